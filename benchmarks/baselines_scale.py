"""Scale benchmark of the cheap baselines: fit + full-ranking evaluation of the test day.

Run (from the repository root; sizes accept k/M suffixes)::

    .venv/bin/python -m benchmarks.baselines_scale --sizes 1M,10M,31.7M [--models itemknn,vsknn]

For every size it (1) generates the YOOCHOOSE-like clickstream (``spark_jobs.generate``,
cached under ``--work-dir`` exactly as ``benchmarks.preprocess_scale`` does, same seed),
(2) preprocesses it with the Spark job into the same split as the preprocessing
benchmark (30-minute sessions by user, item support >= 5, sessions >= 2 events, GRU4Rec
time split with 1 test day; cached), then for each model (3) fits it on ``train_full``
(``python -m training.train``) and (4) evaluates the test day with full ranking over all
training items (``python -m evaluation.evaluate``), each in its own subprocess with
``--threads`` torch threads. Measured per step: wall time and peak RSS of the process
tree (psutil, every 0.2 s), plus the evaluator's own loop seconds and Recall@20/MRR@20.

Results are merged into ``benchmarks/results/baselines_scale.json`` and rendered as the
table in ``benchmarks/README_baselines.md``. A long measurement: never part of the tests.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_label  # noqa: E402
from benchmarks.preprocess_scale import (DEFAULT_FILTERS, ensure_input, label, parse_size, run_measured,  # noqa: E402
                                         spark_command)

RESULTS = ROOT / "benchmarks" / "results" / "baselines_scale.json"
README = ROOT / "benchmarks" / "README_baselines.md"
MARK_BEGIN, MARK_END = "<!-- scale-table:begin -->", "<!-- scale-table:end -->"


def ensure_split(work: Path, n: int, seed: int, timeout_s: float) -> Path:
    inp, _ = ensure_input(work, n, seed, timeout_s)
    out = work / f"prep-{label(n)}-seed{seed}"
    split = out / "splits" / "time"
    if not (split / "test").exists():
        print(f"[{label(n)}] preprocessing -> {out}", flush=True)
        res = run_measured(spark_command(inp, out, DEFAULT_FILTERS), work / "logs" / f"prep-{label(n)}.log", timeout_s)
        if res["rc"] != 0:
            raise SystemExit(f"preprocess failed (rc {res['rc']}), see {res['log']}")
        print(f"[{label(n)}] preprocessed in {res['wall_s']} s", flush=True)
    return split


def measure(model: str, split: Path, work: Path, n: int, threads: int, timeout_s: float) -> dict:
    run = work / "runs" / f"{model}-{label(n)}"
    ev = work / "runs" / f"eval-{model}-{label(n)}"
    fit = run_measured([sys.executable, "-m", "training.train", "--model", model, "--data", str(split),
                        "--out", str(run), "--set", f"num_threads={threads}"],
                       work / "logs" / f"fit-{model}-{label(n)}.log", timeout_s)
    if fit["rc"] != 0:
        return {"fit": fit, "error": f"fit failed, see {fit['log']}"}
    env_threads = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    evr = run_measured([sys.executable, "-m", "evaluation.evaluate", "--model-dir", str(run), "--data", str(split),
                        "--out", str(ev)], work / "logs" / f"eval-{model}-{label(n)}.log", timeout_s,
                       env={**os.environ, **env_threads})
    if evr["rc"] != 0:
        return {"fit": fit, "eval": evr, "error": f"eval failed, see {evr['log']}"}
    m = json.loads((ev / "metrics.json").read_text())
    return {"fit": fit, "eval": evr, "train_events": json.loads((run / "history.json").read_text())["run"]["train_events"],
            "n_items": m["n_items_ranked"], "test_events": m["n_events"], "eval_loop_s": m["eval_seconds"],
            "recall_at_20": m["recall_at_20"], "mrr_at_20": m["mrr_at_20"], "model_bytes": m.get("model_bytes")}


def render(results: dict) -> str:
    rows = ["| events | model | train events | items | test events | fit s | fit peak GB | eval s (loop s) | "
            "eval peak GB | R@20 | MRR@20 | CPU | date |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for key in sorted(results, key=lambda k: (results[k]["events"], results[k]["model"])):
        r = results[key]
        if "error" in r:
            rows.append(f"| {label(r['events'])} | {r['model']} | — | — | — | {r['fit']['wall_s']} | — | — | — | — | — | "
                        f"{r['cpu']} | {r['date']} | ({r['error']})")
            continue
        rows.append(f"| {label(r['events'])} | {r['model']} | {r['train_events']:,} | {r['n_items']:,} | "
                    f"{r['test_events']:,} | {r['fit']['wall_s']:.1f} | {r['fit']['peak_rss_mb'] / 1024:.2f} | "
                    f"{r['eval']['wall_s']:.1f} ({r['eval_loop_s']:.1f}) | {r['eval']['peak_rss_mb'] / 1024:.2f} | "
                    f"{r['recall_at_20']:.4f} | {r['mrr_at_20']:.4f} | {r['cpu']} | {r['date']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,10M,31.7M")
    ap.add_argument("--models", default="itemknn,vsknn")
    ap.add_argument("--work-dir", default="/tmp/rnnrec-bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    a = ap.parse_args(argv)
    work = Path(a.work_dir)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for n in map(parse_size, a.sizes.split(",")):
        split = ensure_split(work, n, a.seed, a.timeout)
        for model in a.models.split(","):
            print(f"[{label(n)}] {model}: fit + eval", flush=True)
            r = measure(model, split, work, n, a.threads, a.timeout)
            r.update(events=n, model=model, threads=a.threads, cpu=cpu_label(), date=dt.date.today().isoformat(),
                     command="python -m benchmarks.baselines_scale " + " ".join(argv or sys.argv[1:]))
            results[f"{label(n)}/{model}"] = r
            print(json.dumps(r, indent=1), flush=True)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    table = render(results)
    if README.exists():
        text = README.read_text()
        if MARK_BEGIN in text and MARK_END in text:
            head, rest = text.split(MARK_BEGIN, 1)
            text = head + MARK_BEGIN + "\n" + table + "\n" + MARK_END + rest.split(MARK_END, 1)[1]
            README.write_text(text)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
