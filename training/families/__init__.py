"""RNN model families (one module each; registered in training/registry.py)."""
