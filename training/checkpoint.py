"""Checkpoint format: plain tensors + primitives, loadable with ``torch.load(weights_only=True)``.

Never a pickled model object (checklist item 11). One file per epoch::

    {"format_version": 1, "model": "gru4rec", "config": {...resolved flat config...},
     "state_dict": {...}, "optimizer": {...tensors...}, "epoch": completed_epochs,
     "item_index": {"item_id": int64[n], "support": int64[n]},
     "train_support": int64[n], "history": [{...per-epoch stats...}]}

A run directory holds ``checkpoints/epoch_XXXX.pt``, ``model.pt`` (the latest,
what evaluation loads), ``config.json``, ``item_index.parquet`` and
``history.json`` (for MLflow). All writes are atomic (temp file + rename).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from spark_jobs import contract as C
from training.data import ItemIndex

FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
FINAL = "model.pt"


def write_json(path: Path, obj: Any) -> None:
    C.write_json(path, obj)


def epoch_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"epoch_{epoch:04d}.pt"


def save_checkpoint(run_dir: Path, ckpt: dict, final: bool = True) -> Path:
    """Write ``checkpoints/epoch_XXXX.pt`` and (unless ``final`` is False, e.g. an epoch that
    did not improve the early-stopping metric) ``model.pt``."""
    run_dir = Path(run_dir)
    ckpt = dict(ckpt, format_version=FORMAT_VERSION)
    p = epoch_path(run_dir, ckpt["epoch"])
    C.atomic_write(p, lambda tmp: torch.save(ckpt, tmp))
    if final:
        C.atomic_write(run_dir / FINAL, lambda tmp: torch.save(ckpt, tmp))
    return p


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint file or a run dir (its model.pt); refuses pickled objects."""
    p = Path(path)
    if p.is_dir():
        p = p / FINAL
    if not p.exists():
        raise FileNotFoundError(f"{p}: no checkpoint (expected a run dir with {FINAL} or a .pt file)")
    ckpt = torch.load(p, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{p}: not a checkpoint of format version {FORMAT_VERSION}")
    for k in ("model", "config", "state_dict", "item_index", "epoch"):
        if k not in ckpt:
            raise ValueError(f"{p}: checkpoint lacks {k!r}")
    return ckpt


def latest_epoch_checkpoint(run_dir: Path) -> Path | None:
    d = Path(run_dir) / CKPT_DIR
    if not d.exists():
        return None
    files = sorted(d.glob("epoch_*.pt"))
    return files[-1] if files else None


def item_index_to_ckpt(index: ItemIndex) -> dict:
    return {"item_id": torch.from_numpy(index.item_ids.copy()), "support": torch.from_numpy(index.support.copy())}


def item_index_from_ckpt(d: dict) -> ItemIndex:
    return ItemIndex(item_ids=d["item_id"].numpy().astype(np.int64), support=d["support"].numpy().astype(np.int64))


def write_item_index(path: Path, index: ItemIndex) -> None:
    t = pa.table({
        "item_id": pa.array(index.item_ids, pa.int64()),
        "item_idx": pa.array(np.arange(index.n_items, dtype=np.int32), pa.int32()),
        "support": pa.array(index.support, pa.int64()),
    })
    C.atomic_write(path, lambda tmp: pq.write_table(t, tmp))


def weights_digest(ckpt: dict) -> str:
    """sha256 of what defines a model: family, resolved config, item index and weights (not the
    history's timings, which differ on every run). The registry's de-duplication key."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(ckpt["model"].encode())
    h.update(json.dumps(ckpt["config"], sort_keys=True).encode())
    for k in ("item_id", "support"):
        h.update(ckpt["item_index"][k].numpy().tobytes())
    for k in sorted(ckpt["state_dict"]):
        t = ckpt["state_dict"][k]
        h.update(k.encode())
        if not isinstance(t, torch.Tensor):  # plain numbers / lists in a baseline's state
            h.update(json.dumps(t, sort_keys=True).encode())
            continue
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
