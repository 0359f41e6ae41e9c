"""GRU4Rec training memory against the number of training events (issue 13).

Run: python -m benchmarks.gru4rec_memory [--split SPLIT_DIR] [--copies 1 2 4 8 16]
        [--settings rsc15 diginetica] [--epochs 2] [--threads 2] [--out JSON]

The training table (``train_full`` of SPLIT_DIR, default the rsc15-100k split) is repeated
``k`` times (each copy's sessions get new ids and start ``k x`` the table's time span later),
and one child process per (setting, k) trains on it with the default training path for
``--epochs`` epochs. Each child reports:

* ``data_mb``: the bytes of the training table's arrays (items, offsets, ids, times);
* ``rss_before_mb``: resident memory after the data is loaded and the model, optimizer state and
  C kernels are set up, before the first epoch;
* ``rss_after_epoch_mb``: resident memory after each epoch (must not creep from epoch to epoch);
* ``peak_rss_mb``: the process's peak (``ru_maxrss``).

The report fits ``peak - before = a + b x events`` by least squares and prints ``b`` in bytes
per training event, next to what an epoch needs by construction: the slot assignment of the
session-parallel schedule (six int64 per session) and one chunk of 256 steps (inputs, targets,
masks, negatives), since the schedule is built chunk by chunk (``training.batching.
StreamedSchedule``) and the negatives are drawn per chunk (no 10M-id store). Anything above that
grows with the data for no reason (per-step loss lists, leaked chunks, a whole-epoch schedule).

Children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (``--glibc-default`` turns it off): glibc's
default raises its mmap threshold after the first large free, after which freed blocks of tens of
MB stay in the heap and RSS says little about what the code holds (measured: after one epoch,
x16, 601 MB with the default vs 455 MB with the fixed threshold, same code).

Settings: the official best parameter files' values (``rsc15_xe_shared_100_best``,
``diginetica_bprmax_shared_best``; key mapping in benchmarks/README_gru4rec.md).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "rsc15": ["loss=cross-entropy", "final_act=softmax", "layers=[100]", "batch_size=32",
              "dropout_embed=0.0", "dropout_hidden=0.4", "learning_rate=0.2", "momentum=0.2",
              "n_sample=2048", "sample_alpha=0.5", "logq=1.0", "bpreg=0.0", "embedding=tied"],
    "diginetica": ["loss=bpr-max", "final_act=elu-1", "layers=[512]", "batch_size=128",
                   "dropout_embed=0.5", "dropout_hidden=0.3", "learning_rate=0.05", "momentum=0.15",
                   "n_sample=2048", "sample_alpha=0.3", "logq=0.0", "bpreg=0.9", "embedding=tied"],
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def repeat_table(data, k: int):
    """``data`` repeated k times: copy j's sessions get ids + j * (max id + 1) and times
    + j * (time span + 1 s), so every copy is a distinct, later stretch of sessions."""
    from training.data import SessionData
    n_ev, n_s = len(data.items), data.n_sessions
    span = int(data.end_ts - data.start_ts.min()) + 1_000_000
    sid_step = int(data.session_ids.max()) + 1
    shift_s = np.repeat(np.arange(k, dtype=np.int64), n_s)
    shift_e = np.repeat(np.arange(k, dtype=np.int64), n_ev)
    lens = np.tile(np.diff(data.offsets), k)
    return SessionData(
        items=np.tile(data.items, k),
        offsets=np.r_[0, np.cumsum(lens)].astype(np.int64),
        session_ids=np.tile(data.session_ids, k) + shift_s * sid_step,
        start_ts=np.tile(data.start_ts, k) + shift_s * span,
        user_ids=None,
        end_ts_per_session=(np.tile(data.end_ts_per_session, k) + shift_s * span
                            if data.end_ts_per_session is not None else None),
        ts=np.tile(data.ts, k) + shift_e * span if data.ts is not None else None)


def child(split: Path, setting: str, copies: int, epochs: int, threads: int) -> dict:
    import torch

    from training.config import resolve_config
    from training.data import read_events, read_item_index, table_support
    from training.families import gru4rec
    from training.family import TrainContext
    from training.trainer import make_runner

    torch.set_num_threads(threads)
    cfg = resolve_config("gru4rec", None, None, SETTINGS[setting] + [f"num_threads={threads}", "seed=1"])
    idx = read_item_index(split)
    data = repeat_table(read_events(split, cfg.train_table, idx), copies)
    data_mb = sum(a.nbytes for a in (data.items, data.offsets, data.session_ids, data.start_ts,
                                     data.ts, data.end_ts_per_session) if a is not None) / 2 ** 20
    sup = table_support(data, idx.n_items)
    fam = gru4rec.GRU4RecFamily(cfg, TrainContext(idx, data, sup, torch.device("cpu")))
    fam.init_weights(torch.Generator().manual_seed(cfg.seed))
    runner = make_runner(fam, cfg, torch.device("cpu"))
    before = _rss_mb()
    after, stats = [], []
    for e in range(epochs):
        st = runner.run_epoch(e)
        after.append(round(_rss_mb(), 1))
        stats.append({k: st[k] for k in ("events", "steps", "seconds", "events_per_s")})
    from benchmarks.machine import cpu_label
    return {"setting": setting, "copies": copies, "events": int(data.n_events), "sessions": int(data.n_sessions),
            "train_path": runner.path, "batch_size": cfg.batch_size, "n_sample": cfg.n_sample,
            "sample_store_size": cfg.sample_store_size, "data_mb": round(data_mb, 2),
            "rss_before_mb": round(before, 1), "rss_after_epoch_mb": after,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "epochs": stats, "threads": threads, "machine": cpu_label()}


def run_child(split: Path, setting: str, copies: int, epochs: int, threads: int,
              glibc_default: bool = False) -> dict:
    """:func:`child` in a fresh process (its own peak RSS); raises with the child's stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gru4rec_memory", "--split", str(split),
                        "--epochs", str(epochs), "--threads", str(threads), "--child", setting, str(copies)],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"child {setting} x{copies} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def expected_schedule_mb(r: dict) -> float:
    """What an epoch needs by construction (module docstring): the slot assignment (six int64
    per session: order, steps, slot, first step, end step, prefix max) and one chunk of 256 steps
    (inputs + targets int64, reset bool, keep float32 per step-slot, the negatives int64)."""
    chunk = 256 * (r["batch_size"] * (8 + 8 + 1 + 4) + r["n_sample"] * 8)
    return (r["sessions"] * 6 * 8 + chunk) / 2 ** 20


def fit(rows: list[dict]) -> dict:
    x = np.array([r["events"] for r in rows], float)
    y = np.array([r["peak_rss_mb"] - r["rss_before_mb"] for r in rows], float)
    if len(rows) < 2:
        return {}
    b, a = np.polyfit(x, y, 1)
    return {"intercept_mb": round(float(a), 1), "bytes_per_event": round(float(b) * 2 ** 20, 1)}


def table(rows: list[dict]) -> str:
    out = ["| setting | copies | events | data MB | RSS before MB | RSS after each epoch MB | peak MB | "
           "peak - before MB | slot assignment + one chunk MB (by construction) | events/s |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['setting']} | {r['copies']} | {r['events']:,} | {r['data_mb']:.1f} | "
                   f"{r['rss_before_mb']:.0f} | {' / '.join(f'{v:.0f}' for v in r['rss_after_epoch_mb'])} | "
                   f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_before_mb']:.0f} | "
                   f"{expected_schedule_mb(r):.0f} | {r['epochs'][-1]['events_per_s']:,.0f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in sorted({r["setting"] for r in rows}):
        rr = [r for r in rows if r["setting"] == s]
        ev = [r["events"] / 1e6 for r in rr]
        ax.plot(ev, [r["peak_rss_mb"] for r in rr], "o-", label=f"{s}: peak RSS")
        ax.plot(ev, [r["rss_before_mb"] for r in rr], "s--", label=f"{s}: before training")
        ax.plot(ev, [r["rss_before_mb"] + expected_schedule_mb(r) for r in rr], ":",
                label=f"{s}: before + slot assignment + one chunk")
    ax.set_xlabel("training events (millions)")
    ax.set_ylabel("MB")
    ax.set_title("GRU4Rec training memory vs data size (rsc15-100k train_full repeated)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", type=Path, default=Path("/tmp/rsc15split/splits/time"))
    ap.add_argument("--settings", nargs="+", default=["rsc15", "diginetica"], choices=sorted(SETTINGS))
    ap.add_argument("--copies", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--max-events-512", type=int, default=600_000,
                    help="skip 512-unit runs above this many events (they take ~1 min per 1M events)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gru4rec_memory.json")
    ap.add_argument("--glibc-default", action="store_true",
                    help="leave glibc's dynamic mmap threshold on in the children (module docstring)")
    ap.add_argument("--child", nargs=2, metavar=("SETTING", "COPIES"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.split, a.child[0], int(a.child[1]), a.epochs, a.threads)))
        return
    if not (a.split / "train_full").exists():
        raise SystemExit(f"{a.split}: no train_full table (make the rsc15-100k split first: "
                         "benchmarks/README_gru4rec.md)")
    rows = []
    for s in a.settings:
        for k in a.copies:
            if s != "rsc15" and k * 70_278 > a.max_events_512:
                continue
            t0 = time.time()
            rows.append(run_child(a.split, s, k, a.epochs, a.threads, a.glibc_default))
            print(f"{s} x{k}: {rows[-1]['events']:,} events, peak {rows[-1]['peak_rss_mb']:.0f} MB "
                  f"({time.time() - t0:.0f} s)", flush=True)
    fits = {s: fit([r for r in rows if r["setting"] == s]) for s in a.settings}
    rep = {"issue": 13, "what": "GRU4Rec training peak RSS against the number of training events",
           "malloc_mmap_threshold": None if a.glibc_default else 131072,
           "command": "python -m benchmarks.gru4rec_memory " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows, "fit": fits,
           "table": table(rows)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rep, indent=1))
    plot(rows, a.out.with_suffix(".png"))
    print(rep["table"])
    for s, f in fits.items():
        if f:
            print(f"{s}: peak - before = {f['intercept_mb']} MB + {f['bytes_per_event']} B x events")


if __name__ == "__main__":
    main()
