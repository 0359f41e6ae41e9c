"""Tan, Xu & Liu (DLRS 2016) M1-M4 next to GRU4Rec on our data, by recent fraction (issue 16).

    python -m benchmarks.tan_tables --dataset rsc15-100k [--work /tmp/tan_tables] [--out docs/results]
        [--seeds 3] [--fractions 64,16,4] [--jobs 2] [--threads 1] [--models gru4rec,m1,m2,m3,m4]
        [--max-epochs 50] [--learning-rate 0.01] [--finetune-lrs 0.001,0.01] [--fixed-batch]
    python -m benchmarks.tan_tables --dataset diginetica-sample --fractions 16,4 --models m1,m2

For one dataset it

1. preprocesses the raw files with the project's Spark job (``baseline_tables.preprocess``,
   the dataset's time split);
2. fits, for ``--seeds`` seeds, on ``train`` only (``valid`` shares no session with it), the
   epoch chosen by early stopping on ``valid`` (Recall@20, patience 2, at most
   ``--max-epochs``; ``villatel_tables.RNN_SETTINGS``):

   * ``gru4rec``: GRU4Rec at its default (the official best RSC15 setting) on all of ``train``;
   * ``m1``: ``tan`` from scratch on the most recent 1/k of ``train``'s sessions for every
     ``--fractions`` k and on all of it (1/1) -- the config key ``recent_fraction=k`` with
     ``train_table=train``, not spark's ``train_recent_<k>``, which are cut from
     ``train_full`` and so overlap ``valid``;
   * ``m2``: the seed's 1/1 M1 fine-tuned (``init_from``, Adam state reset) on each fraction,
     and on 1/1 (continued training with a fresh optimizer; the paper has no M2 at 1/1), at a
     learning rate chosen on ``valid`` from ``--finetune-lrs`` (seed 1, the best mean over the
     fractions; at 0.01 a fresh Adam's first epoch, which early stopping always keeps, wrecks
     the pre-trained model: ``valid`` R@20 0.56 -> 0.44 on 1/64);
   * ``m3``: per fraction a ``tan_teacher`` on the reversed futures of that fraction (their
     "privileged information available in each data fraction"), trained for the number of
     epochs early stopping chose for the seed's M1 on the same fraction (``valid`` scores
     forward prefixes, which says nothing about a model of reversed futures), and a
     ``tan_distill`` student with it (λ = 0.2, T = 1) from scratch on the fraction;
   * ``m4``: ``tan_emb`` on all of ``train`` with the fixed item embeddings of the seed's 1/1
     M1 (their "embeddings trained on the full training dataset in M1"; their Figure 4 also has
     M4 on the fractions, not run here).

   Two departures from the family's defaults (chosen on ``valid``) keep patience 2 meaningful
   on a slice this small (an epoch of rsc15-100k's ``train`` is 60 Adam steps of 512
   examples; an epoch of their RSC15 was some 45,000):

   * ``--learning-rate`` 0.01 (the paper gives none; the family has Keras' 0.001): at 0.001
     M1 first sits ~5 epochs on a popularity plateau whose ``valid`` Recall@20 goes up and
     down (one seed stopped after 3 epochs, at 0.10) and peaks after ~50 epochs; at 0.01 it
     has no plateau and peaks at the same ``valid`` Recall@20 (0.561 vs 0.564, seed 1) by
     epoch ~7;
   * a batch of 512/k examples on fraction 1/k (``--fixed-batch``: 512 everywhere), so every
     epoch is ~60 steps: at 512, 1/64 of ``train`` (213 sessions) is ONE step an epoch and
     early stopping ends on the plateau (``valid`` R@20 0.145 vs 0.217 reached later); their
     smallest fraction (1/256 of RSC15) still had hundreds of steps an epoch. M2 fine-tunes
     with the same batch.

   Fits run ``--jobs`` at a time (processes of ``--threads`` torch threads), each as soon as
   the run it starts from has finished; a finished fit + evaluation is reused on a re-run
   with the same settings (``done.json``; the digest of the run a fit starts from is part of
   its settings);
3. scores ``test`` (session mode) and runs ``evaluation.compare`` with M1 on all of
   ``train`` as the baseline (Recall@20 / MRR@20, 95 % session-bootstrap CIs, paired
   differences, Wilcoxon p) into OUT/tan-<dataset>/, and per fraction with the scratch M1 as
   the baseline (OUT/tan-<dataset>/fraction-<k>/), and M2 per fraction against M2 on 1/1
   (OUT/tan-<dataset>/m2-recency/: recency apart from the second training phase); re-times the seed-1 models on ``test``
   one at a time, 3 rounds, nothing else of this process running (their Table 2: batch prediction
   time and parameters); plots Recall@20 and MRR@20 against the fraction (their Figure 4,
   OUT/tan-<dataset>/fractions.png); writes OUT/tan-<dataset>.md with sentences computed
   from the CIs on what of the paper's findings holds here.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from benchmarks.baseline_tables import DATASETS, preprocess
from benchmarks.table_jobs import Job, run_jobs
from benchmarks.villatel_tables import RNN_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

MODELS = ("gru4rec", "m1", "m2", "m3", "m4")
METRICS = ["recall_at_20", "mrr_at_20"]
LABELS = {"recall_at_20": "Recall@20", "mrr_at_20": "MRR@20"}
#: their Table 1 (RSC15, GRU 100 unless stated) and Table 2 (GRU 100)
PAPER = {"M2": {"recall_at_20": 0.7129, "mrr_at_20": 0.3091}, "M4 (1000)": {"recall_at_20": 0.6676, "mrr_at_20": 0.2847},
         "GRU4Rec TOP1 (1000)": {"recall_at_20": 0.6206, "mrr_at_20": 0.2693}}
PAPER_TABLE2 = {"M1 - M3": (0.665, 5_705_384), "M4": (0.366, 1_950_150)}
#: evaluation dirs of the timing pass (one per round: TIMING_DIR-1, ...), inside a run dir
TIMING_DIR = "timing-test"

log = logging.getLogger("tan_tables")


def frac_label(k: int) -> str:
    return f"1/{k}"


def run_name(model: str, k: int) -> str:
    """Row label: "M1" for M1 on all of train (the baseline), "M1 1/64", "M2 1/1", "GRU4Rec"."""
    return model if k == 1 and model != "M2" else f"{model} {frac_label(k)}"


# ----------------------------------------------------------------------------- fitting


def _digest(run_dir: str) -> str:
    from training import checkpoint as ck

    return ck.weights_digest(ck.load_checkpoint(Path(run_dir) / "model"))


def tan_settings(k: int, max_epochs: int, learning_rate: float, fixed_batch: bool) -> dict:
    """The Tan models' settings on fraction 1/k: early stopping (``RNN_SETTINGS``), the
    learning rate and, unless ``fixed_batch``, a batch of 1/k of TanConfig's 512 examples, so
    that every fraction's epoch is as many optimizer steps as the full data's (module docstring)."""
    from training.families.tan import TanConfig

    sets = {**RNN_SETTINGS, "n_epochs": max_epochs, "learning_rate": learning_rate, "recent_fraction": k}
    if not fixed_batch and k > 1:
        sets["batch_size"] = max(1, round(TanConfig.batch_size / k))
    return sets


def m2_candidate_key(lr: float, k: int) -> str:
    return f"m2-lr{lr:g}-f{k}-s1"


def chosen_finetune_lr(results: dict[str, dict], lrs: list[float], fr: list[int]) -> float:
    """The fine-tuning learning rate with the best mean ``valid`` Recall@20 (the early-stopping
    epoch's) over the fractions ``fr``, seed 1; ties: the first of ``lrs``."""
    def score(lr):
        return sum(results[m2_candidate_key(lr, k)]["valid_best"] for k in fr) / len(fr)
    return max(lrs, key=lambda lr: (score(lr), -lrs.index(lr)))


def plan(models: list[str], fractions: list[int], seeds: int, max_epochs: int, learning_rate: float = 0.01,
         fixed_batch: bool = False, finetune_lrs: tuple[float, ...] = (0.001,)) -> list[Job]:
    """Every fit of the benchmark (module docstring), in the order they are started when ready:
    the full-data M1 (everything else of its seed starts from it) and the longest chains first."""
    es = {**RNN_SETTINGS, "n_epochs": max_epochs}  # GRU4Rec: its own defaults otherwise

    def ts(k):
        return tan_settings(k, max_epochs, learning_rate, fixed_batch)

    S = range(1, seeds + 1)

    def m1(s, k):
        return Job(f"m1-f{k}-s{s}", run_name("M1", k), s, k,
                   lambda res: ("tan", {**ts(k), "seed": s}, None))

    def teacher(s, k):  # as many epochs as early stopping gave the M1 of this seed and fraction
        m = f"m1-f{k}-s{s}"
        return Job(f"teacher-f{k}-s{s}", f"M3 teacher {frac_label(k)}", s, k, deps=[m], resolve=lambda res: (
            "tan_teacher", {**{x: v for x, v in ts(k).items() if x not in RNN_SETTINGS}, "seed": s,
                            "n_epochs": res[m]["best_epoch"]}, None))

    def m3(s, k):
        t = f"teacher-f{k}-s{s}"
        return Job(f"m3-f{k}-s{s}", run_name("M3", k), s, k, deps=[t], resolve=lambda res: (
            "tan_distill", {**ts(k), "seed": s, "teacher_run": str(Path(res[t]["run_dir"]) / "model"),
                            "teacher_digest": _digest(res[t]["run_dir"])}, None))

    def m2_candidate(k, lr):  # seed 1, one per fine-tuning learning rate
        return Job(m2_candidate_key(lr, k), f"{run_name('M2', k)} lr {lr:g}", 1, k, deps=["m1-f1-s1"],
                   resolve=lambda res: ("tan", {**ts(k), "learning_rate": lr, "seed": 1},
                                        str(Path(res["m1-f1-s1"]["run_dir"]) / "model")))

    def m2(s, k, candidates):  # seeds 2.. at the learning rate chosen on valid
        full = f"m1-f1-s{s}"
        return Job(f"m2-f{k}-s{s}", run_name("M2", k), s, k, deps=[full] + candidates, resolve=lambda res: (
            "tan", {**ts(k), "learning_rate": chosen_finetune_lr(res, lrs, [1] + small), "seed": s},
            str(Path(res[full]["run_dir"]) / "model")))

    def m4(s):
        full = f"m1-f1-s{s}"
        return Job(f"m4-f1-s{s}", "M4", s, 1, deps=[full], resolve=lambda res: (
            "tan_emb", {**ts(1), "seed": s, "item_embeddings_from": str(Path(res[full]["run_dir"]) / "model"),
                        "item_embeddings_digest": _digest(res[full]["run_dir"])}, None))

    gru = [Job(f"gru4rec-s{s}", "GRU4Rec", s, 1, lambda res, s=s: ("gru4rec", {**es, "seed": s}, None)) for s in S]
    small = sorted(fractions)  # 1/4 before 1/64: the larger, the longer
    jobs = [m1(s, 1) for s in S]
    if "m3" in models:
        jobs += [teacher(s, 1) for s in S] + [m3(s, 1) for s in S]
    if "m4" in models:
        jobs += [m4(s) for s in S]
    if "gru4rec" in models:
        jobs += gru
    jobs += [m1(s, k) for k in small for s in S]
    if "m3" in models:
        jobs += [j for k in small for s in S for j in (teacher(s, k), m3(s, k))]
    if "m2" in models:
        lrs = list(finetune_lrs)
        cands = [m2_candidate(k, lr) for k in [1] + small for lr in lrs]
        jobs += cands + [m2(s, k, [c.key for c in cands]) for k in [1] + small for s in S if s > 1]
    return jobs


def timing_pass(results: list[dict], split: Path, threads: int, mode: str, repeats: int = 3) -> dict[str, dict]:
    """Run name -> metrics.json of the seed-1 model re-scored on ``test`` in this process, one
    model after another (the fits' own scoring ran beside other fits), ``repeats`` rounds over
    all models; of each model the round with the median ``predict_us_per_event``. A round's
    output is reused while newer than the model."""
    import torch

    from evaluation.evaluate import evaluate

    torch.set_num_threads(threads)
    rounds: dict[str, list[dict]] = {}
    for i in range(repeats):
        for r in results:
            model_pt, ev = Path(r["run_dir"]) / "model" / "model.pt", Path(r["run_dir"]) / f"{TIMING_DIR}-{i + 1}"
            f = ev / "metrics.json"
            if f.exists() and f.stat().st_mtime > model_pt.stat().st_mtime:
                m = json.loads(f.read_text())
            else:
                m = evaluate(Path(r["run_dir"]) / "model", split, ev, table="test", mode=mode)
            rounds.setdefault(r["run"], []).append(m)
    return {n: sorted(ms, key=lambda m: m["predict_us_per_event"])[len(ms) // 2] for n, ms in rounds.items()}


# ----------------------------------------------------------------------------- tables


def _ci(r: dict) -> str:
    return f"{r['mean']:.4f} [{r['lo']:.4f}, {r['hi']:.4f}]"


def _diff(r: dict) -> str:
    p = "p < 1e-300" if r["p_value"] == 0 else f"p = {r['p_value']:.2g}"  # below the smallest double
    return f"{r['diff']:+.4f} [{r['diff_lo']:+.4f}, {r['diff_hi']:+.4f}], {p}"


def _verdict(r: dict, than: str, alpha: float = 0.05) -> str:
    """"higher than X" / "lower than X" when the paired CI excludes 0 and the Wilcoxon test
    agrees; which of the two says so when they disagree; else "not distinguishable from X"."""
    d = _diff(r)
    if r["diff_lo"] > 0 or r["diff_hi"] < 0:
        word = "higher" if r["diff_lo"] > 0 else "lower"
        if r["p_value"] < alpha:
            return f"{word} than {than} ({d})"
        return f"{word} than {than} by the bootstrap CI only, the Wilcoxon test does not confirm it ({d})"
    if r["p_value"] < alpha:
        return f"not distinguishable from {than} by the bootstrap CI, though Wilcoxon p < {alpha:g} ({d})"
    return f"not distinguishable from {than} ({d})"


def _by(result: dict) -> dict:
    return {(r["run"], r["metric"]): r for r in result["rows"]}


def fractions_table(per_frac: dict[int, dict], fractions: list[int], metric: str) -> list[str]:
    """Rows fraction; columns the scratch M1, then every other model's mean [CI] and its paired
    difference to the scratch M1 of that fraction [CI] with the Wilcoxon p."""
    others = [m for m in ("M2", "M3", "M4")
              if any((run_name(m, k), metric) in _by(per_frac[k]) for k in per_frac if k != 1)]
    head = ["fraction", "train sessions", f"M1 from scratch {LABELS[metric]}"]
    for m in others:
        head += [{"M2": "M2 fine-tuned", "M3": "M3 distilled", "M4": "M4 embedding"}[m] + f" {LABELS[metric]}",
                 f"Δ {m} − M1 [CI], Wilcoxon p"]
    out = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for k in fractions + [1]:
        by = _by(per_frac[k])
        base = by[run_name("M1", k), metric]
        cells = [frac_label(k), str(per_frac[k]["train_sessions"]), _ci(base)]
        for m in others:
            r = by.get((run_name(m, k), metric))
            cells += ["—", "—"] if r is None else [_ci(r), _diff(r)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def fractions_plot(main: dict, fractions: list[int], path: Path, dataset: str) -> None:
    """Their Figure 4: each metric against the fraction (log x), a line per model, error bars
    = the 95 % bootstrap CI of the seed-averaged values."""
    from evaluation.plots import _plt, _save

    plt = _plt()
    by = _by(main)
    fr = sorted(fractions, reverse=True) + [1]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        for i, (m, label) in enumerate((("M1", "M1 from scratch"), ("M2", "M2 pre-trained + fine-tuned"),
                                        ("M3", "M3 distilled"), ("M4", "M4 embedding output"))):
            pts = [(1 / k, by[run_name(m, k), metric]) for k in fr if (run_name(m, k), metric) in by]
            if not pts:
                continue
            x = [p[0] * (1 + 0.04 * (i - 1.5)) for p in pts]  # a small offset: error bars side by side
            y = [p[1]["mean"] for p in pts]
            err = [[p[1]["mean"] - p[1]["lo"] for p in pts], [p[1]["hi"] - p[1]["mean"] for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3, label=label)
        g = by.get(("GRU4Rec", metric))
        if g is not None:
            ax.axhspan(g["lo"], g["hi"], color="gray", alpha=0.2)
            ax.axhline(g["mean"], color="gray", lw=1, ls="--", label="GRU4Rec (all of train)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1 / k for k in fr], [frac_label(k) for k in fr])
        ax.set(xlabel="most recent fraction of train", ylabel=LABELS[metric], title=f"{LABELS[metric]} on test")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{dataset}: Tan et al. (2016) Figure 4 (mean over seeds, 95 % session-bootstrap CI)", fontsize=10)
    _save(fig, path)


def findings(main: dict, per_frac: dict[int, dict], fractions: list[int], timing: dict[str, dict],
             recency: dict | None = None) -> list[str]:
    """What of the paper's claims holds on this slice, each sentence from the paired CIs;
    ``recency``: the compare of M2 on each fraction against M2 on 1/1."""
    by = _by(main)
    out = []
    for metric in METRICS:
        L = LABELS[metric]
        m1 = by["M1", metric]
        s = [f"- **{L}**: M1 on all of `train`: {_ci(m1)} (their best, M2 on RSC15: {PAPER['M2'][metric]:.4f})."]
        if ("GRU4Rec", metric) in by:
            g = by["GRU4Rec", metric]
            # the compare's difference is run - baseline: GRU4Rec - M1; say it the paper's way round
            d = {**g, "diff": -g["diff"], "diff_lo": -g["diff_hi"], "diff_hi": -g["diff_lo"]}
            s.append(f"Their M1/M2 gain over GRU4Rec: M1 is {_verdict(d, 'GRU4Rec')}; GRU4Rec: {_ci(g)}.")
        small = [k for k in fractions if (run_name("M1", k), metric) in by]
        if small:
            s.append("Their \"more recent fractions train better than all of the data\" (M1 from scratch): "
                     + "; ".join(f"{frac_label(k)} is {_verdict(by[run_name('M1', k), metric], 'M1 on all of it')}"
                                 for k in small) + ".")
        ft = [k for k in fractions + [1] if (run_name("M2", k), metric) in _by(per_frac[k])]
        if ft:
            s.append("Pre-training + fine-tuning (M2) against from scratch on the same fraction: "
                     + "; ".join(f"{frac_label(k)}: {_verdict(_by(per_frac[k])[run_name('M2', k), metric], 'scratch')}"
                                 for k in ft) + ".")
            s.append("Their M2 claim, fine-tuned on recent data against M1 on all of `train`: "
                     + "; ".join(f"{frac_label(k)}: {_verdict(by[run_name('M2', k), metric], 'M1')}" for k in ft) + ".")
            if recency is not None:
                rb = _by(recency)
                s.append("Recency itself (fine-tuned on 1/k against the same fine-tuning on all of `train`, M2 1/1, "
                         "which is also a second, slower phase of training): "
                         + "; ".join(f"{frac_label(k)}: {_verdict(rb[run_name('M2', k), metric], 'M2 1/1')}"
                                     for k in ft if k != 1) + ".")
            best = max(ft, key=lambda k: _by(per_frac[k])[run_name("M2", k), metric]["mean"])
            b = by[run_name("M2", best), metric]
            s.append(f"Best M2 here: {frac_label(best)}, {_ci(b)}.")
            g = by.get(("GRU4Rec", metric))
            if g is not None:
                rel = "lies below" if b["hi"] < g["lo"] else "lies above" if b["lo"] > g["hi"] else "overlaps"
                s.append(f"Its CI {rel} GRU4Rec's (not a paired test).")
        d3 = [k for k in fractions + [1] if (run_name("M3", k), metric) in _by(per_frac[k])]
        if d3:
            s.append("Their \"M3 gains modestly over M1 on the smallest fractions\": M3 is "
                     + "; ".join(f"{frac_label(k)}: {_verdict(_by(per_frac[k])[run_name('M3', k), metric], 'M1')}"
                                 for k in d3) + ".")
        if ("M4", metric) in by:
            s.append(f"Their \"M4 is less accurate\": M4 is {_verdict(by['M4', metric], 'M1')}.")
        out.append(" ".join(s))
    if "M1" in timing and "M4" in timing:
        t1, t4 = timing["M1"], timing["M4"]
        out.append(f"- **Prediction time and size** (their Table 2: M4 takes "
                   f"{PAPER_TABLE2['M4'][0] / PAPER_TABLE2['M1 - M3'][0] * 100:.0f} % of M1's batch time with "
                   f"{PAPER_TABLE2['M4'][1] / PAPER_TABLE2['M1 - M3'][1] * 100:.0f} % of its parameters): here M4 takes "
                   f"{t4['predict_us_per_event'] / t1['predict_us_per_event'] * 100:.0f} % of M1's time per event "
                   f"({t4['predict_us_per_event']:.1f} vs {t1['predict_us_per_event']:.1f} us) and "
                   f"{t4['latency_ms_p50'] / t1['latency_ms_p50'] * 100:.0f} % of its median batch time, with "
                   f"{t4['n_parameters'] / t1['n_parameters'] * 100:.0f} % of its parameters (both counts include "
                   f"the item table, fixed in M4), on {t1['n_items_ranked']:,} items (theirs: 37,483). The median of "
                   "3 timing rounds on a shared CPU: a ratio, not a CI.")
    return out


def table2(timing: dict[str, dict]) -> list[str]:
    out = ["| model (seed 1, all of train) | parameters | model MB | batch p50 ms | batch p99 ms | rows/batch (median) "
           "| us/event | scored events/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in timing.items():
        out.append(f"| {name} | {m['n_parameters']:,} | {m['model_bytes'] / 1e6:.2f} | {m['latency_ms_p50']:.3f} | "
                   f"{m['latency_ms_p99']:.3f} | {m['latency_batch_rows_p50']:.0f} | {m['predict_us_per_event']:.2f} | "
                   f"{m['eval_events_per_s']:,.0f} |")
    return out


def fits_table(results: list[dict], max_epochs: int) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        groups.setdefault(r["run"], []).append(r)
    out = ["| run | train sessions | epochs run (best), per seed; * = stopped by the cap | valid R@20 at the best epoch "
           "(mean) | fit + test s (mean) |",
           "|---|---:|---|---:|---:|"]
    for name, rs in groups.items():
        ep = ", ".join(f"{r['epochs_run']}{'*' if r['best_epoch'] and r['epochs_run'] == max_epochs else ''} "
                       f"({r['best_epoch'] or '—'})" for r in rs)
        v = [r["valid_best"] for r in rs if r["valid_best"] is not None]
        out.append(f"| {name} | {rs[0]['train_sessions']} | {ep} | {sum(v) / len(v) if v else float('nan'):.4f} | "
                   f"{sum(r['fit_wall_s'] for r in rs) / len(rs):.1f} |".replace("nan", "—"))
    return out


def finetune_table(results: dict[str, dict], lrs: list[float], fr: list[int], chosen: float) -> list[str]:
    """M2's learning rates on valid: Recall@20 of the early-stopping epoch per fraction (seed 1)."""
    out = ["| M2 learning rate | " + " | ".join(f"valid R@20 {frac_label(k)}" for k in fr) + " | mean | chosen |",
           "|---:|" + "---:|" * (len(fr) + 1) + "---|"]
    for lr in lrs:
        v = [results[m2_candidate_key(lr, k)]["valid_best"] for k in fr]
        out.append(f"| {lr:g} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {sum(v) / len(v):.4f} | "
                   f"{'**yes**' if lr == chosen else ''} |")
    return out


def protocol_models(models: list[str], learning_rate: float, fixed_batch: bool, ft_lr: float | None) -> list[str]:
    """One sentence per model of the run, for the protocol paragraph."""
    batch = "" if fixed_batch else ", 512/k on fraction 1/k"
    out = [f"M1 = `tan` (50-d embeddings, GRU 100, 25 % click deletion, prefix augmentation, truncation at 19, Adam "
           f"{learning_rate:g}, batch 512 examples{batch}) from scratch."]
    if "m2" in models:
        out.append("M2 = the seed's M1 on all of `train` fine-tuned on the fraction with the same batch and a learning "
                   f"rate chosen on `valid` ({ft_lr:g}, below) (`init_from`, fresh Adam; its first epoch is always "
                   "kept: the trainer's early stopping has no epoch 0; the paper has no M2 at 1/1: here it is "
                   "continued training).")
    if "m3" in models:
        out.append("M3 = `tan_distill` (λ = 0.2, T = 1) from scratch on the fraction with a `tan_teacher` on that "
                   "fraction's reversed futures (as many epochs as the seed's M1 on the fraction: `valid` cannot "
                   "judge a model of reversed futures).")
    if "m4" in models:
        out.append("M4 = `tan_emb` on all of `train` with the fixed item embeddings of the seed's M1 on all of `train`.")
    if "gru4rec" in models:
        out.append("GRU4Rec at its default (the official best RSC15 setting).")
    return out


def departures(learning_rate: float, fixed_batch: bool) -> str:
    """What differs from the family's defaults, and why (measured on rsc15-100k's `valid`)."""
    parts = []
    if learning_rate != 0.001:
        parts.append(f"learning rate {learning_rate:g}, not 0.001 (at 0.001 M1 first sits ~5 epochs on a popularity "
                     "plateau with a noisy `valid` Recall@20, where patience 2 stopped one seed after 3 epochs, and "
                     "peaks after ~50 epochs at the `valid` Recall@20 that 0.01 reaches by epoch ~7: 0.564 vs 0.561)")
    if not fixed_batch:
        parts.append("a batch of 512/k on fraction 1/k, so that every fraction's epoch is as many steps as the full "
                     "data's (at 512, 1/64 of `train` is one step an epoch and early stopping ends on that plateau: "
                     "`valid` R@20 0.145 against 0.217 reached later)")
    if not parts:
        return ""
    return ("Departures from the family's defaults (the paper states neither), chosen on rsc15-100k's `valid` so that "
            "early stopping with patience 2 works on a slice whose full-data epoch is 60 Adam steps (theirs: "
            "~45,000), and kept for every dataset: " + "; ".join(parts) + ".")


def stuck_note(results: list[dict]) -> str:
    """The from-scratch fits whose best ``valid`` epoch was the first (early stopping ended them
    on the initial popularity plateau: their scores are of a barely trained model)."""
    stuck: dict[str, list[int]] = {}
    for r in results:
        if r["best_epoch"] == 1 and r["init_from"] is None:
            stuck.setdefault(r["run"], []).append(r["seed"])
    if not stuck:
        return "Every from-scratch fit left its first epoch behind (best `valid` epoch > 1)."
    return ("From-scratch fits whose best `valid` epoch was the first, i.e. stopped on the initial plateau (their "
            "scores are of a barely trained model): " + "; ".join(f"{n} seed(s) {', '.join(map(str, sorted(v)))}"
                                                                  for n, v in stuck.items()) + ".")


def _demote(md: str) -> str:
    return "\n".join(("###" + ln[1:]) if ln.startswith("# ") else ln for ln in md.splitlines())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ap.add_argument("--work", default="/tmp/tan_tables")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fractions", default="64,16,4", help="k of the recent fractions 1/k of train (1/1 always runs)")
    ap.add_argument("--models", default=",".join(MODELS), help="of " + ",".join(MODELS) + " (m1 always runs)")
    ap.add_argument("--max-epochs", type=int, default=50, help="epochs at most (early stopping on valid)")
    ap.add_argument("--learning-rate", type=float, default=0.01, help="Adam's, for the Tan models (module docstring)")
    ap.add_argument("--finetune-lrs", default="0.001,0.01",
                    help="M2's candidate learning rates, chosen on valid (seed 1, mean over fractions; ties: first)")
    ap.add_argument("--fixed-batch", action="store_true",
                    help="512 examples a batch on every fraction (the paper's), not 512/k on 1/k")
    ap.add_argument("--jobs", type=int, default=2, help="fits at a time")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not SHARED.exists():
        ap.error(f"{SHARED} is missing: the real datasets live there")
    try:
        fractions = sorted({int(k) for k in a.fractions.split(",") if k.strip()} - {1}, reverse=True)
    except ValueError:
        ap.error(f"--fractions {a.fractions!r}: comma-separated integers k (fraction 1/k)")
    if any(k < 1 for k in fractions):
        ap.error(f"--fractions {a.fractions!r}: every k must be >= 1")
    asked = {m for m in a.models.split(",") if m}
    if asked - set(MODELS):
        ap.error(f"--models: unknown {sorted(asked - set(MODELS))}; choose from {','.join(MODELS)}")
    models = sorted(asked | {"m1"}, key=MODELS.index)
    mode = "session"
    split = preprocess(a.dataset, Path(a.work))
    work = Path(a.work) / a.dataset / "runs"
    try:
        finetune_lrs = [float(x) for x in a.finetune_lrs.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--finetune-lrs {a.finetune_lrs!r}: comma-separated learning rates")
    if not finetune_lrs:
        ap.error("--finetune-lrs: at least one learning rate")
    res = run_jobs(plan(models, fractions, a.seeds, a.max_epochs, a.learning_rate, a.fixed_batch, finetune_lrs),
                   split, work, a.jobs, a.threads, mode)
    fitted = [r for r in res.values() if not r["key"].startswith("teacher-")]
    ft_lr = None
    if "m2" in models:  # the seed-1 fine-tuning runs at the chosen learning rate are M2's seed 1
        ft_lr = chosen_finetune_lr(res, finetune_lrs, [1] + fractions)
        for k in [1] + fractions:
            res[m2_candidate_key(ft_lr, k)]["run"] = run_name("M2", k)

    from benchmarks.machine import cpu_label
    from evaluation.compare import compare
    from spark_jobs import contract as C

    runs: dict[str, list[Path]] = {}
    for r in sorted(fitted, key=lambda r: r["seed"]):
        runs.setdefault(r["run"], []).append(Path(r["eval_dir"]))
    order = ["M1", "GRU4Rec"] + [run_name(m, k) for m in ("M1", "M2", "M3", "M4") for k in fractions + [1]]
    runs = {n: runs[n] for n in dict.fromkeys(order) if n in runs}
    out = Path(a.out) / f"tan-{a.dataset}"
    cmd = (f"python -m benchmarks.tan_tables --dataset {a.dataset} --seeds {a.seeds} --fractions {a.fractions} "
           f"--models {','.join(models)} --max-epochs {a.max_epochs} --learning-rate {a.learning_rate:g}"
           f" --finetune-lrs {','.join(f'{x:g}' for x in finetune_lrs)}"
           f"{' --fixed-batch' if a.fixed_batch else ''} --jobs {a.jobs} --threads {a.threads}")
    main_res = compare(runs, baseline="M1", out=out, metrics=METRICS,
                       command=cmd + " (evaluation.compare.compare() on its evaluation dirs)")
    per_frac = {}
    for k in fractions + [1]:
        fr_runs = {n: runs[n] for n in (run_name(m, k) for m in ("M1", "M2", "M3", "M4")) if n in runs}
        per_frac[k] = compare(fr_runs, baseline=run_name("M1", k), out=out / f"fraction-{k}", metrics=METRICS,
                              command=cmd + f" (fraction 1/{k}, the scratch M1 as baseline)")
        per_frac[k]["train_sessions"] = next(r["train_sessions"] for r in fitted if r["run"] == run_name("M1", k))
    recency = None
    if "m2" in models and fractions:
        recency = compare({run_name("M2", k): runs[run_name("M2", k)] for k in [1] + fractions}, baseline="M2 1/1",
                          out=out / "m2-recency", metrics=METRICS,
                          command=cmd + " (M2 on each fraction against M2 fine-tuned on all of train)")
    fractions_plot(main_res, fractions, out / "fractions.png", a.dataset)
    timing_runs = [r for r in fitted if r["seed"] == 1 and r["run"] in ("M1", "M2 1/1", "M3", "M4", "GRU4Rec")]
    timing = timing_pass(sorted(timing_runs, key=lambda r: order.index(r["run"])), split, a.threads, mode)

    spec = DATASETS[a.dataset]
    md = [f"# {a.dataset}: Tan et al. (2016) M1-M4 next to GRU4Rec, by recent fraction", "",
          f"Data: {spec['what']}. Machine: {cpu_label()}, {time.strftime('%Y-%m-%d')}, {a.jobs} fits at a time with "
          f"{a.threads} torch thread(s) each; {sum(r['fit_wall_s'] for r in res.values()) / 60:.0f} min of fitting + "
          "scoring in all (the sum over the fits, as recorded when each ran). "
          f"Reproduce: `{cmd}`.", "",
          "Protocol: every model is fit on `train` only, the epoch chosen by early stopping on `valid` (which shares "
          f"no session with `train`; Recall@20, patience 2, at most {a.max_epochs} epochs), {a.seeds} seeds each "
          "(a row's value is the mean over seeds, its CI a session bootstrap of the seed-averaged per-event values), "
          "scored on `test` (every session from a zero state), full ranking over all items, ties counted against the "
          "target. A fraction 1/k = the most recent 1/k of `train`'s sessions (`recent_fraction=k` on "
          "`train_table=train`). " + " ".join(protocol_models(models, a.learning_rate, a.fixed_batch, ft_lr)) + " "
          "Baseline of the main table: M1 on all of `train`. " + departures(a.learning_rate, a.fixed_batch), "",
          "## Their headline, and what holds on this slice", "",
          f"Their best (Table 1, RSC15, the full YOOCHOOSE training set, GRU 100): **M2 Recall@20 "
          f"{PAPER['M2']['recall_at_20']:.4f} / MRR@20 {PAPER['M2']['mrr_at_20']:.4f}**; M4 (GRU 1000) "
          f"{PAPER['M4 (1000)']['recall_at_20']:.4f} / {PAPER['M4 (1000)']['mrr_at_20']:.4f}; GRU4Rec TOP1 (1000) "
          f"{PAPER['GRU4Rec TOP1 (1000)']['recall_at_20']:.4f} / {PAPER['GRU4Rec TOP1 (1000)']['mrr_at_20']:.4f}. "
          "Our slice is a different data set in size (a few thousand items, days not months), so "
          "the levels are not comparable; the sentences below test the paper's relations. \"higher\" / \"lower\": "
          "the paired 95 % bootstrap CI excludes 0 and the Wilcoxon signed-rank test on per-session means agrees "
          "(p < 0.05); Δ [CI] is run minus comparison.", "",
          *findings(main_res, per_frac, fractions, timing, recency), "",
          "## Recent fractions: from scratch vs pre-trained + fine-tuned (their Figure 4)", "",
          f"![Recall@20 and MRR@20 against the fraction](tan-{a.dataset}/fractions.png)", "",
          "Per fraction, `evaluation.compare` with the scratch M1 of that fraction as the baseline "
          f"(`tan-{a.dataset}/fraction-<k>/`); Δ = model minus the scratch M1, paired 95 % CI, Wilcoxon p.", ""]
    for metric in METRICS:
        md += [f"### {LABELS[metric]}", "", *fractions_table(per_frac, fractions, metric), ""]
    md += ["## Prediction time and size (their Table 2)", "",
           "Training speed of M1-M4 as a fraction of the compute-bound limit, on this slice and a 10M-event "
           "clickstream, and the memory of M3's soft labels: `benchmarks/README_tan.md` "
           "(`python -m benchmarks.tan_speed`).", "",
           f"The seed-1 models re-scored on `test` one after another in one process ({a.threads} thread(s), nothing "
           "else of this benchmark running), 3 rounds over all models, of each the round with the median us/event. "
           "Batch = one `scorer.step` of the evaluation loop: one event for each active session, up to 512 (M4: including the cosine against every item's embedding); most calls are "
           "the tail of the longest sessions, hence the small median rows per call, so us/event (all step time / "
           "events) is the figure closest to their per-batch time divided by its size. "
           f"Theirs (GPU, GRU 100, 37,483 items): M1-M3 {PAPER_TABLE2['M1 - M3'][0]} s per batch and "
           f"{PAPER_TABLE2['M1 - M3'][1]:,} parameters, M4 {PAPER_TABLE2['M4'][0]} s and {PAPER_TABLE2['M4'][1]:,}.", "",
           *table2(timing), "",
           "## All runs (evaluation.compare, baseline M1 on all of train)", "",
           f"![metrics with 95% CIs](tan-{a.dataset}/comparison_metrics.png)", "",
           _demote((out / "comparison.md").read_text()), "",
           *(["## M2's fine-tuning learning rate, chosen on valid", "",
              f"Seed 1, each candidate fine-tuned on every fraction; the best mean `valid` Recall@20 (of the early-"
              f"stopping epoch) is used for all seeds. For reference, the pre-trained M1 (seed 1) before any "
              f"fine-tuning: `valid` Recall@20 {res['m1-f1-s1']['valid_best']:.4f}.", "",
              *finetune_table(res, finetune_lrs, fractions + [1], ft_lr), ""] if ft_lr is not None else []),
          "## Fits", "", ("M3 teachers: no early stopping (epochs = the M1's best on the same fraction and seed); "
                          "their scores on `test` (forward prefixes) are left out of the tables. " if "m3" in models
                          else "") + stuck_note(fitted), "",
           *fits_table(sorted(res.values(), key=lambda r: (order.index(r["run"]) if r["run"] in order else len(order),
                                                           r["key"])), a.max_epochs), ""]
    C.write_text(Path(a.out) / f"tan-{a.dataset}.md", "\n".join(md))
    C.write_text(out / "runs.json", json.dumps(sorted(res.values(), key=lambda r: r["key"]), indent=1, default=str))
    print((Path(a.out) / f"tan-{a.dataset}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
