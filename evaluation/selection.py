"""Model selection and the champion rule: decisions never use data a model trained on.

The protocol (DESIGN.md "Model selection and the champion"):

* every candidate is trained twice: a **selection copy** on ``train`` (fine-tuned candidates:
  fine-tuned on the most recent 1/k of ``train``, from the pre-trained selection copy) and
  the **final model** on ``train_full`` / ``train_recent_<k>`` (which contain ``valid``);
* candidates are ranked by their selection copy's metric on ``valid``, which no selection
  copy trained on; the final model of the chosen one is registered and reported on ``test``
  (reported only: nothing is selected on ``test``);
* ``champion`` moves to the chosen candidate only when it beats the current champion on the
  same unseen table: the candidate's selection copy and a model of the champion that ended
  training before the validation period starts (its final model, else its selection copy),
  both scored on this run's ``valid``; the candidate must have the better mean AND a paired
  Wilcoxon signed-rank p-value below ``alpha`` over per-session values (or, with
  ``margin > 0``, a mean better by at least ``margin``). Otherwise the decision says why
  the alias did not move.

Pure functions over evaluation outputs (``evaluation.evaluate`` directories); the DAG
(``dags/pipeline_steps.py``) wires them to MLflow.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: the selection metric and how champion decisions are made (DAG Params override these)
DEFAULT_METRIC = "mrr_at_20"
DEFAULT_ALPHA = 0.05
DEFAULT_MARGIN = 0.0


@dataclass
class Comparison:
    """Candidate vs champion on one table (per-session paired values)."""

    metric: str
    table: str
    candidate_mean: float
    champion_mean: float
    diff: float
    p_value: float
    n_units: int
    n_events: int


def best_candidate(rows: list[dict], key: str) -> dict:
    """The row with the highest selection score ``key`` (ties: the first by candidate name).
    Every row's score must come from a model that did not train on the selection table."""
    if not rows:
        raise ValueError("no candidates to choose from")
    bad = [r["candidate"] for r in rows if r.get(key) is None or not np.isfinite(r[key])]
    if bad:
        raise ValueError(f"candidates {bad} have no selection score {key!r}")
    return sorted(rows, key=lambda r: (-r[key], r["candidate"]))[0]


def compare_on_table(candidate_eval, champion_eval, metric: str = DEFAULT_METRIC) -> Comparison:
    """Paired comparison of two evaluation outputs of the SAME table (refused otherwise):
    per-session means of ``metric``, their mean difference and the Wilcoxon p-value."""
    from evaluation import compare as cmp
    from evaluation import stats

    a, b = cmp.load_eval(candidate_eval), cmp.load_eval(champion_eval)
    cmp.check_same_test(a, b, "candidate", "champion")
    va, vb = cmp.metric_values(a, metric), cmp.metric_values(b, metric)
    units = a.columns["session_id"]
    _, ma, _ = stats.unit_means(va, units)
    _, mb, _ = stats.unit_means(vb, units)
    return Comparison(metric=metric, table=str(a.metrics.get("table")), candidate_mean=float(va.mean()),
                      champion_mean=float(vb.mean()), diff=float(va.mean() - vb.mean()),
                      p_value=float(stats.wilcoxon(ma, mb)), n_units=int(len(ma)), n_events=int(len(va)))


def promotion_decision(c: Comparison | None, *, alpha: float = DEFAULT_ALPHA, margin: float = DEFAULT_MARGIN,
                       reason_if_none: str = "") -> tuple[bool, str]:
    """(move champion?, why). ``c`` None = no comparison could be made (``reason_if_none``)."""
    if c is None:
        return False, reason_if_none or "no comparison on an unseen table was possible"
    better = c.diff > 0
    if margin > 0:
        ok = c.diff >= margin
        rule = f"mean better by >= {margin:g}"
    else:
        ok = better and c.p_value < alpha
        rule = f"better mean and Wilcoxon p < {alpha:g}"
    what = (f"{c.metric} on {c.table}: candidate {c.candidate_mean:.4f} vs champion {c.champion_mean:.4f} "
            f"(diff {c.diff:+.4f}, p={c.p_value:.3g}, {c.n_units} sessions)")
    return ok, f"{'beats' if ok else 'does not beat'} the champion ({rule}): {what}"


def unseen_model(champion_tags: dict, valid_start_us: int, tag_prefix: str) -> tuple[str, str] | None:
    """Which model of the champion saw nothing of the validation period: ("final", uri) when
    its final model's training ended before ``valid_start_us``, else ("selection", uri) for
    its selection copy, else None. Read from the registry version's tags."""
    for kind in ("final", "selection"):
        end = champion_tags.get(f"{tag_prefix}{kind}_train_end_us")
        uri = champion_tags.get(f"{tag_prefix}{kind}_model_uri")
        if end is not None and uri and int(end) < int(valid_start_us):
            return kind, uri
    return None


def as_dict(c: Comparison | None) -> dict | None:
    return None if c is None else asdict(c)
