"""The one trainer for every model family.

Run::

    python -m training.train --model gru4rec --data SPLIT_DIR --out RUN_DIR \
        [--config conf/gru4rec.yaml] [--set key=value ...] [--resume] [--init-from CKPT]

* ``--set train_table=train`` trains on ``train`` (tuning against ``valid``);
  the default ``train_full`` is for final runs; ``train_recent_<k>`` for Tan's
  recent-fraction fine-tuning together with ``--init-from``.
* ``--resume`` continues from RUN_DIR's last epoch checkpoint and ends with the
  same weights as an uninterrupted run (each epoch draws from its own
  (seed, epoch) generator and the optimizer state is checkpointed).
* ``--init-from CKPT`` (a .pt file or a run dir) starts from trained weights
  and that checkpoint's config and item index (items of the new table missing
  from it are dropped, so item_idx keeps its meaning); the optimizer restarts.

Writes RUN_DIR/{config.json, item_index.parquet, history.json, model.pt,
checkpoints/epoch_XXXX.pt}. Fails loudly on NaN/inf loss (epoch + step).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from training import checkpoint as ck
from training.config import CONFIG_CLASSES, config_from_dict, config_to_dict, resolve_config
from training.data import read_events, read_item_index, table_support
from training.families import FAMILIES

log = logging.getLogger("training")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_threads(requested: int, cpus: int | None = None, load: float | None = None) -> int:
    """CPU threads for training: ``requested`` when > 0; otherwise ("auto") every core that is
    not already busy. Threads that share a core with another process spin-wait at every
    parallel region: on 2 cores with another job running, 2 threads measured 20x slower than 1
    (benchmarks/README_gru4rec.md), so auto never oversubscribes."""
    if requested > 0:
        return requested
    cpus = cpus or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    n = max(1, min(cpus, int(cpus - load + 0.5)))
    log.info("num_threads=auto: %d of %d cores (1-min load average %.1f)", n, cpus, load)
    return n


def train(model: str, data_dir: str | Path, out: str | Path, config_file=None, sets=None,
          resume: bool = False, init_from=None, show_progress: bool | None = None) -> dict:
    """Train one run; returns {"run_dir", "history", "config"}. Used by the CLI and tests."""
    out = Path(out)
    data_dir = Path(data_dir)
    resume_ckpt = None
    if resume:
        p = ck.latest_epoch_checkpoint(out)
        if p is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out / ck.CKPT_DIR}")
        resume_ckpt = ck.load_checkpoint(p)
        if resume_ckpt["model"] != model:
            raise ValueError(f"--resume: {p} is a {resume_ckpt['model']!r} run, not {model!r}")
        cfg = config_from_dict(resume_ckpt["config"])
        if config_file or sets:
            cfg = resolve_config(model, config_to_dict(cfg), config_file, sets)
    init_ckpt = ck.load_checkpoint(init_from) if init_from else None
    if init_ckpt is not None and init_ckpt["model"] != model:
        raise ValueError(f"--init-from {init_from}: a {init_ckpt['model']!r} checkpoint, not {model!r}")
    if resume_ckpt is None:
        base = init_ckpt["config"] if init_ckpt is not None else None
        cfg = resolve_config(model, base, config_file, sets)

    threads = pick_threads(cfg.num_threads)
    torch.set_num_threads(threads)
    device = pick_device(cfg.device)
    if init_ckpt is not None:  # keep the pre-trained item index so item_idx keeps its meaning
        index = ck.item_index_from_ckpt(init_ckpt["item_index"])
    elif resume_ckpt is not None:
        index = ck.item_index_from_ckpt(resume_ckpt["item_index"])
    else:
        index = read_item_index(data_dir)
    data = read_events(data_dir, cfg.train_table, index, min_session_length=2)
    support = table_support(data, index.n_items)
    log.info("train table %s: %d events, %d sessions, %d items; dropped %d unknown-item events, "
             "%d short sessions; device %s", cfg.train_table, data.n_events, data.n_sessions,
             index.n_items, data.n_unknown_dropped, data.n_short_dropped, device)

    fam = FAMILIES[model](cfg, index, data, support, device)
    history: list[dict] = []
    start_epoch = 0
    if resume_ckpt is not None:
        fam.load_weights(resume_ckpt["state_dict"])
        fam.load_optimizer_state(resume_ckpt["optimizer"])
        history = list(resume_ckpt.get("history", []))
        start_epoch = int(resume_ckpt["epoch"])
    elif init_ckpt is not None:
        fam.load_weights(init_ckpt["state_dict"])
    else:
        torch.manual_seed(cfg.seed)
        fam.init_weights(cfg.seed)

    out.mkdir(parents=True, exist_ok=True)
    ck.write_json(out / "config.json", config_to_dict(cfg))
    ck.write_item_index(out / "item_index.parquet", index)
    run_info = {
        "data": str(data_dir), "train_table": cfg.train_table, "init_from": str(init_from) if init_from else None,
        "train_events": data.n_events, "train_sessions": data.n_sessions, "n_items": index.n_items,
        "dropped_unknown_events": data.n_unknown_dropped, "dropped_short_sessions": data.n_short_dropped,
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }

    def save(epoch: int) -> None:
        ck.save_checkpoint(out, {
            "model": model, "config": config_to_dict(cfg), "state_dict": fam.state_dict(),
            "optimizer": fam.optimizer_state(), "epoch": epoch,
            "item_index": ck.item_index_to_ckpt(index),
            "train_support": torch.from_numpy(support), "history": history,
        })
        ck.write_json(out / "history.json", {"run": run_info, "epochs": history})

    if cfg.n_epochs == 0:  # parameter-free baselines (POP) still get a checkpoint
        save(0)
    for epoch in range(start_epoch, cfg.n_epochs):
        bar = None
        if show_progress is not False:
            from tqdm import tqdm

            bar = tqdm(total=None, desc=f"epoch {epoch + 1}/{cfg.n_epochs}", unit="step",
                       disable=None if show_progress is None else False, file=sys.stderr)

        def progress(n, loss, eps, bar=bar):
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{loss:.4f}", ev_s=f"{eps:,.0f}")

        stats = fam.run_epoch(epoch, progress)
        if bar is not None:
            bar.close()
        stats["wall_time"] = time.time()
        history.append(stats)
        log.info("epoch %d: loss %.6f, %.1f s, %.0f events/s", epoch + 1, stats["loss"],
                 stats["seconds"], stats["events_per_s"])
        save(epoch + 1)
    if resume_ckpt is not None and start_epoch >= cfg.n_epochs:
        log.info("nothing to do: %s already has %d epochs", out, start_epoch)
    return {"run_dir": str(out), "history": history, "config": config_to_dict(cfg)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(CONFIG_CLASSES))
    ap.add_argument("--data", required=True, help="SPLIT_DIR (spark_jobs/contract.py layout)")
    ap.add_argument("--out", required=True, help="run directory")
    ap.add_argument("--config", help="flat YAML/JSON config file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--resume", action="store_true", help="continue from the run dir's last checkpoint")
    ap.add_argument("--init-from", help="start from this checkpoint's weights (file or run dir)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.resume and a.init_from:
        ap.error("--resume and --init-from are exclusive")
    res = train(a.model, a.data, a.out, a.config, a.set, a.resume, a.init_from,
                show_progress=False if a.no_progress else None)
    last = res["history"][-1] if res["history"] else {}
    print(f"run dir {res['run_dir']}: {len(res['history'])} epoch(s); last: "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
