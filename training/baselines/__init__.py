"""Baselines the papers compare against (one module each; registered in training/registry.py)."""
