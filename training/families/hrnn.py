"""HRNN (Quadrana et al., RecSys 2017) and the RNN Concat baseline: one family, three names.

A session-level GRU as in GRU4Rec (one-hot input, the cell of
:meth:`training.families.gru4rec.GRU4RecModel.cell`, scores ``By + Wy s``) and a user-level
GRU over a user's sessions (their eq. 3-5)::

    s_{m,n} = GRU_ses(i_{m,n} [, c_{m-1}], s_{m,n-1})     n = 1 .. N_m - 1   (the session GRU)
    c_m     = GRU_usr(s_{m,N_m-1}, c_{m-1})              c_0 = 0            (once per finished session)
    s_{m+1,0} = tanh(W_init c_m + b_init)                                   (the next session's start)

===============  ==========  ==========================================================================
registry name    variant     what
===============  ==========  ==========================================================================
``hrnn_init``    ``init``    ``c`` only initialises the session GRU (HRNN Init)
``hrnn_all``     ``all``     ``c`` also enters the session GRU at every step, concatenated with the item
                             input: the gates and candidate read ``W_x i + W_c c`` (HRNN All)
``rnn_concat``   ``concat``  no user GRU: a user's sessions concatenated into one sequence, the
                             session GRU's state zeroed only for a new user (RNN Concat)
===============  ==========  ==========================================================================

Each name is the same family with other defaults (``--set variant=...`` changes it, as the
``seqrnn`` presets do). GRU cell (both levels; GRU4Rec's, PyTorch convention, gates r, z, n)::

    r = σ(W_ir x + b_ir + W_hr h + b_hr)     z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))     h' = (1 − z) ⊙ n + z ⊙ h

with ``x`` = the one-hot item (rows of ``Wx0``; or an embedding, ``embedding=tied|separate``)
for the session GRU (HRNN All: plus ``W_c c``) and ``x`` = the session's last state for the
user GRU.

Training (``training.batching.user_parallel_schedule``, their §3.2.2): ``batch_size`` slots,
each walking one user's sessions back to back in time order, one event per slot and step, B
users at once (never one user at a time). Where a slot starts a session of the same user,
the user GRU advances once with the carried final state of the slot's previous session and
the session GRU restarts from ``tanh(W_init c + b_init)``; where a slot starts a new user,
``c = 0`` and the session GRU starts from ``tanh(b_init)`` (= the equations with ``c_0 = 0``;
the authors' code zeroes ``s`` there instead). The user update is computed inside the first
step of the next session, so that step's loss trains the user GRU and ``W_init`` (the same
value as an update at the session end; a user's last session feeds no update, as nothing in
training reads it). As in GRU4Rec
each step is its own update (no BPTT: the carried states are constants), and the
dropped-out states are the ones carried. Dropout, each its own probability (their Table 2:
user GRU / session GRU / initialisation): ``dropout_user`` on the new ``c``,
``dropout_session`` on the session GRU's output, ``dropout_init`` on ``s_{m+1,0}``.

Losses and negatives are GRU4Rec's (``training.losses.sampled_loss``, the in-batch targets
of the other slots + ``n_sample`` shared extra negatives ∝ support^``sample_alpha`` from
``training.batching.SampleStore``, logQ for cross-entropy by
``training.families.gru4rec.logq_weights``), the loss summed over rows / ``batch_size``.
With user-parallel batches the in-batch negatives come from other users (their §3.2.2).

RNN Concat (their baselines: "the same as RNN, but sessions from the same user are concatenated
into a single session") trains on the same kind of schedule built over :func:`user_concat`:
each user's sessions (time order, ties by session id; sessions with < 2 events dropped, as
the schedule and the evaluation's history drop them) concatenated into ONE sequence, so
every consecutive pair of a user's events is a training pair -- the cross-session pair too
(a session's last item -> the user's next session's first item): a user with ``E`` events
gives ``E - 1`` pairs (HRNN: ``E`` minus the number of sessions). ``s = 0`` for a new user,
no other reset. Its scorer (``wants_last_item``) takes each ending session's last click into
``s`` at ``end_session`` in user mode (and in serving, which carries a user across sessions
too), as that click was an input in training; the loop never predicts a session's first
event, so the paper's "discard the first prediction of RNN Concat" is built in. HRNN Init /
All ignore the last click: their user GRU reads the session's last state, and in training
the last click is never an input.

Users: sessions with user id -1 (or a table without users) are each a user of their own (an
HRNN is then GRU4Rec with ``s_0 = tanh(b_init)``). Users are taken in random order every
epoch (their §4.1; ``session_order=random``, from ``training.family.generator(seed,
epoch)``; ``time`` = by first session).

Scorer (``training.scoring``; ``begin(n, mode=)``):

* ``mode="user"`` (``evaluation.evaluate --mode user``): a slot carries ``c`` (RNN Concat:
  ``s``) from one session of a user to the next -- the loop feeds the user's history sessions
  unscored first (their "bootstrap"), ``end_session`` advances the user GRU (RNN Concat: feeds
  the session's last click into ``s``) -- and resets it for a new user; an anonymous (-1)
  session or a user without history starts from the fallback.
* ``mode="session"``: every session starts from the fallback (the model as a session-based
  recommender; the DAG and early stopping score this way).
* serving (``evaluation.serving``, ``begin(1)`` without a mode): a known user starts from
  ``c`` after the user's training sessions, stored in the checkpoint by user id
  (``served_user_ids`` [U] int64, ``served_user_states`` [U, D]: ``c`` for HRNN, for RNN Concat
  ``s`` after ALL the user's training clicks, each session's last included; computed on the
  run's training table with the scorer's own user-mode walk, so a served known user = user
  mode with that table as history); an unknown user or none gets the fallback.
* **Fallback** (anonymous, unseen in training, session mode): zero user state, i.e. the
  session GRU starts from ``tanh(b_init)`` (HRNN) or from zero (RNN Concat).

The stored states count in ``evaluate``'s ``n_parameters`` / ``model_bytes`` (it counts every
float tensor of the state dict: U · D more); fine-tuning (``--init-from``) loads the weights
and recomputes the states on the new training table.

Config keys (defaults: ``hrnn_init`` / ``hrnn_all`` / ``rnn_concat``; source)::

    variant          init / all / concat           the registry name's
    hidden           500 / 500 / 500               Table 2 "large" (500+500 units; best on XING)
    user_hidden      500 / 500 / (unused)          Table 2 "large"
    batch_size       100 / 50 / 100                Table 2 (*)
    dropout_user     0.1 / 0.0 / (unused)          Table 2
    dropout_session  0.2 / 0.2 / 0.2               Table 2
    dropout_init     0.2 / 0.2 / (unused)          Table 2
    learning_rate    0.1 / 0.05 / 0.1              Table 2 (*), Adagrad
    momentum         0.1 / 0.3 / 0.1               Table 2 (*), heavy-ball (the authors' update)
    optimizer        adagrad                       §4.2 "AdaGrad with momentum"
    n_epochs         10                            §4.2
    loss / final_act top1 / tanh                   §3.1 (TOP1 always best; tanh before it: §3.1 g)
    n_sample         0                             §3.1: in-batch negatives only
    embedding        onehot                        §3.1 (one-hot item input); tied | separate
    session_order    random                        §4.1 "We then order users at random"
    bpreg, logq, sample_alpha, sample_store_size, embedding_dim: GRU4Rec's (gru4rec.py)

(*) Table 2's batch-size and learning-rate/momentum columns are lost in our text copy of the
paper (its dropout column is legible); the values are those of the authors' scripts
(``scripts/xing_dense_large.sh`` of mquad/hgru4rec), whose dropouts equal Table 2's. Table 2's
RNN row (shared by RNN Concat) is not legible either and is in no script: ``rnn_concat``
takes HRNN Init (large)'s session-level values (our choice; tune on ``valid``). Not in the
paper: Glorot-uniform weights per gate block and zero biases (the authors' code and GRU4Rec's),
Adagrad's eps 1e-6 inside the square root (theirs).

Train / evaluate::

    python -m training.train --model hrnn_init --data SPLIT_DIR --out RUN_DIR [--set hidden=100 ...]
    python -m evaluation.evaluate --model-dir RUN_DIR --data SPLIT_DIR --out EVAL_DIR --mode user
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.batching import SampleStore, user_parallel_schedule
from training.config import ConfigError, TrainConfig, config_from_dict
from training.data import SessionData
from training.family import Family, TrainContext, gather_rows, generator, glorot_
from training.families.gru4rec import GRU4RecModel, logq_weights
from training.losses import check_loss_config, sampled_loss

VARIANTS = ("init", "all", "concat")
EMBEDDINGS = ("onehot", "tied", "separate")
ORDERS = ("time", "random")
#: state-dict keys of the per-user states for serving (not model weights)
SERVED_KEYS = ("served_user_ids", "served_user_states")
#: slots of the pass that computes the stored user states
STATE_SLOTS = 256


@dataclass
class HRNNConfig(TrainConfig):
    """HRNN Init (Quadrana et al. 2017, Table 2 "large"); see the module docstring."""

    model: str = "hrnn_init"
    #: init (HRNN Init) | all (HRNN All: c also input at every step) | concat (RNN Concat)
    variant: str = "init"
    #: session-level GRU units
    hidden: int = 500
    #: user-level GRU units (init / all)
    user_hidden: int = 500
    #: onehot (the paper's 1-of-N input) | tied (input = output rows Wy) | separate (own table)
    embedding: str = "onehot"
    embedding_dim: int = 0
    #: top1 | bpr | top1-max | bpr-max | cross-entropy (GRU4Rec's)
    loss: str = "top1"
    final_act: str = "tanh"
    bpreg: float = 0.0
    logq: float = 1.0
    #: drop probabilities: user GRU output, session GRU output, session initialisation
    dropout_user: float = 0.1
    dropout_session: float = 0.2
    dropout_init: float = 0.2
    optimizer: str = "adagrad"
    learning_rate: float = 0.1
    momentum: float = 0.1
    batch_size: int = 100
    n_epochs: int = 10
    #: shared extra negatives per step (0 = in-batch only, the paper's)
    n_sample: int = 0
    sample_alpha: float = 0.5
    sample_store_size: int = 10_000_000
    #: order of the USERS in an epoch: random (shuffled every epoch, the paper's) | time
    session_order: str = "random"

    def __post_init__(self):
        m = self.model
        for key, val, choices in (("variant", self.variant, VARIANTS), ("embedding", self.embedding, EMBEDDINGS),
                                  ("session_order", self.session_order, ORDERS)):
            if val not in choices:
                raise ConfigError(f"{m}: {key} {val!r}: choose {' | '.join(choices)}")
        for key in ("hidden", "user_hidden", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{m}: {key} must be >= 1, got {getattr(self, key)}")
        if self.embedding == "separate" and self.embedding_dim < 1:
            raise ConfigError(f"{m}: embedding=separate needs embedding_dim >= 1")
        for key in ("dropout_user", "dropout_session", "dropout_init"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{m}: {key} must be in [0, 1), got {getattr(self, key)}")
        if self.n_sample < 0:
            raise ConfigError(f"{m}: n_sample must be >= 0, got {self.n_sample}")
        try:
            check_loss_config(self.loss, self.final_act)
        except ValueError as e:
            raise ConfigError(f"{m}: {e}") from None


@dataclass
class HRNNAllConfig(HRNNConfig):
    """HRNN All (Table 2 "large")."""

    model: str = "hrnn_all"
    variant: str = "all"
    batch_size: int = 50
    dropout_user: float = 0.0
    dropout_session: float = 0.2
    dropout_init: float = 0.2
    learning_rate: float = 0.05
    momentum: float = 0.3


@dataclass
class RNNConcatConfig(HRNNConfig):
    """RNN Concat: a session GRU over each user's sessions, state carried across them."""

    model: str = "rnn_concat"
    variant: str = "concat"
    dropout_user: float = 0.0
    dropout_init: float = 0.0


# ----------------------------------------------------------------------------- the model
class HRNNModel(nn.Module):
    """Session GRU (+ user GRU and initialisation unless ``concat``) -> scores over items."""

    def __init__(self, n_items: int, cfg: HRNNConfig):
        super().__init__()
        H, U = cfg.hidden, cfg.user_hidden
        self.n_items, self.variant, self.embedding = n_items, cfg.variant, cfg.embedding
        self.hidden = H
        self.user_hidden = U if cfg.variant != "concat" else 0
        if cfg.embedding == "onehot":
            self.Wx0 = nn.Parameter(torch.zeros(n_items, 3 * H))  # row i = [W_ir | W_iz | W_in] one-hot column i
        else:
            if cfg.embedding == "separate":
                self.E = nn.Parameter(torch.zeros(n_items, cfg.embedding_dim))
            self.W_ih = nn.Parameter(torch.zeros(3 * H, cfg.embedding_dim if cfg.embedding == "separate" else H))
        self.b_ih = nn.Parameter(torch.zeros(3 * H))
        self.W_hh = nn.Parameter(torch.zeros(3 * H, H))
        self.b_hh = nn.Parameter(torch.zeros(3 * H))
        if cfg.variant == "all":
            self.W_c = nn.Parameter(torch.zeros(3 * H, U))  # the user state's share of [x; c]
        if cfg.variant != "concat":
            self.Wu_ih = nn.Parameter(torch.zeros(3 * U, H))
            self.bu_ih = nn.Parameter(torch.zeros(3 * U))
            self.Wu_hh = nn.Parameter(torch.zeros(3 * U, U))
            self.bu_hh = nn.Parameter(torch.zeros(3 * U))
            self.W_init = nn.Parameter(torch.zeros(H, U))
            self.b_init = nn.Parameter(torch.zeros(H))
        self.Wy = nn.Parameter(torch.zeros(n_items, H))
        self.By = nn.Parameter(torch.zeros(n_items))

    def reset_parameters(self, gen: torch.Generator) -> None:
        """Glorot uniform per gate block (fan = in + out of one gate), zero biases."""
        H, U = self.hidden, self.user_hidden

        def gates(W, fan_in, h, by_column=False):  # the 3 gate blocks [r | z | n] of W
            for g in range(3):
                glorot_(W.data[:, g * h:(g + 1) * h] if by_column else W.data[g * h:(g + 1) * h], fan_in, h, gen)

        if self.embedding == "onehot":
            gates(self.Wx0, self.n_items, H, by_column=True)
        else:
            if self.embedding == "separate":
                glorot_(self.E, self.n_items, self.E.shape[1], gen)
            gates(self.W_ih, self.W_ih.shape[1], H)
        gates(self.W_hh, H, H)
        if self.variant == "all":
            gates(self.W_c, U, H)
        if self.variant != "concat":
            gates(self.Wu_ih, H, U)
            gates(self.Wu_hh, U, U)
            glorot_(self.W_init, U, H, gen)
        glorot_(self.Wy, self.n_items, H, gen)
        for name, p in self.named_parameters():
            if name.startswith("b") or name == "By":
                p.data.zero_()

    # ---- the equations ---------------------------------------------------------------------
    def init_state(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        dev = device or self.Wy.device
        return torch.zeros(n, self.hidden, device=dev), torch.zeros(n, self.user_hidden, device=dev)

    def session_step(self, x: torch.Tensor, s: torch.Tensor, c: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        """One step of the session GRU: items x [n], state s [n, H], user state c [n, U] (read
        by ``all`` only) -> the new state [n, H]."""
        if self.embedding == "onehot":
            gi = gather_rows(self.Wx0, x, sparse) + self.b_ih
        else:
            inp = gather_rows(self.E if self.embedding == "separate" else self.Wy, x, sparse)
            gi = torch.addmm(self.b_ih, inp, self.W_ih.t())
        if self.variant == "all":
            gi = torch.addmm(gi, c, self.W_c.t())
        return GRU4RecModel.cell(gi, s, self.W_hh, self.b_hh)

    def user_step(self, s_last: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """c_m = GRU_usr(s_{m,N-1}, c_{m-1})."""
        return GRU4RecModel.cell(torch.addmm(self.bu_ih, s_last, self.Wu_ih.t()), c, self.Wu_hh, self.bu_hh)

    def session_init(self, c: torch.Tensor) -> torch.Tensor:
        """s_{m+1,0} = tanh(W_init c_m + b_init)."""
        return torch.tanh(torch.addmm(self.b_init, c, self.W_init.t()))

    def sampled_scores(self, out: torch.Tensor, y: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        return torch.addmm(gather_rows(self.By, y, sparse), out, gather_rows(self.Wy, y, sparse).t())

    def all_scores(self, out: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.By, out, self.Wy.t())

    # ---- training: the hand-over at session starts -------------------------------------------
    def hand_over(self, s: torch.Tensor, c: torch.Tensor, rows: torch.Tensor, new_user: torch.Tensor,
                  cont: torch.Tensor, u_mask=None, i_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """States of ``rows`` (slots starting a session) for their first step. ``new_user`` [len(rows)]
        bool; ``cont``: positions in ``rows`` continuing a user (the user GRU advances there,
        once, from the slot's carried state = its previous session's last state). Masks are
        inverted-dropout masks of those rows (or None)."""
        if self.variant == "concat":  # the state runs on across the user's sessions
            keep = (~new_user).to(s.dtype).unsqueeze(1)
            return s.index_copy(0, rows, s.index_select(0, rows) * keep), c
        c_new = torch.zeros(len(rows), self.user_hidden, device=s.device, dtype=s.dtype)
        if len(cont):
            r = rows.index_select(0, cont)
            cu = self.user_step(s.index_select(0, r), c.index_select(0, r))
            if u_mask is not None:
                cu = cu * u_mask.index_select(0, cont)
            c_new = c_new.index_copy(0, cont, cu)
        s0 = self.session_init(c_new)
        if i_mask is not None:
            s0 = s0 * i_mask
        return s.index_copy(0, rows, s0), c.index_copy(0, rows, c_new)


# ----------------------------------------------------------------------------- scorer
class HRNNScorer:
    """State = [s [n, H], c [n, U], the user id each row last started (-2: none)]; see the
    module docstring for the modes and the fallback."""

    wants_mode = True
    #: the loop passes each ending session's last click to end_session; only RNN Concat reads it
    wants_last_item = True

    def __init__(self, model: HRNNModel, device: torch.device, served_users: torch.Tensor | None = None,
                 served_states: torch.Tensor | None = None):
        self.model = model.to(device).eval()
        self.device = device
        self.n_items = model.n_items
        self.concat = model.variant == "concat"
        self.served_users = served_users.to(device) if served_users is not None else None
        self.served_states = served_states.to(device) if served_states is not None else None
        self.mode = "serve"

    def begin(self, n_slots: int, mode: str = "serve"):
        if mode not in ("session", "user", "serve"):
            raise ValueError(f"HRNN scorer mode {mode!r}: session | user | serve")
        self.mode = mode
        s, c = self.model.init_state(n_slots, self.device)
        return [s, c, torch.full((n_slots,), -2, dtype=torch.int64, device=self.device)]

    def select(self, state, rows):
        return [t.index_select(0, rows) for t in state]

    def served(self, users: torch.Tensor) -> torch.Tensor:
        """Stored state of each user (zeros = the fallback for unknown users / -1 / no table)."""
        dim = self.model.hidden if self.concat else self.model.user_hidden
        out = torch.zeros(len(users), dim, device=self.device)
        if self.served_users is None or not len(self.served_users):
            return out
        pos = torch.searchsorted(self.served_users, users).clamp(max=len(self.served_users) - 1)
        known = (self.served_users[pos] == users) & (users >= 0)
        return torch.where(known.unsqueeze(1), self.served_states[pos], out)

    @torch.no_grad()
    def start_session(self, state, slots, users):
        s, c, last = state
        if users is None:
            users = torch.full_like(last, -1)
        users = users.to(self.device)
        same = slots & (users >= 0) & (users == last) if self.mode != "session" else torch.zeros_like(slots)
        new = (slots & ~same).unsqueeze(1)
        fresh = self.served(users) if self.mode == "serve" else None  # user mode: the history rebuilds it
        if self.concat:
            s = torch.where(new, fresh if fresh is not None else torch.zeros_like(s), s)
        else:
            c = torch.where(new, fresh if fresh is not None else torch.zeros_like(c), c)
            s = torch.where(slots.unsqueeze(1), self.model.session_init(c), s)
        return [s, c, torch.where(slots, users, last)]

    @torch.no_grad()
    def advance(self, state, items):
        s, c, last = state
        return [self.model.session_step(items.to(self.device), s, c), c, last]

    @torch.no_grad()
    def step(self, state, items):
        state = self.advance(state, items)
        return self.model.all_scores(state[0]).float(), state

    @torch.no_grad()
    def end_session(self, state, ending, last_items=None):
        """HRNN: the user GRU advances once from the session's last state (``last_items`` is
        ignored, as in training). RNN Concat: outside session mode the ending rows take their
        session's last click into ``s`` (the user's sequence goes on, as in training)."""
        if self.concat:
            if last_items is None or self.mode == "session":
                return state
            s, c, last = state
            nxt = self.model.session_step(last_items.to(self.device), s, c)
            return [torch.where(ending.to(self.device).unsqueeze(1), nxt, s), c, last]
        s, c, last = state
        rows = torch.nonzero(ending).squeeze(1)
        if rows.numel():  # the user GRU advances once per finished session
            c = c.index_copy(0, rows, self.model.user_step(s.index_select(0, rows), c.index_select(0, rows)))
        return [s, c, last]


def user_lanes(data: SessionData) -> np.ndarray:
    """User of every session for the schedule; sessions without a user (-1) are each their own
    (negative ids that never clash with real ones)."""
    anon = -(np.arange(data.n_sessions, dtype=np.int64) + 2)
    if data.user_ids is None:
        return anon
    return np.where(data.user_ids >= 0, data.user_ids, anon)


def time_rank(data: SessionData) -> np.ndarray:
    """Rank of every session by (start time, session id)."""
    r = np.empty(data.n_sessions, np.int64)
    r[np.lexsort((data.session_ids, data.start_ts))] = np.arange(data.n_sessions)
    return r


def user_concat(data: SessionData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RNN Concat's training sequences: (items, offsets [n_seq + 1], lane [n_seq], first
    session's time rank [n_seq]), one sequence per user of :func:`user_lanes` (ascending), the
    user's sessions with >= 2 events in time order (ties by session id) back to back."""
    lane, rank = user_lanes(data), time_rank(data)
    keep = np.flatnonzero(np.diff(data.offsets) >= 2)
    order = keep[np.lexsort((rank[keep], lane[keep]))]
    lens = np.diff(data.offsets)[order]
    idx = np.repeat(data.offsets[order] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
    lo = lane[order]
    first = np.flatnonzero(np.r_[True, lo[1:] != lo[:-1]]) if len(order) else np.zeros(0, np.int64)
    seq_len = np.add.reduceat(lens, first) if len(order) else np.zeros(0, np.int64)
    return (data.items[idx], np.r_[0, np.cumsum(seq_len)].astype(np.int64), lo[first],
            rank[order][first])


@torch.no_grad()
def served_user_states(model: HRNNModel, data: SessionData, device: torch.device,
                       n_slots: int = STATE_SLOTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(user ids sorted [U], state [U, D]) after each user's sessions of ``data``, walked in time
    order by the scorer in user mode (``c`` after the last session's user update; RNN Concat:
    ``s`` after every click, each session's last fed at its end as the evaluation loop does).
    Only scores nothing: no output layer."""
    lane = user_lanes(data)
    known = np.unique(lane[lane >= 0])
    dim = model.hidden if model.variant == "concat" else model.user_hidden
    out = torch.zeros(len(known), dim, device=device)
    if not len(known):
        return torch.from_numpy(known), out.cpu()
    sch = user_parallel_schedule(data.items, data.offsets, lane, time_rank(data), n_slots)
    sc = HRNNScorer(model, device)
    st = sc.begin(n_slots, mode="user")
    was_training = model.training
    for t in range(sch.n_steps):
        starting = sch.session_start[t]
        if starting.any():
            st = sc.start_session(st, torch.from_numpy(starting).to(device),
                                  torch.from_numpy(np.where(starting, sch.user[t], -1)).to(device))
        st = sc.advance(st, torch.from_numpy(sch.inputs[t].clip(min=0)).to(device))
        ending = sch.session_end[t] & (sch.targets[t] >= 0)
        if ending.any():
            st = sc.end_session(st, torch.from_numpy(ending).to(device),
                                torch.from_numpy(np.where(ending, sch.targets[t], 0)).to(device))
            rows = np.flatnonzero(ending & (sch.user[t] >= 0))
            if len(rows):  # overwritten session by session: the last write is after the last one
                vec = st[0] if model.variant == "concat" else st[1]
                r = torch.from_numpy(rows).to(device)
                out[torch.from_numpy(np.searchsorted(known, sch.user[t, rows])).to(device)] = vec.index_select(0, r)
    model.train(was_training)
    return torch.from_numpy(known.astype(np.int64)), out.cpu()


# ----------------------------------------------------------------------------- family
@dataclass
class Step:
    """One step of the user-parallel schedule (host flags, device tensors)."""

    x: torch.Tensor  # [B] input item_idx (0 where idle)
    y: torch.Tensor  # [B] target item_idx (-1 where idle)
    active: np.ndarray  # [B] bool
    session_start: np.ndarray  # [B] bool
    user_start: np.ndarray  # [B] bool
    samples: torch.Tensor | None  # [n_sample] shared extra negatives
    s_mask: torch.Tensor | None  # [B, H] session-GRU dropout
    u_mask: torch.Tensor | None  # [B, U] user-GRU dropout
    i_mask: torch.Tensor | None  # [B, H] initialisation dropout


class HRNNFamily(Family):
    name = "hrnn_init"
    Config = HRNNConfig

    @classmethod
    def eval_mode(cls, cfg) -> str:
        return "user"  # session mode is the zero-user-state fallback

    def __init__(self, cfg: HRNNConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        self.model = HRNNModel(ctx.index.n_items, cfg).to(ctx.device)
        self.logp = torch.log(torch.tensor(np.maximum(ctx.support, 1), dtype=torch.float32)).to(ctx.device)
        self._lane = user_lanes(ctx.data)
        self._time = time_rank(ctx.data)
        self._concat = user_concat(ctx.data) if cfg.variant == "concat" else None
        self._s = self._c = None
        self._served_cache = (None, None)

    def init_weights(self, gen: torch.Generator) -> None:
        self.model.reset_parameters(gen)

    # ---- checkpoint: weights + the users' states for serving ------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = super().state_dict()
        key = tuple(p._version for p in self.model.parameters())  # bumped by every optimizer step
        if self._served_cache[0] != key:
            self._served_cache = (key, served_user_states(self.model, self.ctx.data, self.ctx.device))
        users, states = self._served_cache[1]
        sd[SERVED_KEYS[0]], sd[SERVED_KEYS[1]] = users.clone(), states.clone()
        return sd

    def load_weights(self, state_dict: dict) -> None:
        self.model.load_state_dict({k: v for k, v in state_dict.items() if k not in SERVED_KEYS})

    # ---- training ----------------------------------------------------------------------------
    def schedule(self, gen: torch.Generator):
        """The epoch's user-parallel schedule: users shuffled by ``gen`` or by first session
        (RNN Concat: over :func:`user_concat`'s sequences, one "session" per user)."""
        c, d = self.cfg, self.ctx.data
        if self._concat is not None:
            items, offsets, lane, first = self._concat
            key = first
            if c.session_order == "random":
                key = torch.randperm(len(lane), generator=gen).numpy().astype(np.int64)
            return user_parallel_schedule(items, offsets, lane, key, c.batch_size)
        key = self._time
        if c.session_order == "random":
            uniq, inv = np.unique(self._lane, return_inverse=True)
            rank = torch.randperm(len(uniq), generator=gen).numpy()
            key = rank[inv].astype(np.int64) * (d.n_sessions + 1) + self._time
        return user_parallel_schedule(d.items, d.offsets, self._lane, key, c.batch_size)

    def batches(self, epoch: int):
        """One user-parallel step per batch; the states are carried by the family."""
        c, m, dev = self.cfg, self.model, self.ctx.device
        B = c.batch_size
        gen = generator(c.seed, epoch)  # the user order, then negatives and dropout masks
        sch = self.schedule(gen)
        X = torch.from_numpy(sch.inputs.clip(min=0)).to(dev)
        Y = torch.from_numpy(sch.targets).to(dev)
        store = SampleStore(self.ctx.support, c.n_sample, c.sample_alpha,
                            min(c.sample_store_size, max(1, sch.n_steps) * c.n_sample), gen, dev) \
            if c.n_sample > 0 else None
        hier = m.variant != "concat"

        def mask(p, width):
            if p <= 0 or width == 0:
                return None
            return (torch.rand(B, width, generator=gen) >= p).float().mul_(1 / (1 - p)).to(dev)

        self._s, self._c = m.init_state(B, dev)
        for t in range(sch.n_steps):
            yield Step(X[t], Y[t], sch.targets[t] >= 0, sch.session_start[t], sch.user_start[t],
                       store.take(1)[0] if store is not None else None,
                       mask(c.dropout_session, m.hidden),
                       mask(c.dropout_user, m.user_hidden) if hier else None,
                       mask(c.dropout_init, m.hidden) if hier else None)

    def loss(self, b: Step):
        m, dev, B = self.model, self.ctx.device, self.cfg.batch_size
        s, c = self._s, self._c
        starts = np.flatnonzero(b.session_start)
        if len(starts):
            new = b.user_start[starts]
            rows = torch.from_numpy(starts).to(dev)
            sel = (lambda t: t.index_select(0, rows) if t is not None else None)
            s, c = m.hand_over(s, c, rows, torch.from_numpy(new).to(dev),
                               torch.from_numpy(np.flatnonzero(~new)).to(dev), sel(b.u_mask), sel(b.i_mask))
        x, y, s_mask = b.x, b.y, b.s_mask
        act = None
        if not b.active.all():  # tail: users ran out, the batch shrinks to the active slots
            act = torch.from_numpy(np.flatnonzero(b.active)).to(dev)
            s_a, c_a = s.index_select(0, act), c.index_select(0, act)
            x, y = x.index_select(0, act), y.index_select(0, act)
            s_mask = s_mask.index_select(0, act) if s_mask is not None else None
        else:
            s_a, c_a = s, c
        out = m.session_step(x, s_a, c_a, sparse=True)
        if s_mask is not None:
            out = out * s_mask
        new_s, new_c = out.detach(), c_a.detach()
        if act is None:
            self._s, self._c = new_s, new_c
        else:
            self._s = self._s.index_copy(0, act, new_s)
            self._c = self._c.index_copy(0, act, new_c)
        cols = torch.cat([y, b.samples]) if b.samples is not None else y
        if cols.shape[0] < 2:  # a single row with no negatives cannot be ranked
            return None
        R = m.sampled_scores(out, cols, sparse=True)
        w = logq_weights(self.cfg, x.shape[0])
        lq = self.logp[cols] * w.to(R.device) if w is not None else None
        return sampled_loss(R, self.cfg.loss, self.cfg.final_act, self.cfg.bpreg, lq) / B, x.shape[0]

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        cfg = config_from_dict(ckpt["config"])
        model = HRNNModel(int(ckpt["item_index"]["item_id"].shape[0]), cfg)
        sd = ckpt["state_dict"]
        model.load_state_dict({k: v for k, v in sd.items() if k not in SERVED_KEYS})
        return HRNNScorer(model, device, sd.get(SERVED_KEYS[0]), sd.get(SERVED_KEYS[1]))


class HRNNAllFamily(HRNNFamily):
    name = "hrnn_all"
    Config = HRNNAllConfig


class RNNConcatFamily(HRNNFamily):
    name = "rnn_concat"
    Config = RNNConcatConfig
