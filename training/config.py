"""Flat dataclass configs shared by every model family, loaded from YAML/JSON and ``--set``.

One dataclass per model family; every field has a documented default (the
papers' or the official code's setting). A run's config is resolved as::

    defaults  <-  --init-from checkpoint's config (if any)  <-  --config FILE  <-  --set key=value ...

and the resolved dict is written beside every checkpoint (``config.json``) so
that MLflow and the evaluator see exactly what ran. Values from files and the
command line are coerced by the field's declared type; no ``eval``/``exec``.

Adding a family (HRNN, user-based GRU, Tan, Villatel, ...) = one more dataclass
subclassing :class:`CommonConfig` and an entry in ``training.registry``.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CommonConfig:
    """Fields every trainable family shares."""

    model: str = "gru4rec"
    #: which SPLIT_DIR table to train on: train_full (final runs), train (tuning), train_recent_<k>
    train_table: str = "train_full"
    n_epochs: int = 10
    batch_size: int = 32
    seed: int = 42
    #: "auto" = CUDA when present, else CPU; or an explicit torch device string ("cpu", "cuda")
    device: str = "auto"
    #: CPU threads (torch and the C kernels); 0 = auto: the cores not already busy (load average)
    num_threads: int = 0
    #: session order in an epoch: "time" (by first event, the official default) or "random"
    session_order: str = "time"
    #: bf16 autocast on CUDA for the evaluation pass only (training stays fp32 for accuracy)
    eval_mixed_precision: bool = False


@dataclass
class GRU4RecConfig(CommonConfig):
    """GRU4Rec (Hidasi et al. 2016 + the later official versions).

    Defaults = the official best RSC15 setting (``rsc15_xe_shared_100_best``).
    """

    model: str = "gru4rec"
    layers: list[int] = field(default_factory=lambda: [100])
    #: "tied" (constrained: input embedding = output weights), "separate" (own table of
    #: size ``embedding_dim``) or "onehot" (1-of-N input straight into the first GRU layer)
    embedding: str = "tied"
    embedding_dim: int = 0
    #: top1 | bpr | top1-max | bpr-max | cross-entropy
    loss: str = "cross-entropy"
    #: linear | tanh | relu | elu-<alpha> | leaky-<slope> | softmax (cross-entropy only)
    final_act: str = "softmax"
    bpreg: float = 0.0
    logq: float = 1.0
    #: drop probabilities (not keep probabilities)
    dropout_embed: float = 0.0
    dropout_hidden: float = 0.4
    #: adagrad (with optional momentum, touched-rows-only for item tables) or adam
    optimizer: str = "adagrad"
    learning_rate: float = 0.2
    momentum: float = 0.2
    #: Nesterov look-ahead on top of the momentum; the official code uses plain (heavy-ball) momentum
    nesterov: bool = False
    adagrad_eps: float = 1e-6
    n_sample: int = 2048
    sample_alpha: float = 0.5
    #: rows of negative samples generated at once (official: 10M ids / n_sample)
    sample_store_size: int = 10_000_000
    #: fused C kernels for the CPU training step (training/kernels.c, built on first use with
    #: gcc); false, or no compiler, = the pure-torch step (same mathematics, ~3x slower)
    native_kernels: bool = True


@dataclass
class PopConfig(CommonConfig):
    """POP: always recommend the most popular training items (no parameters to learn)."""

    model: str = "pop"
    n_epochs: int = 0


CONFIG_CLASSES: dict[str, type] = {"gru4rec": GRU4RecConfig, "pop": PopConfig}


class ConfigError(ValueError):
    """A config file or --set override that cannot be applied (names the key and reason)."""


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            parts = [p for p in value.replace("/", ",").strip("[]").split(",") if p.strip()]
            value = parts
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r}: expected a list, got {value!r}")
        return [_coerce(name, inner, v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key {name!r}: {value!r} is not a boolean")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {name!r}: expected int, got bool")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {name!r}: {value!r} is not an int") from None
        if f != int(f):
            raise ConfigError(f"config key {name!r}: {value!r} is not an int")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {name!r}: {value!r} is not a number") from None
    if tp is str:
        return str(value)
    raise ConfigError(f"config key {name!r}: unsupported type {tp}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def apply_overrides(cfg: Any, overrides: dict[str, Any], source: str) -> Any:
    """Return a copy of ``cfg`` with ``overrides`` applied; unknown keys are errors."""
    types = _field_types(type(cfg))
    updates = {}
    for k, v in overrides.items():
        if k not in types:
            raise ConfigError(
                f"{source}: unknown config key {k!r} for {type(cfg).__name__}; "
                f"known keys: {', '.join(sorted(types))}"
            )
        updates[k] = _coerce(k, types[k], v)
    return dataclasses.replace(cfg, **updates)


def parse_set(items: list[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}`` (values typed later by the dataclass)."""
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(f"--set {it!r}: expected key=value")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML or JSON mapping (by suffix)."""
    p = Path(path)
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


def resolve_config(
    model: str,
    base: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
    sets: list[str] | None = None,
) -> Any:
    """Build the resolved config: defaults <- base (e.g. init-from) <- file <- --set."""
    if model not in CONFIG_CLASSES:
        raise ConfigError(f"unknown model {model!r}; known: {', '.join(sorted(CONFIG_CLASSES))}")
    cfg = CONFIG_CLASSES[model]()
    if base:
        cfg = apply_overrides(cfg, {k: v for k, v in base.items() if k != "model"}, "checkpoint config")
    if config_file:
        data = read_config_file(config_file)
        if "model" in data and data["model"] != model:
            raise ConfigError(f"{config_file}: model {data['model']!r} does not match --model {model!r}")
        cfg = apply_overrides(cfg, {k: v for k, v in data.items() if k != "model"}, str(config_file))
    if sets:
        cfg = apply_overrides(cfg, parse_set(sets), "--set")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> Any:
    """Rebuild a config saved with :func:`config_to_dict` (checkpoint / config.json)."""
    model = d.get("model")
    if model not in CONFIG_CLASSES:
        raise ConfigError(f"saved config names unknown model {model!r}")
    return apply_overrides(CONFIG_CLASSES[model](), {k: v for k, v in d.items() if k != "model"}, "saved config")
