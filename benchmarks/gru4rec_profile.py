"""Profile GRU4Rec training steps on CPU (where does the time go?).

Run: python -m benchmarks.gru4rec_profile SPLIT_DIR [--steps 600] [--set key=value ...]
Prints events/s for a few hundred steps of epoch 0 and the torch.profiler op table.
"""
from __future__ import annotations

import argparse
import time

import torch

from training.config import resolve_config
from training.data import read_events, read_item_index, table_support
from training.families import GRU4RecFamily


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = resolve_config("gru4rec", None, None, a.set)
    idx = read_item_index(a.data)
    data = read_events(a.data, cfg.train_table, idx)
    sup = table_support(data, idx.n_items)
    fam = GRU4RecFamily(cfg, idx, data, sup, torch.device("cpu"))
    fam.init_weights(cfg.seed)
    GRU4RecFamily.CHECK_EVERY = a.steps
    # cut the epoch short by shrinking the data to ~steps*batch events
    import numpy as np
    keep = int(np.searchsorted(data.offsets, a.steps * cfg.batch_size * 1.4))
    data.offsets = data.offsets[: keep + 1]
    data.session_ids = data.session_ids[:keep]
    data.start_ts = data.start_ts[:keep]
    fam.run_epoch(0)  # warm-up
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            st = fam.run_epoch(1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    else:
        c0 = time.process_time()
        st = fam.run_epoch(1)
        cpu = time.process_time() - c0
        print(f"cpu_seconds={cpu:.2f} events_per_cpu_s={st['events'] / cpu:.0f}")
    print(f"threads={torch.get_num_threads()} events={st['events']} steps={st['steps']} "
          f"sec={st['seconds']:.2f} events/s={st['events_per_s']:.0f}")


if __name__ == "__main__":
    main()
