"""Per-step training loss of GRU4Rec, this project vs the official code (issue 13: loss
spikes at epoch starts). Three sub-commands:

``run``   train this project's GRU4Rec (default setting) and write its per-step losses::

    python -m benchmarks.gru4rec_loss_curves run SPLIT_DIR --seed 42 --path chunk \\
        --out benchmarks/results/gru4rec_loss_steps_chunk_s42.json [--set key=value ...]

    ``--path``: chunk | native | manual | torch (the ``train_path``; ``native`` = the per-step
    C path = what ``RNNREC_NATIVE_CHUNK=0`` gives, ``torch`` = what ``RNNREC_NATIVE=0`` gives).

``plot``  per-step curves (moving average, epoch boundaries marked) of any number of such
JSON files, e.g. one of this project and one of the official code::

    python -m benchmarks.gru4rec_loss_curves plot A.json B.json --out benchmarks/results/X.png

``stats`` seed-free statistics over several runs per code: mean loss of the first K steps
of each epoch vs the rest of the epoch (mean and spread over the runs)::

    python -m benchmarks.gru4rec_loss_curves stats --group ours 'benchmarks/results/*chunk_s*.json' \\
        --group official '/tmp/official_runs/*.json' --k 256 --out benchmarks/results/X.json

JSON layout (both codes; ``.json`` or gzipped ``.json.gz``): ``{"code", "label", "seed",
"epochs": [{"epoch", "loss": [per step], "n_valid": [active slots per step]}, ...]}`` (the
official files add ``cc``, the weights its printed epoch loss uses: always the batch size,
because its ``fit`` never updates ``n_valid``, and ``hopeless_rows``, rows per step whose
target probability was below 1e-20). ``loss`` of a step = sum over the step's active
rows of the row loss / batch_size (both codes divide by the full batch size, also in the
shrinking tail); the epoch loss both codes print is sum(loss * n_valid) / sum(n_valid).
The official side's file is written by a scratch copy of the official code (outside this
repository: its license forbids reuse) patched to dump ``c`` and ``cc`` of ``GRU4Rec.fit``.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np


# ---- run --------------------------------------------------------------------------------------
def run(args) -> None:
    import torch

    from training import trainer
    from training.native.fast_step import FastRunner

    records: list[dict] = []
    orig = trainer.make_runner

    def make_runner(fam, cfg, device):
        r = orig(fam, cfg, device)
        if isinstance(r, FastRunner):
            r.step_log = records
        else:  # the autograd runner: wrap its per-batch loss (host sync per step: slow, fine here)
            fam_loss = r.loss_fn
            cur = {"epoch": None}

            def loss_fn(batch):
                res = fam_loss(batch)
                if res is not None:
                    rec = records[-1]
                    rec["loss"].append(float(res[0].detach()))
                    rec["n_valid"].append(int(res[1]))
                return res

            run_epoch = r.run_epoch

            def run_epoch_rec(epoch, progress=None):
                records.append({"epoch": epoch, "loss": [], "n_valid": []})
                return run_epoch(epoch, progress)

            r.loss_fn = loss_fn
            r.run_epoch = run_epoch_rec
        return r

    trainer.make_runner = make_runner
    sets = [f"seed={args.seed}", f"num_threads={args.threads}", f"train_path={args.path}"] + list(args.set)
    out_dir = Path(args.run_dir or f"/tmp/gru4rec_loss_{args.path}_s{args.seed}")
    t0 = time.time()
    res = trainer.train("gru4rec", args.data, out_dir, sets=sets, show_progress=False)
    trainer.make_runner = orig
    doc = {"code": "this project", "label": args.label or f"this project ({res['train_path']})",
           "train_path": res["train_path"], "seed": args.seed, "sets": sets, "data": str(args.data),
           "torch": torch.__version__, "seconds": round(time.time() - t0, 1),
           "epoch_loss": [h["loss"] for h in res["history"]], "epochs": records}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.out.endswith(".gz"):
        import gzip

        with gzip.open(args.out, "wt") as f:
            json.dump(doc, f)
    else:
        Path(args.out).write_text(json.dumps(doc))
    print(f"{args.out}: epoch losses " + " ".join(f"{x:.4f}" for x in doc["epoch_loss"]))


# ---- statistics ---------------------------------------------------------------------------------
def load(path: str) -> dict:
    """A per-step loss file (``.json`` or ``.json.gz``)."""
    if path.endswith(".gz"):
        import gzip

        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(Path(path).read_text())


def epoch_stats(ep: dict, k: int) -> dict:
    """first K steps vs the rest of the epoch's full-batch steps; the tail (shrinking batch)
    separately; all per-step losses are divided back by the active share so that they are a
    mean per event (= the printed epoch loss when averaged with n_valid weights)."""
    L = np.asarray(ep["loss"], dtype=np.float64)
    nv = np.asarray(ep["n_valid"], dtype=np.float64)
    B = nv.max()
    per_event = L * B / np.maximum(nv, 1)  # mean row loss of the step
    full = nv == B
    first_tail = int(np.argmin(full)) if not full.all() else len(L)
    head = per_event[:k]
    rest = per_event[k:first_tail]
    w = np.asarray(ep.get("cc", ep["n_valid"]), dtype=np.float64)  # the weights the code printed with
    return {"first_k": float(head.mean()), "rest_full": float(rest.mean()) if len(rest) else float("nan"),
            "tail": float(per_event[first_tail:].mean()) if first_tail < len(L) else float("nan"),
            "tail_steps": int(len(L) - first_tail), "steps": int(len(L)),
            "printed": float((L * w).sum() / w.sum()),
            "mean_per_event": float((per_event * nv).sum() / nv.sum()),
            "max_step": float(L.max()), "steps_over_20": int((L > 20).sum()),
            "steps_over_20_in_first_k": int((L[:k] > 20).sum())}


def stats(args) -> None:
    out = {"k": args.k, "groups": {}}
    for name, pattern in args.group:
        files = sorted(glob.glob(pattern))
        if not files:
            sys.exit(f"no file matches {pattern!r}")
        runs = [load(f) for f in files]
        n_ep = min(len(r["epochs"]) for r in runs)
        rows = []
        for e in range(n_ep):
            st = [epoch_stats(r["epochs"][e], args.k) for r in runs]
            row = {"epoch": e + 1}
            for key in ("first_k", "rest_full", "tail", "printed", "mean_per_event"):
                v = np.array([s[key] for s in st])
                row[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                            "min": float(v.min()), "max": float(v.max())}
            d = np.array([s["first_k"] - s["rest_full"] for s in st])
            row["first_k_minus_rest"] = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
                                         "min": float(d.min()), "max": float(d.max())}
            row["tail_steps"] = st[0]["tail_steps"]
            row["max_step"] = [s["max_step"] for s in st]
            row["steps_over_20"] = [s["steps_over_20"] for s in st]
            row["steps_over_20_in_first_k"] = [s["steps_over_20_in_first_k"] for s in st]
            rows.append(row)
        n20 = sum(sum(r["steps_over_20"]) for r in rows)
        n20k = sum(sum(r["steps_over_20_in_first_k"]) for r in rows)
        n_steps = sum(len(r["epochs"][e]["loss"]) for r in runs for e in range(n_ep))
        out["groups"][name] = {"files": files, "seeds": [r.get("seed") for r in runs], "epochs": rows,
                               "steps": n_steps, "steps_over_20": n20, "steps_over_20_in_first_k": n20k,
                               "max_step": max(max(r["max_step"]) for r in rows),
                               "non_monotone_epochs": sum(
                                   int(b > a) for r in runs for a, b in zip(
                                       [epoch_stats(e, args.k)["printed"] for e in r["epochs"][:n_ep]][:-1],
                                       [epoch_stats(e, args.k)["printed"] for e in r["epochs"][:n_ep]][1:]))}
        print(f"== {name}: {len(files)} runs ({', '.join(str(r.get('seed')) for r in runs)}); mean ± sd over runs of: "
              f"the epoch loss as the code printed it, the mean row loss of the epoch (per event), and the mean "
              f"row loss of the first K={args.k} steps, of the rest of the full-batch steps, their difference, "
              f"and of the shrinking tail")
        print(f"{'epoch':>5} {'printed':>15} {'per event':>15} {'first K':>15} {'rest (full)':>15} "
              f"{'first-rest':>15} {'tail':>15}")
        for r in rows:
            f = lambda x: f"{r[x]['mean']:7.3f} ± {r[x]['std']:5.3f}"  # noqa: E731
            print(f"{r['epoch']:>5} {f('printed'):>15} {f('mean_per_event'):>15} {f('first_k'):>15} {f('rest_full'):>15} "
                  f"{f('first_k_minus_rest'):>15} {f('tail'):>15}")
        gr = out["groups"][name]
        print(f"   steps with loss > 20: {gr['steps_over_20']} of {gr['steps']} "
              f"({gr['steps_over_20_in_first_k']} of them in the first {args.k} steps of an epoch); "
              f"largest step loss {gr['max_step']:.1f}; epochs whose loss rose: {gr['non_monotone_epochs']}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.png:
        stats_plot(out, args.png)


def stats_plot(out: dict, png: str) -> None:
    """first K steps minus the rest of the epoch, and the mean row loss of the epoch, per epoch:
    mean and min-max over the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for j, (name, g) in enumerate(out["groups"].items()):
        ep = np.array([r["epoch"] for r in g["epochs"]]) + (j - (len(out["groups"]) - 1) / 2) * 0.12
        for ax, key in zip(axes, ("first_k_minus_rest", "mean_per_event")):
            m = np.array([r[key]["mean"] for r in g["epochs"]])
            lo = m - np.array([r[key]["min"] for r in g["epochs"]])
            hi = np.array([r[key]["max"] for r in g["epochs"]]) - m
            ax.errorbar(ep, m, yerr=[lo, hi], fmt="o-", ms=3, capsize=2, label=f"{name} ({len(g['files'])} seeds)")
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_title(f"mean loss of the first {out['k']} steps of the epoch minus the rest\n(mean, min-max over seeds)",
                      fontsize=10)
    axes[1].set_title("mean row loss of the epoch, one formula for both codes\n(mean, min-max over seeds)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(png)


# ---- plot ---------------------------------------------------------------------------------------
def moving_average(x: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or len(x) < w:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    ma = (c[w:] - c[:-w]) / w
    return np.concatenate([np.full(w - 1, np.nan), ma])


def plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [load(f) for f in args.inputs]
    for doc, lab in zip(docs, args.labels or []):
        doc["label"] = lab
    fig, axes = plt.subplots(len(docs), 1, figsize=(14, 3.2 * len(docs)), sharex=True, sharey=True, squeeze=False)
    for ax, doc in zip(axes[:, 0], docs):
        L = np.concatenate([np.asarray(e["loss"], float) for e in doc["epochs"]])
        nv = np.concatenate([np.asarray(e["n_valid"], float) for e in doc["epochs"]])
        B = nv.max()
        per_event = L * B / np.maximum(nv, 1) if args.per_event else L
        x = np.arange(len(L))
        ax.plot(x, per_event, lw=0.3, color="0.75", label="per step")
        ax.plot(x, moving_average(per_event, args.window), lw=1.2, color="C0" if doc["code"] == "this project" else "C3",
                label=f"moving average ({args.window} steps)")
        b = 0
        for e in doc["epochs"]:
            ax.axvline(b, color="k", lw=0.6, ls="--")
            w = np.asarray(e.get("cc", e["n_valid"]), dtype=float)  # the weights the code printed with
            ep_loss = float((np.asarray(e["loss"]) * w).sum() / w.sum())
            ax.text(b + 5, 0.97, f"ep {e['epoch'] + 1}\n{ep_loss:.2f}", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=7)
            b += len(e["loss"])
        title = f"{doc['label']} (seed {doc.get('seed')}): largest step loss {per_event.max():.1f}"
        if args.ylim and per_event.max() > args.ylim[1]:
            title += f", {int((per_event > args.ylim[1]).sum())} steps above the plot's {args.ylim[1]:g}"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("loss per event" if args.per_event else "step loss (sum / batch)")
        if args.ylim:
            ax.set_ylim(*args.ylim)
        ax.legend(loc="lower left", fontsize=8)
    axes[-1, 0].set_xlabel("training step (dashed: epoch starts; printed epoch loss beside)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(args.out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("data")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--path", default="chunk", choices=("chunk", "native", "manual", "torch"))
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--set", action="append", default=[])
    r.add_argument("--label")
    r.add_argument("--run-dir")
    r.add_argument("--out", required=True)
    p = sub.add_parser("plot")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--per-event", action="store_true", help="divide each step's loss by its active share")
    p.add_argument("--ylim", type=float, nargs=2)
    p.add_argument("--labels", nargs="+", help="panel titles, one per input (default: the files' labels)")
    p.add_argument("--dpi", type=int, default=110)
    s = sub.add_parser("stats")
    s.add_argument("--group", nargs=2, action="append", metavar=("NAME", "GLOB"), required=True)
    s.add_argument("--k", type=int, default=256)
    s.add_argument("--out")
    s.add_argument("--png", help="also plot first K - rest and the epoch loss per epoch")
    args = ap.parse_args(argv)
    {"run": run, "plot": plot, "stats": stats}[args.cmd](args)


if __name__ == "__main__":
    main()
