"""Peak memory and wall time of the per-event gates (raw_events, sessions) at YOOCHOOSE size.

    .venv/bin/python -m expectations.bench_memory --events 31700000 --work /tmp/gx_bench

Writes a contract-conforming events table (sorted by session, seq; ~3.5 events
per session; Parquet row groups of 1M rows) once, then validates it in a fresh
child process per gate and reports the child's peak RSS (ru_maxrss) and wall
time. Not part of the test suite (minutes at 31.7M events on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spark_jobs import contract as C


def write_events(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lens = rng.geometric(1 / 3.5, size=n // 2 + 10)
    lens = lens[: np.searchsorted(np.cumsum(lens), n) + 1]
    lens[-1] -= lens.sum() - n
    starts = np.cumsum(lens) - lens
    sid = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
    seq = (np.arange(n) - np.repeat(starts, lens)).astype(np.int32)
    t0 = 1_396_310_400 * 1_000_000  # 2014-04-01, YOOCHOOSE's first day
    sess_t = t0 + np.sort(rng.integers(0, 183 * 86_400, size=len(lens))) * 1_000_000
    ts = np.repeat(sess_t, lens) + seq.astype(np.int64) * 60_000_000
    item = (rng.zipf(1.3, size=n) % 50_000).astype(np.int64)
    t = pa.table({"session_id": sid, "user_id": pa.nulls(n, pa.int64()), "item_id": item,
                  "ts": pa.array(ts, pa.timestamp("us", tz="UTC")), "seq": seq}, schema=C.EVENT_SCHEMA)
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, path / "part-00000.parquet", row_group_size=1_000_000)


def child(table: str, suite: str, qdir: str) -> None:
    from expectations.runner import validate_table

    t = time.perf_counter()
    r = validate_table(table, suite, out_dir=qdir, raise_on_failure=False)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(json.dumps({"suite": suite, "success": r.success, "wall_s": round(wall, 1), "peak_rss_mib": round(peak)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=31_700_000)
    ap.add_argument("--work", default="/tmp/gx_bench")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(*a.child)
        return 0
    table = Path(a.work) / f"events_{a.events}"
    if not table.exists():
        t = time.perf_counter()
        write_events(table, a.events)
        print(f"wrote {a.events} events to {table} in {time.perf_counter() - t:.0f} s", flush=True)
    for suite in ("raw_events", "sessions"):
        out = subprocess.run([sys.executable, "-m", "expectations.bench_memory", "--child", str(table), suite,
                              str(Path(a.work) / "quality")], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        print(f"events={a.events} " + out.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
