"""Counter-based random streams: GRU4Rec's negative samples and dropout masks.

Value ``i`` of a stream is splitmix64's output for the counter ``key + (i + 1) * GOLDEN``
(Steele, Lea & Flood 2014): a pure function of (key, position), so the draws do not depend
on the thread count, on how a chunk is split, or on which code computes them. The fused C
kernels (``training/native/kernels.c`` ``rnn_rand_mask`` / ``rnn_alias_draw``, OpenMP) and
the numpy code here give the same bits (tested); numpy is the reference and the fallback when
the kernels are unavailable.

Why not ``torch.rand`` with a ``torch.Generator`` (what GRU4Rec used before): drawing one
epoch's 2048 negatives per step (randint + float64 rand + the alias gather) and the dropout
masks took 11-14 % of a training epoch on the official settings (issue 13, 2-core Xeon:
rsc15 ~70 us of a 460 us step, retailrocket ~270 us of a 2.1 ms step); the C draws take a
small fraction of that.

Streams are keyed by ``(seed, epoch, purpose)`` (:func:`stream_key`), so an epoch's
randomness never depends on earlier epochs, and the samples' stream never on the masks'.

Draws:

* :meth:`CounterStream.mask` -- inverted-dropout mask: ``u >= p`` -> ``scale`` (float32
  ``1 / (1 - p)``), else 0, with ``u = (z >> 40) * 2^-24`` (24 random bits: every float32 in
  [0, 1) on that grid, exactly what ``torch.rand`` provides for float32).
* :meth:`CounterStream.alias` -- Walker alias draws: bucket ``((z >> 32) * n) >> 32`` (the
  multiply-shift map of 32 random bits onto [0, n): bias below n / 2^32, i.e. < 1e-5 for a
  million items), ``u = (z mod 2^32) * 2^-32``; the item is the bucket if ``u < prob[bucket]``
  else ``alias[bucket]``.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

log = logging.getLogger("training")

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

#: stream purposes (the third part of a key)
SAMPLES, DROPOUT = 1, 2


def stream_key(*parts: int) -> int:
    """A 64-bit key from integers (e.g. seed, epoch, purpose): each part folded in by one
    splitmix64 round (the first value of the stream keyed by the key so far xor the part), so
    nearby tuples give unrelated keys."""
    k = 0
    for p in parts:
        k = int(raw(k ^ (int(p) & M64), 0, 1)[0])
    return k


def raw(key: int, start: int, n: int) -> np.ndarray:
    """The stream's 64-bit values at positions ``start .. start + n - 1`` (numpy reference)."""
    ctr = np.arange(start + 1, start + n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(key) + ctr * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * _C1
        z = (z ^ (z >> np.uint64(27))) * _C2
    return z ^ (z >> np.uint64(31))


def mask_numpy(key: int, start: int, n: int, p: float, scale: float) -> np.ndarray:
    u = (raw(key, start, n) >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)
    return np.where(u >= np.float32(p), np.float32(scale), np.float32(0.0))


def alias_numpy(key: int, start: int, n: int, prob: np.ndarray, alias: np.ndarray) -> np.ndarray:
    z = raw(key, start, n)
    b = (((z >> np.uint64(32)) * np.uint64(len(prob))) >> np.uint64(32)).astype(np.int64)
    u = (z & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0 ** -32
    return np.where(u < prob[b], b, alias[b])


def _native():
    if os.environ.get("RNNREC_NATIVE_RNG", "1") == "0":
        return None
    from training import native
    return native.load()


class CounterStream:
    """One random stream; each draw consumes as many positions as it returns values."""

    def __init__(self, *key_parts: int):
        self.key = stream_key(*key_parts)
        self.pos = 0
        self.lib = _native()

    def _take(self, n: int) -> int:
        s = self.pos
        self.pos += n
        return s

    def mask(self, shape: tuple, p: float) -> torch.Tensor:
        """float32 inverted-dropout mask of ``shape`` (drop probability ``p`` in [0, 1))."""
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        n = int(np.prod(shape))
        scale = float(np.float32(1.0 / (1.0 - p)))
        start = self._take(n)
        if self.lib is not None:
            out = torch.empty(shape, dtype=torch.float32)
            self.lib.rnn_rand_mask(self.key, start, n, p, scale, out.data_ptr())
            return out
        return torch.from_numpy(mask_numpy(self.key, start, n, p, scale).reshape(shape))

    def alias(self, n: int, prob: torch.Tensor, alias: torch.Tensor) -> torch.Tensor:
        """``n`` int64 draws from the alias tables (``prob`` float64, ``alias`` int64, CPU)."""
        start = self._take(n)
        if self.lib is not None:
            prob, alias = prob.contiguous(), alias.contiguous()
            out = torch.empty(n, dtype=torch.int64)
            self.lib.rnn_alias_draw(self.key, start, n, prob.data_ptr(), alias.data_ptr(), len(prob),
                                    out.data_ptr())
            return out
        return torch.from_numpy(alias_numpy(self.key, start, n, prob.numpy(), alias.numpy()))
