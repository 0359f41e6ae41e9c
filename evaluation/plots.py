"""PNG plots for MLflow: training curve, metrics by session length / position, family comparison.

Pure functions of the JSON files training and evaluation write; matplotlib's
Agg backend (no display). Used by ``evaluation.mlflow_logging``; by hand::

    python -c "from evaluation.plots import breakdown_plot; breakdown_plot('EVAL_DIR/breakdowns.json', 'b.png')"
"""
from __future__ import annotations

import json
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out) -> Path:
    """Write ``fig`` atomically to ``out`` and close it (pyplot keeps every open figure)."""
    try:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        tmp.replace(out)
        return out
    finally:
        _plt().close(fig)


def training_curve(history: list[dict], out, title: str = "training") -> Path:
    """Loss and events/s per epoch (``history.json``'s ``epochs``)."""
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = [h["epoch"] + 1 for h in history]
    ax[0].plot(ep, [h["loss"] for h in history], marker="o")
    ax[0].set(xlabel="epoch", ylabel="train loss", title=f"{title}: loss")
    ax[1].plot(ep, [h["events_per_s"] for h in history], marker="o", color="tab:green")
    ax[1].set(xlabel="epoch", ylabel="events/s", title=f"{title}: throughput")
    for a in ax:
        a.grid(alpha=0.3)
    return _save(fig, out)


def breakdown_plot(breakdowns, out, k: int = 20, title: str = "") -> Path:
    """Recall@k and MRR@k by session-length bucket and by position (``breakdowns.json``)."""
    if not isinstance(breakdowns, dict):
        breakdowns = json.loads(Path(breakdowns).read_text())
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    for a, key, label in ((ax[0], "session_length", "session length"), (ax[1], "position", "position in session")):
        rows = breakdowns.get(key, [])
        xs = list(range(len(rows)))
        w = 0.38
        a.bar([x - w / 2 for x in xs], [r.get(f"recall_at_{k}", 0.0) or 0.0 for r in rows], w, label=f"Recall@{k}")
        a.bar([x + w / 2 for x in xs], [r.get(f"mrr_at_{k}", 0.0) or 0.0 for r in rows], w, label=f"MRR@{k}")
        a.set_xticks(xs, [f"{r['bucket']}\n(n={r['n_events']})" for r in rows], fontsize=8)
        a.set(xlabel=label, ylim=(0, 1), title=f"{title} by {label}".strip())
        a.legend(fontsize=8)
        a.grid(alpha=0.3, axis="y")
    return _save(fig, out)


def comparison_bar(rows: list[dict], out, metrics=("recall_at_20", "mrr_at_20"), title: str = "") -> Path:
    """One group of bars per candidate (``label``) for each metric, e.g. across families."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 3.6))
    n = len(metrics)
    w = 0.8 / max(n, 1)
    xs = list(range(len(rows)))
    for j, m in enumerate(metrics):
        vals = [float(r.get(m) or 0.0) for r in rows]
        bars = ax.bar([x - 0.4 + w * (j + 0.5) for x in xs], vals, w, label=m.replace("_at_", "@"))
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="test metric", title=title or "model comparison")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out)
