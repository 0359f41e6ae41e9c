"""Dataset configs: what a scheduled run of ``session_rec_pipeline`` reads, without editing code.

One YAML file per dataset, ``conf/datasets/<name>.yaml`` (folder: ``$RNNREC_DATASET_CONF_DIR``)::

    name: clicks                      # -> Param dataset (outputs, MLflow experiment, registry names)
    input: [/data/raw/clicks/*.csv]   # -> Param input: files / folders / globs (relative: to this file)
    format: gru4rec                   # -> Param format (spark_jobs.readers.FORMATS)
    arrival: /data/raw/clicks/{end:%Y-%m-%d}.done   # the file that says an interval's input is complete
    retention: {keep_intervals: 14, sweep_after_hours: 24}
    min_item_support: 5               # any other DAG Param (dags/pipeline_steps.PARAM_SPECS) ...
    families: [gru4rec, pop]
    overrides: {gru4rec: {layers: [100]}}

Every key is checked here, with the file and the key in the message; the values are then
validated like a manual trigger's Params (``pipeline_steps.resolve``). Precedence: the Params'
defaults < the dataset config < what a manual trigger passes explicitly.

``arrival`` is a path template formatted with the data interval (``start`` / ``end`` as UTC
datetimes; ``{end:%Y%m%d}``): the run waits until it exists (absent: no wait).
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: keys of a dataset config beside the DAG Params
OWN_KEYS = ("name", "arrival", "retention")
RETENTION_KEYS = {"keep_intervals": int, "sweep_after_hours": (int, float)}
#: JSON-schema types of PARAM_SPECS -> Python types
_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
          "null": type(None)}


class DatasetConfigError(ValueError):
    """A dataset config that cannot be used (names the file, the key and the reason)."""


@dataclass(frozen=True)
class DatasetConfig:
    path: str
    params: dict[str, Any]                       # DAG Params it sets (dataset, input, ...)
    arrival: str | None = None                   # path template of the arrival marker
    retention: dict[str, Any] = field(default_factory=dict)

    def arrival_path(self, start: dt.datetime, end: dt.datetime) -> str | None:
        """The marker file of the interval ``[start, end)``, or None when the config has none."""
        if not self.arrival:
            return None
        try:
            return self.arrival.format(start=start, end=end)
        except (KeyError, IndexError, ValueError) as e:
            raise DatasetConfigError(f"{self.path}: arrival = {self.arrival!r}: {e} "
                                     "(use {start:...} / {end:...} with strftime codes)") from None


def conf_dir() -> Path:
    return Path(os.environ.get("RNNREC_DATASET_CONF_DIR") or ROOT / "conf" / "datasets")


def find(name: str) -> Path:
    """``conf/datasets/<name>.yaml`` (or ``.yml``), or a clear error listing the configs there."""
    d = conf_dir()
    for ext in (".yaml", ".yml"):
        if (d / f"{name}{ext}").is_file():
            return d / f"{name}{ext}"
    have = sorted(p.stem for p in d.glob("*.y*ml")) if d.is_dir() else []
    raise DatasetConfigError(f"no dataset config {name!r} in {d} (have: {', '.join(have) or 'none'})")


def load(path_or_name: str | os.PathLike) -> DatasetConfig:
    """Read and check one dataset config (a path, or a name under :func:`conf_dir`)."""
    import yaml

    from dags.pipeline_steps import PARAM_SPECS

    p = Path(path_or_name)
    if p.suffix not in (".yaml", ".yml") or not p.exists():
        p = find(str(path_or_name))
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise DatasetConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise DatasetConfigError(f"{p}: expected a mapping of keys to values, got {type(raw).__name__}")
    params: dict[str, Any] = {}
    for key, value in raw.items():
        if key in OWN_KEYS:
            continue
        if key == "dataset":
            raise DatasetConfigError(f"{p}: key 'dataset': use 'name'")
        if key == "dataset_config":
            raise DatasetConfigError(f"{p}: key 'dataset_config': a dataset config cannot name another one")
        if key == "data_dir":
            raise DatasetConfigError(f"{p}: key 'data_dir': where outputs go is the deployment's "
                                     "(RNNREC_DATA_DIR), not the dataset's")
        spec = PARAM_SPECS.get(key)
        if spec is None:
            allowed = sorted(set(PARAM_SPECS) - {"dataset", "data_dir", "dataset_config"} | set(OWN_KEYS))
            raise DatasetConfigError(f"{p}: unknown key {key!r} (allowed: {', '.join(allowed)})")
        types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        ok = any(isinstance(value, _TYPES[t]) and not (t in ("integer", "number") and isinstance(value, bool))
                 for t in types)
        if not ok:
            raise DatasetConfigError(f"{p}: key {key!r} = {value!r}: expected {' or '.join(types)}")
        params[key] = value
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise DatasetConfigError(f"{p}: key 'name' (the dataset's name) is required")
    params["dataset"] = name
    if "input" in params:  # relative inputs are relative to the config file, not the worker's cwd
        params["input"] = [s if os.path.isabs(s) else str((p.parent / s).resolve()) for s in params["input"]]
    retention = raw.get("retention") or {}
    if not isinstance(retention, dict):
        raise DatasetConfigError(f"{p}: key 'retention' = {retention!r}: expected a mapping")
    for k, v in retention.items():
        if k not in RETENTION_KEYS:
            raise DatasetConfigError(f"{p}: retention.{k}: unknown (allowed: {', '.join(RETENTION_KEYS)})")
        if not isinstance(v, RETENTION_KEYS[k]) or isinstance(v, bool) or v < (1 if k == "keep_intervals" else 0):
            raise DatasetConfigError(f"{p}: retention.{k} = {v!r}: expected a "
                                     f"{'whole number >= 1' if k == 'keep_intervals' else 'number >= 0'}")
    arrival = raw.get("arrival")
    if arrival is not None and not isinstance(arrival, str):
        raise DatasetConfigError(f"{p}: key 'arrival' = {arrival!r}: expected a path template")
    if arrival and not os.path.isabs(arrival):
        arrival = str(p.parent.resolve() / arrival)
    cfg = DatasetConfig(path=str(p), params=params, arrival=arrival, retention=dict(retention))
    cfg.arrival_path(dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2000, 1, 2, tzinfo=dt.timezone.utc))
    return cfg


def merge(defaults: dict, config: DatasetConfig, explicit: dict) -> dict:
    """The run's Params: ``defaults`` < the dataset config < ``explicit`` (what a trigger passed)."""
    return {**defaults, **config.params, **explicit}
