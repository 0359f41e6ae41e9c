"""Item-KNN (Hidasi et al. 2016's strongest baseline) and its time-decayed variant
(Donkers et al. 2017's "exponentially decaying item-based k-NN", after Ding & Li 2005).

**Item-KNN.** Items are compared by the sessions they occur in; the next-item scores are the
similarities to the CURRENT item only (the paper: "items similar to the actual item are
recommended"). With ``c(s, x)`` the number of times item x occurs in training session s::

    C(a, b)   = sum_s c(s, a) * [b in s]                 (co-occurrence, a != b)
    supp(x)   = sum_s c(s, x)                            (events of x)
    sim(a, b) = C(a, b) / ((supp(a) + lmbd)^alpha * (supp(b) + lmbd)^(1 - alpha))

This is session-rec's ``algorithms/knn/iknn.py`` (rn5l/session-rec @ 5dcd583, itself the
official GRU4Rec baseline), the behaviour reference, read for what it computes: for every
EVENT of item a it adds 1 to every DISTINCT item of that event's session (numpy's buffered
``iarray[items] += 1`` counts a repeated index once), so the count is by events on the
current item's side and by sessions on the candidate's side (not symmetric); supports are
event counts; ``lmbd`` sits inside both powers; self-similarity is 0; every item keeps its
``n_sims`` most similar items and every other item scores 0 (no popularity padding: items
outside the neighbourhood tie at 0 and the loop counts ties against the target).
``alpha = 0.5`` is the paper's cosine of session vectors, ``alpha = 1`` association-rule
confidence. ``counting = "sessionrec"`` (default) is that rule; ``"sessions"`` is the paper's
literal wording, binary session-occurrence vectors (``c(s, x)`` in {0, 1}, ``supp(x) =
|S_x|``, symmetric); ``"events"`` counts occurrences on both sides (``X^T X`` of counts).
``regularisation = "product"`` puts lambda outside: ``C / (supp(a)^alpha supp(b)^(1-alpha) +
lmbd)``. Ties at the ``n_sims`` cut (equal similarity) keep the smaller item_idx (session-rec
leaves them to its sort's internal order). On rsc15-100k (train_full -> test, conservative
ties) the default reproduces session-rec's 0.3982 / 0.1798 (Recall@20 / MRR@20) exactly;
``counting=sessions`` gives 0.4075 / 0.1862, ``events`` 0.3900 / 0.1669.

Defaults (session-rec's ``ItemKNN`` and the README's reference run): ``n_sims = 100``,
``lmbd = 20``, ``alpha = 0.5``; Quadrana et al. 2017 found a neighbourhood of 300 best
(``--set n_sims=300``).

Fit (scipy.sparse, no loop per item): the session x item count matrix ``X`` (CSR, float32:
counts are exact below 2^24), then ``C = X_left^T X_right`` (``X_right`` binary for
"sessionrec") one block of item rows at a time (blocks sized by an upper bound of their
non-zeros, ``block_nnz``, 5M by default: about 300 MB of temporaries whatever the catalogue
and the table; measured 1.6 s for 0.83M events / 5,000 items), each block's rows cut to their top
``n_sims`` by one lexsort over the block's non-zeros. The result is a pair of
``[n_items, n_sims]`` tensors (neighbour item_idx, similarity; rows with fewer neighbours
are padded with the item itself and 0). Scoring scatters the current item's row into a
dense ``[rows, n_items]`` zero matrix.

**Time-decayed Item-KNN** (``itemknn_td``). Donkers et al. (sec. 4) use "its time-dependent
exponentially decaying counterpart [7]", [7] being Ding & Li (CIKM 2005, "Time weight
collaborative filtering"), described in their sec. 2.1 as "a fully personalized
time-discounted version ... extending k-NN with an exponential decaying component that
penalizes items consumed a long time ago". In Ding & Li the similarity is unchanged and the
decay weights the user's consumed items at prediction time by their age, ``f(t) = e^(-t/tau)``.
With implicit feedback (all ratings 1; Ding & Li's normalisation by ``sum sim * f`` would
make every candidate's score 1) the score of item i after the events ``j`` seen so far is::

    score(i) = sum_j sim(j, i) * exp(-(t_now - t_j) / tau)

with ``t_now`` the current event's time: the current item weighs 1 (Item-KNN's scores), the
earlier ones less the older they are. It is computed incrementally (``acc <- acc *
exp(-dt/tau) + sim(current)``, one dense step, no per-event history), with the same
similarities and the same ``n_sims`` cut as Item-KNN. What the papers leave open: Donkers'
Table 1 gives the "decaying constant" as 1 without a unit, and their data are per-user
sequences, not sessions; this project measures age in seconds and chose ``tau_s = 300``
(5 minutes) on rsc15-100k ``train`` -> ``valid`` (Recall@20 / MRR@20: tau 30 s 0.3933 /
0.1712, 60 s 0.4083 / 0.1726, 300 s 0.4224 / 0.1702, 1 h 0.4167 / 0.1614, no decay
0.4141 / 0.1597; plain Item-KNN is the tau -> 0 limit). ``scope = "session"`` (default) starts
every session from nothing (session mode); ``scope = "user"`` keeps the decayed history over
the consecutive sessions of one user in a slot (``--mode user``: Donkers' users' whole
histories, including the unscored bootstrap sessions). A history whose last event is LATER
than the next event (never in user mode, which walks a user in time order) is dropped, so
nothing leaks from the future. NOT implemented: decaying the co-occurrence counts themselves
by the time between two events of a session, which is not what the paper describes.

Train (nothing is learned by gradient descent: the trainer writes one checkpoint, epoch 0)::

    python -m training.train --model itemknn --data SPLIT_DIR --out RUN_DIR [--set n_sims=300]
    python -m training.train --model itemknn_td --data SPLIT_DIR --out RUN_DIR [--set tau_s=600]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from training.config import CommonConfig, ConfigError
from training.family import Family, TrainContext
from training.scoring import SessionScorerBase

COUNTINGS = ("sessionrec", "events", "sessions")
REGULARISATIONS = ("supports", "product")
SCOPES = ("session", "user")


@dataclass
class ItemKNNConfig(CommonConfig):
    """Item-KNN: similarities to the current item (session-rec's ItemKNN defaults)."""

    model: str = "itemknn"
    n_epochs: int = 0
    #: neighbours kept per item (session-rec 100; Quadrana et al. 2017 best: 300)
    n_sims: int = 100
    #: regularisation lambda (session-rec / official GRU4Rec baseline: 20)
    lmbd: float = 20.0
    #: normalisation balance: 0.5 = cosine, 1.0 = confidence (session-rec: 0.5)
    alpha: float = 0.5
    #: "sessionrec": events of the current item x distinct sessions of the candidate
    #: (session-rec); "sessions": binary session vectors; "events": counts on both sides
    counting: str = "sessionrec"
    #: "supports": (supp_a+lmbd)^alpha (supp_b+lmbd)^(1-alpha) (session-rec);
    #: "product": supp_a^alpha supp_b^(1-alpha) + lmbd
    regularisation: str = "supports"
    #: fit: non-zeros of X^T X computed per block of item rows (memory bound of the fit)
    block_nnz: int = 5_000_000

    def __post_init__(self):
        if self.n_sims < 1:
            raise ConfigError(f"n_sims must be >= 1, got {self.n_sims}")
        if not self.lmbd >= 0:
            raise ConfigError(f"lmbd must be >= 0, got {self.lmbd}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.counting not in COUNTINGS:
            raise ConfigError(f"counting {self.counting!r}: one of {', '.join(COUNTINGS)}")
        if self.regularisation not in REGULARISATIONS:
            raise ConfigError(f"regularisation {self.regularisation!r}: one of {', '.join(REGULARISATIONS)}")
        if self.block_nnz < 1:
            raise ConfigError(f"block_nnz must be >= 1, got {self.block_nnz}")


@dataclass
class TimeDecayItemKNNConfig(ItemKNNConfig):
    """Item-KNN scores of every event seen so far, decayed by age (Donkers et al. 2017)."""

    model: str = "itemknn_td"
    #: decay time constant in seconds: weight exp(-age / tau_s) (module docstring)
    tau_s: float = 300.0
    #: "session": history = the current session; "user": a user's consecutive sessions
    scope: str = "session"

    def __post_init__(self):
        super().__post_init__()
        if not self.tau_s > 0:
            raise ConfigError(f"tau_s must be > 0 (seconds), got {self.tau_s}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope {self.scope!r}: one of {', '.join(SCOPES)}")


def session_item_matrix(items: np.ndarray, offsets: np.ndarray, n_items: int,
                        binary: bool = False) -> sp.csr_matrix:
    """[n_sessions, n_items] CSR of occurrence counts (or 1s when ``binary``)."""
    n_s = len(offsets) - 1
    rows = np.repeat(np.arange(n_s, dtype=np.int64), np.diff(offsets))
    X = sp.csr_matrix((np.ones(len(items), np.float32), (rows, np.asarray(items, np.int64))),
                      shape=(n_s, n_items))
    X.sum_duplicates()
    if binary:
        X.data[:] = 1.0
    return X


def item_similarities(items: np.ndarray, offsets: np.ndarray, n_items: int, n_sims: int,
                      lmbd: float = 20.0, alpha: float = 0.5, counting: str = "sessionrec",
                      regularisation: str = "supports", block_nnz: int = 5_000_000):
    """Top-``n_sims`` similar items of every item (module docstring):
    ``(idx int32 [n_items, k], val float32 [n_items, k])``, ``k = min(n_sims, max(n_items - 1, 1))``,
    rows sorted by similarity (ties: smaller item_idx first), padded with (self, 0)."""
    k = int(min(n_sims, max(n_items - 1, 1)))
    X = session_item_matrix(items, offsets, n_items, binary=(counting == "sessions"))
    supp = np.asarray(X.sum(axis=0), np.float64).ravel()
    XT = X.T.tocsr()  # [n_items, n_sessions]
    if counting == "sessionrec":  # left side counts events, right side distinct sessions
        X = X.copy()
        X.data[:] = 1.0
    if regularisation == "supports":
        left = np.power(supp + lmbd, alpha)
        right = np.power(supp + lmbd, 1.0 - alpha)
    else:
        left = np.power(supp, alpha)
        right = np.power(supp, 1.0 - alpha)
    # non-zeros a row of C = X^T X can have at most: sum of the lengths of its sessions
    row_len = np.diff(X.indptr).astype(np.float64)
    XTb = XT.copy()
    XTb.data[:] = 1.0
    work = XTb @ row_len
    cum = np.cumsum(work)
    idx_out = np.tile(np.arange(n_items, dtype=np.int32)[:, None], (1, k))  # pad: self
    val_out = np.zeros((n_items, k), np.float32)
    a = 0
    while a < n_items:
        base = cum[a - 1] if a else 0.0
        b = int(np.searchsorted(cum, base + block_nnz, side="right"))
        b = min(max(b, a + 1), n_items)
        B = (XT[a:b] @ X).tocsr()
        r = np.repeat(np.arange(b - a, dtype=np.int64), np.diff(B.indptr))
        c = B.indices.astype(np.int64)
        v = B.data.astype(np.float64)
        keep = (c != r + a) & (v > 0)
        r, c, v = r[keep], c[keep], v[keep]
        norm = left[r + a] * right[c]
        if regularisation == "product":
            norm = norm + lmbd
        norm[norm == 0] = 1.0
        s = v / norm
        order = np.lexsort((c, -s, r))  # by row, similarity descending, item_idx ascending
        r, c, s = r[order], c[order], s[order]
        starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]]) if len(r) else np.zeros(0, np.int64)
        first = np.repeat(starts, np.diff(np.r_[starts, len(r)]))
        rank = np.arange(len(r)) - first
        top = rank < k
        idx_out[r[top] + a, rank[top]] = c[top]
        val_out[r[top] + a, rank[top]] = s[top]
        a = b
    return idx_out, val_out


class ItemKNNScorer(SessionScorerBase):
    """Scores = the current item's similarity row (no state)."""

    def __init__(self, nb_idx: torch.Tensor, nb_val: torch.Tensor, device: torch.device):
        self.device = device
        self.nb_idx = nb_idx.to(device=device, dtype=torch.int64)
        self.nb_val = nb_val.to(device=device, dtype=torch.float32)
        self.n_items = int(self.nb_idx.shape[0])

    def begin(self, n_slots: int):
        return None

    def start_session(self, state, slots, users):
        return state

    def select(self, state, rows):
        return state

    def similarity_rows(self, items: torch.Tensor) -> torch.Tensor:
        """Dense [rows, n_items] similarity rows of ``items``."""
        out = torch.zeros(items.shape[0], self.n_items, dtype=torch.float32, device=self.device)
        return out.scatter_(1, self.nb_idx[items], self.nb_val[items])

    @torch.no_grad()
    def step(self, state, items):
        return self.similarity_rows(items), state


class TimeDecayItemKNNScorer(ItemKNNScorer):
    """Decayed sum of the similarity rows of the events seen so far (module docstring).

    State: ``(acc [rows, n_items] float32, last_ts [rows] int64, user [rows] int64,
    fresh [rows] bool)``; ``fresh`` rows have no history yet."""

    uses_time = True

    def __init__(self, nb_idx, nb_val, device, tau_s: float, scope: str = "session"):
        super().__init__(nb_idx, nb_val, device)
        self.tau_us = float(tau_s) * 1e6
        self.scope = scope

    def begin(self, n_slots: int):
        d = self.device
        return (torch.zeros(n_slots, self.n_items, dtype=torch.float32, device=d),
                torch.zeros(n_slots, dtype=torch.int64, device=d),
                torch.full((n_slots,), -1, dtype=torch.int64, device=d),
                torch.ones(n_slots, dtype=torch.bool, device=d))

    def select(self, state, rows):
        return tuple(x.index_select(0, rows) for x in state)

    def start_session(self, state, slots, users):
        acc, last, user, fresh = state
        slots = slots.to(self.device)
        new_user = torch.full_like(user, -1) if users is None else users.to(self.device, torch.int64)
        if self.scope == "user":
            cont = slots & (new_user >= 0) & (new_user == user)
            reset = slots & ~cont
        else:
            reset = slots
        fresh = fresh | reset
        user = torch.where(slots, new_user, user)
        return acc, last, user, fresh

    @torch.no_grad()
    def step(self, state, items, ts=None):
        acc, last, user, fresh = state
        if ts is None:  # no event times (e.g. a caller without uses_time): no decay
            ts = last
        ts = ts.to(self.device, torch.int64)
        dt = (ts - last).to(torch.float64)
        # a history later than this event (not time-ordered) is dropped, never used
        w = torch.where(fresh | (dt < 0), torch.zeros_like(dt), torch.exp(-dt.clamp(min=0) / self.tau_us))
        acc = acc * w.to(torch.float32).unsqueeze(1)
        acc.scatter_add_(1, self.nb_idx[items], self.nb_val[items])
        return acc, (acc, ts, user, torch.zeros_like(fresh))


class ItemKNNFamily(Family):
    name = "itemknn"
    Config = ItemKNNConfig
    trainable = False

    def __init__(self, cfg: ItemKNNConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        d = ctx.data
        idx, val = item_similarities(d.items, d.offsets, ctx.index.n_items, cfg.n_sims, cfg.lmbd, cfg.alpha,
                                     cfg.counting, cfg.regularisation, cfg.block_nnz)
        self.nb_idx = torch.from_numpy(idx)
        self.nb_val = torch.from_numpy(val)

    def state_dict(self) -> dict:
        return {"nb_idx": self.nb_idx.clone(), "nb_val": self.nb_val.clone()}

    def load_weights(self, state_dict: dict) -> None:
        pass  # recounted from the (new) training table: "fine-tuning" = refitting on it

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        sd = ckpt["state_dict"]
        return ItemKNNScorer(sd["nb_idx"], sd["nb_val"], device)


class TimeDecayItemKNNFamily(ItemKNNFamily):
    name = "itemknn_td"
    Config = TimeDecayItemKNNConfig

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        sd, cfg = ckpt["state_dict"], ckpt["config"]
        return TimeDecayItemKNNScorer(sd["nb_idx"], sd["nb_val"], device,
                                      tau_s=float(cfg.get("tau_s", TimeDecayItemKNNConfig.tau_s)),
                                      scope=cfg.get("scope", "session"))
