"""Results table with bootstrap CIs and paired tests for any set of evaluation outputs.

Run::

    python -m evaluation.compare EVAL_DIR [EVAL_DIR ...] --baseline EVAL_DIR --out DIR \
        [--run NAME=EVAL_DIR[,EVAL_DIR...]] [--names a,b,c] \
        [--metrics recall_at_20,mrr_at_20,recall_at_5,mrr_at_5] [--unit auto|session|user] \
        [--n-boot 1000] [--seed 0] [--level 0.95]

An EVAL_DIR is what ``python -m evaluation.evaluate --out EVAL_DIR`` writes
(``metrics.json`` + ``per_event.parquet``), or a folder holding exactly one
such folder somewhere below it (e.g. ``EVAL`` for ``EVAL/test``).

Runs and seeds: each positional EVAL_DIR is one run, named by ``--names``
(in order) or by the model in its ``metrics.json`` (made unique by its path
when two runs have the same model). ``--run NAME=DIR1,DIR2,DIR3`` declares
one run made of several evaluations of the same model (e.g. three training
seeds): its per-event values are averaged event by event over the seeds
before anything else, so its point estimate is the mean over seeds, its CI
is the cluster bootstrap of the seed-averaged values, and the spread across
seeds is reported as min..max of the seeds' own point estimates.
``--baseline`` is a run name or an EVAL_DIR (one not listed otherwise is
added as a run).

Every run must be evaluated on the same test table: same metrics.json
``table``, tie mode (``ties``) and ``test_digest`` (when both have one), and
the same multiset of per-event (session_id, position, target_item_id) rows
(compared via a SHA-256 digest of the sorted rows); otherwise it stops with
an ``IncompatibleRunsError`` naming the two runs. Rows are then aligned by
sorting on those keys, so the order in which evaluate wrote them is irrelevant.

Statistics (``evaluation.stats``): the resampling unit is the session, or
the user when ``--unit user`` (or ``auto`` and every event of every run has a ``user_id``
column); 95 % percentile intervals from ``--n-boot`` cluster resamples with
one ``--seed`` (common random numbers across runs and metrics); differences
are run minus baseline with a paired bootstrap over the same resamples, and
a two-sided paired Wilcoxon signed-rank test on per-unit means.

Metrics: ``recall|mrr|ndcg|precision_at_K`` are computed from the per-event
``rank``; any other name must be a numeric per-event column (e.g. a future
``hit_at_20_n5``), used as is (``recall_at_K_nN`` also finds ``hit_at_K_nN``).

Writes into DIR (each file atomically): ``comparison.md``, ``comparison.csv``
(one row per run x metric), ``comparison.json`` (rows + metadata),
``comparison_metrics.png`` (metric bars with CIs) and ``comparison_diffs.png``
(differences to the baseline with CIs). From Python (the DAG)::

    from evaluation.compare import compare
    compare({"gru4rec": [d1, d2, d3], "pop": [d4]}, baseline="pop", out=DIR)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation import stats
from spark_jobs import contract as C

log = logging.getLogger("evaluation.compare")

DEFAULT_METRICS = ("recall_at_20", "mrr_at_20", "recall_at_5", "mrr_at_5")
UNITS = ("auto", "session", "user")
#: per-event columns that identify an event of the test table (and sort it)
KEY_COLUMNS = ("session_id", "position", "target_item_id")
METRICS_FILE, PER_EVENT_FILE = "metrics.json", "per_event.parquet"
CSV_COLUMNS = ("run", "metric", "is_baseline", "mean", "lo", "hi", "diff", "diff_lo", "diff_hi",
               "p_value", "n_events", "n_units", "unit", "n_seeds", "seed_min", "seed_max")
#: metrics.json values and per-event means must agree to this (float summation order only)
_CHECK_TOL = 1e-6


class IncompatibleRunsError(ValueError):
    """Two runs were not evaluated on the same test table (or not in the same way)."""


@dataclass
class EvalRun:
    """One evaluation output, rows sorted by KEY_COLUMNS."""
    path: Path
    metrics: dict
    columns: dict[str, np.ndarray]
    digest: str = ""

    @property
    def n_events(self) -> int:
        return len(self.columns["rank"])


# --------------------------------------------------------------------------- loading


def find_eval_dir(path) -> Path:
    """``path`` itself if it holds metrics.json + per_event.parquet, else its only such sub-folder."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a directory")
    if (p / METRICS_FILE).is_file() and (p / PER_EVENT_FILE).is_file():
        return p
    found = sorted({m.parent for m in p.rglob(METRICS_FILE) if (m.parent / PER_EVENT_FILE).is_file()})
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"{p}: no evaluation output ({METRICS_FILE} + {PER_EVENT_FILE}) in it or below it")
    raise FileNotFoundError(f"{p}: {len(found)} evaluation outputs below it, name one: "
                            + ", ".join(str(f) for f in found))


def rows_digest(columns: dict[str, np.ndarray]) -> str:
    """The evaluator's ``test_digest`` of these rows (``stats.events_digest``)."""
    return stats.events_digest(*(columns[c] for c in KEY_COLUMNS))


def load_eval(path) -> EvalRun:
    """Read an evaluation output; rows are sorted by (session_id, position, target_item_id)."""
    import pyarrow.parquet as pq

    d = find_eval_dir(path)
    metrics = json.loads((d / METRICS_FILE).read_text())
    table = pq.read_table(d / PER_EVENT_FILE)
    missing = [c for c in (*KEY_COLUMNS, "rank") if c not in table.column_names]
    if missing:
        raise ValueError(f"{d / PER_EVENT_FILE}: missing column(s) {missing}")
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    # lexsort: last key is primary -> session_id, then position, then target
    order = np.lexsort(tuple(cols[c] for c in reversed(KEY_COLUMNS)))
    cols = {c: v[order] for c, v in cols.items()}
    run = EvalRun(path=d, metrics=metrics, columns=cols)
    run.digest = rows_digest(cols)
    return run


def check_same_test(a: EvalRun, b: EvalRun, name_a: str = "", name_b: str = "") -> None:
    """Raise ``IncompatibleRunsError`` unless ``a`` and ``b`` scored the same events the same way."""
    who = f"{name_a + ' ' if name_a else ''}({a.path}) and {name_b + ' ' if name_b else ''}({b.path})"
    diffs = []
    for key, label in (("table", "table"), ("ties", "tie mode"), ("test_digest", "test_digest")):
        va, vb = a.metrics.get(key), b.metrics.get(key)
        if key == "test_digest" and (va is None or vb is None):
            continue
        if va != vb:
            diffs.append(f"{label} {va!r} vs {vb!r}")
    if a.digest != b.digest:
        same_n = a.n_events == b.n_events
        diffs.append(f"per-event rows (session_id, position, target_item_id) differ: "
                     f"{a.n_events} vs {b.n_events} rows{' (same count)' if same_n else ''}, "
                     f"digest {a.digest[:12]} vs {b.digest[:12]}")
    if diffs:
        raise IncompatibleRunsError(f"runs {who} were not evaluated on the same test table: "
                                    + "; ".join(diffs))


def metric_values(run: EvalRun, metric: str) -> np.ndarray:
    """Per-event values of ``metric`` for ``run`` (from ``rank``, or a per-event column)."""
    cols = run.columns
    if stats.METRIC_RE.match(metric):
        v = stats.event_values(cols["rank"], metric)
        reported = run.metrics.get(metric)
        if isinstance(reported, (int, float)) and not math.isclose(
                float(reported), float(v.mean()), rel_tol=_CHECK_TOL, abs_tol=_CHECK_TOL):
            raise ValueError(f"{run.path}: per_event.parquet gives {metric}={v.mean():.6f} but "
                             f"metrics.json says {reported:.6f}; the two files do not belong together")
        return v
    col = metric
    if col not in cols and metric.startswith("recall_at_"):
        col = "hit_at_" + metric[len("recall_at_"):]
    def numeric(c):  # per-event hits (bool) count as 0/1 values
        return np.issubdtype(cols[c].dtype, np.number) or cols[c].dtype == np.bool_

    if col not in cols or col in KEY_COLUMNS or not numeric(col):
        have = sorted(c for c in cols if c not in KEY_COLUMNS and numeric(c))
        raise ValueError(f"{run.path}: metric {metric!r} is neither <recall|mrr|ndcg|precision>_at_K "
                         f"nor a numeric per-event column (columns: {have})")
    v = cols[col].astype(np.float64)
    if np.isnan(v).any():
        raise ValueError(f"{run.path}: per-event column {col!r} has NaN values")
    return v


# --------------------------------------------------------------------------- statistics


def _missing_users(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u, dtype=np.float64)
    return np.isnan(u) | (u < 0)


def _unit_of(loaded: dict[str, list[EvalRun]], unit: str) -> tuple[str, np.ndarray]:
    runs = [r for rs in loaded.values() for r in rs]
    has_user = all("user_id" in r.columns for r in runs)
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if unit == "auto":
        # users are the unit only when every event has one (anonymous sessions, e.g. most of
        # diginetica's, cannot be grouped by user): otherwise sessions
        unit = "user" if has_user and not any(_missing_users(r.columns["user_id"]).any() for r in runs) \
            else "session"
    if unit == "user":
        if not has_user:
            lacking = [str(r.path) for r in runs if "user_id" not in r.columns]
            raise ValueError(f"--unit user needs a user_id column in every per_event.parquet; missing in {lacking}")
        ref = runs[0].columns["user_id"]
        n_missing = int(_missing_users(ref).sum())
        if n_missing:
            raise ValueError(f"--unit user: {n_missing} of {len(ref)} events in {runs[0].path} have no user_id "
                             "(anonymous sessions); use --unit session")
        for r in runs[1:]:
            if not np.array_equal(np.asarray(r.columns["user_id"], np.float64), np.asarray(ref, np.float64),
                                  equal_nan=True):
                raise IncompatibleRunsError(f"runs ({runs[0].path}) and ({r.path}) assign different "
                                            "user_id values to the same events")
        return unit, ref
    return unit, runs[0].columns["session_id"]


def _fmt_ci(mean, lo, hi, signed=False) -> str:
    return f"{mean:+.4f} [{lo:.3f}, {hi:.3f}]" if signed else f"{mean:.4f} [{lo:.3f}, {hi:.3f}]"


def _fmt_p(p) -> str:
    if p == 0:  # below the smallest double scipy can return
        return "p<1e-300"
    return f"p={p:.3f}" if p >= 0.001 else f"p={p:.1e}"


def _default_names(dirs: list[Path]) -> list[str]:
    models = []
    for d in dirs:
        try:
            models.append(str(json.loads((find_eval_dir(d) / METRICS_FILE).read_text()).get("model") or Path(d).name))
        except (OSError, ValueError):
            models.append(Path(d).name)
    return [m if models.count(m) == 1 else f"{m}:{d}" for m, d in zip(models, dirs)]


def compare(runs: dict[str, list[Path]], baseline: str, out, metrics=DEFAULT_METRICS, unit: str = "auto",
            n_boot: int = 1000, seed: int = 0, level: float = 0.95, command: str | None = None) -> dict:
    """Compare ``runs`` (name -> evaluation dirs; several dirs = seeds, averaged per event)
    against ``runs[baseline]``; write comparison.{md,csv,json} and two PNGs into ``out``.

    Returns the content of comparison.json: ``{"metadata": ..., "runs": ..., "rows": [...]}``,
    one row per run x metric (see CSV_COLUMNS). Raises ``IncompatibleRunsError`` when two
    runs were not evaluated on the same test table.
    """
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    metrics = list(metrics)
    if not metrics:
        raise ValueError("no metrics to compare")
    if not runs or any(len(v) == 0 for v in runs.values()):
        raise ValueError("every run needs at least one evaluation dir")
    if baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {list(runs)}")
    out = Path(out)
    # baseline first: everything is checked against, and ordered like, its first evaluation
    names = [baseline] + [n for n in runs if n != baseline]
    loaded = {n: [load_eval(p) for p in runs[n]] for n in names}
    ref_name, ref = baseline, loaded[baseline][0]
    for n in names:
        for i, r in enumerate(loaded[n]):
            if r is not ref:
                check_same_test(ref, r, ref_name, n if len(loaded[n]) == 1 else f"{n}[{i}]")
    unit, unit_ids = _unit_of(loaded, unit)
    n_events = ref.n_events
    n_units = int(len(np.unique(unit_ids)))

    # per-event values: (run, metric) -> seed-averaged array; seeds' own point estimates
    values, seed_points = {}, {}
    for n in names:
        for m in metrics:
            per_seed = [metric_values(r, m) for r in loaded[n]]
            values[n, m] = np.mean(per_seed, axis=0) if len(per_seed) > 1 else per_seed[0]
            seed_points[n, m] = [float(v.mean()) for v in per_seed]

    # one bootstrap for every column: run values and run-minus-baseline differences
    cols, keys = [], []
    for n in names:
        for m in metrics:
            cols.append(values[n, m])
            keys.append(("value", n, m))
            if n != baseline:
                cols.append(values[n, m] - values[baseline, m])
                keys.append(("diff", n, m))
    dist = stats.bootstrap_distribution(np.stack(cols, 1), unit_ids, n_boot=n_boot, seed=seed)
    interval = {k: stats.percentile_interval(dist[:, j], level) for j, k in enumerate(keys)}
    point = {k: float(c.mean()) for k, c in zip(keys, cols)}

    rows = []
    for n in names:
        for m in metrics:
            lo, hi = interval["value", n, m]
            row = {"run": n, "metric": m, "is_baseline": n == baseline, "mean": point["value", n, m],
                   "lo": lo, "hi": hi, "diff": None, "diff_lo": None, "diff_hi": None, "p_value": None,
                   "n_events": n_events, "n_units": n_units, "unit": unit, "n_seeds": len(loaded[n]),
                   "seed_min": min(seed_points[n, m]), "seed_max": max(seed_points[n, m])}
            if n != baseline:
                dlo, dhi = interval["diff", n, m]
                _, ma, _ = stats.unit_means(values[n, m], unit_ids)
                _, mb, _ = stats.unit_means(values[baseline, m], unit_ids)
                row.update(diff=point["diff", n, m], diff_lo=dlo, diff_hi=dhi, p_value=stats.wilcoxon(ma, mb))
            rows.append(row)

    if command is None:
        command = "evaluation.compare.compare() from Python: " + shlex.join(sys.argv)
    meta = {
        "table": ref.metrics.get("table"), "ties": ref.metrics.get("ties"), "rows_digest": ref.digest,
        "test_digest": ref.metrics.get("test_digest"),
        "n_events": n_events, "n_units": n_units, "unit": unit, "n_boot": n_boot, "seed": seed,
        "level": level, "baseline": baseline, "metrics": metrics, "command": command,
        "interval": "percentile, cluster bootstrap over units; metric of a resample = sum of "
                    "per-event values / number of events of the drawn units",
        "test": "two-sided paired Wilcoxon signed-rank on per-unit means (zero differences dropped)",
    }
    run_info = {n: {"dirs": [str(r.path) for r in loaded[n]],
                    "models": [r.metrics.get("model") for r in loaded[n]],
                    "seed_values": {m: seed_points[n, m] for m in metrics},
                    "cost": _cost(loaded[n])} for n in names}
    result = {"metadata": meta, "runs": run_info, "rows": rows}

    out.mkdir(parents=True, exist_ok=True)
    C.write_text(out / "comparison.md", _markdown(result))
    C.write_text(out / "comparison.csv", _csv(rows))
    C.write_text(out / "comparison.json", json.dumps(_json_safe(result), indent=2, sort_keys=True) + "\n")
    _plot_metrics(result, out / "comparison_metrics.png")
    _plot_diffs(result, out / "comparison_diffs.png")
    return result


# --------------------------------------------------------------------------- writing


COST_KEYS = ("fit_seconds", "eval_seconds", "eval_events_per_s", "n_parameters", "model_bytes")


def _cost(evals: list[EvalRun]) -> dict:
    """Mean over a run's evaluations of what evaluate recorded about its cost (None when
    an evaluation predates these fields)."""
    out = {}
    for k in COST_KEYS:
        v = [r.metrics.get(k) for r in evals]
        out[k] = float(np.mean(v)) if v and all(isinstance(x, (int, float)) for x in v) else None
    return out


def _fmt_cost(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _json_safe(o):
    if isinstance(o, dict):
        return {k: _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else (repr(r[k]) if isinstance(r[k], float) else r[k]))
                    for k in CSV_COLUMNS})
    return buf.getvalue()


def _markdown(result: dict) -> str:
    meta, rows = result["metadata"], result["rows"]
    metrics, base = meta["metrics"], meta["baseline"]
    by = {(r["run"], r["metric"]): r for r in rows}
    names = list(result["runs"])
    pct = f"{meta['level'] * 100:g}%"
    lines = [
        f"# Comparison on table `{meta['table']}` (ties: {meta['ties']})",
        "",
        f"- {meta['n_events']} events in {meta['n_units']} {meta['unit']}s (the resampled unit: **{meta['unit']}**); "
        f"{meta['n_boot']} cluster-bootstrap resamples, seed {meta['seed']}; {pct} percentile intervals",
        f"- differences: run minus baseline **{base}**, paired bootstrap {pct} CI, "
        "two-sided paired Wilcoxon signed-rank p on per-unit means",
        f"- test rows digest (sha256 of sorted session_id, position, target_item_id): `{meta['rows_digest'][:16]}`",
        f"- command: `{meta['command']}`",
        "",
    ]
    head = ["run"]
    for m in metrics:
        head += [m, f"Δ {m} vs {base}"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for n in names:
        k = result["runs"][n]
        label = n + (" (baseline)" if n == base else "") + (f" ({len(k['dirs'])} seeds)" if len(k["dirs"]) > 1 else "")
        cells = [label]
        for m in metrics:
            r = by[n, m]
            c = _fmt_ci(r["mean"], r["lo"], r["hi"])
            if r["n_seeds"] > 1:
                c += f" seeds {r['seed_min']:.4f}..{r['seed_max']:.4f}"
            cells.append(c)
            cells.append("—" if n == base else
                         f"{_fmt_ci(r['diff'], r['diff_lo'], r['diff_hi'], signed=True)}, {_fmt_p(r['p_value'])}")
        lines.append("| " + " | ".join(cells) + " |")
    costs = {n: result["runs"][n].get("cost") or {} for n in names}
    if any(any(v is not None for v in c.values()) for c in costs.values()):
        lines += ["", "Cost (mean over a run's seeds; fit = the training run's wall time, scoring = the evaluation "
                  "loop's wall time over this table; timings are of the machine and thread count they ran on; "
                  "parameters = elements of floating-point tensors, while a kNN's state is mostly integer index "
                  "arrays, counted in model MB):", "",
                  "| run | fit s | scoring s | scored events/s | parameters | model MB |", "|---|---:|---:|---:|---:|---:|"]
        for n in names:
            c = costs[n]
            mb = None if c.get("model_bytes") is None else c["model_bytes"] / 1e6
            lines.append(f"| {n} | {_fmt_cost(c.get('fit_seconds'), '.1f')} | {_fmt_cost(c.get('eval_seconds'), '.1f')} | "
                         f"{_fmt_cost(c.get('eval_events_per_s'), ',.0f')} | {_fmt_cost(c.get('n_parameters'), ',.0f')} | "
                         f"{_fmt_cost(mb, '.2f')} |")
    lines += ["", "Runs:", ""]
    for n in names:
        lines.append(f"- {n}: " + ", ".join(f"`{d}`" for d in result["runs"][n]["dirs"]))
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    plt = _plt()
    try:
        C.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _bar_panels(result: dict, path: Path, diff: bool) -> None:
    plt = _plt()
    meta, rows = result["metadata"], result["rows"]
    metrics = meta["metrics"]
    names = [n for n in result["runs"] if not (diff and n == meta["baseline"])]
    by = {(r["run"], r["metric"]): r for r in rows}
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(3.2 * len(metrics), 4), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        xs = np.arange(len(names))
        if not names:
            ax.text(0.5, 0.5, "no run besides the baseline", ha="center", va="center", transform=ax.transAxes)
        else:
            key = ("diff", "diff_lo", "diff_hi") if diff else ("mean", "lo", "hi")
            y = np.array([by[n, m][key[0]] for n in names])
            err = np.array([[y[i] - by[n, m][key[1]], by[n, m][key[2]] - y[i]] for i, n in enumerate(names)]).T
            colors = ["tab:gray" if (not diff and n == meta["baseline"]) else "tab:blue" for n in names]
            ax.bar(xs, y, yerr=np.clip(err, 0, None), capsize=4, color=colors)
            ax.set_xticks(xs, names, rotation=30, ha="right")
            if diff:
                ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(f"Δ {m} vs {meta['baseline']}" if diff else m, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{'differences to baseline' if diff else 'metrics'} on {meta['table']} "
                 f"({meta['level'] * 100:g}% CI, {meta['n_boot']} resamples of {meta['unit']}s)", fontsize=10, y=1.03)
    _save_png(fig, path)


def _plot_metrics(result: dict, path: Path) -> None:
    _bar_panels(result, path, diff=False)


def _plot_diffs(result: dict, path: Path) -> None:
    _bar_panels(result, path, diff=True)


# --------------------------------------------------------------------------- CLI


def _parse_runs(positional: list[str], names: str | None, run_specs: list[str], baseline: str) -> tuple[dict, str]:
    runs: dict[str, list[Path]] = {}
    pos = [Path(p) for p in positional]
    if names:
        nm = [s.strip() for s in names.split(",")]
        if len(nm) != len(pos):
            raise ValueError(f"--names has {len(nm)} names for {len(pos)} positional run dirs")
    else:
        nm = _default_names(pos)
    for n, p in zip(nm, pos):
        if n in runs:
            raise ValueError(f"run name {n!r} given twice")
        runs[n] = [p]
    for spec in run_specs:
        if "=" not in spec:
            raise ValueError(f"--run expects NAME=DIR[,DIR...], got {spec!r}")
        n, dirs = spec.split("=", 1)
        if n in runs:
            raise ValueError(f"run name {n!r} given twice")
        runs[n] = [Path(d) for d in dirs.split(",") if d]
    if baseline in runs:
        return runs, baseline
    bdir = find_eval_dir(baseline).resolve()
    for n, dirs in runs.items():
        if len(dirs) == 1 and find_eval_dir(dirs[0]).resolve() == bdir:
            return runs, n
    n = _default_names([Path(baseline)])[0]
    if n in runs:
        n = f"{n}:baseline"
    runs[n] = [Path(baseline)]
    return runs, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.compare", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="*", metavar="EVAL_DIR", help="one evaluation output per run")
    ap.add_argument("--run", action="append", default=[], metavar="NAME=DIR[,DIR...]",
                    help="a named run; several dirs (seeds) are averaged event by event")
    ap.add_argument("--baseline", required=True, help="run name or EVAL_DIR to compare against")
    ap.add_argument("--out", required=True)
    ap.add_argument("--names", help="comma-separated names of the positional runs")
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
    ap.add_argument("--unit", default="auto", choices=UNITS,
                    help="resampling unit (auto: user when every run has user_id, else session)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level", type=float, default=0.95)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        runs, base = _parse_runs(a.run_dirs, a.names, a.run, a.baseline)
    except ValueError as e:
        ap.error(str(e))
    res = compare(runs, base, a.out, metrics=a.metrics, unit=a.unit, n_boot=a.n_boot, seed=a.seed,
                  level=a.level, command="python -m evaluation.compare " + shlex.join(argv))
    sys.stdout.write(_markdown(res))
    print(f"wrote {Path(a.out) / 'comparison.md'} (+ .csv, .json, 2 PNGs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
