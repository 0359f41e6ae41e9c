"""Device and CPU-thread choice for training and evaluation (detected, never assumed)."""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("training")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when present, else CPU; otherwise the torch device string as given
    (``cpu``, ``cuda``, ``cuda:1``). Asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available (use 'auto' or 'cpu')")
    return dev


def pick_threads(requested: int, cpus: int | None = None, load: float | None = None) -> int:
    """CPU threads for training: ``requested`` when > 0; otherwise ("auto") every core that is
    not already busy. Threads that share a core with another process spin-wait at every
    parallel region: on 2 cores with another job running, 2 threads measured 20x slower than 1
    (benchmarks/README_gru4rec.md), so auto never oversubscribes."""
    if requested > 0:
        return requested
    cpus = cpus or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    n = max(1, min(cpus, int(cpus - load + 0.5)))
    log.info("num_threads=auto: %d of %d cores (1-min load average %.1f)", n, cpus, load)
    return n
