"""What a model family is: the base class every family module subclasses.

A family module (``training/families/<name>.py``, ``training/baselines/<name>.py``, or a
plugin module) defines, in one file:

* its config dataclass (a subclass of :class:`training.config.CommonConfig`, or of
  :class:`training.config.TrainConfig` for families trained by gradient descent),
* its ``nn.Module`` (autograd: ``forward`` is the model's only definition),
* its batches and loss (:meth:`Family.batches`, :meth:`Family.loss`) on one of the shared
  schedules in ``training.batching``,
* its scorer for evaluation and serving (:meth:`Family.scorer`, a ``training.scoring.Scorer``),

and one line in ``training/registry.py`` (or a ``registry.register(...)`` call in a plugin
module named in ``$RNNREC_PLUGINS``). The one trainer (``training.trainer``) does the rest:
epochs, optimizer, LR schedule, clipping, AMP, NaN checks, checkpoints, exact resume,
early stopping, progress.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np
import torch

from training.data import ItemIndex, SessionData


@dataclass
class TrainContext:
    """What a family is built from: the training table and where it runs."""

    index: ItemIndex
    data: SessionData  # the training table (item_idx, sessions in time order)
    support: np.ndarray  # item support in the training table, [n_items]
    device: torch.device


class Family:
    """Base class. ``Config`` is the family's dataclass; ``name`` its registry name."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    #: False for families with nothing to learn by gradient descent (POP, counting baselines)
    trainable: ClassVar[bool] = True
    #: config keys that must name another trained run: key -> the families such a run may be
    #: of (the first is the one the DAG trains for it), e.g. a distillation student's teacher.
    #: The DAG trains that family first and hands its run over (dags.pipeline_steps.plan_dependent)
    source_runs: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def eval_mode(cls, cfg: Any) -> str:
        """The evaluation loop's mode this family is meant to be scored in (the DAG's
        ``eval_mode=auto``): "user" for models with a user state or a user-sequence state,
        whose session mode is only their fallback; "session" otherwise."""
        return "session"

    def __init__(self, cfg: Any, ctx: TrainContext):
        self.cfg = cfg
        self.ctx = ctx
        self.model: torch.nn.Module | None = None

    # ---- weights --------------------------------------------------------------------
    def init_weights(self, gen: torch.Generator) -> None:
        """Fresh weights from ``gen`` (seeded by the trainer from ``cfg.seed``)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}

    def load_weights(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)

    # ---- training (autograd) ----------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; override to give some parameters their own
        ``weight_decay`` / ``lr`` (e.g. L2 on user parameters only)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad and p.numel()],
                 "weight_decay": getattr(self.cfg, "weight_decay", 0.0)}]

    def batches(self, epoch: int) -> Iterator[Any]:
        """The epoch's mini-batches, drawn from a generator of (seed, epoch) only, so that
        ``--resume`` after epoch k reproduces an uninterrupted run exactly."""
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, int] | None:
        """(loss to back-propagate, events it covers) for one batch, or None to skip it."""
        raise NotImplementedError

    def runner(self):
        """An optional fast epoch runner replacing the autograd one (GRU4Rec's C path);
        None = the trainer's :class:`training.trainer.AutogradRunner`."""
        return None

    # ---- evaluation -----------------------------------------------------------------
    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        """Checkpoint (``training.checkpoint`` format) -> ``training.scoring.Scorer``."""
        raise NotImplementedError


def glorot_(t: torch.Tensor, fan_in: int, fan_out: int, gen: torch.Generator) -> None:
    """Glorot-uniform in place: U(-s, s), s = sqrt(6 / (fan_in + fan_out)), drawn from ``gen``
    (TF1's / Keras' default initializer; every family's "Glorot uniform")."""
    s = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * 2 * s - s)


def generator(seed: int, epoch: int) -> torch.Generator:
    """One generator per (seed, epoch): an epoch's randomness never depends on earlier ones."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class _GatherRows1d(torch.autograd.Function):
    """``weight[idx]`` for a 1-D parameter with a row-sparse (COO) gradient: what
    ``F.embedding(..., sparse=True)`` does for 2-D tables, which it cannot do for a vector."""

    @staticmethod
    def forward(ctx, weight, idx):
        ctx.n = weight.shape[0]
        ctx.save_for_backward(idx)
        return weight.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        g = torch.sparse_coo_tensor(idx.unsqueeze(0), grad, (ctx.n,), check_invariants=False)
        return g, None


def gather_rows(weight: torch.Tensor, idx: torch.Tensor, sparse: bool = True) -> torch.Tensor:
    """Rows ``idx`` of an item table (2-D) or item bias (1-D); with ``sparse`` the gradient is
    row-sparse, so a row-sparse optimizer touches only these rows (the official GRU4Rec
    updates only the rows a mini-batch used)."""
    if not sparse:
        return weight[idx]
    if weight.dim() == 1:
        return _GatherRows1d.apply(weight, idx)
    return torch.nn.functional.embedding(idx, weight, sparse=True)
