"""The one trainer for every model family.

``train()`` resolves the config, reads the training table, builds the family
(``training.registry``), picks the device (CUDA when present, else CPU) and runs
epochs with an *epoch runner*:

* :class:`AutogradRunner` (every family): the family's ``batches()`` and autograd
  ``loss()``, then clipping, the optimizer (``training.optim``) and the LR schedule;
  optional bf16 autocast on CUDA (``amp``). (``torch.compile`` was measured and did not
  help on CPU: benchmarks/README_gru4rec.md, ``python -m benchmarks.gru4rec_compile``.)
* a family's own runner where it has a measured faster path (GRU4Rec's C kernels,
  ``training/native``), chosen once at construction.

After every epoch: NaN/inf losses fail with the epoch and step (checked every
``CHECK_EVERY`` steps: a per-step host sync would stall the loop), a checkpoint
(weights + optimizer + schedule + RNG + history, ``training.checkpoint``) is written,
and, when ``early_stop_patience > 0``, the model is scored on ``early_stop_table``,
which must share no session with the training table. ``--resume`` continues from the
last epoch checkpoint and ends bit-identical to an uninterrupted run on CPU: every
epoch draws only from its own (seed, epoch) generator. The path that ran is recorded
as ``train_path`` in ``history.json`` (and from there in MLflow).
"""
from __future__ import annotations

import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training import checkpoint as ck
from training import registry
from training.config import ConfigError, config_from_dict, config_to_dict, resolve_config
from training.data import read_events, read_item_index, table_support
from training.device import pick_device, pick_threads
from training.family import Family, TrainContext

log = logging.getLogger("training")

#: steps between host syncs (NaN check + progress)
CHECK_EVERY = 256


class NonFiniteLoss(FloatingPointError):
    """Training produced NaN/inf; the message names the epoch and step."""


class CheckpointMismatch(ValueError):
    """A --resume / --init-from checkpoint of another family (the message names the file)."""


def check_losses(losses: torch.Tensor, epoch: int, first_step: int, n_steps: int | None = None) -> None:
    """Raise :class:`NonFiniteLoss` naming the first non-finite step of ``losses``."""
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        of = f" (of {n_steps})" if n_steps else ""
        raise NonFiniteLoss(f"non-finite loss {float(losses[i])} at epoch {epoch} step {first_step + i}{of}; "
                            "lower learning_rate or check the data")


class AutogradRunner:
    """Epochs of ``family.batches()`` / ``family.loss()`` with autograd + ``training.optim``."""

    def __init__(self, fam: Family, cfg, device: torch.device):
        from training.optim import build_optimizer, make_schedule

        self.fam, self.cfg, self.device = fam, cfg, device
        self.path = "torch"
        kw = {"momentum": cfg.momentum, "nesterov": cfg.nesterov, "eps": cfg.adagrad_eps} \
            if cfg.optimizer == "adagrad" else {"eps": cfg.adam_eps}
        self.opt = build_optimizer(cfg.optimizer, fam.param_groups(), lr=cfg.learning_rate, **kw)
        self.sched = make_schedule(self.opt, cfg.lr_schedule, decay_steps=cfg.lr_decay_steps,
                                   end_lr=cfg.lr_end, power=cfg.lr_power)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.amp = bool(cfg.amp) and device.type == "cuda"
        self.loss_fn = fam.loss

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "schedule": self.sched.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        if "optimizer" not in d or "schedule" not in d:
            raise ValueError("checkpoint optimizer state is not from the autograd trainer "
                             f"(keys {sorted(d)[:5]}...): resume with the train_path it was made with")
        self.opt.load_state_dict(d["optimizer"])
        self.sched.load_state_dict(d["schedule"])

    def run_epoch(self, epoch: int, progress=None) -> dict:
        from training.optim import clip_grad_norm

        c = self.cfg
        self.fam.model.train()
        losses, counts = [], []
        pending, pend_n, first = [], [], 0
        t0 = time.perf_counter()
        done = 0
        step = 0

        def flush():
            nonlocal pending, pend_n, first, done
            if not pending:
                return
            L = torch.stack(pending).float()
            check_losses(L, epoch, first)
            losses.append(L.cpu())
            counts.extend(pend_n)
            done += sum(pend_n)
            if progress is not None:
                progress(len(pending), float(L.mean()), done / max(time.perf_counter() - t0, 1e-9))
            first += len(pending)
            pending, pend_n = [], []

        for batch in self.fam.batches(epoch):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                res = self.loss_fn(batch)
            if res is None:
                continue
            loss, n = res
            loss.backward()
            if c.grad_clip > 0:
                clip_grad_norm(self.params, c.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
            pending.append(loss.detach())
            pend_n.append(int(n))
            step += 1
            if len(pending) == CHECK_EVERY:
                flush()
        flush()
        secs = time.perf_counter() - t0
        L = torch.cat(losses) if losses else torch.zeros(0)
        w = torch.tensor(counts, dtype=torch.float64)
        loss = float((L.double() * w).sum() / w.sum()) if len(w) else float("nan")
        return {"epoch": epoch, "loss": loss, "events": int(w.sum()), "steps": step, "seconds": secs,
                "events_per_s": float(w.sum()) / max(secs, 1e-9)}


def make_runner(fam: Family, cfg, device: torch.device):
    """The family's own fast runner if it chose one, else the autograd runner."""
    fast = fam.runner()
    if fast is not None:
        return fast
    path = getattr(cfg, "train_path", "torch")
    if path not in ("torch", "auto"):
        raise ConfigError(f"train_path {path!r} is not available for {cfg.model!r} (torch)")
    return AutogradRunner(fam, cfg, device)


def _disjoint_sessions(train_data, valid_data, train_table: str, valid_table: str) -> None:
    shared = np.intersect1d(train_data.session_ids, valid_data.session_ids)
    if len(shared):
        raise ConfigError(
            f"early stopping on {valid_table!r} while training on {train_table!r}: {len(shared)} of its "
            f"{valid_data.n_sessions} sessions are in the training table (valid lies inside train_full "
            "and most of train_recent_k): train on 'train' or early-stop on an unseen table")


def train(model: str, data_dir: str | Path, out: str | Path, config_file=None, sets=None,
          resume: bool = False, init_from=None, show_progress: bool | None = None,
          overrides: dict | None = None) -> dict:
    """Train one run; returns {"run_dir", "history", "config", "train_path"}. CLI, DAG and tests."""
    out, data_dir = Path(out), Path(data_dir)
    fam_cls = registry.get(model)  # UnknownFamily names the registered ones
    resume_ckpt = None
    if resume:
        p = ck.latest_epoch_checkpoint(out)
        if p is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out / ck.CKPT_DIR}")
        resume_ckpt = ck.load_checkpoint(p)
        if resume_ckpt["model"] != model:
            raise CheckpointMismatch(f"--resume: {p} is a {resume_ckpt['model']!r} checkpoint, not {model!r}")
        cfg = config_from_dict(resume_ckpt["config"], str(p))
        if config_file or sets or overrides:
            cfg = resolve_config(model, config_to_dict(cfg), config_file, sets, overrides)
    init_ckpt = ck.load_checkpoint(init_from) if init_from else None
    if init_ckpt is not None and init_ckpt["model"] != model:
        raise CheckpointMismatch(f"--init-from {init_from}: a {init_ckpt['model']!r} checkpoint, not {model!r}")
    if resume_ckpt is None:
        base = init_ckpt["config"] if init_ckpt is not None else None
        cfg = resolve_config(model, base, config_file, sets, overrides)

    torch.set_num_threads(pick_threads(cfg.num_threads))
    device = pick_device(cfg.device)
    src = init_ckpt if init_ckpt is not None else resume_ckpt
    # fine-tuning keeps the pre-trained item index so that item_idx keeps its meaning
    index = ck.item_index_from_ckpt(src["item_index"]) if src is not None else read_item_index(data_dir)
    data = read_events(data_dir, cfg.train_table, index, min_session_length=2)
    if cfg.recent_fraction:
        n_all = data.n_sessions
        data = data.recent(cfg.recent_fraction)
        log.info("recent_fraction=%d: the most recent %d of %d sessions", cfg.recent_fraction, data.n_sessions, n_all)
    support = table_support(data, index.n_items)
    log.info("%s on %s: %d events, %d sessions, %d items; dropped %d unknown-item events, %d short "
             "sessions; device %s", model, cfg.train_table, data.n_events, data.n_sessions, index.n_items,
             data.n_unknown_dropped, data.n_short_dropped, device)
    valid = None
    patience = getattr(cfg, "early_stop_patience", 0)
    if patience > 0:
        if cfg.early_stop_mode not in ("session", "user"):
            raise ConfigError(f"early_stop_mode {cfg.early_stop_mode!r}: session | user")
        valid = read_events(data_dir, cfg.early_stop_table, index, min_session_length=2)
        _disjoint_sessions(data, valid, cfg.train_table, cfg.early_stop_table)

    t_fit0 = time.perf_counter()  # fit_seconds: family build (a baseline's counting) + epochs + checkpoints
    fam = fam_cls(cfg, TrainContext(index=index, data=data, support=support, device=device))
    history: list[dict] = []
    start_epoch = 0
    if resume_ckpt is not None:
        fam.load_weights(resume_ckpt["state_dict"])
        history = list(resume_ckpt.get("history", []))
        start_epoch = int(resume_ckpt["epoch"])
    elif init_ckpt is not None:
        fam.load_weights(init_ckpt["state_dict"])
    else:
        torch.manual_seed(cfg.seed)
        fam.init_weights(torch.Generator().manual_seed(cfg.seed))
    runner = make_runner(fam, cfg, device) if fam.trainable else None
    path = runner.path if runner is not None else "none"
    init_opt = getattr(cfg, "init_optimizer", "reset")
    if init_opt not in ("reset", "carry"):
        raise ConfigError(f"init_optimizer {init_opt!r}: reset | carry")
    if init_ckpt is not None and runner is not None and init_opt == "carry":
        if init_ckpt.get("train_path") != path:
            raise ConfigError(f"init_optimizer=carry: {init_from} was trained with train_path="
                              f"{init_ckpt.get('train_path')!r}, this run uses {path!r}")
        runner.load_state_dict(init_ckpt["optimizer"])
    if resume_ckpt is not None:
        if resume_ckpt.get("train_path", path) != path:
            raise ConfigError(f"--resume: {out} was trained with train_path={resume_ckpt['train_path']!r}, "
                              f"this run would use {path!r}; set train_path={resume_ckpt['train_path']}")
        if runner is not None:
            runner.load_state_dict(resume_ckpt["optimizer"])
        if "rng" in resume_ckpt:
            torch.set_rng_state(resume_ckpt["rng"])
    log.info("train_path=%s", path)

    out.mkdir(parents=True, exist_ok=True)
    ck.write_json(out / "config.json", config_to_dict(cfg))
    ck.write_item_index(out / "item_index.parquet", index)
    run_info = {
        "data": str(data_dir), "train_table": cfg.train_table, "recent_fraction": cfg.recent_fraction,
        "init_from": str(init_from) if init_from else None,
        # fine-tuning lineage: what it started from and whether the optimizer state came along
        "init_from_epoch": int(init_ckpt["epoch"]) if init_ckpt is not None else None,
        "init_from_digest": ck.weights_digest(init_ckpt) if init_ckpt is not None else None,
        "init_optimizer": init_opt if init_ckpt is not None else None,
        "learning_rate": getattr(cfg, "learning_rate", None), "n_epochs": cfg.n_epochs,
        "train_start_ts": int(data.start_ts.min()) if data.n_sessions else None,
        "train_end_ts": int(data.end_ts) if data.n_sessions else None,
        "train_events": data.n_events, "train_sessions": data.n_sessions, "n_items": index.n_items,
        "dropped_unknown_events": data.n_unknown_dropped, "dropped_short_sessions": data.n_short_dropped,
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "train_path": path,
    }

    def ckpt_dict(epoch: int) -> dict:
        return {"model": model, "config": config_to_dict(cfg), "state_dict": fam.state_dict(),
                "optimizer": runner.state_dict() if runner is not None else {}, "epoch": epoch,
                "item_index": ck.item_index_to_ckpt(index), "train_support": torch.from_numpy(support),
                "history": history, "train_path": path, "rng": torch.get_rng_state()}

    def save(epoch: int, final: bool = True) -> None:
        ck.save_checkpoint(out, ckpt_dict(epoch), final=final)
        run_info["fit_seconds"] = round(time.perf_counter() - t_fit0, 3)
        ck.write_json(out / "history.json", {"run": run_info, "epochs": history})

    n_epochs = cfg.n_epochs if fam.trainable else 0
    if n_epochs == 0:  # parameter-free baselines (POP) still get a checkpoint
        save(0)
    best = max((h for h in history if "early_stop_value" in h), key=lambda h: h["early_stop_value"], default=None)
    for epoch in range(start_epoch, n_epochs):
        if best is not None and epoch - best["epoch"] > patience:
            break
        bar = None
        if show_progress is not False:
            from tqdm import tqdm

            bar = tqdm(total=None, desc=f"{model} epoch {epoch + 1}/{n_epochs}", unit="step",
                       disable=None if show_progress is None else False, file=sys.stderr)

        def progress(n, loss, eps, bar=bar):
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{loss:.4f}", ev_s=f"{eps:,.0f}")

        stats = runner.run_epoch(epoch, progress)
        if bar is not None:
            bar.close()
        stats["wall_time"] = time.time()
        stats["train_path"] = path
        improved = True
        if valid is not None:
            from training.validation import conservative_ranks, metric, user_mode_ranks

            scorer = fam_cls.scorer(ckpt_dict(epoch + 1), device)
            ranks = conservative_ranks(scorer, valid) if cfg.early_stop_mode == "session" else \
                user_mode_ranks(scorer, valid, history=[data])
            stats["early_stop_value"] = metric(cfg.early_stop_metric, ranks)
            stats["early_stop_metric"] = f"{cfg.early_stop_table}/{cfg.early_stop_metric}" + (
                " (user mode)" if cfg.early_stop_mode == "user" else "")
            improved = best is None or stats["early_stop_value"] > best["early_stop_value"]
            if improved:
                best = stats
        history.append(stats)
        log.info("epoch %d: loss %.6f, %.1f s, %.0f events/s%s", epoch + 1, stats["loss"], stats["seconds"],
                 stats["events_per_s"], "" if valid is None else
                 f", {stats['early_stop_metric']} {stats['early_stop_value']:.4f}")
        # with early stopping, model.pt stays the best epoch's weights
        save(epoch + 1, final=improved)
    if best is not None:
        run_info["best_epoch"] = best["epoch"] + 1
        run_info["stopped_after_epoch"] = len(history)
        ck.write_json(out / "history.json", {"run": run_info, "epochs": history})
    if resume_ckpt is not None and start_epoch >= n_epochs:
        log.info("nothing to do: %s already has %d epochs", out, start_epoch)
    return {"run_dir": str(out), "history": history, "config": config_to_dict(cfg), "train_path": path}
