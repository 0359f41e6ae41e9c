"""Personalised RNNs against the session RNN (issue 15): Quadrana et al. (2017) HRNN and
Donkers et al. (2017) user-based GRUs, on our data.

    python -m benchmarks.personal_tables --dataset ml100k [--work /tmp/personal_tables] [--out docs/results]
    python -m benchmarks.personal_tables --dataset ml100k-global
    python -m benchmarks.personal_tables --dataset trivago-100k

For one dataset it

1. preprocesses the raw data with the project's Spark job as Quadrana et al. did (30-minute
   sessions, repeated clicks removed, item support, sessions of >= 3 events, users with >= 5
   sessions; the arguments per dataset are in ``DATASETS``; MovieLens 100K is fetched first);
   the last session of each user is test and the one before valid (``last_session``), or the
   global-cut variant (``last_session_global``);
2. fits every model on ``train`` only, ``--seeds`` seeds each for the trained ones: the session
   RNN (GRU4Rec: each session from a zero state), RNN Concat, HRNN-Init, HRNN-All, the three
   user-based GRU cells, PPOP and Item-KNN; the RNNs' epoch is chosen by early stopping on
   ``valid`` scored in user mode (``early_stop_mode=user``), never on ``test``;
3. scores ``valid`` and ``test`` in user mode (each user's training sessions fed first,
   unscored; ``evaluation.loop``);
4. runs ``evaluation.compare`` against the session RNN: Recall / MRR / Precision @5 and @20 with
   95% bootstrap CIs over users, uplift in % with its CI and the paired Wilcoxon p; the same by
   user history length and by position in the session (``--by``), into
   OUT/personal-<dataset>/ and OUT/personal-<dataset>.md.

Fits run ``--jobs`` at a time (``benchmarks.table_jobs``); a finished fit is reused on a re-run.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from benchmarks.table_jobs import Job, fixed, run_jobs
from benchmarks.villatel_tables import SHARED, preprocess

ROOT = Path(__file__).resolve().parents[1]

_QUADRANA = ["--remove-repeats", "--min-item-support", "10", "--min-session-length", "3"]
DATASETS = {
    "ml100k": {
        "fetch": True, "args": ["--input", "{raw}/ml-100k.inter", "--format", "movielens", *_QUADRANA,
                                "--min-sessions-per-user", "5", "--split", "last_session"],
        "what": "MovieLens 100K ratings as implicit events, 30-minute sessions per user, consecutive repeats "
                "removed, items with >= 10 events, sessions of >= 3 events, users with >= 5 sessions; each user's "
                "last session is test, the one before valid (`last_session`, Quadrana et al.'s protocol; it "
                "leaks through time: a user's test session may precede another user's training sessions)",
    },
    "ml100k-global": {
        "fetch": True, "args": ["--input", "{raw}/ml-100k.inter", "--format", "movielens", *_QUADRANA,
                                "--min-sessions-per-user", "5", "--split", "last_session_global",
                                "--test-fraction", "0.3"],
        "what": "MovieLens 100K as `ml100k`, split by a global time cut (`last_session_global`: the cut at the "
                "70 % quantile of session starts -- at the default 90 % only 22 of the 84 users have a session "
                "after it; each user's first session after the cut is test, for users with training history; "
                "valid the same rule inside train)",
    },
    "trivago-100k": {
        "fetch": False, "args": ["--input", "trivago-100k/trivago_val_100k.parquet.snappy", "--format", "trivago",
                                 "--sessionize-by-user", "--idle-gap-minutes", "30", "--remove-repeats",
                                 "--min-item-support", "5", "--min-session-length", "2",
                                 "--min-sessions-per-user", "2", "--split", "last_session"],
        "what": "trivago RecSys Challenge 2019 sample (2 days), item actions re-sessionized per user at 30 idle "
                "minutes, repeats removed, items with >= 5 events, sessions of >= 2 events, users with >= 2 "
                "sessions (the sample is too short for 5); last session per user test, the one before valid",
    },
}
RNN_SETTINGS = {"early_stop_patience": 2, "early_stop_metric": "recall_at_20", "early_stop_table": "valid",
                "early_stop_mode": "user"}
#: run name -> (family, settings, label): the session RNN first (the baseline of every test)
MODELS = {
    # Quadrana et al.'s "RNN": GRU4Rec with TOP1 and HRNN's session-level setting (500 units,
    # 1-of-N input, dropout 0.2, Adagrad 0.1 with momentum 0.1, batch 100, in-batch negatives)
    "gru4rec": ("gru4rec", {"layers": [500], "embedding": "onehot", "loss": "top1", "final_act": "tanh",
                            "dropout_hidden": 0.2, "learning_rate": 0.1, "momentum": 0.1, "batch_size": 100,
                            "n_sample": 0}, "RNN (session GRU4Rec, TOP1)"),
    # this project's default GRU4Rec (cross-entropy + logQ, 100 units, tied): a second session RNN
    "gru4rec_ce": ("gru4rec", {}, "RNN (GRU4Rec default, cross-entropy)"),
    "rnn_concat": ("rnn_concat", {}, "RNN Concat"),
    "hrnn_init": ("hrnn_init", {}, "HRNN-Init"),
    "hrnn_all": ("hrnn_all", {}, "HRNN-All"),
    "ugru_linear": ("ugru_linear", {}, "User GRU, linear"),
    "ugru_rect": ("ugru_rect", {}, "User GRU, rectified linear"),
    "ugru_attn": ("ugru_attn", {}, "User GRU, attentional"),
    "ppop": ("ppop", {}, "PPOP"),
    "itemknn": ("itemknn", {}, "Item-KNN"),
}
#: run -> (config key, values; the first = the paper's): chosen on valid (seed 1). HRNN-All's 500-d
#: user state is concatenated to a 1-of-N item input at every step: on a small catalogue the dense
#: user term swamps the item's and the model does not learn (valid R@20 ~0.03 vs ~0.11 for Init)
GRIDS = {"hrnn_all": ("user_hidden", [500, 100, 20])}
BASELINE = "gru4rec"
METRICS = ["recall_at_5", "recall_at_20", "mrr_at_5", "mrr_at_20", "precision_at_5", "precision_at_20"]
LABELS = {"recall_at_5": "R@5", "recall_at_20": "R@20", "mrr_at_5": "MRR@5", "mrr_at_20": "MRR@20",
          "precision_at_5": "P@5", "precision_at_20": "P@20"}
BY = {"user_history_sessions": "0,1-4,5-6,7-14,15-", "input_position": "1-2,3-4,5-9,10-"}

log = logging.getLogger("personal_tables")


def grid_key(run: str, value) -> str:
    """Run dir of grid point ``value`` (seed 1); the first value (the paper's) is the plain run."""
    key, values = GRIDS[run]
    return f"{run}-s1" if value == values[0] else f"{run}-{key}{value}-s1"


def chosen_point(run: str, results: dict) -> tuple[object, dict]:
    """The grid value with the best seed-1 ``valid`` Recall@20 (ties: the earlier, paper's first)."""
    key, values = GRIDS[run]
    best = max(values, key=lambda v: (results[grid_key(run, v)]["valid"]["recall_at_20"], -values.index(v)))
    return best, ({} if best == values[0] else {key: best})


def plan(models: list[str], seeds: int, max_epochs: int) -> list:
    """Every model's fits; a model of ``GRIDS``: seed 1 at each grid point, then the other seeds
    at the point chosen on ``valid`` (jobs that wait for the grid)."""
    from training import registry

    jobs = []
    for run in models:
        fam, sets, _ = MODELS[run]
        trainable = registry.get(fam).trainable
        extra = {**RNN_SETTINGS, "n_epochs": max_epochs} if trainable else {}
        if run in GRIDS and trainable:
            key, values = GRIDS[run]
            for v in values:  # the paper's value is left out of the settings (its cache key)
                jobs.append(fixed(grid_key(run, v), f"{run}@{key}={v}", fam,
                                  {**extra, **sets, **({} if v == values[0] else {key: v}), "seed": 1}))
            deps = [grid_key(run, v) for v in values]
            for s in range(2, seeds + 1):
                jobs.append(Job(f"{run}-s{s}", run, s, 1, deps=deps, resolve=lambda res, run=run, fam=fam, s=s, b={
                    **extra, **sets}: (fam, {**b, **chosen_point(run, res)[1], "seed": s}, None)))
            continue
        for s in range(1, (seeds if trainable else 1) + 1):
            jobs.append(fixed(f"{run}-s{s}", run, fam, {**extra, **sets, "seed": s}))
    return jobs


def done_runs(done: dict) -> set[str]:
    return {r["run"].split("@")[0] for r in done.values()}


def _uplift(r: dict) -> str:
    """``+6.5 % [+5.2, +7.8]``; — without an uplift (the baseline's mean is 0), [—] without its CI."""
    if r.get("uplift") is None:
        return "— (baseline mean 0)"
    ci = "—" if r.get("uplift_lo") is None else f"{r['uplift_lo']:+.1f}, {r['uplift_hi']:+.1f}"
    return f"{r['uplift']:+.1f} % [{ci}]"


def _cell(r: dict) -> str:
    c = f"{r['mean']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}]"
    if r.get("n_seeds", 1) > 1:
        c += f" ({r['seed_min']:.4f}..{r['seed_max']:.4f})"
    return c


def main_table(result: dict, labels: dict) -> list[str]:
    """One row per model: each metric mean [CI] (seed range); uplift over the session RNN and p on @20."""
    by = {}
    for r in result["rows"]:
        by.setdefault(r["run"], {})[r["metric"]] = r
    head = ("| model | " + " | ".join(LABELS[m] for m in METRICS)
            + " | uplift R@20 vs RNN | uplift MRR@20 vs RNN | Wilcoxon p R@20 / MRR@20 |")
    out = [head, "|---|" + "---:|" * (len(METRICS) + 3)]
    for run, ms in by.items():
        cells = [_cell(ms[m]) for m in METRICS]
        for m in ("recall_at_20", "mrr_at_20"):
            r = ms[m]
            cells.append("—" if run == BASELINE else _uplift(r))
        p = [ms[m].get("p_value") for m in ("recall_at_20", "mrr_at_20")]
        cells.append(" / ".join("—" if x is None else f"{x:.2g}" for x in p))
        out.append(f"| {labels.get(run, run)} | " + " | ".join(cells) + " |")
    return out


def findings(result: dict, labels: dict) -> list[str]:
    """Per personalised model: better / worse / no difference than the session RNN on R@20 and MRR@20
    (uplift CI excludes 0 and Wilcoxon p < 0.05)."""
    out = []
    for m in ("recall_at_20", "mrr_at_20"):
        rows = [r for r in result["rows"] if r["metric"] == m and r["run"] != BASELINE]
        better = [r for r in rows if r.get("uplift_lo") is not None and r["uplift_lo"] > 0 and r["p_value"] < 0.05]
        worse = [r for r in rows if r.get("uplift_hi") is not None and r["uplift_hi"] < 0 and r["p_value"] < 0.05]
        same = [r for r in rows if r not in better and r not in worse]

        def cell(r):
            p = "—" if r.get("p_value") is None else f"{r['p_value']:.2g}"
            return f"{labels.get(r['run'], r['run'])} {_uplift(r)}, p = {p}"
        out.append(f"- {LABELS[m]}: better than the session RNN: " + ("; ".join(f"**{cell(r)}**" for r in better)
                                                                    or "none") + ".")
        if worse:
            out.append("  Worse: " + "; ".join(cell(r) for r in worse) + ".")
        if same:
            out.append("  Not distinguishable (CI of the uplift spans 0 or p >= 0.05): "
                       + "; ".join(cell(r) for r in same) + ".")
    return out


def too_small(a, spec: dict, manifest: dict, tables: dict) -> None:
    """OUT/personal-<dataset>.md saying why there is no table: what each preprocessing step left."""
    from spark_jobs import contract as C

    steps = ["| step | events | sessions | users | items |", "|---|---:|---:|---:|---:|"]
    for st in manifest.get("steps", []):
        name = st["step"] + (f" (round {st['round']})" if "round" in st else "")
        steps.append(f"| {name} | {st.get('events', 0):,} | {st.get('sessions', 0):,} | {st.get('users', 0):,} | "
                     f"{st.get('items', 0):,} |")
    md = [f"# {a.dataset}: personalised RNNs — too small for a table", "",
          f"Data: {spec['what']}.", "",
          f"After Quadrana et al.'s filters the split has {tables['test']['sessions']} test users "
          f"(test {tables['test']['events']:,} events, train {tables['train']['events']:,} events in "
          f"{tables['train']['sessions']:,} sessions), fewer than the {a.min_test_users} this driver needs for "
          "a per-user bootstrap and a Wilcoxon test worth reporting. What each step left (the project's Spark job, "
          "`manifest.json`):", "", *steps, "",
          *_why(manifest), "",
          f"Reproduce: `python -m benchmarks.personal_tables --dataset {a.dataset}`."]
    C.write_text(Path(a.out) / f"personal-{a.dataset}.md", "\n".join(md) + "\n")
    print("\n".join(md))


def _why(manifest: dict) -> list[str]:
    """The two numbers that explain a too-small split: sessions per user, and the share of
    events that only repeated the previous click."""
    by = {st["step"]: st for st in manifest.get("steps", [])}
    first = by.get("sessionized") or by.get("read")
    out = []
    if first and first.get("users"):
        out.append(f"Sessions per user after sessionizing: {first['sessions'] / first['users']:.2f} "
                   f"({first['sessions']:,} sessions of {first['users']:,} users): few users come back.")
    if first and "remove_repeats" in by:
        out.append(f"Consecutive repeats removed: {1 - by['remove_repeats']['events'] / first['events']:.0%} of "
                   "the events.")
    return out + ["Requiring returning users leaves too little to measure personalisation on this data."]


def _demote(md: str) -> str:
    return "\n".join(("###" + ln[1:]) if ln.startswith("# ") else ln for ln in md.splitlines())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--work", default="/tmp/personal_tables")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated run names of MODELS")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-epochs", type=int, default=10, help="RNN epochs at most (early stopping on valid)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="fits at a time")
    ap.add_argument("--min-test-users", type=int, default=30,
                    help="below this many test sessions (one per user) no table: the reason, with the counts")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not SHARED.exists():
        ap.error(f"{SHARED} is missing: the real datasets live there")
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad or BASELINE not in models:
        ap.error(f"--models: unknown {bad} (known: {', '.join(MODELS)}); {BASELINE} (the baseline) is required")
    spec = DATASETS[a.dataset]
    split = preprocess(a.dataset, Path(a.work), DATASETS)
    manifest = json.loads((split.parent.parent / "manifest.json").read_text())
    tables = manifest["splits"][split.name]["tables"]
    if tables["test"]["sessions"] < a.min_test_users:
        too_small(a, spec, manifest, tables)
        return 0
    work = Path(a.work) / a.dataset / "runs"
    t0 = time.time()
    done = run_jobs(plan(models, a.seeds, a.max_epochs), split, work, a.jobs, a.threads, "user", also=("valid",))

    from benchmarks.machine import cpu_label
    from evaluation.compare import compare
    from spark_jobs import contract as C

    by_run: dict[str, list[dict]] = {}
    for r in sorted(done.values(), key=lambda r: (r["run"], r["seed"])):
        by_run.setdefault(r["run"], []).append(r)
    tuning = ["| model | setting | valid R@20 (seed 1) | chosen |", "|---|---|---:|---|"]
    for m in [m for m in models if m in GRIDS and m in done_runs(done)]:
        key, values = GRIDS[m]
        best, _ = chosen_point(m, done)
        for v in values:
            tuning.append(f"| {MODELS[m][2]} | {key}={v}{' (paper)' if v == values[0] else ''} | "
                          f"{done[grid_key(m, v)]['valid']['recall_at_20']:.4f} | {'**yes**' if v == best else ''} |")
        by_run[m] = [dict(done[grid_key(m, best)], run=m)] + by_run.get(m, [])
    labels = {k: v[2] for k, v in MODELS.items()}
    runs = {m: [Path(r["eval_dir"]) for r in by_run[m]] for m in models}
    out = Path(a.out) / f"personal-{a.dataset}"
    cmd = f"python -m benchmarks.personal_tables --dataset {a.dataset} --seeds {a.seeds} --max-epochs {a.max_epochs}"
    result = compare(runs, baseline=BASELINE, out=out, metrics=METRICS, by=BY, unit="user",
                     command=cmd + " (evaluation.compare.compare() on its evaluation dirs)")
    test_m = next(iter(done.values()))["test"]
    fit_rows = ["| run | seeds | valid R@20 (mean) | epochs run (best), per seed | fit s (mean) |",
                "|---|---:|---:|---|---:|"]
    for k, rs in by_run.items():
        ep = ", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in rs) if rs[0]["best_epoch"] else "—"
        fit_rows.append(f"| {labels.get(k, k)} | {len(rs)} | {sum(r['valid']['recall_at_20'] for r in rs) / len(rs):.4f}"
                        f" | {ep} | {sum(r['fit_wall_s'] for r in rs) / len(rs):.1f} |")
    sections = []
    for col, stem in (("user_history_sessions", "user_history"), ("input_position", "position")):
        f = out / f"comparison_by_{stem}.md"
        if f.exists():
            sections += [_demote(f.read_text()), ""]
    md = [f"# {a.dataset}: personalised RNNs (HRNN, user-based GRUs) against the session RNN", "",
          f"Data: {spec['what']}. Tables (events / sessions): " + ", ".join(
              f"{t} {tables[t]['events']:,} / {tables[t]['sessions']:,}" for t in ("train", "valid", "test")
              if t in tables) + f"; {test_m.get('n_users', '?')} test users, "
          f"{test_m.get('n_users_without_history', '?')} without history. Machine: {cpu_label()}, "
          f"{time.strftime('%Y-%m-%d')}, {a.jobs} fits at a time with {a.threads} torch thread(s) each; "
          f"{(time.time() - t0) / 60:.0f} min wall. Reproduce: `{cmd}`.", "",
          "Protocol: every model is fit on `train` only, each RNN with its paper's defaults and the epoch "
          f"with the best `valid` Recall@20 scored in user mode (early stopping, patience 2, at most {a.max_epochs} "
          f"epochs); {a.seeds} seeds for the trained models (mean over seeds; CI = bootstrap over users of the "
          "seed-averaged per-event values; the seed range in parentheses). Scored in user mode: each user's "
          "training sessions are fed first, unscored (HRNN's bootstrap), then the test session; full ranking over "
          "all training items, ties counted against the target. Baseline of every test: the session RNN.", "",
          "## Does personalisation help here?", "", *findings(result, labels), "",
          "## Results", "", *main_table(result, labels), "",
          *(["Chosen on `valid` (seed 1; the other seeds at the chosen setting):", "", *tuning, ""]
            if len(tuning) > 2 else []), *sections,
          "## Fits", "", *fit_rows, "",
          "## Full comparison (evaluation.compare)", "", _demote((out / "comparison.md").read_text())]
    C.write_text(Path(a.out) / f"personal-{a.dataset}.md", "\n".join(md))
    C.write_text(out / "runs.json", json.dumps(list(done.values()), indent=1, default=str))
    print((Path(a.out) / f"personal-{a.dataset}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
