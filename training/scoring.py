"""The one scorer interface every model and baseline exposes to evaluation and serving.

It sits below both ``training`` (each family builds its scorer) and ``evaluation``
(the loop, metrics and serving only talk to this), so nothing in ``training``
imports ``evaluation``.

The evaluation loop walks test sessions in ``n_slots`` parallel slots and talks
to a model only through::

    state = scorer.begin(n_slots)                   # all slots empty / zero
    state = scorer.end_session(state, slots)        # sessions in these slots just ended
                                                    # (user-level models update the user here)
    state = scorer.start_session(state, slots, users)  # new sessions start: reset (or
                                                    # initialise from the user state)
    scores, state = scorer.step(state, items)       # one event per slot -> [n_slots, n_items]
    state = scorer.select(state, rows)              # OPTIONAL: keep only these state rows once
                                                    # some slots have gone idle for good (speed)

A scorer with the class attribute ``wants_mode = True`` is begun as ``scorer.begin(n_slots,
mode=mode)`` with the loop's mode ("session" | "user"), so that a model of user sequences
(``seqrnn`` with ``sequence=user``) carries its state across one user's sessions in user mode
and resets it at every session in session mode.

A scorer with the class attribute ``wants_last_item = True`` gets ``end_session(state, slots,
last_items)``: ``last_items`` [n_slots] int64 holds the item_idx of each ending session's last
click (0 elsewhere), which is a target but never an input of ``step``. A model of user
sequences (trained on a user's sessions back to back, so that click was the input before the
user's next session) feeds it into its state there.

A scorer with the class attribute ``uses_time = True`` (STAN, time-decayed Item-KNN) is
stepped as ``scorer.step(state, items, ts)`` with ``ts`` the input events' times (int64
microseconds since the epoch, 0 on idle rows).

``items`` holds item_idx (dense, from the model's own item index) for every
slot; idle slots carry item 0 and their scores are ignored. ``slots`` is a bool
tensor [n_slots]; ``users`` an int64 tensor [n_slots] (-1 = unknown/anonymous).
Scores are "higher = more likely next"; the loop does the ranking (ties,
cut-offs), so no model can get ranking wrong on its own.

A family's scorer is built by ``training.registry.load_scorer(ckpt, device)``.
Session-based models ignore ``users``; user-level models keep a user state and
update it in ``end_session``; POP / S-POP / kNN keep per-slot session item lists
in ``state``.
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


class RNNScorer(SessionScorerBase):
    """Any session RNN whose state is a list of per-slot tensors, zeroed at every session
    start (checklist item 1). ``model`` must provide ``init_state(n, device)``,
    ``forward(items, state) -> (output, state)`` and ``all_scores(output)``."""

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
            out, state = self.model(items, state)
            scores = self.model.all_scores(out)
        return scores.float(), [h.float() for h in state]

    def output_factors(self):
        """``(W, b)`` with ``all_scores(out) == out @ W.T + b`` for models that say so
        (``output_factors``), in full precision only; else None (evaluation.loop "Blocked ranking")."""
        f = getattr(self.model, "output_factors", None)
        return None if f is None or self.amp else tuple(t.detach() for t in f())

    @torch.no_grad()
    def step_hidden(self, state, items):
        """:meth:`step` without the scores: the top layer's output (blocked ranking)."""
        out, state = self.model(items, state)
        return out, state
