"""The preprocessing-only demo (``make demo-preprocess``): generate a clickstream, preprocess it,
run the quality gates. (``make demo`` runs the whole Airflow DAG: ``dags/run_demo.py``.)

    python -m dags.preprocess_demo --events 200000 --data-dir data/demo-preprocess

1. :mod:`spark_jobs.generate` writes a YOOCHOOSE-like synthetic clickstream
   (daily Parquet partitions) under ``DATA_DIR/raw``;
2. :mod:`spark_jobs.preprocess` sessionizes it per user (30-min idle gap),
   filters (item support >= 5, session length >= 2, to a fixed point), and
   writes the GRU4Rec time split (last day = test) plus recent fractions to
   ``DATA_DIR/processed``;
3. the Great Expectations gates validate every hand-over and build Data Docs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dags.preprocess_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--days", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data/demo-preprocess")
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from spark_jobs import generate
    from spark_jobs.preprocess import PreprocessConfig, run, summary

    t0 = time.perf_counter()
    raw = os.path.join(args.data_dir, "raw")
    print(f"[1/3] generating {args.events:,} events over {args.days} days -> {raw}")
    generate.write(raw, args.events, n_days=args.days, seed=args.seed)
    out = os.path.join(args.data_dir, "processed")
    print(f"[2/3] Spark preprocessing -> {out}")
    cfg = PreprocessConfig(input=[raw], format="synthetic", out=out, split="time", test_days=1,
                           min_item_support=5, min_session_length=2)
    manifest = run(cfg)
    print(summary(manifest))
    print("[3/3] data-quality gates (Great Expectations)")
    from expectations.runner import gates_for_demo

    docs = gates_for_demo(out)
    print(f"all gates passed; Data Docs: {os.path.abspath(docs)}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
