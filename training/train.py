"""Train any registered model family (``training.registry``) with the one trainer.

Run::

    python -m training.train --model gru4rec --data SPLIT_DIR --out RUN_DIR \\
        [--config conf/gru4rec.yaml] [--set key=value ...] [--resume] [--init-from CKPT]
    python -m training.train --list                 # families and their config keys

* ``--set train_table=train`` trains on ``train`` (selection against ``valid``);
  the default ``train_full`` is for final runs; ``train_recent_<k>`` for Tan's
  recent-fraction fine-tuning together with ``--init-from``.
* ``--resume`` continues from RUN_DIR's last epoch checkpoint and ends with the
  same weights as an uninterrupted run.
* ``--init-from CKPT`` (a .pt file or a run dir) starts from trained weights
  and that checkpoint's config and item index (items of the new table missing
  from it are dropped, so item_idx keeps its meaning); the optimizer restarts.

Writes RUN_DIR/{config.json, item_index.parquet, history.json, model.pt,
checkpoints/epoch_XXXX.pt}. Fails loudly on NaN/inf loss (epoch + step).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from training import registry
from training.config import ConfigError
from training.trainer import CheckpointMismatch, train


def describe_families() -> str:
    lines = []
    for name in registry.names():
        cls = registry.config_class(name)
        doc = (cls.__doc__ or "").strip().split("\n")[0]
        keys = ", ".join(f"{f.name}={getattr(cls(), f.name)!r}" for f in dataclasses.fields(cls) if f.name != "model")
        lines.append(f"{name}: {doc}\n    {keys}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="list the registered families and their config keys")
    ap.add_argument("--model", help="family name (" + ", ".join(registry.names()) + ")")
    ap.add_argument("--data", help="SPLIT_DIR (spark_jobs/contract.py layout)")
    ap.add_argument("--out", help="run directory")
    ap.add_argument("--config", help="flat YAML/JSON config file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--resume", action="store_true", help="continue from the run dir's last checkpoint")
    ap.add_argument("--init-from", help="start from this checkpoint's weights (file or run dir)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        print(describe_families())
        return 0
    for k in ("model", "data", "out"):
        if not getattr(a, k):
            ap.error(f"--{k} is required")
    if a.model not in registry.names():
        ap.error(f"--model: unknown model family {a.model!r}; registered: {', '.join(registry.names())}")
    if a.resume and a.init_from:
        ap.error("--resume and --init-from are exclusive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        res = train(a.model, a.data, a.out, a.config, a.set, a.resume, a.init_from,
                    show_progress=False if a.no_progress else None)
    except (ConfigError, CheckpointMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = res["history"][-1] if res["history"] else {}
    print(f"run dir {res['run_dir']}: {len(res['history'])} epoch(s), train_path={res['train_path']}; last: "
          + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
