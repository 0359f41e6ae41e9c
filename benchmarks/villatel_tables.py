"""Villatel et al. (RecSys 2018) Table 4 / Table 5 / Figure 3 on our data (issue 17).

    python -m benchmarks.villatel_tables --dataset ml100k [--work /tmp/villatel_tables] [--out docs/results]
    python -m benchmarks.villatel_tables --dataset rsc15-100k
    python -m benchmarks.villatel_tables --dataset ml100k-time

For one dataset it

1. preprocesses the raw data with the project's Spark job (``spark_jobs.preprocess``; the
   arguments per dataset are in ``DATASETS``; MovieLens 100K is fetched first with
   ``../shared/data/fetch-movielens-100k.sh``);
2. fits every model on ``train`` only: the six Table 4 RNNs (``training.families.seqrnn``
   presets, the paper's Table 2 hyper-parameters, the epoch chosen by early stopping on
   ``valid``, which ``train`` does not contain) for ``--seeds`` seeds, and the paper's
   baselines POP, Item-KNN (their definition: co-occurrences / product of frequencies) and
   CoEvent MF with and without tying (``--seeds`` seeds for the trained ones);
3. scores ``valid`` and ``test`` in the dataset's evaluation mode (``user`` for the per-user
   sequences of MovieLens, ``session`` for rsc15's sessions); the best baseline is the one
   with the best ``valid`` Recall@20 (never ``test``);
4. runs ``evaluation.compare`` against that baseline: Recall@20,N=1 / Recall@20,N=5 / MRR@20
   with 95% bootstrap CIs (users or sessions), uplift in % with its CI, Wilcoxon p; the same
   by session length [2-5], [6-25], [26+] (their Table 5); Recall@20 per future step (their
   Figure 3), into OUT/villatel-<dataset>/ and OUT/villatel-<dataset>.md.

Fits run ``--jobs`` at a time (separate processes, ``--threads`` torch threads each); a
finished fit + evaluation is reused on a re-run with the same settings (``done.json``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.baseline_tables import DATASETS as BASE_DATASETS
from benchmarks.baseline_tables import fit_and_score

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

#: dataset -> preprocess args, evaluation mode, RNN sequence kind, description
DATASETS = {
    "ml100k": {
        "fetch": True, "args": ["--input", "{raw}/ml-100k.inter", "--format", "movielens", "--split", "random_users"],
        "mode": "user", "sequence": "user",
        "what": "MovieLens 100K ratings as implicit events, 30-minute sessions per user; users split at random "
                "80/10/10 (`random_users`, seeded): the test users are unseen in training (their Internal-dataset "
                "setup); each user's sessions form one sequence (`sequence=user`), evaluated in user mode",
    },
    "ml100k-time": {
        "fetch": True, "args": ["--input", "{raw}/ml-100k.inter", "--format", "movielens", "--split", "time_strict",
                                "--test-days", "22", "--valid-days", "25"],
        "mode": "user", "sequence": "user",
        "what": "MovieLens 100K, strict global time cut (`time_strict`: the last 22 days test, the 25 before "
                "valid, ~10 % of events each; sessions straddling a cut dropped); a test user's earlier sessions "
                "are fed first, unscored (user mode); about half of the test users have no history",
    },
    "rsc15-100k": {
        "fetch": False, "args": BASE_DATASETS["rsc15-100k"]["args"], "mode": "session", "sequence": "session",
        "what": BASE_DATASETS["rsc15-100k"]["what"] + " (their Yoochoose setup: each session a sequence)",
    },
}
#: the paper's baselines; Item-KNN as they define it: C(a, b) / (supp(a) supp(b)) over binary
#: sequence occurrences, which ranks the items b after a like alpha = 0, lmbd = 0
BASELINES = {"pop": {}, "itemknn": {"counting": "sessions", "alpha": 0.0, "lmbd": 0.0, "n_sims": 500},
             "coevent": {}, "coevent_tied": {}}
RNN_SETTINGS = {"early_stop_patience": 2, "early_stop_metric": "recall_at_20", "early_stop_table": "valid"}
METRICS = ["recall_at_20_n_1", "recall_at_20_n_5", "mrr_at_20"]

log = logging.getLogger("villatel_tables")


def preprocess(dataset: str, work: Path) -> Path:
    spec = DATASETS[dataset]
    split_kind = spec["args"][spec["args"].index("--split") + 1]
    split = work / dataset / "splits" / split_kind
    if (split / "test").exists() and (split / "split.json").exists():
        return split
    raw = work / "raw"
    if spec["fetch"]:
        subprocess.run(["bash", str(SHARED / "fetch-movielens-100k.sh"), str(raw)], check=True)
    args = [a.format(raw=raw) for a in spec["args"]]
    args = [str(SHARED / a) if (SHARED / a).exists() else a for a in args]
    cmd = [sys.executable, "-m", "spark_jobs.preprocess", *args, "--out", str(work / dataset)]
    log.info("preprocess: %s", shlex.join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return split


def _job(model: str, split: str, run_dir: str, sets: dict, threads: int, mode: str) -> dict:
    logging.basicConfig(level=logging.WARNING)
    r = fit_and_score(model, Path(split), Path(run_dir), "test", "train", sets, threads, mode=mode,
                      also=("valid",))
    hist = json.loads((Path(run_dir) / "model" / "history.json").read_text())
    return {"model": model, "sets": sets, "eval_dir": str(r["eval_dir"]), "fit_wall_s": r["fit_wall_s"],
            "valid": r["metrics_valid"], "test": r["metrics"], "best_epoch": hist["run"].get("best_epoch"),
            "epochs_run": len(hist["epochs"]),
            "train_events_per_s": [round(e["events_per_s"]) for e in hist["epochs"]]}


def plan(dataset: str, split: Path, work: Path, seeds: int, max_epochs: int) -> list[tuple]:
    from training.families.seqrnn import TABLE4
    from training import registry

    spec = DATASETS[dataset]
    jobs = []
    for name, sets in BASELINES.items():
        n = seeds if registry.get(name).trainable else 1
        for s in range(1, n + 1):
            jobs.append((name, str(split), str(work / f"{name}-s{s}"), {**sets, "seed": s}))
    for name in TABLE4:
        for s in range(1, seeds + 1):
            jobs.append((name, str(split), str(work / f"{name}-s{s}"),
                         {**RNN_SETTINGS, "sequence": spec["sequence"], "n_epochs": max_epochs, "seed": s}))
    return jobs


def _fmt(v, signed=False):
    return "—" if v is None else (f"{v:+.1f}" if signed else f"{v:.4f}")


def table4(result: dict, names: dict) -> list[str]:
    """Their Table 4: one row per model, each metric "mean [CI] (uplift % [CI])"."""
    by = {}
    for r in result["rows"]:
        by.setdefault(r["run"], {})[r["metric"]] = r
    head = "| model | " + " | ".join(METRICS) + " | Wilcoxon p (R@20,1) |"
    out = [head, "|---|" + "---:|" * (len(METRICS) + 1)]
    for run, ms in by.items():
        cells = []
        for m in METRICS:
            r = ms[m]
            c = f"{r['mean']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}]"
            if r.get("uplift") is not None:
                c += f" ({_fmt(r['uplift'], True)} % [{_fmt(r.get('uplift_lo'), True)}, {_fmt(r.get('uplift_hi'), True)}])"
            cells.append(c)
        p = ms[METRICS[0]].get("p_value")
        out.append(f"| {names.get(run, run)} | " + " | ".join(cells) + f" | {'—' if p is None else f'{p:.2g}'} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--work", default="/tmp/villatel_tables")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-epochs", type=int, default=20, help="RNN epochs at most (early stopping on valid)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="fits at a time")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not SHARED.exists():
        ap.error(f"{SHARED} is missing: the real datasets live there")
    spec = DATASETS[a.dataset]
    split = preprocess(a.dataset, Path(a.work))
    work = Path(a.work) / a.dataset / "runs"
    jobs = plan(a.dataset, split, work, a.seeds, a.max_epochs)
    t0 = time.perf_counter()
    done: list[dict] = []
    with cf.ProcessPoolExecutor(max_workers=a.jobs) as ex:
        futs = {ex.submit(_job, *j, a.threads, spec["mode"]): j for j in jobs}
        for f in cf.as_completed(futs):
            r = f.result()
            done.append(r)
            log.info("[%d/%d] %s seed %s: valid R@20 %.4f, test R@20 %.4f (%.0f s)", len(done), len(jobs),
                     r["model"], r["sets"].get("seed"), r["valid"]["recall_at_20"], r["test"]["recall_at_20"],
                     r["fit_wall_s"])
    wall = time.perf_counter() - t0

    from benchmarks.machine import cpu_label
    from evaluation.compare import compare
    from spark_jobs import contract as C
    from training.families.seqrnn import TABLE4

    runs: dict[str, list[Path]] = {}
    for r in sorted(done, key=lambda r: (r["model"], r["sets"].get("seed", 0))):
        runs.setdefault(r["model"], []).append(Path(r["eval_dir"]))
    valid_r20 = {}
    for r in done:
        valid_r20.setdefault(r["model"], []).append(r["valid"]["recall_at_20"])
    best = max(BASELINES, key=lambda m: sum(valid_r20[m]) / len(valid_r20[m]))
    order = list(BASELINES) + list(TABLE4)
    runs = {m: runs[m] for m in order}
    out = Path(a.out) / f"villatel-{a.dataset}"
    cmd = f"python -m benchmarks.villatel_tables --dataset {a.dataset} --seeds {a.seeds} --max-epochs {a.max_epochs}"
    result = compare(runs, baseline=best, out=out, metrics=METRICS, by_length="2-5,6-25,26-",
                     command=cmd + " (evaluation.compare.compare() on its evaluation dirs)")
    names = {"pop": "POP", "itemknn": "Item-KNN", "coevent": "CoEvent MF", "coevent_tied": "CoEvent MF + RE", **TABLE4}
    fit_rows = ["| model | seeds | valid R@20 (mean) | epochs run (best) | fit s (mean) | train events/s (epoch 1) |",
                "|---|---:|---:|---|---:|---:|"]
    for m in order:
        rs = [r for r in done if r["model"] == m]
        ep = ", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in rs) if rs[0]["best_epoch"] else "—"
        eps = rs[0]["train_events_per_s"][0] if rs[0]["train_events_per_s"] else None
        fit_rows.append(f"| {names[m]} | {len(rs)} | {sum(valid_r20[m]) / len(rs):.4f} | {ep} | "
                        f"{sum(r['fit_wall_s'] for r in rs) / len(rs):.1f} | {eps if eps is not None else '—'} |")
    by_len = (out / "comparison_by_length.md").read_text() if (out / "comparison_by_length.md").exists() else ""
    md = [f"# {a.dataset}: Villatel et al. (2018) Table 4 / Table 5 / Figure 3", "",
          f"Data: {spec['what']}. Machine: {cpu_label()}, {time.strftime('%Y-%m-%d')}, {a.jobs} fits at a time with "
          f"{a.threads} torch thread(s) each; {wall / 60:.0f} min wall. Reproduce: `{cmd}`.", "",
          "Protocol: every model is fit on `train` only; RNNs use the paper's Table 2 setting (Adam 0.01 -> 0.001 "
          "polynomial, power 0.5, 50k steps; N_E = N_H = 100; batch 128) and the epoch with the best `valid` "
          f"Recall@20 (early stopping, patience 2, at most {a.max_epochs} epochs); {a.seeds} seeds each (the "
          "table's value is the mean over seeds, its CI a bootstrap of the seed-averaged per-event values). "
          f"Best baseline = best `valid` Recall@20: **{names[best]}**; uplifts are relative to it. "
          "Recall@20,N counts the next N items of the session (the loop stops at the session end). Full "
          "ranking over all training items, ties counted against the target.", "",
          "## Table 4: short- and long-term recall, uplift over the best baseline", "",
          *table4(result, names), "",
          "## Table 5: Recall@20 by session length (uplift over the best baseline)", "", by_len, "",
          "## Figure 3: Recall@20 per future step", "",
          f"![Recall@20 per future step](villatel-{a.dataset}/comparison_future_steps.png)", "",
          "## Fits", "", *fit_rows, "",
          "## Full comparison (evaluation.compare)", "", (out / "comparison.md").read_text()]
    C.write_text(Path(a.out) / f"villatel-{a.dataset}.md", "\n".join(md))
    C.write_text(out / "runs.json", json.dumps(done, indent=1, default=str))
    print((Path(a.out) / f"villatel-{a.dataset}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
