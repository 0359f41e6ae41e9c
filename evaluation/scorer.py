"""The one scorer interface every model and baseline exposes to evaluation.

The evaluation loop (``evaluation.loop``) walks test sessions session-parallel
in ``n_slots`` slots, exactly like training, and talks to a model only through
this interface::

    state = scorer.begin(n_slots)                   # all slots empty / zero
    state = scorer.end_session(state, slots)        # sessions in these slots just ended
                                                    # (user-level models update the user here)
    state = scorer.start_session(state, slots, users)  # new sessions start: reset (or
                                                    # initialise from the user state)
    scores, state = scorer.step(state, items)       # one event per slot -> [n_slots, n_items]
    state = scorer.select(state, rows)              # OPTIONAL: keep only these state rows once
                                                    # some slots have gone idle for good (speed)

``items`` holds item_idx (dense, from the model's own item index) for every
slot; idle slots carry item 0 and their scores are ignored. ``slots`` is a bool
tensor [n_slots]; ``users`` an int64 tensor [n_slots] (-1 = unknown/anonymous).
Scores are "higher = more likely next"; the loop does the ranking (ties,
cut-offs), so no model can get ranking wrong on its own.

A model family plugs in by returning an object with these four methods from
its loader (``training.registry.load_scorer``). Session-based models ignore
``users``; HRNN keeps a user state and uses ``end_session``; POP / S-POP /
kNN keep per-slot session item lists in ``state``.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Scorer(Protocol):
    n_items: int
    device: torch.device

    def begin(self, n_slots: int) -> Any: ...

    def end_session(self, state: Any, slots: torch.Tensor) -> Any: ...

    def start_session(self, state: Any, slots: torch.Tensor, users: torch.Tensor | None) -> Any: ...

    def step(self, state: Any, items: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


class SessionScorerBase:
    """Defaults for session-only models: nothing to do at session end."""

    def end_session(self, state: Any, slots: torch.Tensor) -> Any:
        return state


class PopScorer(SessionScorerBase):
    """POP: the same scores (training support) at every step, whatever the session."""

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


class GRU4RecScorer(SessionScorerBase):
    """GRU4Rec: per-slot hidden state, zeroed at every session start (checklist item 1)."""

    def __init__(self, model, device: torch.device, mixed_precision: bool = False):
        self.model = model.to(device).eval()
        self.device = device
        self.n_items = model.n_items
        self.amp = mixed_precision and device.type == "cuda"

    def begin(self, n_slots: int):
        return self.model.init_state(n_slots, self.device)

    def select(self, state, rows):
        """Keep only these state rows (the loop drops slots whose sessions ran out)."""
        return [h.index_select(0, rows) for h in state]

    def start_session(self, state, slots, users):
        keep = (~slots).to(torch.float32).unsqueeze(1)
        return [h * keep for h in state]

    @torch.no_grad()
    def step(self, state, items):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out, state = self.model.forward_step(items, state)
            scores = self.model.all_scores(out)
        return scores.float(), [h.float() for h in state]
