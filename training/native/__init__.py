"""Build and load the fused C kernels of the GRU4Rec training step (training/native/kernels.c).

The kernels are compiled on first use with the machine's C compiler (``$CC``, default
``gcc``; about a second) into a cache folder keyed by the source, the flags and the CPU,
and loaded with ctypes: no torch C++ extension toolchain is needed. When no compiler is
available, compilation fails, or ``RNNREC_NATIVE=0`` is set, :func:`load` returns ``None``
and the trainer uses its pure-torch step (same mathematics, slower on CPU) after one
warning that says why.

Cache folder: ``$RNNREC_NATIVE_CACHE``, default ``~/.cache/rnnrec/native``.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SRC = Path(__file__).with_name("kernels.c")
# -fno-math-errno / -fno-trapping-math let gcc vectorise sqrtf and the clamps of the exp
# (errno and FP traps are never used here); fused multiply-adds are allowed (results differ
# from the torch step in the last bits only). No -ffast-math: NaN must still propagate so the
# kernels' NaN checks keep working.
# -fopenmp: the kernels use the OpenMP runtime torch already loaded (libgomp.so.1, same
# soname, so one thread pool; torch.set_num_threads sets its size).
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math",
          "-fopenmp", "-std=c11", "-shared", "-fPIC"]

_lib = None
_tried = False
_why = ""

# pointers travel as plain addresses (tensor.data_ptr()): cheaper per call than ctypes casts
f32p = i64p = u8p = ctypes.c_void_p


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> Path:
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler {cc!r} on PATH")
    src = SRC.read_bytes()
    key = hashlib.sha256(src + " ".join([cc] + CFLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("RNNREC_NATIVE_CACHE", Path.home() / ".cache" / "rnnrec" / "native"))
    out = cache / f"gru4rec_kernels_{key}.so"
    if out.exists():
        return out
    from spark_jobs.contract import atomic_write

    def compile_to(tmp):
        r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SRC), "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SRC}:\n{r.stderr[-2000:]}")

    atomic_write(out, compile_to)  # concurrent builders never load a half-written file
    return out


def load():
    """The loaded kernel library, or None (with the reason in :func:`why_not`)."""
    global _lib, _tried, _why
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("RNNREC_NATIVE", "1") == "0":
        _why = "disabled by RNNREC_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except Exception as e:  # noqa: BLE001 - any failure means: use the torch step
        _why = f"{type(e).__name__}: {e}"
        log.warning("fused CPU kernels unavailable (%s); using the pure-torch training step", _why)
        return None
    lib.rnn_coalesce2.restype = ctypes.c_int64
    lib.rnn_coalesce2.argtypes = [i64p, ctypes.c_int64, i64p, ctypes.c_int64, i64p, i64p, i64p]
    lib.rnn_add_rows.restype = None
    lib.rnn_add_rows.argtypes = [f32p, i64p, f32p, ctypes.c_int64, ctypes.c_int64]
    lib.rnn_xe_softmax.restype = ctypes.c_double
    lib.rnn_xe_softmax.argtypes = [f32p, f32p, i64p, ctypes.c_int64, ctypes.c_int64, i64p, i64p, f32p,
                                   ctypes.c_float, ctypes.c_float, ctypes.c_int64, ctypes.c_float,
                                   f32p, u8p, f32p, f32p]
    lib.rnn_gru_gates_fwd.restype = None
    lib.rnn_gru_gates_fwd.argtypes = [f32p, f32p, f32p, f32p, f32p, f32p, ctypes.c_int64, ctypes.c_int64,
                                      f32p, f32p, f32p, f32p, f32p]
    lib.rnn_gru_gates_bwd.restype = None
    lib.rnn_gru_gates_bwd.argtypes = [f32p, f32p, f32p, f32p, f32p, f32p, f32p, ctypes.c_int64,
                                      ctypes.c_int64, f32p, f32p, f32p, f32p]
    lib.rnn_adagrad_rows.restype = None
    lib.rnn_adagrad_rows.argtypes = [f32p, f32p, f32p, i64p, u8p, ctypes.c_int64, ctypes.c_int64,
                                     f32p, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int]
    lib.rnn_mm_jobs.restype = ctypes.c_int
    lib.rnn_mm_jobs.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.rnn_set_blas.restype = None
    lib.rnn_set_blas.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.rnn_train_chunk.restype = ctypes.c_int64
    lib.rnn_train_chunk.argtypes = [ctypes.c_void_p, ctypes.c_int64, i64p, i64p, i64p, f32p, f32p,
                                    ctypes.c_void_p, ctypes.c_void_p, f32p]
    lib.rnn_rand_mask.restype = None
    lib.rnn_rand_mask.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_float,
                                  ctypes.c_float, f32p]
    lib.rnn_alias_draw.restype = None
    lib.rnn_alias_draw.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p,
                                   i64p, ctypes.c_int64, i64p]
    lib.rnn_rank_rows.restype = ctypes.c_int64
    lib.rnn_rank_rows.argtypes = [f32p, f32p, ctypes.c_int64, ctypes.c_int64, i64p, i64p, ctypes.c_int64,
                                  ctypes.c_int64, f32p, i64p, f32p, ctypes.c_void_p, ctypes.c_void_p]
    lib.rnn_chunk_profile.restype = None
    lib.rnn_parallel_slots.restype = ctypes.c_int
    lib.rnn_parallel_slots.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_void_p]
    lib.rnn_chunk_profile.argtypes = [ctypes.c_int, ctypes.c_void_p]
    lib.has_blas = _hand_over_blas(lib)
    _lib = lib
    return lib


def _hand_over_blas(lib) -> bool:
    """Give the kernels torch's own MKL ``sgemm_`` (exported by libtorch_cpu); False if absent."""
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        sgemm = ctypes.cast(torch_cpu.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        log.info("torch's MKL sgemm_ not found: the step's products stay in torch")
        return False
    # (not mkl_set_num_threads_local: it crashes the interpreter at exit; inside the two-thread
    # region MKL runs single-threaded by itself)
    lib.rnn_set_blas(sgemm, None)
    return True


class MatmulJobs:
    """Row-major products run by ``rnn_mm_jobs``: two groups, one per core (see kernels.c).

    A job is ``(ta, tb, M, N, K, A, B, C)`` with byte addresses: ``C[M,N] = op(A) @ op(B)``,
    ``ta``: A is stored ``[K, M]``; ``tb``: B is stored ``[N, K]``. All buffers contiguous float32.
    """

    def __init__(self, lib, capacity: int = 8):
        self.lib = lib
        self.buf = (ctypes.c_int64 * (8 * capacity))()
        self.addr = ctypes.addressof(self.buf)

    def run(self, jobs: list[tuple], split: int) -> None:
        b = self.buf
        for i, j in enumerate(jobs):
            b[8 * i:8 * i + 8] = j
        if self.lib.rnn_mm_jobs(len(jobs), split, self.addr) != 0:
            raise RuntimeError("rnn_mm_jobs: no BLAS was handed over")


MAXL = 8  # RNN_MAXL in kernels.c


class ChunkCtx(ctypes.Structure):
    """Mirror of ``rnn_ctx`` in kernels.c: sizes, parameter / optimizer-state / scratch addresses
    and hyperparameters of :func:`rnn_train_chunk` (the whole-step path)."""

    _fields_ = [(k, ctypes.c_int64) for k in ("B", "S", "L", "n_items", "D", "n_flat", "nesterov")] + [
        ("H", ctypes.c_int64 * MAXL)] + [
        (k, ctypes.c_void_p) for k in ("Wy", "By", "Wy_acc", "Wy_mom", "By_acc", "By_mom",
                                       "flat", "gflat", "dacc", "dmom")] + [
        (k, ctypes.c_void_p * MAXL) for k in ("W_ih", "W_hh", "b_ih", "b_hh",
                                              "gW_ih", "gW_hh", "gb_ih", "gb_hh")] + [
        (k, ctypes.c_void_p) for k in ("logp", "eq_in", "eq_ex", "slot")] + [
        (k, ctypes.c_float) for k in ("lr", "eps", "momentum", "w_in", "w_extra", "inv_b")] + [
        (k, ctypes.c_int64) for k in ("loss_kind", "act_kind")] + [
        (k, ctypes.c_float) for k in ("act_alpha", "bpreg")]

#: rnn_ctx.loss_kind / act_kind (kernels.c)
LOSS_KINDS = {"cross-entropy": 0, "bpr-max": 1}
ACT_LINEAR, ACT_ELU = 0, 1


def why_not() -> str:
    return _why


def ptr(t: torch.Tensor | None):
    """Address of a contiguous CPU tensor's data (None -> NULL)."""
    if t is None:
        return None
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError("the fused kernels need contiguous CPU tensors")
    return t.data_ptr()


def check_tensor(name: str, t: torch.Tensor | None, dtype: torch.dtype, shape: tuple) -> None:
    """Raise ValueError (naming the argument) unless ``t`` is a contiguous CPU tensor of this
    dtype and shape: checked before its address is handed to C."""
    if t is None:
        raise ValueError(f"{name}: expected a {dtype} tensor of shape {tuple(shape)}, got None")
    if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous CPU {dtype} tensor of shape {tuple(shape)}, got "
                         f"{t.device.type} {t.dtype} {tuple(t.shape)}{'' if t.is_contiguous() else ' (strided)'}")
