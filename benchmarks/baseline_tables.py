"""Results tables: every baseline next to GRU4Rec on one real dataset (issue 14).

    python -m benchmarks.baseline_tables --dataset rsc15-100k [--work /tmp/bt] [--out docs/results]
    python -m benchmarks.baseline_tables --dataset diginetica-sample
    python -m benchmarks.baseline_tables --dataset trivago-100k

For one dataset it

1. preprocesses the raw files from ``../shared/data`` with the project's Spark job
   (``spark_jobs.preprocess``; the command per dataset is in ``DATASETS``) into WORK;
2. tunes each baseline on a small grid (``GRIDS``; GRU4Rec: ``GRU4REC_GRID``) **on ``valid`` only**: every grid
   point is trained on ``train`` (which shares no session with ``valid``) and scored on
   ``valid``; the best by ``--select`` (default MRR@20; ties: the first grid point, i.e.
   the paper's default) is kept. ``test`` is never looked at while choosing;
3. refits each baseline with its chosen setting on ``train_full`` and scores ``test``;
   GRU4Rec (its chosen setting) for ``--seeds`` seeds;
4. runs ``evaluation.compare`` with GRU4Rec as the baseline (Recall/MRR @5/@20, 95%
   session-bootstrap CIs, Wilcoxon p) into OUT/<dataset>/, and writes OUT/<dataset>.md
   holding that table, the fit / scoring cost per model, the tuning record
   (OUT/<dataset>/tuning.csv) and the sentences "X beats GRU4Rec on M" wherever a
   baseline's paired CI lies above zero.

Everything runs in this process, one model after another, with ``--threads`` torch
threads, so fit and scoring times are comparable within one run (not across machines).
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

#: dataset -> preprocess arguments (inputs relative to ../shared/data) and a description
DATASETS = {
    "rsc15-100k": {
        "args": ["--input", "rsc15-100k/yoochoose-clicks-100k_train_full.txt", "rsc15-100k/yoochoose-clicks-100k_test.txt",
                 "--format", "gru4rec", "--split", "time", "--test-days", "1"],
        "what": "YOOCHOOSE clicks, first ~100k (GRU4Rec layout), test = last day, valid = the day before",
    },
    "diginetica-sample": {
        "args": ["--input", "diginetica-sample/sample_train-item-views.csv", "--format", "diginetica",
                 "--split", "time", "--test-days", "28", "--valid-days", "28"],
        "what": "DIGINETICA item views (SR-GNN's sample), test = last 28 days, valid = the 28 before "
                "(the sample is sparse: 7 days would leave 117 test sessions)",
    },
    "trivago-100k": {
        "args": ["--input", "trivago-100k/trivago_val_100k.parquet.snappy", "--format", "trivago",
                 "--sessionize-by-user", "--idle-gap-minutes", "30", "--split", "time",
                 "--test-days", "0.5", "--valid-days", "0.5"],
        "what": "trivago RecSys Challenge 2019 sample, item actions, re-sessionized per user at 30 idle "
                "minutes; the sample spans 2 days: test = last 12 h, valid = the 12 h before",
    },
}

#: family -> grid (key -> values); the first value of each key is the family's default
GRIDS: dict[str, dict[str, list]] = {
    "pop": {},
    "spop": {},
    "itemknn": {"n_sims": [100, 300], "lmbd": [20.0, 0.0]},
    "itemknn_td": {"tau_s": [300.0, 60.0, 3600.0]},
    "bprmf": {"learning_rate": [0.1, 0.05]},
    "coevent": {},
    "coevent_tied": {},
    "sknn": {"k": [100, 200], "sample_size": [500, 1000]},
    "vsknn": {"k": [100, 200], "sample_size": [500, 1000]},
    "stan": {"k": [100, 200]},
    "vstan": {"k": [1000, 200]},
}
BASELINES = list(GRIDS)
#: GRU4Rec's candidates, chosen on valid like the baselines' grids: its default (the official
#: best RSC15 setting: cross-entropy + logQ, 100 units, batch 32) and the official
#: ``diginetica_bprmax_shared_best`` parameter set (../shared/data/README.md)
GRU4REC_GRID = [
    {},
    {"loss": "bpr-max", "final_act": "elu-1", "bpreg": 0.9, "logq": 0.0, "layers": [512], "batch_size": 128,
     "dropout_embed": 0.5, "dropout_hidden": 0.3, "learning_rate": 0.05, "momentum": 0.15, "n_sample": 2048,
     "sample_alpha": 0.3},
]
METRICS = ["recall_at_20", "mrr_at_20", "recall_at_5", "mrr_at_5"]

log = logging.getLogger("baseline_tables")


def preprocess(dataset: str, work: Path) -> Path:
    split = work / dataset / "splits" / "time"
    if (split / "test").exists() and (split / "split.json").exists():
        return split
    spec = DATASETS[dataset]
    args = [str(SHARED / a) if (SHARED / a).exists() else a for a in spec["args"]]
    cmd = [sys.executable, "-m", "spark_jobs.preprocess", *args, "--out", str(work / dataset)]
    log.info("preprocess: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return split


def grid_points(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, v)) for v in itertools.product(*(grid[k] for k in keys))] or [{}]


def _same_settings(prev, over: dict) -> bool:
    if isinstance(prev, list):  # older records: "key=value" strings
        prev = dict(x.split("=", 1) for x in prev)
    return isinstance(prev, dict) and {k: str(v) for k, v in prev.items()} == {k: str(v) for k, v in over.items()}


def fit_and_score(model: str, split: Path, run_dir: Path, table: str, train_table: str, sets: dict,
                  threads: int, mode: str = "session", also: tuple[str, ...] = (),
                  init_from: Path | None = None) -> dict:
    """Fit ``model`` on ``train_table`` with ``sets`` (starting from the run ``init_from`` if
    given: fine-tuning) and evaluate it on ``table`` (and on the tables in ``also``:
    ``metrics_<table>``) in evaluation ``mode``; cached by settings (and the start run's digest)."""
    from evaluation.evaluate import evaluate
    from training import checkpoint as ck
    from training.trainer import train

    over = {**sets, "train_table": train_table, "num_threads": threads}
    key = over if init_from is None else {
        **over, "init_from": str(init_from), "init_digest": ck.weights_digest(ck.load_checkpoint(init_from))}
    done = run_dir / "done.json"  # re-runs reuse a finished fit + evaluation with the same settings
    tables = (table, *also)
    if done.exists():
        rec = json.loads(done.read_text())
        if _same_settings(rec.get("sets"), key) and rec.get("mode", "session") == mode \
                and all((run_dir / f"eval-{t}" / "metrics.json").exists() for t in tables):
            out = {"fit_wall_s": rec["fit_wall_s"], "eval_dir": run_dir / f"eval-{table}"}
            for t in tables:
                m = json.loads((run_dir / f"eval-{t}" / "metrics.json").read_text())
                out["metrics" if t == table else f"metrics_{t}"] = m
            return out
    t0 = time.perf_counter()
    train(model, split, run_dir / "model", overrides=over, init_from=init_from, show_progress=False)
    fit = time.perf_counter() - t0
    out = {"fit_wall_s": fit, "eval_dir": run_dir / f"eval-{table}"}
    for t in tables:
        m = evaluate(run_dir / "model", split, run_dir / f"eval-{t}", table=t, mode=mode)
        out["metrics" if t == table else f"metrics_{t}"] = m
    done.write_text(json.dumps({"sets": key, "fit_wall_s": fit, "mode": mode}))
    return out


def tune(model: str, split: Path, work: Path, select: str, threads: int, points=None) -> tuple[dict, list[dict]]:
    rows, best, best_v = [], {}, None
    for i, point in enumerate(points if points is not None else grid_points(GRIDS[model])):
        r = fit_and_score(model, split, work / "tune" / f"{model}-{i}", "valid", "train", point, threads)
        v = r["metrics"][select]
        rows.append({"model": model, "setting": json.dumps(point, sort_keys=True), select: v,
                     "recall_at_20": r["metrics"]["recall_at_20"], "fit_s": round(r["fit_wall_s"], 2),
                     "valid_events": r["metrics"]["n_events"]})
        log.info("tune %s %s: valid %s %.4f", model, point, select, v)
        if best_v is None or v > best_v:
            best, best_v = point, v
    for row in rows:
        row["chosen"] = row["setting"] == json.dumps(best, sort_keys=True)
    return best, rows


def beats_sentences(result: dict, baseline: str, alpha: float = 0.05) -> list[str]:
    """A baseline "beats" GRU4Rec on a metric when its paired bootstrap CI lies above zero AND
    the paired Wilcoxon test on per-session means agrees (p < alpha); a CI above zero alone
    is reported as such (the two can disagree: the bootstrap weighs sessions by their number of
    predictions, the Wilcoxon test weighs every session once)."""
    out = []
    for r in result["rows"]:
        if r["run"] == baseline or r["diff_lo"] is None:
            continue
        d = f"{r['diff']:+.4f} [{r['diff_lo']:+.4f}, {r['diff_hi']:+.4f}], Wilcoxon p = {r['p_value']:.2g}"
        if r["diff_lo"] > 0 and r["p_value"] < alpha:
            out.append(f"- **{r['run']} beats {baseline} on {r['metric']}**: {d}")
        elif r["diff_lo"] > 0:
            out.append(f"- {r['run']} is ahead of {baseline} on {r['metric']} by the bootstrap CI, but the "
                       f"Wilcoxon test does not confirm it: {d}")
    return out or [f"- No baseline's paired 95% CI lies above {baseline} on any metric here."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--work", default="/tmp/baseline_tables")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--seeds", type=int, default=3, help="GRU4Rec seeds")
    ap.add_argument("--select", default="mrr_at_20", help="tuning metric on valid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=",".join(BASELINES), help="baselines to include")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not SHARED.exists():
        ap.error(f"{SHARED} is missing: the real datasets live there")
    work = Path(a.work) / a.dataset
    split = preprocess(a.dataset, Path(a.work))
    models = [m for m in a.models.split(",") if m]
    unknown = [m for m in models if m not in GRIDS]
    if unknown:
        ap.error(f"--models: no grid for {unknown}; known: {BASELINES}")

    from evaluation.compare import compare

    runs, tuning = {}, []
    g_best, rows = tune("gru4rec", split, work, a.select, a.threads, points=GRU4REC_GRID)
    tuning += rows
    tag = "" if not g_best else "-bprmax"
    for seed in range(1, a.seeds + 1):
        r = fit_and_score("gru4rec", split, work / f"gru4rec{tag}-s{seed}", "test", "train_full",
                          {**g_best, "seed": seed}, a.threads)
        runs.setdefault("gru4rec", []).append(r["eval_dir"])
    for m in models:
        best, rows = tune(m, split, work, a.select, a.threads)
        tuning += rows
        r = fit_and_score(m, split, work / m, "test", "train_full", best, a.threads)
        runs[m] = [r["eval_dir"]]

    out = Path(a.out) / a.dataset
    cmd = f"python -m benchmarks.baseline_tables --dataset {a.dataset} --seeds {a.seeds} --threads {a.threads}"
    result = compare(runs, baseline="gru4rec", out=out, metrics=METRICS,
                     command=cmd + " (evaluation.compare.compare() on its evaluation dirs)")
    from spark_jobs import contract as C
    from benchmarks.machine import cpu_label

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["model", "setting", a.select, "recall_at_20", "fit_s", "valid_events", "chosen"],
                       lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(tuning)
    C.write_text(out / "tuning.csv", buf.getvalue())
    tune_md = ["| model | setting | valid " + a.select + " | valid recall_at_20 | chosen |", "|---|---|---:|---:|---|"]
    for row in tuning:
        tune_md.append(f"| {row['model']} | `{row['setting']}` | {row[a.select]:.4f} | {row['recall_at_20']:.4f} | "
                       f"{'**yes**' if row['chosen'] else ''} |")
    spec = DATASETS[a.dataset]
    md = [f"# {a.dataset}: every baseline next to GRU4Rec", "",
          f"Data: {spec['what']}. Machine: {cpu_label()}, {time.strftime('%Y-%m-%d')}, {a.threads} torch thread(s). "
          f"Reproduce: `{cmd}` (preprocess: `python -m spark_jobs.preprocess {shlex.join(spec['args'])} --out WORK`).", "",
          f"Baselines tuned on `valid` only (trained on `train`, best {a.select}; grid below), then refit on "
          f"`train_full` and scored once on `test`. GRU4Rec: the better on `valid` of its default (the official best RSC15 "
          f"setting) and the official `diginetica_bprmax_shared_best` setting (rows `gru4rec` in the grid), "
          f"{a.seeds} seeds. Full ranking over all training items, ties counted "
          "against the target.", "",
          "## Where a baseline beats GRU4Rec", "", *beats_sentences(result, "gru4rec"), "",
          "![metrics with 95% CIs](" + a.dataset + "/comparison_metrics.png)", "",
          (out / "comparison.md").read_text(), "",
          "## Tuning on valid", "", *tune_md, ""]
    C.write_text(Path(a.out) / f"{a.dataset}.md", "\n".join(md))
    print((Path(a.out) / f"{a.dataset}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
