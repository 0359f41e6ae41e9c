"""Results table with bootstrap CIs and paired tests for any set of evaluation outputs.

Run::

    python -m evaluation.compare EVAL_DIR [EVAL_DIR ...] --baseline EVAL_DIR --out DIR \
        [--run NAME=EVAL_DIR[,EVAL_DIR...]] [--names a,b,c] \
        [--metrics recall_at_20,mrr_at_20,recall_at_5,mrr_at_5] [--unit auto|session|user] \
        [--n-boot 1000] [--seed 0] [--level 0.95] [--by-length [2-5,6-25,26-]]

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
a two-sided paired Wilcoxon signed-rank test on per-unit means. The uplift
(Villatel et al. 2018, Tables 4 and 5) is the relative difference
``(mean_run - mean_baseline) / mean_baseline`` in percent; its CI is the
percentile interval of the same ratio of resampled means over the same paired
resamples (none when the baseline's mean is 0: in the point estimate, uplift
and CI are empty; in some resample only, the CI is).

Metrics: ``recall|mrr|ndcg|precision_at_K`` are computed from the per-event
``rank``; any other name must be a numeric per-event column (e.g. a future
``hit_at_20_n5``), used as is (``recall_at_K_nN`` also finds ``hit_at_K_nN``).
``recall_at_K_n_1`` (Villatel's Recall@K,N=1, which evaluate writes no column
for) is ``1 + n_greater + n_ties <= K``: the next item under the conservative
tie rule that evaluate uses for every Recall@K,N. Villatel's Table 4 is
``--metrics recall_at_20_n_1,recall_at_20_n_5``.

``--by-length 2-5,6-25,26-`` (Table 5; ``--by-length`` alone: these buckets;
``LO-`` or ``LO+`` has no upper bound): the same statistics within each bucket
of the per-event ``session_length`` (the evaluated session's number of events),
each bucket resampled over its own units (paired, one seed); a bucket without
events is shown empty. ``--by COLUMN[=BUCKETS]`` (repeatable) does the same for
other per-event columns (``BY_COLUMNS``): ``user_history_sessions`` (user mode:
the user's sessions in the history tables, 0 = none; default ``0,1-6,7-``),
``input_position`` (1-based position of the click the prediction follows, =
``position`` + 1; default ``1-2,3-4,5-9,10-``, Quadrana et al.'s) and
``session_length``; a lone ``N`` is the bucket ``N-N``. Files:
``comparison_by_{length,user_history,position}.{md,csv,json}``.

Writes into DIR (each file atomically): ``comparison.md``, ``comparison.csv``
(one row per run x metric), ``comparison.json`` (rows + metadata),
``comparison_metrics.png`` (metric bars with CIs) and ``comparison_diffs.png``
(differences to the baseline with CIs); with ``--by-length`` also
``comparison_by_length.{md,csv,json}`` (one row per bucket x run x metric;
its tables are a section of comparison.md too); and, when every evaluation
of every run has ``recall_per_step.json`` (evaluate writes it),
``comparison_future_steps.png`` and ``.csv`` (Villatel's Figure 3: Recall@20
of the item d steps ahead, d = 1..20, per run; a run of several seeds: mean
over seeds, band min..max; and its uplift over the baseline). From Python (the DAG)::

    from evaluation.compare import compare
    compare({"gru4rec": [d1, d2, d3], "pop": [d4]}, baseline="pop", out=DIR,
            by_length=[(2, 5), (6, 25), (26, None)])
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
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
               "uplift", "uplift_lo", "uplift_hi",
               "p_value", "n_events", "n_units", "unit", "n_seeds", "seed_min", "seed_max")
#: comparison_by_length.csv: one row per length bucket x run x metric
BY_LENGTH_CSV_COLUMNS = ("bucket", "length_min", "length_max", "run", "metric", "is_baseline", "mean", "lo", "hi",
                         "diff", "diff_lo", "diff_hi", "uplift", "uplift_lo", "uplift_hi",
                         "n_events", "n_units", "unit", "n_seeds")
#: comparison_by_<name>.csv of the other columns: one row per bucket x run x metric
BY_CSV_COLUMNS = ("bucket", "column", "min", "max", "run", "metric", "is_baseline", "mean", "lo", "hi",
                  "diff", "diff_lo", "diff_hi", "uplift", "uplift_lo", "uplift_hi",
                  "n_events", "n_units", "unit", "n_seeds")
#: Villatel et al.'s session-length buckets (Table 5); ``None``: no upper bound
VILLATEL_LENGTHS = ((2, 5), (6, 25), (26, None))
#: per-event columns a comparison can be broken down by: column -> (what it is, default
#: buckets, file name part). input_position = position + 1 (1 = the prediction after the first
#: click); the defaults are evaluate's breakdowns (Quadrana et al.'s positions and history)
BY_COLUMNS = {
    "session_length": ("session length", "2-5,6-25,26-", "length"),
    "input_position": ("input position in the session (1 = after its first click)", "1-2,3-4,5-9,10-", "position"),
    "user_history_sessions": ("user history (the user's sessions in the history tables; 0 = none)", "0,1-6,7-",
                              "user_history"),
}
#: what evaluate writes beside metrics.json: recall per future step d = 1..n_future
FUTURE_STEPS_FILE, FUTURE_METRIC = "recall_per_step.json", "recall_at_20"
FUTURE_CSV_COLUMNS = ("run", "metric", "step", "n_events", "mean", "seed_min", "seed_max", "n_seeds", "uplift")
_N1_RE = re.compile(r"^recall_at_(\d+)_n_?1$")
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
    n1 = _N1_RE.match(metric)
    if col not in cols and n1 and "n_greater" in cols and "n_ties" in cols:
        # the next item under the conservative tie rule (evaluate's rule for every Recall@K,N)
        v = (1.0 + cols["n_greater"] + cols["n_ties"] <= int(n1.group(1))).astype(np.float64)
        reported = run.metrics.get(f"recall_at_{n1.group(1)}_n_1")
        if isinstance(reported, (int, float)) and not math.isclose(
                float(reported), float(v.mean()), rel_tol=_CHECK_TOL, abs_tol=_CHECK_TOL):
            raise ValueError(f"{run.path}: per_event.parquet gives {metric}={v.mean():.6f} from n_greater + "
                             f"n_ties but metrics.json says {reported:.6f}; the two files do not belong together")
        return v
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


def _uplift(run_mean: float, base_mean: float, run_dist, base_dist, level: float):
    """Relative uplift in % of a run over the baseline and the percentile interval of the same
    ratio over the paired resamples ``run_dist`` / ``base_dist``: ``(None, None, None)`` when
    the baseline's mean is 0, no interval when it is 0 in some resample."""
    if base_mean == 0:
        return None, None, None
    u = (run_mean - base_mean) / base_mean * 100.0
    if np.any(base_dist == 0):
        return u, None, None
    lo, hi = stats.percentile_interval((run_dist - base_dist) / base_dist * 100.0, level)
    return u, lo, hi


def _summaries(values: dict, names: list[str], metrics: list[str], baseline: str, unit_ids: np.ndarray,
               n_boot: int, seed: int, level: float) -> dict:
    """(run, metric) -> mean, lo, hi and, for a run other than the baseline, diff, diff_lo,
    diff_hi (per-event difference resampled) and uplift, uplift_lo, uplift_hi (ratio of the
    run's and the baseline's resampled means), all from ONE cluster bootstrap of every column
    (common random numbers: the same resampled units for every run and metric)."""
    cols, keys = [], []
    for n in names:
        for m in metrics:
            cols.append(values[n, m])
            keys.append(("value", n, m))
            if n != baseline:
                cols.append(values[n, m] - values[baseline, m])
                keys.append(("diff", n, m))
    dist = stats.bootstrap_distribution(np.stack(cols, 1), unit_ids, n_boot=n_boot, seed=seed)
    j = {k: i for i, k in enumerate(keys)}
    out = {}
    for n in names:
        for m in metrics:
            jv = j["value", n, m]
            lo, hi = stats.percentile_interval(dist[:, jv], level)
            s = {"mean": float(cols[jv].mean()), "lo": lo, "hi": hi, "diff": None, "diff_lo": None,
                 "diff_hi": None, "uplift": None, "uplift_lo": None, "uplift_hi": None}
            if n != baseline:
                jd, jb = j["diff", n, m], j["value", baseline, m]
                dlo, dhi = stats.percentile_interval(dist[:, jd], level)
                u, ulo, uhi = _uplift(s["mean"], float(cols[jb].mean()), dist[:, jv], dist[:, jb], level)
                s.update(diff=float(cols[jd].mean()), diff_lo=dlo, diff_hi=dhi, uplift=u, uplift_lo=ulo, uplift_hi=uhi)
            out[n, m] = s
    return out


def _bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else (str(lo) if hi == lo else f"{lo}-{hi}")


def parse_length_buckets(spec) -> list[tuple[int, int | None]]:
    """``"2-5,6-25,26-"`` (``26+`` also reads as open-ended) or ``[(2, 5), (6, 25), (26, None)]``
    -> session-length buckets ``lo <= length <= hi`` (``hi`` None: no upper bound). Raises
    ``ValueError`` for a malformed, empty, reversed or overlapping bucket."""
    return parse_buckets(spec, "by_length", lo_min=1)


def parse_buckets(spec, what: str = "by", lo_min: int = 0) -> list[tuple[int, int | None]]:
    """Buckets ``lo <= value <= hi`` of an integer per-event column, from ``"0,1-6,7-"`` (a lone
    ``N`` is ``N-N``) or pairs; ``lo >= lo_min``; ``what`` names the option in errors."""
    want = "expected LO-HI, N or LO- (no upper bound), e.g. 2-5,6-25,26-"
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        pairs = []
        for p in parts:
            m = re.fullmatch(r"(\d+)\s*(?:(-)\s*(\d*)|(\+))?", p)
            if not m:
                raise ValueError(f"{what}: bad bucket {p!r} in {spec!r}: {want}")
            lo = int(m.group(1))
            pairs.append((lo, lo) if not (m.group(2) or m.group(4)) else
                         (lo, int(m.group(3)) if m.group(3) else None))
    else:
        pairs = []
        for b in spec:
            try:
                lo, hi = b
                pairs.append((int(lo), None if hi is None else int(hi)))
            except (TypeError, ValueError):
                raise ValueError(f"{what}: bad bucket {b!r}: expected (lo, hi) or (lo, None)") from None
    if not pairs:
        raise ValueError(f"{what}: no bucket in {spec!r}: {want}")
    for lo, hi in pairs:
        if lo < lo_min or (hi is not None and hi < lo):
            raise ValueError(f"{what}: bucket {_bucket_label(lo, hi)}: needs {lo_min} <= LO <= HI")
    ordered = sorted(pairs, key=lambda b: b[0])
    for (lo1, hi1), (lo2, hi2) in zip(ordered, ordered[1:]):
        if hi1 is None or hi1 >= lo2:
            raise ValueError(f"{what}: buckets {_bucket_label(lo1, hi1)} and {_bucket_label(lo2, hi2)} overlap")
    return pairs


def parse_by(spec) -> dict[str, list[tuple[int, int | None]]]:
    """``{"user_history_sessions": "0,1-6,7-", ...}`` or ``["COLUMN=BUCKETS", ...]`` -> column ->
    buckets, for the columns of ``BY_COLUMNS`` (``session_length``: lower bounds >= 1)."""
    items = spec.items() if isinstance(spec, dict) else (str(x).partition("=")[::2] for x in spec)
    out = {}
    for col, b in items:
        col = col.strip()
        if col not in BY_COLUMNS:
            raise ValueError(f"by: unknown column {col!r}; one of {', '.join(BY_COLUMNS)} (COLUMN=BUCKETS)")
        if col in out:
            raise ValueError(f"by: column {col!r} given twice")
        out[col] = parse_buckets(b or BY_COLUMNS[col][1], f"by {col}", lo_min=1 if col == "session_length" else 0)
    return out


def _column(loaded: dict[str, list[EvalRun]], col: str) -> np.ndarray:
    """The per-event values of ``col`` (``input_position`` = ``position`` + 1), the same in every run."""
    src = "position" if col == "input_position" else col
    runs = [r for rs in loaded.values() for r in rs]
    lacking = [str(r.path) for r in runs if src not in r.columns]
    if lacking:
        raise ValueError(f"by {col} needs the per-event column {src} (written by evaluation.evaluate"
                         + (" in user mode" if src == "user_history_sessions" else "") + f"); missing in {lacking}")
    ref = runs[0].columns[src]
    for r in runs[1:]:
        if not np.array_equal(r.columns[src], ref):
            raise IncompatibleRunsError(f"runs ({runs[0].path}) and ({r.path}) give different {src} "
                                        "values to the same events")
    return np.asarray(ref, dtype=np.int64) + (1 if col == "input_position" else 0)


def _by_buckets(buckets, col_values, values, loaded, names, metrics, baseline, unit, unit_ids,
                n_boot, seed, level) -> list[dict]:
    """One row per bucket x run x metric: the statistics of ``_summaries`` on the bucket's events."""
    rows = []
    for lo, hi in buckets:
        sel = (col_values >= lo) & ((col_values <= hi) if hi is not None else True)
        n_ev = int(sel.sum())
        n_un = int(len(np.unique(unit_ids[sel])))
        summ = _summaries({k: v[sel] for k, v in values.items()}, names, metrics, baseline, unit_ids[sel],
                          n_boot, seed, level) if n_ev else {}
        for n in names:
            for m in metrics:
                empty = dict.fromkeys(("mean", "lo", "hi", "diff", "diff_lo", "diff_hi",
                                       "uplift", "uplift_lo", "uplift_hi"))
                rows.append({"bucket": _bucket_label(lo, hi), "min": lo, "max": hi, "run": n,
                             "metric": m, "is_baseline": n == baseline, **summ.get((n, m), empty),
                             "n_events": n_ev, "n_units": n_un, "unit": unit, "n_seeds": len(loaded[n])})
    return rows


def _future_steps(loaded: dict[str, list[EvalRun]], names: list[str], baseline: str) -> list[dict] | None:
    """Rows of comparison_future_steps.csv from every evaluation's recall_per_step.json (None,
    logged, when one lacks it or they disagree on the steps)."""
    per_run = {}
    for n in names:
        per_run[n] = []
        for r in loaded[n]:
            f = r.path / FUTURE_STEPS_FILE
            if not f.is_file():
                log.info("no %s in %s: no future-step plot", FUTURE_STEPS_FILE, r.path)
                return None
            try:
                steps = {int(x["step"]): x for x in json.loads(f.read_text())}
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{f}: not a list of per-step rows with a 'step' ({e})") from None
            if not steps or any(FUTURE_METRIC not in x for x in steps.values()):
                log.warning("%s has no %s per step: no future-step plot", f, FUTURE_METRIC)
                return None
            per_run[n].append(steps)
    ref = per_run[baseline][0]
    if any(sorted(s) != sorted(ref) for seeds in per_run.values() for s in seeds):
        log.warning("the evaluations' %s files have different steps: no future-step plot", FUTURE_STEPS_FILE)
        return None
    base_mean = {}
    rows = []
    for n in names:
        for d in sorted(ref):
            v = [s[d][FUTURE_METRIC] for s in per_run[n]]
            mean = None if any(x is None for x in v) else float(np.mean(v))
            if n == baseline:
                base_mean[d] = mean
            b = base_mean[d]
            uplift = None if n == baseline or mean is None or not b else (mean - b) / b * 100.0
            rows.append({"run": n, "metric": FUTURE_METRIC, "step": d, "n_events": ref[d].get("n_events"),
                         "mean": mean, "seed_min": None if mean is None else float(min(v)),
                         "seed_max": None if mean is None else float(max(v)), "n_seeds": len(v), "uplift": uplift})
    return rows


def compare(runs: dict[str, list[Path]], baseline: str, out, metrics=DEFAULT_METRICS, unit: str = "auto",
            n_boot: int = 1000, seed: int = 0, level: float = 0.95, command: str | None = None,
            by_length=None, by=None) -> dict:
    """Compare ``runs`` (name -> evaluation dirs; several dirs = seeds, averaged per event)
    against ``runs[baseline]``; write comparison.{md,csv,json} and two PNGs into ``out``.
    ``by_length`` (``"2-5,6-25,26-"`` or ``[(2, 5), (6, 25), (26, None)]``): also the
    statistics per session-length bucket, comparison_by_length.{md,csv,json}. When every
    evaluation has recall_per_step.json: comparison_future_steps.{png,csv}.

    Returns the content of comparison.json: ``{"metadata": ..., "runs": ..., "rows": [...]}``,
    one row per run x metric (see CSV_COLUMNS), plus ``"by_length"`` (the content of
    comparison_by_length.json) when ``by_length`` is given and ``"future_steps"`` (the rows
    of comparison_future_steps.csv) when those were written. Raises ``IncompatibleRunsError``
    when two runs were not evaluated on the same test table.
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
    by_cols = parse_by(by or {})
    if by_length is not None:
        if "session_length" in by_cols:
            raise ValueError("give the session-length buckets once: by_length or by['session_length']")
        by_cols = {"session_length": parse_length_buckets(by_length), **by_cols}
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
    col_values = {c: _column(loaded, c) for c in by_cols}
    n_events = ref.n_events
    n_units = int(len(np.unique(unit_ids)))

    # per-event values: (run, metric) -> seed-averaged array; seeds' own point estimates
    values, seed_points = {}, {}
    for n in names:
        for m in metrics:
            per_seed = [metric_values(r, m) for r in loaded[n]]
            values[n, m] = np.mean(per_seed, axis=0) if len(per_seed) > 1 else per_seed[0]
            seed_points[n, m] = [float(v.mean()) for v in per_seed]

    summ = _summaries(values, names, metrics, baseline, unit_ids, n_boot, seed, level)
    rows = []
    for n in names:
        for m in metrics:
            row = {"run": n, "metric": m, "is_baseline": n == baseline, **summ[n, m], "p_value": None,
                   "n_events": n_events, "n_units": n_units, "unit": unit, "n_seeds": len(loaded[n]),
                   "seed_min": min(seed_points[n, m]), "seed_max": max(seed_points[n, m])}
            if n != baseline:
                _, ma, _ = stats.unit_means(values[n, m], unit_ids)
                _, mb, _ = stats.unit_means(values[baseline, m], unit_ids)
                row["p_value"] = stats.wilcoxon(ma, mb)
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
        "uplift": "(mean_run - mean_baseline) / mean_baseline in percent; interval: percentile of the "
                  "same ratio of the run's and the baseline's means over the same paired resamples",
        "test": "two-sided paired Wilcoxon signed-rank on per-unit means (zero differences dropped)",
        "by_length": None if "session_length" not in by_cols else
        [_bucket_label(lo, hi) for lo, hi in by_cols["session_length"]],
        "by": {c: [_bucket_label(lo, hi) for lo, hi in b] for c, b in by_cols.items()},
    }
    run_info = {n: {"dirs": [str(r.path) for r in loaded[n]],
                    "models": [r.metrics.get("model") for r in loaded[n]],
                    "seed_values": {m: seed_points[n, m] for m in metrics},
                    "cost": _cost(loaded[n])} for n in names}
    result = {"metadata": meta, "runs": run_info, "rows": rows}
    by_out = {}
    for col, buckets in by_cols.items():
        brows = _by_buckets(buckets, col_values[col], values, loaded, names, metrics, baseline, unit, unit_ids,
                            n_boot, seed, level)
        for r in brows:
            r["column"] = col
            if col == "session_length":  # the columns comparison_by_length.csv always had
                r["length_min"], r["length_max"] = r["min"], r["max"]
        by_out[col] = {"metadata": {**{k: meta[k] for k in ("table", "ties", "rows_digest", "unit", "n_boot", "seed",
                                                            "level", "baseline", "metrics", "command", "interval",
                                                            "uplift")}, "column": col},
                       "buckets": [{"bucket": _bucket_label(lo, hi), "min": lo, "max": hi,
                                    **({"length_min": lo, "length_max": hi} if col == "session_length" else {})}
                                   for lo, hi in buckets],
                       "rows": brows}
    future = _future_steps(loaded, names, baseline)
    meta["future_steps"] = future is not None

    out.mkdir(parents=True, exist_ok=True)
    C.write_text(out / "comparison.md", _markdown(result, by_out, future))
    C.write_text(out / "comparison.csv", _csv(rows))
    C.write_text(out / "comparison.json", json.dumps(_json_safe(result), indent=2, sort_keys=True) + "\n")
    _plot_metrics(result, out / "comparison_metrics.png")
    _plot_diffs(result, out / "comparison_diffs.png")
    for col, b in by_out.items():
        stem = f"comparison_by_{BY_COLUMNS[col][2]}"
        C.write_text(out / f"{stem}.md", _by_length_markdown(b))
        C.write_text(out / f"{stem}.csv", _csv(b["rows"], BY_LENGTH_CSV_COLUMNS if col == "session_length"
                                                else BY_CSV_COLUMNS))
        C.write_text(out / f"{stem}.json", json.dumps(_json_safe(b), indent=2, sort_keys=True) + "\n")
    if by_out:
        result["by"] = by_out
    if "session_length" in by_out:
        result["by_length"] = by_out["session_length"]
    if future is not None:
        C.write_text(out / "comparison_future_steps.csv", _csv(future, FUTURE_CSV_COLUMNS))
        _plot_future_steps(future, meta, out / "comparison_future_steps.png")
        result["future_steps"] = future
    return result


# --------------------------------------------------------------------------- writing


COST_KEYS = ("fit_seconds", "eval_seconds", "eval_events_per_s", "n_parameters", "model_bytes",
             "latency_ms_p50", "latency_ms_p99", "latency_batch_rows_p50", "predict_us_per_event")


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


def _csv(rows: list[dict], columns=CSV_COLUMNS) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else (repr(r[k]) if isinstance(r[k], float) else r[k]))
                    for k in columns})
    return buf.getvalue()


def _fmt_uplift(u, lo, hi) -> str:
    """``+6.5 % [+5.2, +7.8]``; ``—`` without an uplift (baseline mean 0), ``[—, —]`` without its CI."""
    if u is None:
        return "—"
    ci = "—, —" if lo is None else f"{lo:+.1f}, {hi:+.1f}"
    return f"{u:+.1f} % [{ci}]"


def _by_length_tables(by_len: dict) -> list[str]:
    """Villatel's Table 5 shape, one table per metric: a row per run, a column per length bucket;
    each cell the run's mean [CI] and, but for the baseline, its uplift over the baseline [CI]."""
    meta, rows = by_len["metadata"], by_len["rows"]
    base = meta["baseline"]
    names = list(dict.fromkeys(r["run"] for r in rows))
    labels = [b["bucket"] for b in by_len["buckets"]]
    by = {(r["bucket"], r["run"], r["metric"]): r for r in rows}
    lines = []
    what = BY_COLUMNS[meta.get("column", "session_length")][0]
    for m in meta["metrics"]:
        head = [f"{m} by {what.split(' (')[0]}"]
        for b in labels:
            r = by[b, base, m]
            head.append(f"{b} ({r['n_events']} events, {r['n_units']} {meta['unit']}s)")
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(labels)) + "|"]
        for n in names:
            cells = [n + (" (baseline)" if n == base else "")]
            for b in labels:
                r = by[b, n, m]
                if r["mean"] is None:
                    cells.append("—")
                    continue
                c = _fmt_ci(r["mean"], r["lo"], r["hi"])
                if n != base:
                    c += "; " + _fmt_uplift(r["uplift"], r["uplift_lo"], r["uplift_hi"])
                cells.append(c)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _by_length_markdown(by_len: dict) -> str:
    meta = by_len["metadata"]
    col = meta.get("column", "session_length")
    what = BY_COLUMNS[col][0]
    pct = f"{meta['level'] * 100:g}%"
    return "\n".join([
        f"# By {what.split(' (')[0]} on table `{meta['table']}` (ties: {meta['ties']})",
        "",
        f"- buckets of the per-event `{col}` ({what}); each bucket resampled "
        f"over its own {meta['unit']}s, {meta['n_boot']} cluster-bootstrap resamples, seed {meta['seed']}, "
        f"{pct} percentile intervals",
        f"- uplift: relative to the baseline **{meta['baseline']}** in percent, {pct} CI of the ratio over the "
        "same paired resamples; an empty bucket (no event) shows —",
        f"- test rows digest: `{meta['rows_digest'][:16]}`",
        f"- command: `{meta['command']}`",
        "",
    ] + _by_length_tables(by_len))


def _markdown(result: dict, by_cols: dict | None = None, future: list[dict] | None = None) -> str:
    """comparison.md; ``by_cols`` / ``future``: its by-column sections and its line on the
    future-step files (``compare`` returns them as ``by`` / ``future_steps``); a ``by_cols`` that
    is one breakdown (the older ``by_length`` content) is the by-session-length one."""
    if by_cols is not None and "rows" in by_cols:
        by_cols = {"session_length": by_cols}
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
        "two-sided paired Wilcoxon signed-rank p on per-unit means; uplift: the difference relative to the "
        f"baseline in percent, {pct} CI of the ratio of means over the same paired resamples",
        f"- test rows digest (sha256 of sorted session_id, position, target_item_id): `{meta['rows_digest'][:16]}`",
        f"- command: `{meta['command']}`",
        "",
    ]
    head = ["run"]
    for m in metrics:
        head += [m, f"Δ {m} vs {base}", f"uplift {m} vs {base}"]
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
            cells.append("—" if n == base else _fmt_uplift(r["uplift"], r["uplift_lo"], r["uplift_hi"]))
        lines.append("| " + " | ".join(cells) + " |")
    costs = {n: result["runs"][n].get("cost") or {} for n in names}
    if any(any(v is not None for v in c.values()) for c in costs.values()):
        lines += ["", "Cost (mean over a run's seeds; fit = the training run's wall time, scoring = the evaluation "
                  "loop's wall time over this table; timings are of the machine and thread count they ran on; "
                  "parameters = elements of floating-point tensors, while a kNN's state is mostly integer index "
                  "arrays, counted in model MB; step p50 / p99 = the model's prediction of one batch "
                  "(one scorer.step call of the evaluation loop) in ms, of batches of the median rows shown; "
                  "us/event = all step time / events fed):", "",
                  "| run | fit s | scoring s | scored events/s | step p50 ms | step p99 ms | rows/step | us/event "
                  "| parameters | model MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in names:
            c = costs[n]
            mb = None if c.get("model_bytes") is None else c["model_bytes"] / 1e6
            lines.append(f"| {n} | {_fmt_cost(c.get('fit_seconds'), '.1f')} | {_fmt_cost(c.get('eval_seconds'), '.1f')} | "
                         f"{_fmt_cost(c.get('eval_events_per_s'), ',.0f')} | {_fmt_cost(c.get('latency_ms_p50'), '.3f')} | "
                         f"{_fmt_cost(c.get('latency_ms_p99'), '.3f')} | {_fmt_cost(c.get('latency_batch_rows_p50'), '.0f')} | "
                         f"{_fmt_cost(c.get('predict_us_per_event'), '.2f')} | {_fmt_cost(c.get('n_parameters'), ',.0f')} | "
                         f"{_fmt_cost(mb, '.2f')} |")
    for col, b in (by_cols or {}).items():
        lines += ["", f"## By {BY_COLUMNS[col][0]}", ""] + _by_length_tables(b)[:-1]
    if future is not None:
        lines += ["", f"{FUTURE_METRIC} of the item d steps ahead, d = 1..{max(r['step'] for r in future)} (mean over "
                  f"seeds, from each evaluation's {FUTURE_STEPS_FILE}): `comparison_future_steps.png`, "
                  "`comparison_future_steps.csv`"]
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


def _plot_future_steps(future: list[dict], meta: dict, path: Path) -> None:
    """Villatel's Figure 3: (a) Recall@20 per future step, a line per run (a band: min..max over
    its seeds); (b) its uplift over the baseline in percent (of the means over seeds)."""
    plt = _plt()
    base = meta["baseline"]
    names = list(dict.fromkeys(r["run"] for r in future))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))

    def series(n, key):
        rs = [r for r in future if r["run"] == n]
        return (np.array([r["step"] for r in rs]),
                np.array([np.nan if r[key] is None else r[key] for r in rs], dtype=np.float64), rs)

    for n in names:
        x, y, rs = series(n, "mean")
        line, = axes[0].plot(x, y, marker="o", ms=3, label=n + (" (baseline)" if n == base else ""))
        if rs[0]["n_seeds"] > 1:
            _, lo, _ = series(n, "seed_min")
            _, hi, _ = series(n, "seed_max")
            axes[0].fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        if n != base:
            axes[1].plot(x, series(n, "uplift")[1], marker="o", ms=3, color=line.get_color(), label=n)
    axes[0].set(xlabel="steps ahead d", ylabel=FUTURE_METRIC.replace("_at_", "@"),
                title=f"{FUTURE_METRIC} of the item d steps ahead")
    axes[1].axhline(0.0, color="black", lw=0.8)
    axes[1].set(xlabel="steps ahead d", ylabel="uplift %", title=f"uplift over {base} (mean over seeds)")
    if len(names) == 1:
        axes[1].text(0.5, 0.5, "no run besides the baseline", ha="center", va="center", transform=axes[1].transAxes)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"future steps on {meta['table']} (band: min..max over seeds)", fontsize=10, y=1.02)
    _save_png(fig, path)


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
    ap.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                    help="comma-separated (module docstring); Villatel's Table 4: recall_at_20_n_1,recall_at_20_n_5")
    ap.add_argument("--unit", default="auto", choices=UNITS,
                    help="resampling unit (auto: user when every run has user_id, else session)")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level", type=float, default=0.95)
    villatel = ",".join(f"{lo}-{'' if hi is None else hi}" for lo, hi in VILLATEL_LENGTHS)
    ap.add_argument("--by-length", nargs="?", const=villatel, default=None, metavar="LO-HI,...,LO-",
                    help="also per session-length bucket (per-event session_length; LO- has no upper bound), "
                         f"mean [CI] and uplift [CI] per run, into comparison_by_length.*; alone: {villatel}")
    ap.add_argument("--by", action="append", default=[], metavar="COLUMN[=LO-HI,...]",
                    help="also per bucket of a per-event column: "
                         + "; ".join(f"{c} ({w}; default {d})" for c, (w, d, _) in BY_COLUMNS.items())
                         + "; into comparison_by_<length|position|user_history>.*")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        runs, base = _parse_runs(a.run_dirs, a.names, a.run, a.baseline)
        if a.by_length is not None:
            parse_length_buckets(a.by_length)
        by = parse_by(a.by)
        if a.by_length is not None and "session_length" in by:
            raise ValueError("give the session-length buckets once: --by-length or --by session_length=...")
    except ValueError as e:
        ap.error(str(e))
    res = compare(runs, base, a.out, metrics=a.metrics, unit=a.unit, n_boot=a.n_boot, seed=a.seed,
                  level=a.level, command="python -m evaluation.compare " + shlex.join(argv), by_length=a.by_length,
                  by=by)
    sys.stdout.write(_markdown(res, res.get("by"), res.get("future_steps")))
    extra = [f"comparison_by_{BY_COLUMNS[c][2]}.{{md,csv,json}}" for c in res.get("by", {})] + \
        (["comparison_future_steps.{png,csv}"] if "future_steps" in res else [])
    print(f"wrote {Path(a.out) / 'comparison.md'} (+ .csv, .json, 2 PNGs{''.join(', ' + e for e in extra)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
