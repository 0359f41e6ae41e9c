"""Issue 13: accuracy of the non-default GRU4Rec losses against the official code.

The official GRU4Rec_PyTorch_Official best parameter files for diginetica and retailrocket
(bpr-max) and the same settings with loss top1-max (the official repo ships no top1-max best
file), trained on the rsc15-100k ``train_full`` and tested on ``test`` (full ranking over all
training items, conservative ties, Recall@20 / MRR@20) by this project and by the official
code run from a scratch clone (never copied here: its license forbids reuse).

    # this project (one record per setting x seed, appended to a JSON-lines file)
    python -m benchmarks.gru4rec_loss_settings_accuracy ours SPLIT_DIR --setting diginetica_bprmax \
        --seeds 1 2 --epochs 10 --records /tmp/i13/records.jsonl
    # the official code (a scratch checkout at OFFICIAL; writes SPLIT_DIR's train_full / test as
    # TSV once, SessionId ItemId Time, sorted by session and time)
    python -m benchmarks.gru4rec_loss_settings_accuracy official SPLIT_DIR --setting diginetica_bprmax \
        --seeds 1 2 --epochs 10 --official /tmp/official --tsv-dir /tmp/i13 --records /tmp/i13/records.jsonl
    # collect: results JSON + markdown table
    python -m benchmarks.gru4rec_loss_settings_accuracy table --records /tmp/i13/records.jsonl \
        --out benchmarks/results/gru4rec_loss_settings_accuracy.json

The official command each record ran is stored in it (``command``), e.g.
``cd OFFICIAL && LC_SEED=1 LC_THREADS=1 OMP_NUM_THREADS=1 python run.py TRAIN.tsv -ps
loss=bpr-max,... -d cpu -t TEST.tsv -m 20 -e conservative``; ``LC_SEED`` / ``LC_THREADS`` come from
the scratch patch described in benchmarks/README_gru4rec.md (seeding and thread count), and
top1-max needs one more scratch patch there (the PyTorch code implements only cross-entropy and
bpr-max; the loss added is the official Theano version's ``top1_max``, with the ELU applied as
its bpr-max does).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OFFICIAL_COMMIT = "d1fc31105577665d2f105de1c8d9a38d223a9a22"

# The official best files (paramfiles/*_bprmax_shared_best.py @ d1fc311), verbatim values.
OFFICIAL_PARAMS = {
    "diginetica": dict(loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=1, layers=512,
                       n_epochs=10, batch_size=128, dropout_p_embed=0.5, dropout_p_hidden=0.3,
                       learning_rate=0.05, momentum=0.15, n_sample=2048, sample_alpha=0.3, bpreg=0.9,
                       logq=0.0),
    "retailrocket": dict(loss="bpr-max", constrained_embedding=True, embedding=0, elu_param=0.5, layers=224,
                         n_epochs=10, batch_size=80, dropout_p_embed=0.5, dropout_p_hidden=0.05,
                         learning_rate=0.05, momentum=0.4, n_sample=2048, sample_alpha=0.4, bpreg=1.95,
                         logq=0.0),
}
SETTINGS = {f"{d}_{l.replace('-', '')}": (d, l) for d in OFFICIAL_PARAMS for l in ("bpr-max", "top1-max")}


def yaml_path(setting: str) -> Path:
    return HERE / f"gru4rec_{setting}.yaml"


def official_param_string(setting: str, epochs: int) -> str:
    d, loss = SETTINGS[setting]
    p = dict(OFFICIAL_PARAMS[d], loss=loss, n_epochs=epochs)
    if loss == "top1-max":
        p["bpreg"] = 0.0  # unused by top1-max
    return ",".join(f"{k}={v}" for k, v in p.items())


def machine() -> str:
    from benchmarks.machine import cpu_label
    return cpu_label()


def append(records: Path, rec: dict) -> None:
    records.parent.mkdir(parents=True, exist_ok=True)
    with open(records, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def run_ours(split: Path, setting: str, seeds, epochs: int, records: Path, work: Path, threads: int) -> None:
    from evaluation.evaluate import evaluate
    from training.train import train
    for seed in seeds:
        out = work / f"ours_{setting}_e{epochs}_s{seed}"
        sets = [f"seed={seed}", f"num_threads={threads}", f"n_epochs={epochs}"]
        t0 = time.time()
        res = train("gru4rec", split, out / "run", str(yaml_path(setting)), sets, show_progress=False)
        t_train = time.time() - t0
        m = evaluate(out / "run", split, out / "eval")
        cmd = (f"python -m training.train --model gru4rec --data {split} --out RUN --config "
               f"benchmarks/gru4rec_{setting}.yaml " + " ".join(f"--set {s}" for s in sets) +
               f" && python -m evaluation.evaluate --model-dir RUN --data {split} --out RUN/eval")
        append(records, dict(code="ours", setting=setting, seed=seed, epochs=epochs,
                             recall_at_20=m["recall_at_20"], mrr_at_20=m["mrr_at_20"], n_events=m["n_events"],
                             ties=m["ties"], n_items_ranked=m["n_items_ranked"], train_path=res["train_path"],
                             train_seconds=round(t_train, 1), final_loss=res["history"][-1]["loss"],
                             command=cmd, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))


def write_tsvs(split: Path, tsv_dir: Path) -> tuple[Path, Path]:
    import pandas as pd
    import pyarrow.dataset as ds
    tsv_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for table in ("train_full", "test"):
        p = tsv_dir / f"{table}.tsv"
        if not p.exists():
            t = ds.dataset(str(split / table), format="parquet").to_table().to_pandas()
            pd.DataFrame({"SessionId": t.session_id, "ItemId": t.item_id, "Time": t.ts.astype("int64") / 1e6}) \
                .sort_values(["SessionId", "Time"], kind="stable").to_csv(p, sep="\t", index=False)
        paths.append(p)
    return paths[0], paths[1]


def run_official(split: Path, setting: str, seeds, epochs: int, records: Path, official: Path, tsv_dir: Path,
                 work: Path, threads: int) -> None:
    train_tsv, test_tsv = write_tsvs(split, tsv_dir)
    commit = subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for seed in seeds:
        args = [sys.executable, "run.py", str(train_tsv), "-ps", official_param_string(setting, epochs), "-d", "cpu",
                "-t", str(test_tsv), "-m", "20", "-e", "conservative"]
        env = dict(os.environ, LC_SEED=str(seed), LC_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        env.pop("LC_OUT", None)
        t0 = time.time()
        p = subprocess.run(args, cwd=official, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        work.mkdir(parents=True, exist_ok=True)
        (work / f"official_{setting}_e{epochs}_s{seed}.log").write_text(p.stdout + p.stderr)
        m = re.search(r"Recall@20: ([0-9.]+) MRR@20: ([0-9.]+)", p.stdout)
        t = re.search(r"Total training time: ([0-9.]+)s", p.stdout)
        losses = re.findall(r"loss: ([0-9.naN]+)", p.stdout)
        if p.returncode or not m:
            raise SystemExit(f"official run failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        cmd = (f"cd {official} && LC_SEED={seed} LC_THREADS={threads} OMP_NUM_THREADS={threads} python "
               + " ".join(args[1:]))
        append(records, dict(code="official", setting=setting, seed=seed, epochs=epochs,
                             recall_at_20=float(m.group(1)), mrr_at_20=float(m.group(2)),
                             train_seconds=float(t.group(1)) if t else None, wall_seconds=round(wall, 1),
                             final_loss=float(losses[-1]) if losses else None, official_commit=commit,
                             command=cmd, machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))


def summarise(recs: list[dict]) -> list[dict]:
    """Mean and spread (max - min) per (setting, epochs, code); the difference ours - official."""
    groups: dict = {}
    for r in recs:
        groups.setdefault((r["setting"], r["epochs"]), {}).setdefault(r["code"], []).append(r)
    rows = []
    for (setting, epochs), by_code in sorted(groups.items()):
        row = dict(setting=setting, loss=SETTINGS[setting][1], epochs=epochs)
        for code, rs in by_code.items():
            for k in ("recall_at_20", "mrr_at_20"):
                v = [r[k] for r in rs]
                row[f"{code}_{k}"] = round(statistics.fmean(v), 4)
                row[f"{code}_{k}_spread"] = round(max(v) - min(v), 4)
                row[f"{code}_{k}_values"] = v
            row[f"{code}_seeds"] = sorted(r["seed"] for r in rs)
        if "ours" in by_code and "official" in by_code:
            row["diff_recall_at_20"] = round(row["ours_recall_at_20"] - row["official_recall_at_20"], 4)
            row["diff_mrr_at_20"] = round(row["ours_mrr_at_20"] - row["official_mrr_at_20"], 4)
            row["within_0.01"] = abs(row["ours_recall_at_20"] - row["official_recall_at_20"]) <= 0.01
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| setting | loss | epochs | ours R@20 | ours MRR@20 | official R@20 | official MRR@20 | diff R@20 / MRR@20 | within 0.01? |",
           "|---|---|---:|---|---|---|---|---|---|"]
    f = lambda r, c, k: (f"{r[f'{c}_{k}']:.4f} ± {r[f'{c}_{k}_spread'] / 2:.4f} (n={len(r[f'{c}_seeds'])})"
                         if f"{c}_{k}" in r else "—")
    for r in rows:
        diff = f"{r['diff_recall_at_20']:+.4f} / {r['diff_mrr_at_20']:+.4f}" if "diff_recall_at_20" in r else "—"
        ok = ("yes" if r["within_0.01"] else "**no**") if "within_0.01" in r else "—"
        out.append(f"| {r['setting'].split('_')[0]} | {r['loss']} | {r['epochs']} | {f(r, 'ours', 'recall_at_20')} | "
                   f"{f(r, 'ours', 'mrr_at_20')} | {f(r, 'official', 'recall_at_20')} | "
                   f"{f(r, 'official', 'mrr_at_20')} | {diff} | {ok} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["ours", "official", "table"])
    ap.add_argument("split", nargs="?", type=Path, help="SPLIT_DIR (the Spark job's splits/time)")
    ap.add_argument("--setting", choices=sorted(SETTINGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--records", type=Path, required=True, help="JSON-lines file the runs append to")
    ap.add_argument("--work", type=Path, default=Path("/tmp/i13"))
    ap.add_argument("--official", type=Path, help="scratch checkout of the official code")
    ap.add_argument("--tsv-dir", type=Path, default=Path("/tmp/i13"))
    ap.add_argument("--out", type=Path, help="results JSON (table)")
    a = ap.parse_args(argv)
    if a.what == "ours":
        import torch
        torch.set_num_threads(a.threads)
        run_ours(a.split, a.setting, a.seeds, a.epochs, a.records, a.work, a.threads)
    elif a.what == "official":
        run_official(a.split, a.setting, a.seeds, a.epochs, a.records, a.official, a.tsv_dir, a.work, a.threads)
    else:
        recs = [json.loads(l) for l in a.records.read_text().splitlines() if l.strip()]
        rows = summarise(recs)
        print(table(rows))
        if a.out:
            a.out.write_text(json.dumps(dict(
                issue=13, official_commit=OFFICIAL_COMMIT, official_params=OFFICIAL_PARAMS,
                protocol="train on train_full, test on test (rsc15-100k, Spark time split), full ranking over the "
                         "2,933 training items, conservative ties, 10,152 test predictions",
                summary=rows, records=recs), indent=1) + "\n")


if __name__ == "__main__":
    main()
