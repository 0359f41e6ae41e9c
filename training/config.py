"""Flat dataclass configs for every model family, and the ONE way values get into them.

Each family's dataclass lives in its own module and subclasses :class:`CommonConfig`
(or :class:`TrainConfig` when it is trained by gradient descent); every field has a
documented default (the papers' or the official code's setting). A run's config is
resolved as::

    defaults  <-  --init-from checkpoint's config  <-  --config FILE  <-  overrides  <-  --set key=value

* typed overrides (a dict: DAG Params, YAML/JSON files, Python callers) must already have
  the field's type (an int for an int field, a list for a list field; an int is accepted
  for a float);
* ``--set key=value`` strings are parsed by the field's type (``layers=100,100``,
  ``nesterov=true``, ``learning_rate=0.05``).

Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key and
where it came from. No ``eval``/``exec``. The resolved dict is written beside every
checkpoint (``config.json``) so MLflow and the evaluator see exactly what ran.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spark_jobs.contract import parse_key_values


@dataclass
class CommonConfig:
    """Fields every family shares."""

    model: str = ""
    #: which SPLIT_DIR table to train on: train_full (final runs), train (selection against
    #: valid), train_recent_<k> (Tan et al.'s recent-fraction fine-tuning)
    train_table: str = "train_full"
    #: train on the most recent 1/k of train_table's sessions only (0 = all): the rule of
    #: spark_jobs' train_recent_<k>, for tables that have no such copy (e.g. ``train``)
    recent_fraction: int = 0
    n_epochs: int = 10
    batch_size: int = 32
    seed: int = 42
    #: "auto" = CUDA when present, else CPU; or an explicit torch device string ("cpu", "cuda")
    device: str = "auto"
    #: CPU threads (torch and the C kernels); 0 = auto: the cores not already busy (load average)
    num_threads: int = 0
    #: session order in an epoch: "time" (by first event, the official default) or "random"
    session_order: str = "time"
    #: bf16 autocast on CUDA for the evaluation pass only
    eval_mixed_precision: bool = False


@dataclass
class TrainConfig(CommonConfig):
    """Fields of the one trainer (``training.trainer``) for gradient-trained families."""

    #: adagrad (row-sparse for item tables, optional (Nesterov) momentum) | adam
    optimizer: str = "adam"
    learning_rate: float = 0.001
    momentum: float = 0.0
    nesterov: bool = False
    adagrad_eps: float = 1e-6
    adam_eps: float = 1e-8
    #: L2 on every parameter (families may give groups their own, e.g. user parameters only)
    weight_decay: float = 0.0
    #: clip the global gradient norm to this value (0 = off; Donkers et al. use 5.0)
    grad_clip: float = 0.0
    #: constant | polynomial (TF polynomial_decay: learning_rate -> lr_end over lr_decay_steps
    #: optimizer steps with power lr_power; Villatel et al.: 0.01 -> 0.001, 50k steps, 0.5)
    lr_schedule: str = "constant"
    lr_decay_steps: int = 0
    lr_end: float = 0.0
    lr_power: float = 1.0
    #: bf16 autocast for training on CUDA (ignored on CPU)
    amp: bool = False
    #: with --init-from (fine-tuning): "reset" the optimizer state (Adagrad accumulators,
    #: momentum, LR schedule start afresh: the default, as Tan et al. continue training with a
    #: new run) or "carry" the pre-trained run's state over (same family and train_path)
    init_optimizer: str = "reset"
    #: early stopping: stop after this many epochs without improvement of early_stop_metric
    #: on early_stop_table (0 = off). That table must share no session with train_table
    #: (``valid`` lies inside ``train_full``: use ``train_table=train``).
    early_stop_patience: int = 0
    early_stop_metric: str = "mrr_at_20"
    early_stop_table: str = "valid"
    #: session | user: score early_stop_table in evaluation.loop's user mode, each user's
    #: sessions of the training table fed first, unscored (as ``evaluate --mode user``): for
    #: families that carry a user state or embedding (HRNN, user GRUs, user sequences)
    early_stop_mode: str = "session"
    #: how a step is computed: "torch" (autograd, the reference); families with a measured
    #: faster path add their own values and "auto" (GRU4Rec: chunk | native | manual)
    train_path: str = "torch"


@dataclass
class VillatelTrainConfig(TrainConfig):
    """Villatel et al. (2018) Table 2, "the same for all models" (their RNNs and CoEvent MF):
    Adam, lr 0.01 decaying polynomially to 0.001 (power 0.5, 50,000 steps), batch 128. The
    paper states no epoch count: 10 here."""

    optimizer: str = "adam"
    learning_rate: float = 0.01
    lr_schedule: str = "polynomial"
    lr_decay_steps: int = 50_000
    lr_end: float = 0.001
    lr_power: float = 0.5
    batch_size: int = 128
    n_epochs: int = 10


class ConfigError(ValueError):
    """A config file or override that cannot be applied (names the key and reason)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _from_string(name: str, tp: Any, value: str, source: str) -> Any:
    """Parse a ``--set`` string by the field's type."""
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        parts = [p.strip() for p in value.replace("/", ",").strip("[]").split(",") if p.strip()]
        return [_from_string(name, inner, p, source) for p in parts]
    if tp is bool:
        s = value.strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
    elif tp is int:
        try:
            f = float(value)
            if f == int(f):
                return int(f)
        except (TypeError, ValueError, OverflowError):
            pass
    elif tp is float:
        try:
            return float(value)
        except ValueError:
            pass
    elif tp is str:
        return value
    article = "an" if _type_name(tp)[0] in "aeiou" else "a"
    raise ConfigError(f"{source}: config key {name!r}: {value!r} is not {article} {_type_name(tp)}")


def _typed(name: str, tp: Any, value: Any, source: str) -> Any:
    """Check a typed value (from JSON / YAML / a DAG Param) against the field's type."""
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: config key {name!r}: expected a list of {_type_name(inner)}, "
                              f"got {value!r}")
        return [_typed(name, inner, v, source) for v in value]
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, str) if tp is str else False)
    if not ok:
        raise ConfigError(f"{source}: config key {name!r}: expected {_type_name(tp)}, got "
                          f"{type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def apply_overrides(cfg: Any, overrides: dict[str, Any], source: str, *, strings: bool = False) -> Any:
    """A copy of ``cfg`` with ``overrides`` applied (typed values, or ``--set`` strings when
    ``strings``); unknown keys and wrongly typed values raise :class:`ConfigError`."""
    types = field_types(type(cfg))
    updates = {}
    for k, v in overrides.items():
        if k == "model":
            if v != cfg.model:
                raise ConfigError(f"{source}: model {v!r} does not match {cfg.model!r}")
            continue
        if k not in types:
            raise ConfigError(f"{source}: unknown config key {k!r} for {type(cfg).__name__}; "
                              f"known keys: {', '.join(sorted(types))}")
        updates[k] = _from_string(k, types[k], v, source) if strings and isinstance(v, str) else \
            _typed(k, types[k], v, source)
    return dataclasses.replace(cfg, **updates)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML or JSON mapping (by suffix)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif p.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise ConfigError(f"{p}: config files must end in .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of key: value")
    for k, v in data.items():
        if isinstance(v, dict):
            raise ConfigError(f"{p}: key {k!r} is nested; configs are flat (one level)")
    return data


def resolve_config(model: str, base: dict[str, Any] | None = None, config_file: str | Path | None = None,
                   sets: list[str] | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """defaults <- base (a saved config, e.g. --init-from) <- file <- overrides <- --set."""
    from training import registry

    try:
        cls = registry.config_class(model)
    except registry.UnknownFamily as e:
        raise ConfigError(str(e)) from None
    cfg = cls()
    if base:
        cfg = config_from_dict(dict(base, model=model), "checkpoint config")
    if config_file:
        cfg = apply_overrides(cfg, read_config_file(config_file), str(config_file))
    if overrides:
        cfg = apply_overrides(cfg, overrides, "overrides")
    if sets:
        try:
            kv = parse_key_values(sets, "--set")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        cfg = apply_overrides(cfg, kv, "--set", strings=True)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any], source: str = "saved config") -> Any:
    """Rebuild a config saved with :func:`config_to_dict` (checkpoint / config.json). Keys a
    family has retired (``Config.RETIRED_KEYS``) are dropped."""
    from training import registry

    model = d.get("model")
    try:
        cls = registry.config_class(model)
    except registry.UnknownFamily as e:
        raise ConfigError(f"{source}: {e}") from None
    retired = getattr(cls, "RETIRED_KEYS", ())
    return apply_overrides(cls(), {k: v for k, v in d.items() if k not in retired}, source)
