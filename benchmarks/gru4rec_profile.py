"""Profile GRU4Rec training steps on CPU (where does the time go?).

Run: python -m benchmarks.gru4rec_profile SPLIT_DIR [--steps 600] [--set key=value ...]
        [--threads N] [--profile | --kernels | --phases]
Prints events/s for a few hundred steps (after a warm-up epoch) and, with --profile, the
torch.profiler op table (torch ops only: the C kernels are invisible to it), with
--kernels, the CPU time per step spent in each fused C kernel (training/native/kernels.c), or, with
--phases, the wall time per step of each phase of the whole-step C path (rnn_train_chunk;
RNNREC_NATIVE_CHUNK=0 turns that path off, to profile the per-step path instead).
"""
from __future__ import annotations

import argparse
import time

import torch

from training.config import resolve_config
from training.data import read_events, read_item_index, table_support
from training.families import gru4rec
from training.family import TrainContext
from training.trainer import make_runner


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--phases", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = resolve_config("gru4rec", None, None, a.set)
    idx = read_item_index(a.data)
    data = read_events(a.data, cfg.train_table, idx)
    sup = table_support(data, idx.n_items)
    fam = gru4rec.GRU4RecFamily(cfg, TrainContext(idx, data, sup, torch.device("cpu")))
    fam.init_weights(torch.Generator().manual_seed(cfg.seed))
    gru4rec.CHUNK = a.steps
    # cut the epoch short by shrinking the data to ~steps*batch events
    import numpy as np
    keep = int(np.searchsorted(data.offsets, a.steps * cfg.batch_size * 1.4))
    data.offsets = data.offsets[: keep + 1]
    data.session_ids = data.session_ids[:keep]
    data.start_ts = data.start_ts[:keep]
    fam = make_runner(fam, cfg, torch.device("cpu"))  # the epoch runner of cfg.train_path
    print(f"train_path={fam.path}")
    fam.run_epoch(0)  # warm-up
    if a.kernels and getattr(getattr(fam, "step", None), "native", None) is not None:
        import collections
        lib, spent, calls = fam.step.native, collections.Counter(), collections.Counter()

        class Timed:  # wraps every kernel call with a CPU-time counter
            def __getattr__(self, name):
                f = getattr(lib, name)

                def call(*args):
                    t = time.process_time()
                    r = f(*args)
                    spent[name] += time.process_time() - t
                    calls[name] += 1
                    return r
                return call
        fam.step.native = Timed()
        c0 = time.process_time()
        st = fam.run_epoch(1)
        cpu = time.process_time() - c0
        print(f"cpu_ms_per_step={cpu / st['steps'] * 1e3:.3f} events_per_cpu_s={st['events'] / cpu:.0f}")
        for name in sorted(spent, key=spent.get, reverse=True):
            print(f"  {name:22s} {calls[name] / st['steps']:.0f} call(s)/step "
                  f"{spent[name] / st['steps'] * 1e6:8.1f} us/step")
        print(f"  {'(torch ops + Python)':22s}            "
              f"{(cpu - sum(spent.values())) / st['steps'] * 1e6:8.1f} us/step")
    elif a.phases:
        import ctypes
        if getattr(getattr(fam, "step", None), "chunk", None) is None:
            raise SystemExit("--phases: this configuration does not run the whole-step C path")
        lib = fam.step.native
        times = (ctypes.c_double * 36)()
        lib.rnn_chunk_profile(1, None)
        st = fam.run_epoch(1)
        lib.rnn_chunk_profile(0, ctypes.addressof(times))
        names = ["A coalesce, state reset, input rows", "C GRU forward products",
                 "D scores + softmax", "E output-layer gradient products", "F GRU backward",
                 "G1 input-row grads, dense Adagrad", "G2 Wy/By row Adagrad", "B gather of the output rows",
                 "C GRU forward gates"]
        order = [0, 7, 1, 8, 2, 3, 4, 5, 6]  # the order they run in
        tot = sum(times[:9])
        n = st["steps"]
        print(f"wall per step: {st['seconds'] / n * 1e6:.1f} us, of which in the phases {tot / n * 1e6:.1f} us "
              f"(busy: the time each thread worked before the phase's barriers; the rest it waited)")
        print(f"  {'phase':38s} {'wall us/step':>12s} {'share':>6s} {'busy t0':>8s} {'busy t1':>8s}")
        for k in order:
            print(f"  {names[k]:38s} {times[k] / n * 1e6:12.1f} {100 * times[k] / tot:5.1f}% "
                  f"{times[12 + k] / n * 1e6:8.1f} {times[24 + k] / n * 1e6:8.1f}")
    elif a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            st = fam.run_epoch(1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    else:
        c0 = time.process_time()
        st = fam.run_epoch(1)
        cpu = time.process_time() - c0
        print(f"cpu_seconds={cpu:.2f} events_per_cpu_s={st['events'] / cpu:.0f}")
    from benchmarks.machine import cpu_label
    print(f"machine: {cpu_label()}; train_path: {fam.path}")
    print(f"threads={torch.get_num_threads()} events={st['events']} steps={st['steps']} "
          f"sec={st['seconds']:.2f} events/s={st['events_per_s']:.0f}")


if __name__ == "__main__":
    main()
