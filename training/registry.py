"""The ONLY list of model families: name -> the module that defines it.

Everything that needs to know the families reads this: the training CLI's choices
(``python -m training.train --model``), the DAG's ``families`` Param validation, the
evaluator and the MLflow pyfunc (``load_scorer``). Importing this module is cheap (no
torch): the family modules are imported on first use.

Adding a family = one module (see ``training/family.py``) + one line below. A family
defined outside the repository (or in a test) registers itself with :func:`register` in
a module listed in ``$RNNREC_PLUGINS`` (comma-separated module names), which every
process (CLI, Airflow task, MLflow server) imports on first look-up.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

#: name -> "module:attribute" of the family class
BUILTIN: dict[str, str] = {
    "gru4rec": "training.families.gru4rec:GRU4RecFamily",
    "seqrnn": "training.families.seqrnn:SeqRNNFamily",
    "seqrnn_re": "training.families.seqrnn:SeqRNNREFamily",
    "seqrnn_ln": "training.families.seqrnn:SeqRNNLNFamily",
    "seqrnn_re_ln": "training.families.seqrnn:SeqRNNRELNFamily",
    "seqrnn_stack_re_ln": "training.families.seqrnn:StackedRELNFamily",
    "hmlstm_re_ln": "training.families.seqrnn:HMLSTMRELNFamily",
    "hrnn_init": "training.families.hrnn:HRNNFamily",
    "hrnn_all": "training.families.hrnn:HRNNAllFamily",
    "rnn_concat": "training.families.hrnn:RNNConcatFamily",
    "tan": "training.families.tan:TanFamily",
    "tan_teacher": "training.families.tan:TanTeacherFamily",
    "tan_distill": "training.families.tan:TanDistillFamily",
    "tan_emb": "training.families.tan:TanEmbFamily",
    "ugru_linear": "training.families.ugru:UGRUFamily",
    "ugru_rect": "training.families.ugru:UGRURectFamily",
    "ugru_attn": "training.families.ugru:UGRUAttnFamily",
    "pop": "training.baselines.pop:PopFamily",
    "spop": "training.baselines.spop:SPopFamily",
    "ppop": "training.baselines.ppop:PPopFamily",
    "itemknn": "training.baselines.itemknn:ItemKNNFamily",
    "itemknn_td": "training.baselines.itemknn:TimeDecayItemKNNFamily",
    "bprmf": "training.baselines.bprmf:BPRMFFamily",
    "coevent": "training.baselines.coevent:CoEventFamily",
    "coevent_tied": "training.baselines.coevent:TiedCoEventFamily",
    "sknn": "training.baselines.sknn:SKNNFamily",
    "vsknn": "training.baselines.sknn:VSKNNFamily",
    "stan": "training.baselines.sknn:STANFamily",
    "vstan": "training.baselines.sknn:VSTANFamily",
}

_registered: dict[str, Any] = {}
_plugins_loaded: set[str] = set()


class UnknownFamily(ValueError):
    """A family name that is not registered (the message lists the known ones)."""


def register(family: type) -> type:
    """Register a family class (``family.name`` must be new). Usable as a decorator."""
    name = getattr(family, "name", "")
    if not name:
        raise ValueError(f"{family!r} has no 'name'")
    where = f"{family.__module__}:{family.__qualname__}"
    known = _registered.get(name)
    taken = BUILTIN.get(name) or (f"{known.__module__}:{known.__qualname__}" if known else None)
    if taken is not None and taken != where:
        raise ValueError(f"model family {name!r} is already registered ({taken})")
    _registered[name] = family
    return family


def _load_plugins() -> None:
    for mod in filter(None, (m.strip() for m in os.environ.get("RNNREC_PLUGINS", "").split(","))):
        if mod not in _plugins_loaded:
            _plugins_loaded.add(mod)
            importlib.import_module(mod)


def names() -> list[str]:
    """Every family name, sorted (built-ins without importing them)."""
    _load_plugins()
    return sorted(set(BUILTIN) | set(_registered))


def get(name: str) -> type:
    """The family class of ``name``; :class:`UnknownFamily` names the known ones."""
    if name not in _registered:
        _load_plugins()
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN:
        raise UnknownFamily(f"unknown model family {name!r}; registered: {', '.join(names())}")
    mod, attr = BUILTIN[name].split(":")
    fam = getattr(importlib.import_module(mod), attr)
    _registered[name] = fam
    return fam


def config_class(name: str) -> type:
    return get(name).Config


def load_scorer(ckpt: dict, device):
    """Checkpoint -> Scorer for the evaluation loop and serving (any family)."""
    name = ckpt.get("model")
    try:
        fam = get(name)
    except UnknownFamily as e:
        raise UnknownFamily(f"checkpoint is of {e}") from None
    return fam.scorer(ckpt, device)
