"""POP: always recommend the most popular training items (Hidasi et al. 2016's first baseline).

"Training" is counting item support in the training table; nothing is learned by gradient
descent, so the trainer writes one checkpoint (epoch 0) holding the counts::

    python -m training.train --model pop --data SPLIT_DIR --out RUN_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.config import CommonConfig
from training.family import Family, TrainContext
from training.scoring import SessionScorerBase


@dataclass
class PopConfig(CommonConfig):
    """POP: the most popular training items, whatever the session (no parameters to learn)."""

    model: str = "pop"
    n_epochs: int = 0


class PopScorer(SessionScorerBase):
    """The same scores (training support) at every step."""

    def __init__(self, support: torch.Tensor, device: torch.device):
        self.device = device
        self.pop = support.to(device=device, dtype=torch.float32)
        self.n_items = int(self.pop.shape[0])

    def begin(self, n_slots: int):
        return None

    def start_session(self, state, slots, users):
        return state

    def step(self, state, items):
        return self.pop.unsqueeze(0).expand(items.shape[0], -1), state


class PopFamily(Family):
    name = "pop"
    Config = PopConfig
    trainable = False

    def __init__(self, cfg: PopConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        self.support = torch.from_numpy(ctx.support.astype("int64"))

    def state_dict(self) -> dict:
        return {"support": self.support.clone()}

    def load_weights(self, state_dict: dict) -> None:
        pass  # POP is recounted from the (new) training table

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        return PopScorer(ckpt["state_dict"]["support"], device)
