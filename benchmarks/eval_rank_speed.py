"""The evaluation's fused ranking pass against the torch ranking it replaced (issue 13).

Run: python -m benchmarks.eval_rank_speed [--rows 512] [--items 2933 40000] [--threads 2] [--reps 20]

For each catalogue size, random float32 scores ``[rows, items]`` plus a bias and 20 next items per
row are ranked by ``evaluation.loop.rank_rows_native`` (one C pass: top-21 values and items, the
next items' scores, the target's exact greater / ties counts) and by the torch ops of the
non-native loop for the same outputs: ``S + b``, ``topk(21)``, the gather of the next items and
the two comparison passes (``evaluation.metrics.greater_and_ties``) for the rows whose target is
not in the top 21 (all rows of random scores but ~21 / items of them). Prints the best-of-
``--reps`` seconds of each and their ratio, with the CPU (``benchmarks.machine``).
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.machine import cpu_label


def best_seconds(f, reps: int) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--items", type=int, nargs="+", default=[2933, 40000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    from evaluation.loop import rank_lib, rank_rows_native
    from evaluation.metrics import greater_and_ties

    torch.set_num_threads(a.threads)
    lib = rank_lib("cpu")
    if lib is None:
        raise SystemExit("the C kernels are unavailable (training.native.why_not()); nothing to compare")
    print(f"machine: {cpu_label()}; threads {a.threads}; rows {a.rows}; best of {a.reps}")
    g = torch.Generator().manual_seed(0)
    for n in a.items:
        S = torch.randn(a.rows, n, generator=g)
        b = torch.randn(n, generator=g)
        fut = torch.randint(0, n, (a.rows, 20), generator=g)

        def torch_rank():
            V = S + b
            tv, tix = torch.topk(V, 21, dim=1)
            fs = V.gather(1, fut)
            far = torch.nonzero((tv >= fs[:, :1]).sum(1) >= 21).squeeze(1)
            greater_and_ties(V[far], fut[far, 0], check_nan=False)

        tn = best_seconds(lambda: rank_rows_native(lib, S, b, fut, 21), a.reps)
        tt = best_seconds(torch_rank, a.reps)
        print(f"items {n:>7,}: fused C pass {tn * 1e3:7.2f} ms, torch ranking {tt * 1e3:7.2f} ms, "
              f"ratio {tt / tn:.2f}x")


if __name__ == "__main__":
    main()
