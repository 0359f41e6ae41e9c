"""Session-kNN baselines: SKNN, V-SKNN, STAN and VSTAN (one implementation, four defaults).

All four score the next item of the current session ``s`` from the ``k`` training sessions
most similar to it (Ludewig & Jannach 2018, "Evaluation of session-based recommendation
algorithms"; Garg et al., SIGIR 2019, STAN; Ludewig et al. 2021, VSTAN)::

    score(i) = sum over n in N_k(s) of  sim(s, n) * 1[i in n] * inh(n, i) * idf(i) * dec(s, n)

**Candidates.** ``R(s)`` = the training sessions that contain any item of ``s`` so far (the
union grows with every event of the session). The candidates are the ``sample_size`` most
RECENT of them, recency = the time of a session's LAST event (ties: larger session id first);
``sample_size = 0`` keeps all of ``R(s)`` (memory then grows with the popularity of the
items). ``N_k(s)`` = the ``k`` candidates with the largest similarity > 0 (ties: the more
recent session first; similarities are compared at float32 precision, so that two
mathematically equal values computed in different orders tie).

**Similarity.** With ``w_j`` the weight of item ``j`` of ``s`` (from the position ``p_j`` of
its LAST occurrence in ``s``, 1-based over all ``L`` events of ``s`` repeats included) and
``|n|`` the number of distinct items of ``n``:

* ``cosine``: ``sum_{j in s & n} w_j / (sqrt(sum_{j in s} w_j^2) * sqrt(|n|))`` -- with
  ``w = 1`` the cosine of the binary item vectors (SKNN);
* ``vec``: ``sum_{j in s & n} w_j / |s|`` (V-SKNN, session-rec's default for it);
* ``jaccard``: ``|s & n| / |s | n|`` (binary; session-rec's ContextKNN default).

``w_j`` = ``weighting(p_j, L)``: ``same`` 1, ``div`` p/L, ``linear`` 1 - 0.1 (L - p) for
p <= 10 else 0 (session-rec's formula, literally), ``log`` 1 / log10(L - p + 1.7),
``quadratic`` (p/L)^2; or STAN's ``exp((p - L) / lambda_spw)`` when ``lambda_spw > 0``.
STAN's neighbour-recency decay (``lambda_snh`` > 0, in DAYS as in session-rec, which
multiplies by 24*3600 and works in seconds) multiplies the similarity by
``exp(-(t - t_n) / (lambda_snh * 86400 s))``, ``t`` the current event's time and ``t_n``
the neighbour's last event time (the scorer gets the event times in microseconds and
converts them to seconds).

**Score factors** (1 when off):

* ``inh(n, i) = exp(-|q_n(i) - q_n*| / lambda_inh)`` (STAN): ``q_n(i)`` the position of the
  last occurrence of ``i`` in ``n``, ``q_n*`` the largest such position over the items ``n``
  shares with ``s``;
* ``idf(i) = 1 + lambda_idf * log(N / c_i)`` (V-SKNN's ``idf_weighting``, VSTAN's
  ``lambda_idf``): ``N`` training sessions, ``c_i`` training EVENTS of ``i``;
* ``dec(s, n) = weighting_score(d) * exp(-(d - 1) / lambda_ipw)`` with ``d = L - p* + 1``
  and ``p*`` the largest ``p_j`` over the items ``s`` shares with ``n`` (d = 1: ``n``
  contains the current item): V-SKNN's ``weighting_score`` (``same`` 1, ``div`` 1/d,
  ``linear`` 1 - 0.1 d for d <= 100 else 0, ``log`` 1 / log10(d + 1.7), ``quadratic`` 1/d^2)
  and VSTAN's ``lambda_ipw``.

This is session-rec's behaviour (rn5l/session-rec @ 5dcd583, ``algorithms/knn/sknn.py``,
``vsknn.py``, ``stan.py``, ``vstan.py``; read for behaviour, not copied), with these
differences. None of the first three changes a ranking: session-rec's SKNN "cosine" computes
``|s&n| / sqrt(|n|) * sqrt(|s|)`` (a factor ``|s|`` away from the cosine, the same for every
neighbour of a step); SKNN / V-SKNN there divide the scores by their maximum; session-rec's
evaluation passes STAN the time of the TARGET event, this project's loop the time of the
input event (``t`` only scales a row's similarities by one common factor). Ties at the
sample and top-k cuts follow Python's set order there, the recency rule above here: on
rsc15-100k this is worth up to 0.004 Recall@20 for SKNN / V-SKNN (whose binary similarities
tie often; ties broken towards the older session give 0.6358 / 0.6661 instead of 0.6386 /
0.6702), nothing for STAN / VSTAN. Not implemented: ``sampling = "random"``, and the
``extend``, ``remind``/``push_reminders``/``add_reminders``, ``dwelling_time``,
``last_n_days`` and ``weighting_time`` options.

Measured on rsc15-100k (``train_full`` -> ``test``, 10,152 predictions; session-rec's figures
of the README in brackets), Recall@20 / MRR@20: SKNN 0.6386 / 0.3190 (0.6355 / 0.3184),
V-SKNN 0.6702 / 0.3560 (0.6666 / 0.3557), STAN 0.6821 / 0.3686 (0.6821 / 0.3686), VSTAN
0.6736 / 0.3747 (0.6736 / 0.3747).

Defaults (the parameters of the reference run in ``../shared/data/README.md``):

=======  ====  ======  ==========  ==========  =====================================
family   k     sample  similarity  weighting   other
=======  ====  ======  ==========  ==========  =====================================
sknn     100   500     cosine      same
vsknn    100   500     vec         div         weighting_score div
stan     100   5000    cosine      lambda_spw  lambda_spw 1.02, snh 5, inh 2.05
vstan    1000  5000    cosine      lambda_spw  spw 4, snh 5, inh 4, ipw 1e-5, idf 1
=======  ====  ======  ==========  ==========  =====================================

**Fit** (numpy, no loop per session or item): the distinct items of every training session
with the position of their last occurrence (CSR, sessions ordered by recency rank), the
item -> sessions lists sorted by recency with the same positions (CSC), the sessions' last
event times and the item IDF, all as tensors in ``state_dict``.

**Scoring**, for all rows of a step at once (no loop per row, neighbour or item; a loop
over row blocks bounds the memory). The state keeps each row's session items (padded
``[rows, max_len]``) and its candidate sample (``[rows, <= sample_size]`` recency ranks,
sorted). A new event merges the item's first ``sample_size`` sessions into the sample (the
most recent of a union are among the most recent of its parts, so the sample is exact
without keeping ``R(s)``). As the sample holds every candidate up to its last rank ``thr``,
the candidates sharing item ``j`` with the row are the prefix ``<= thr`` of ``j``'s session
list (one vectorised binary search per distinct item of the row): these (row, candidate,
shared item) entries are mapped to their sample cell with one ``searchsorted`` and reduced
per cell (weight sums, largest positions), giving the similarities of all (row, candidate)
cells; one ``topk`` per row picks the neighbours, whose items alone are then expanded and
summed per (row, item) in float64 (a zeroed scratch table reset after use), written into the
dense float32 ``[rows, n_items]`` scores. Row blocks hold at most ``block_entries``
candidate cells + shared-item entries, neighbour items are expanded in chunks of
``block_entries``; the step's peak memory is a few of those plus the scores and the scratch
(12 bytes x rows x n_items).

Train (nothing is learned by gradient descent: the trainer writes one checkpoint, epoch 0)::

    python -m training.train --model sknn --data SPLIT_DIR --out RUN_DIR [--set k=50]
    python -m training.train --model vsknn --data SPLIT_DIR --out RUN_DIR [--set lambda_idf=5]
    python -m training.train --model stan --data SPLIT_DIR --out RUN_DIR
    python -m training.train --model vstan --data SPLIT_DIR --out RUN_DIR
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from training.config import CommonConfig, ConfigError, config_from_dict
from training.data import SessionData
from training.family import Family, TrainContext
from training.scoring import SessionScorerBase

SIMILARITIES = ("cosine", "vec", "jaccard")
WEIGHTINGS = ("same", "div", "linear", "log", "quadratic")
SCORE_WEIGHTINGS = ("same", "div", "linear", "log", "quadratic")
DAY_S = 24 * 3600


@dataclass
class SKNNConfig(CommonConfig):
    """SKNN: cosine of binary session vectors over a recency sample (session-rec ContextKNN)."""

    model: str = "sknn"
    n_epochs: int = 0
    #: neighbours per prediction
    k: int = 100
    #: the most recent sessions sharing an item with the current one (0 = all of them)
    sample_size: int = 500
    #: cosine | vec | jaccard (module docstring)
    similarity: str = "cosine"
    #: position weight of the current session's items: same | div | linear | log | quadratic
    weighting: str = "same"
    #: V-SKNN's neighbour decay by the recency of the shared item: same | div | linear | log | quadratic
    weighting_score: str = "same"
    #: STAN lambda_1: position weight exp((p - L) / lambda_spw) (0 = off, use ``weighting``)
    lambda_spw: float = 0.0
    #: STAN lambda_2, in days: neighbour weight exp(-(t - t_n) / lambda_snh) (0 = off)
    lambda_snh: float = 0.0
    #: STAN lambda_3: item weight exp(-|q(i) - q*| / lambda_inh) inside a neighbour (0 = off)
    lambda_inh: float = 0.0
    #: VSTAN: neighbour weight exp((p* - L) / lambda_ipw) (0 = off)
    lambda_ipw: float = 0.0
    #: IDF boost 1 + lambda_idf * log(N / c_i) (V-SKNN idf_weighting, VSTAN lambda_idf; 0 = off)
    lambda_idf: float = 0.0
    #: scoring memory bound: candidate cells / shared-item entries / neighbour items per block
    block_entries: int = 2_000_000

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.sample_size < 0:
            raise ConfigError(f"sample_size must be >= 0 (0 = all candidate sessions), got {self.sample_size}")
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"similarity {self.similarity!r}: one of {', '.join(SIMILARITIES)}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting {self.weighting!r}: one of {', '.join(WEIGHTINGS)}")
        if self.weighting_score not in SCORE_WEIGHTINGS:
            raise ConfigError(f"weighting_score {self.weighting_score!r}: one of {', '.join(SCORE_WEIGHTINGS)}")
        for name in ("lambda_spw", "lambda_snh", "lambda_inh", "lambda_ipw", "lambda_idf"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0 (0 = off), got {v}")
        if self.lambda_spw > 0 and self.weighting != "same":
            raise ConfigError(f"lambda_spw={self.lambda_spw} (STAN's position weight) and weighting="
                              f"{self.weighting!r} both weight positions: set one of them")
        if self.similarity == "jaccard" and (self.weighting != "same" or self.lambda_spw > 0):
            raise ConfigError("similarity=jaccard compares binary sets: it takes no position weighting "
                              "(weighting=same, lambda_spw=0)")
        if self.block_entries < 1:
            raise ConfigError(f"block_entries must be >= 1, got {self.block_entries}")


@dataclass
class VSKNNConfig(SKNNConfig):
    """V-SKNN: position-weighted similarity and neighbour decay (session-rec VMContextKNN)."""

    model: str = "vsknn"
    similarity: str = "vec"
    weighting: str = "div"
    weighting_score: str = "div"


@dataclass
class STANConfig(SKNNConfig):
    """STAN (Garg et al. 2019): SKNN with position, session-recency and item-distance decays."""

    model: str = "stan"
    sample_size: int = 5000
    lambda_spw: float = 1.02
    lambda_snh: float = 5.0
    lambda_inh: float = 2.05


@dataclass
class VSTANConfig(SKNNConfig):
    """VSTAN (Ludewig et al. 2021): STAN plus V-SKNN's neighbour decay and IDF weighting."""

    model: str = "vstan"
    k: int = 1000
    sample_size: int = 5000
    lambda_spw: float = 4.0
    lambda_snh: float = 5.0
    lambda_inh: float = 4.0
    lambda_ipw: float = 1e-5
    lambda_idf: float = 1.0


# --------------------------------------------------------------------------------- fit
def fit_index(data: SessionData, n_items: int) -> dict:
    """The training table as tensors (module docstring, "Fit"); sessions by recency rank
    (0 = the most recent last event; ties: larger session id first)."""
    S = data.n_sessions
    items = np.asarray(data.items, np.int64)
    lengths = np.diff(data.offsets).astype(np.int64)
    if data.end_ts_per_session is not None:
        end = np.asarray(data.end_ts_per_session, np.int64)
    elif data.ts is not None and S:
        end = np.asarray(data.ts, np.int64)[data.offsets[1:] - 1]
    else:
        end = np.asarray(data.start_ts, np.int64)
    order = np.lexsort((-np.asarray(data.session_ids, np.int64), -end))  # rank -> session
    rank = np.empty(S, np.int64)
    rank[order] = np.arange(S)
    sess_ev = np.repeat(np.arange(S, dtype=np.int64), lengths)
    pos = np.arange(len(items), dtype=np.int64) - np.repeat(data.offsets[:-1].astype(np.int64), lengths) + 1
    key = rank[sess_ev] * n_items + items
    del sess_ev
    o = np.argsort(key, kind="stable")  # by (rank, item), events in time order within
    ks = key[o]
    del key
    last = np.ones(len(ks), bool)
    last[:-1] = ks[1:] != ks[:-1]
    sel = o[last]  # the LAST occurrence of every (session, item)
    r_d = ks[last] // n_items
    del o, ks, last
    item_d = items[sel]
    lp_d = pos[sel]
    del sel, pos
    sess_indptr = np.zeros(S + 1, np.int64)
    np.cumsum(np.bincount(r_d, minlength=S), out=sess_indptr[1:])
    o2 = np.argsort(item_d * max(S, 1) + r_d)  # by (item, rank)
    item_sessions = r_d[o2].astype(np.int32)
    item_lastpos = lp_d[o2].astype(np.int32)
    del o2
    item_indptr = np.zeros(n_items + 1, np.int64)
    np.cumsum(np.bincount(item_d, minlength=n_items), out=item_indptr[1:])
    count = np.bincount(items, minlength=n_items).astype(np.float64)
    idf = np.where(count > 0, np.log(np.maximum(S, 1) / np.maximum(count, 1)), 0.0)
    return {
        "sess_indptr": torch.from_numpy(sess_indptr),
        "sess_items": torch.from_numpy(item_d.astype(np.int32)),
        "sess_lastpos": torch.from_numpy(lp_d.astype(np.int32)),
        "sess_end": torch.from_numpy(end[order].copy()),
        "item_indptr": torch.from_numpy(item_indptr),
        "item_sessions": torch.from_numpy(item_sessions),
        "item_lastpos": torch.from_numpy(item_lastpos),
        "idf": torch.from_numpy(idf),
        "n_items": int(n_items),
        "n_sessions": int(S),
    }


# ----------------------------------------------------------------------------- scoring
def position_weight(p: torch.Tensor, L: torch.Tensor, weighting: str, lambda_spw: float) -> torch.Tensor:
    """w_j from the 1-based last position ``p`` and the session length ``L`` (float64)."""
    if lambda_spw > 0:
        return torch.exp((p - L) / lambda_spw)
    if weighting == "same":
        return torch.ones_like(p)
    if weighting == "div":
        return p / L
    if weighting == "linear":
        return torch.where(p <= 10, 1 - 0.1 * (L - p), torch.zeros_like(p))
    if weighting == "log":
        return 1 / torch.log10((L - p) + 1.7)
    if weighting == "quadratic":
        return (p / L) ** 2
    raise ValueError(weighting)


def score_decay(d: torch.Tensor, weighting_score: str) -> torch.Tensor:
    """V-SKNN's neighbour factor from the distance ``d`` >= 1 of the shared item (float64)."""
    if weighting_score == "same":
        return torch.ones_like(d)
    if weighting_score == "div":
        return 1 / d
    if weighting_score == "linear":
        return torch.where(d <= 100, 1 - 0.1 * d, torch.zeros_like(d))
    if weighting_score == "log":
        return 1 / torch.log10(d + 1.7)
    if weighting_score == "quadratic":
        return 1 / (d * d)
    raise ValueError(weighting_score)


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending. On the CPU numpy's sort (2.5-4x faster than torch's here,
    measured on [512, 10000] int64 rows, 2 cores)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


@dataclass
class KNNState:
    """Per-row session: items so far (``seq[r, :lens[r]]``) and the candidate sample (recency
    ranks, ascending, padded with ``n_sessions``)."""

    seq: torch.Tensor  # int64 [rows, cap]
    lens: torch.Tensor  # int64 [rows]
    sample: torch.Tensor  # int64 [rows, width <= sample_size]


class SessionKNNScorer(SessionScorerBase):
    """All four families' scorer (module docstring, "Scoring")."""

    uses_time = False

    def __init__(self, sd: dict, cfg: SKNNConfig, device: torch.device):
        self.device = device
        self.cfg = cfg
        self.n_items = int(sd["n_items"])
        self.S = S = int(sd["n_sessions"])
        dev = device
        i64 = torch.int64
        self.sess_indptr = sd["sess_indptr"].to(dev, i64)
        self.sess_items = sd["sess_items"].to(dev, i64)  # int64 here: gathers without casts
        self.sess_lastpos = sd["sess_lastpos"].to(dev)
        self.item_indptr = sd["item_indptr"].to(dev, i64)
        self.item_sessions = sd["item_sessions"].to(dev, i64)
        self.item_lastpos = sd["item_lastpos"].to(dev)
        # per recency rank, with one more entry for the padding rank S (no items, time 0)
        self.la = torch.cat([self.sess_indptr[1:] - self.sess_indptr[:-1], torch.zeros(1, dtype=i64, device=dev)])
        end = sd["sess_end"].to(dev, i64)
        self.end_us = torch.cat([end, torch.zeros(1, dtype=i64, device=dev)])
        self.t_ref = int(end.max()) if S else 0  # stands in for a missing event time
        self.idf_factor = (1.0 + cfg.lambda_idf * sd["idf"].to(dev, torch.float64)) if cfg.lambda_idf > 0 else None
        self.m = int(cfg.sample_size)
        self.k = int(cfg.k)
        self._scratch = torch.zeros(0, dtype=torch.float64, device=dev)

    def _scratch_for(self, size: int) -> torch.Tensor:
        """A float64 table of >= ``size`` zeros (kept zero between uses: whoever writes into it
        resets the entries it wrote), for per-(row, item) reductions without sorting."""
        if self._scratch.numel() < size:
            self._scratch = torch.zeros(size, dtype=torch.float64, device=self.device)
        return self._scratch

    # ---- state ------------------------------------------------------------------------
    def begin(self, n_slots: int) -> KNNState:
        d = self.device
        return KNNState(seq=torch.zeros(n_slots, 8, dtype=torch.int64, device=d),
                        lens=torch.zeros(n_slots, dtype=torch.int64, device=d),
                        sample=torch.full((n_slots, 0), self.S, dtype=torch.int64, device=d))

    def start_session(self, state: KNNState, slots, users) -> KNNState:
        slots = slots.to(self.device)
        return KNNState(seq=state.seq, lens=state.lens.masked_fill(slots, 0),
                        sample=state.sample.masked_fill(slots.unsqueeze(1), self.S))

    def select(self, state: KNNState, rows) -> KNNState:
        rows = rows.to(self.device)
        return KNNState(seq=state.seq.index_select(0, rows), lens=state.lens.index_select(0, rows),
                        sample=state.sample.index_select(0, rows))

    def _merge_sample(self, sample: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """sample <- the ``m`` most recent of (sample | sessions of ``items``)."""
        S = self.S
        st = self.item_indptr[items]
        cnt = self.item_indptr[items + 1] - st
        if self.m:
            cnt = cnt.clamp(max=self.m)
        wn = int(cnt.max()) if cnt.numel() else 0
        if wn == 0:
            return sample
        ar = torch.arange(wn, device=self.device)
        idx = (st.unsqueeze(1) + ar).clamp(max=self.item_sessions.shape[0] - 1)
        new = self.item_sessions[idx].masked_fill(ar.unsqueeze(0) >= cnt.unsqueeze(1), S)
        if sample.shape[1] == 0:
            return new  # the item lists are sorted by rank already
        both = sort_rows(torch.cat([sample, new], 1))
        keep = both < S
        keep[:, 1:] &= both[:, 1:] != both[:, :-1]  # a session already in the sample: once
        pos = keep.cumsum(1) - 1  # compacted column of every kept entry
        w = int(pos[:, -1].max()) + 1
        if self.m:
            w = min(w, self.m)
        keep &= pos < w
        out = torch.full((both.shape[0], w), S, dtype=torch.int64, device=self.device)
        r = torch.arange(both.shape[0], device=self.device).unsqueeze(1).expand_as(both)
        out[r[keep], pos[keep]] = both[keep]
        return out

    def _count_upto(self, lo: torch.Tensor, hi: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
        """Per query: how many of ``item_sessions[lo:hi]`` (ascending) are <= ``thr``
        (vectorised binary search, one gather per halving)."""
        a, b = lo.clone(), hi.clone()
        top = self.item_sessions.shape[0] - 1
        for _ in range(int((hi - lo).max()).bit_length() + 1 if lo.numel() else 0):
            act = a < b
            mid = (a + b) // 2
            right = act & (self.item_sessions[mid.clamp(max=top)] <= thr)
            a = torch.where(right, mid + 1, a)
            b = torch.where(act & ~right, mid, b)
        return a - lo

    def _blocks(self, W: int, e_row: np.ndarray) -> list[tuple[int, int]]:
        """Contiguous row blocks of at most ``block_entries`` candidate cells + shared-item
        entries each (a single row is never split)."""
        R = len(e_row)
        excl = np.concatenate([[0], np.cumsum(e_row + W)[:-1]])
        key = excl // self.cfg.block_entries
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if R else np.zeros(0, np.int64)
        return list(zip(starts.tolist(), np.r_[starts[1:], R].tolist()))

    # ---- one step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, state: KNNState, items: torch.Tensor, ts: torch.Tensor | None = None):
        dev = self.device
        items = items.to(dev, torch.int64)
        R = items.shape[0]
        lens = state.lens + 1
        seq = state.seq
        lmax = int(lens.max()) if R else 0
        if lmax > seq.shape[1]:
            seq = torch.cat([seq, seq.new_zeros(R, max(lmax, 2 * seq.shape[1]) - seq.shape[1])], 1)
        rows = torch.arange(R, device=dev)
        seq[rows, lens - 1] = items
        sample = self._merge_sample(state.sample, items)
        new_state = KNNState(seq=seq, lens=lens, sample=sample)
        out = torch.zeros(R, self.n_items, dtype=torch.float32, device=dev)
        if R == 0 or sample.shape[1] == 0:
            return out, new_state
        cfg, n, S = self.cfg, self.n_items, self.S
        # the rows' distinct items with their last positions (amax in the zeroed scratch table)
        col = torch.arange(lmax, device=dev)
        valid = col.unsqueeze(0) < lens.unsqueeze(1)
        rr = rows.unsqueeze(1).expand(R, lmax)[valid]
        pp = (col + 1).to(torch.float64).unsqueeze(0).expand(R, lmax)[valid]
        keys = rr * n + seq[:, :lmax][valid]
        scratch = self._scratch_for(R * n)
        scratch.scatter_reduce_(0, keys, pp, reduce="amax")
        last = scratch[keys] == pp
        scratch[keys] = 0.0
        dr, dp, dj = rr[last], pp[last], keys[last] - rr[last] * n  # queries (row, item), by row
        n_dist = torch.bincount(dr, minlength=R).to(torch.float64)
        L = lens.to(torch.float64)
        wq = position_weight(dp, L[dr], cfg.weighting, cfg.lambda_spw)
        norm = torch.zeros(R, dtype=torch.float64, device=dev).index_add_(0, dr, wq * wq).sqrt()
        # every candidate of a row shares an item with it, and the sample holds ALL candidates
        # up to its most recent-last rank thr: each query's shared sessions are the prefix of
        # the item's session list up to thr
        cnt = (sample < S).sum(1)
        thr = sample.gather(1, (cnt - 1).clamp(min=0).unsqueeze(1)).squeeze(1).masked_fill(cnt == 0, -1)
        lo = self.item_indptr[dj]
        c = self._count_upto(lo, self.item_indptr[dj + 1], thr[dr])
        e_row = torch.zeros(R, dtype=torch.int64, device=dev).index_add_(0, dr, c).cpu().numpy()
        t_us = None
        if cfg.lambda_snh > 0:  # the input events' times; a missing one (0) -> the training end
            t = ts.to(dev, torch.int64) if ts is not None else torch.full((R,), self.t_ref, device=dev)
            t_us = torch.where(t > 0, t, torch.full_like(t, self.t_ref))
        q_start = np.concatenate([[0], np.cumsum(torch.bincount(dr, minlength=R).cpu().numpy())])
        try:
            for r0, r1 in self._blocks(sample.shape[1], e_row):
                qa, qb = int(q_start[r0]), int(q_start[r1])
                self._score_block(out, sample, r0, r1, dr[qa:qb], dp[qa:qb], wq[qa:qb], lo[qa:qb], c[qa:qb],
                                  L, n_dist, norm, t_us)
        except BaseException:
            self._scratch = self._scratch[:0]  # may hold partial sums: never reuse it
            raise
        return out, new_state

    def _score_block(self, out, sample, r0, r1, qr, qp, qw, qlo, qc, L, n_dist, norm, t_us) -> None:
        """Rows r0:r1. Queries (row qr, last position qp, weight qw of a distinct item of the
        row's session; its first qc sessions from qlo in item_sessions are the candidates
        holding it). Cells = (row, sample column)."""
        cfg, dev, n, S = self.cfg, self.device, self.n_items, self.S
        take = torch.index_select
        samp = sample[r0:r1]
        rb, W = samp.shape
        flat = samp.reshape(-1)
        f64 = torch.float64
        # 1. shared-item entries -> their cells
        E1 = int(qc.sum())
        q_e = torch.repeat_interleave(torch.arange(qc.numel(), device=dev), qc, output_size=E1)
        idx_e = torch.arange(E1, device=dev) + take(qlo - (torch.cumsum(qc, 0) - qc), 0, q_e)
        rank_e = take(self.item_sessions, 0, idx_e)
        row_e = take(qr, 0, q_e) - r0
        cell_keys = (torch.arange(rb, device=dev).unsqueeze(1) * (S + 1) + samp).reshape(-1)  # sorted
        cell_e = torch.searchsorted(cell_keys, row_e * (S + 1) + rank_e)
        # 2. per cell: similarity and the positions of the shared items
        valid = flat < S
        la = take(self.la, 0, flat).to(f64)
        crow = torch.arange(rb, device=dev).repeat_interleave(W) + r0
        if cfg.similarity == "jaccard":
            li = torch.bincount(cell_e, minlength=rb * W).to(f64)
            sim = li / (take(n_dist, 0, crow) + la - li).clamp(min=1)
        else:
            num = torch.zeros(rb * W, dtype=f64, device=dev).index_add_(0, cell_e, take(qw, 0, q_e))
            if cfg.similarity == "cosine":
                den = take(norm, 0, crow) * la.sqrt()
                sim = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
            else:  # vec
                sim = num / take(n_dist, 0, crow)
        if t_us is not None:
            dt_s = (take(t_us, 0, crow) - take(self.end_us, 0, flat)).to(f64) / 1e6
            sim = sim * torch.exp(-dt_s / (cfg.lambda_snh * DAY_S))
        pos = valid & (sim > 0)
        # 3. top k per row: key = (float32 bits of sim, then more recent first); -1 = none
        if W > self.k:
            bits = sim.to(torch.float32).view(torch.int32).to(torch.int64)
            key = torch.where(pos, (bits << 32) | (0xFFFFFFFF - flat), torch.full_like(flat, -1))
            top = key.view(rb, W).topk(self.k, dim=1)
            tcell = (top.indices + torch.arange(rb, device=dev).unsqueeze(1) * W).reshape(-1)
            sel_cells = tcell[top.values.reshape(-1) >= 0].sort().values
        else:
            sel_cells = pos.nonzero().squeeze(1)
        if sel_cells.numel() == 0:
            return
        f = take(sim, 0, sel_cells)  # per selected neighbour
        if cfg.weighting_score != "same" or cfg.lambda_ipw > 0:
            pmax = torch.zeros(rb * W, dtype=f64, device=dev).scatter_reduce_(
                0, cell_e, take(qp, 0, q_e), reduce="amax")
            d = take(L, 0, take(crow, 0, sel_cells)) - take(pmax, 0, sel_cells) + 1
            if cfg.weighting_score != "same":
                f = f * score_decay(d, cfg.weighting_score)
            if cfg.lambda_ipw > 0:
                f = f * torch.exp(-(d - 1) / cfg.lambda_ipw)
        qstar = None
        if cfg.lambda_inh > 0:
            qn = take(self.item_lastpos, 0, idx_e).to(f64)
            qstar = take(torch.zeros(rb * W, dtype=f64, device=dev).scatter_reduce_(0, cell_e, qn, reduce="amax"),
                         0, sel_cells)
        # 4. the neighbours' items -> the scores, in chunks of at most block_entries items
        nrank = take(flat, 0, sel_cells)
        nrow = take(crow, 0, sel_cells)
        nla = take(self.la, 0, nrank)
        nst = take(self.sess_indptr, 0, nrank)
        ns, B = sel_cells.numel(), cfg.block_entries
        acc, touched = self._scratch_for(out.numel()), []
        cum = torch.cumsum(nla, 0)
        cuts = torch.searchsorted(cum, torch.arange(1, int(cum[-1]) // B + 1, device=dev) * B, right=True)
        bounds = sorted({0, ns, *cuts.cpu().tolist()})
        for a, b in zip(bounds[:-1], bounds[1:]):
            la_c = nla[a:b]
            E2 = int(la_c.sum())
            j_e = torch.repeat_interleave(torch.arange(b - a, device=dev), la_c, output_size=E2)
            eidx = torch.arange(E2, device=dev) + take(nst[a:b] - (torch.cumsum(la_c, 0) - la_c), 0, j_e)
            it = take(self.sess_items, 0, eidx)
            v = take(f[a:b], 0, j_e)
            if qstar is not None:
                q = take(self.sess_lastpos, 0, eidx).to(f64)
                v = v * torch.exp(-(q - take(qstar[a:b], 0, j_e)).abs() / cfg.lambda_inh)
            if self.idf_factor is not None:
                v = v * take(self.idf_factor, 0, it)
            key = take(nrow[a:b], 0, j_e) * n + it
            acc.index_add_(0, key, v)  # sums per (row, item) in float64
            touched.append(key)
        touched = torch.cat(touched)
        out.view(-1)[touched] = acc[touched].to(torch.float32)
        acc[touched] = 0.0


class TimedSessionKNNScorer(SessionKNNScorer):
    """STAN / VSTAN (``lambda_snh > 0``): stepped with the input events' times."""

    uses_time = True


def make_scorer(sd: dict, cfg: SKNNConfig, device: torch.device) -> SessionKNNScorer:
    cls = TimedSessionKNNScorer if cfg.lambda_snh > 0 else SessionKNNScorer
    return cls(sd, cfg, device)


# ------------------------------------------------------------------------------ families
class SKNNFamily(Family):
    name = "sknn"
    Config = SKNNConfig
    trainable = False

    def __init__(self, cfg: SKNNConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        self.index = fit_index(ctx.data, ctx.index.n_items)

    def state_dict(self) -> dict:
        return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in self.index.items()}

    def load_weights(self, state_dict: dict) -> None:
        pass  # refitted from the (new) training table: "fine-tuning" = refitting on it

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        cfg = config_from_dict(dict(ckpt["config"], model=ckpt.get("model", cls.name)))
        return make_scorer(ckpt["state_dict"], cfg, device)


class VSKNNFamily(SKNNFamily):
    name = "vsknn"
    Config = VSKNNConfig


class STANFamily(SKNNFamily):
    name = "stan"
    Config = STANConfig


class VSTANFamily(SKNNFamily):
    name = "vstan"
    Config = VSTANConfig
