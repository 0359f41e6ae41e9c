"""Training / evaluation speed and memory of the personalised RNNs (issue 15) and of the session
RNN they are compared with, each as a fraction of its compute-bound limit on the machine at hand;
and the check that user-parallel batching never falls back to one user at a time.

    python -m benchmarks.personal_speed \\
        --data ml100k=/tmp/personal_tables/ml100k/splits/last_session,steps=epoch,rounds=3 \\
        --data gen10M=/tmp/bench/prep-10M-seed0/splits/time,steps=2,warmup=1,min_seconds=30,eval_sessions=300 \\
        [--models gru4rec,gru4rec_torch,rnn_concat,hrnn_init,hrnn_all,ugru_linear,ugru_rect,ugru_attn] \\
        [--threads 1] [--out benchmarks/results/personal_speed.json]

``--data NAME=SPLIT_DIR[,KEY=VALUE...]`` (a split of ``spark_jobs.preprocess`` with user ids;
keys, each defaulting to the flag of that name: ``steps`` (an integer, or ``epoch`` = as many
timed steps as one epoch has), ``warmup``, ``min_seconds``, ``rounds``, ``eval_sessions``,
``served_events``). Models: ``gru4rec`` = the session RNN of ``benchmarks.personal_tables``
(``MODELS["gru4rec"]``: Quadrana et al.'s RNN, GRU4Rec with TOP1, 500 units, one-hot input,
in-batch negatives, batch 100) on the path ``training.trainer.train`` takes for it
(``make_runner``: its hand-written fast path, ``native`` here -- the whole-step C ``chunk`` path
needs a tied embedding and cross-entropy --; the row says which); ``gru4rec_torch`` = the same
setting on the autograd path (``train_path=torch``), the like-for-like reference for HRNN, which
is autograd only; ``rnn_concat``, ``hrnn_init``, ``hrnn_all`` (``training.families.hrnn``),
``ugru_linear``, ``ugru_rect``, ``ugru_attn`` (``training.families.ugru``), all with their
family defaults, as ``personal_tables`` trains them.

For every dataset x model, in a fresh process (``benchmarks.rnn_speed_common``), ``rounds``
times, the settings taken round-robin; a row is the setting's fastest round (most training
events/s: the one least slowed by other work on the shared cores; every round's figures and
1-minute load averages are in the JSON):

* **training**: the runner ``training.trainer.train`` builds (``make_runner``), weights seed 0.
  Autograd families: ``warmup`` + ``steps`` optimizer steps of the trainer's loop (``fam.batches``
  -> ``fam.loss`` -> backward -> clipping -> optimizer -> schedule, at least ``min_seconds`` of
  them, across epochs), events/s = (input, target) pairs (the ``n`` of ``fam.loss``) / wall
  second, with the seconds by phase. GRU4Rec's fast path runs whole epochs of its own
  ``run_epoch``: ``steps=epoch`` times whole epochs of the table after one warm-up epoch;
  ``steps=N`` runs an epoch of the first sessions of the table (time order), as many as give
  >= N x batch_size events and >= ``min_seconds`` at the rate of a warm-up epoch of ~20 steps;
* **rows per step** (HRNN, RNN Concat, the user GRUs): active rows of every timed step (mean,
  min, max) against ``batch_size`` and the users of the table, the distinct users among them,
  and the **fall-back check**: a step with fewer active rows than ``batch_size`` while a user of
  the epoch has not started yet would be batching that fails to fill its rows; the count of such
  steps over every step seen (warm-up included) must be 0 and is asserted. HRNN: read off the
  epoch's ``user_parallel_schedule`` (captured from ``fam.schedule``); user GRUs: off the
  window's user rows (``UGRUBatch.user_rows``);
* **compute-bound limit** (training): every matrix product of every timed step, at its real
  shape (``[m, k] x [k, n]`` forward; a product with gradients adds the weight-gradient
  ``[k, m] x [m, n]`` and, where autograd needs it, the input-gradient ``[m, n] x [n, k]``),
  each timed with ``torch.mm`` on this machine (same threads; 2 FLOPs per multiply-add) ->
  the events/s if the steps were nothing but those products. Per family (functions below):

  - ``gru4rec``: the one-hot input is a row gather of ``Wx0`` (no product); the recurrent
    ``[R, H] x [H, 3H]`` (weight gradient only: the carried state is a constant); TOP1 over
    the in-batch targets ``[R, H] x [H, R]`` (+ ``n_sample``, 0 here). The fast path scores the
    unique target rows only (``U <= R``), counted here at ``R``;
  - HRNN / RNN Concat (one user-parallel step, R active slots, S of them starting a session, C
    of those continuing a user): the session GRU as GRU4Rec's (HRNN All: plus ``[R, U] x
    [U, 3H]`` for ``W_c c``); the recurrent product needs the input gradient on a step where a
    session started (HRNN: ``s_0 = tanh(W_init c + b_init)`` is a function of the weights);
    hand-over: the user GRU ``[C, H] x [H, 3U]`` and ``[C, U] x [U, 3U]`` (once per finished
    session followed by another of its user, inside the next session's first step), the
    initialisation ``[S, U] x [U, H]``; output ``[R, H] x [H, R + n_sample]``;
  - user GRUs (one ``stream_windows`` window: R active rows x T = ``window`` steps, N scored
    cells): the state-free input products over all R*T cells at once (``precompute``: item and
    user vectors into the gates, candidate, thresholds or attention), the per-step products
    on ``h`` (``[R, n] x [n, 2n]``, ``[R, n] x [n, n]``, the rectified thresholds ``[R, n] x
    [n, 2d]`` and the filtered user vector's ``[R, d] x [d, 2n | n]``, the attention gate ``[R,
    n] x [n, d]`` and the gated vectors' ``[R, d] x [d, 2n | n]``; no input gradient on ``h``
    at t = 0: the carried state is a constant), the full softmax ``[N, n] x [n, n_items]``;

  element-wise work (gates, TOP1 / softmax, gathers of embeddings and one-hot rows, dropout,
  the optimizer -- for the user GRUs a dense Adam step over the whole user table ``E_v`` every
  step --) counts 0 FLOPs, so the fraction shows its cost. Shapes that occur with many row
  counts (tails, hand-overs) are timed at up to 16 row counts on a geometric grid and scaled
  linearly in m to the nearest one;
* **evaluation**: the one evaluation loop in user mode (``evaluation.loop.evaluate_sessions``,
  ``mode="user"``, ``history=[train_full]``: each test user's training sessions fed first,
  unscored, then the test session) on the first ``eval_sessions`` test sessions, full ranking;
  events/s of the scored events and of every stepped event (history too: every history step
  scores the whole catalogue like a test step); its limit from the forward products of every
  scorer call (``step``, and HRNN's ``start_session`` initialisation / ``end_session`` user GRU,
  the user GRUs' ``end_session`` step on the session's last click), recorded by a counting
  wrapper around the family's scorer; ranking (top-k, comparisons) counts 0 FLOPs;
* **HRNN's stored user states**: ``fam.state_dict()`` (every checkpoint the trainer writes)
  walks the whole training table through the scorer to store each user's state for serving;
  its events/s is measured on the first ``served_events`` events (the evaluation above uses
  the weights alone: user mode rebuilds the states from the history) and the seconds for the
  whole table derived from it;
* **memory**: peak RSS after training and at the end (before the limit's own products are
  timed), parameters and optimizer state (MB; the user GRUs' user table separately).

Prints markdown tables and writes ``--out`` (JSON: CPU label from ``benchmarks.machine``,
command, per row the load averages, every round, the product lists' summary).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.rnn_speed_common import (Product, build_family, eval_speed, markdown_table, mm_seconds, peak_rss_mb,
                                         rss_now_mb, run_in_processes, timed_steps, write_report)
from benchmarks.rnn_speed_common import fastest_rounds as common_fastest_rounds

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["gru4rec", "gru4rec_torch", "rnn_concat", "hrnn_init", "hrnn_all", "ugru_linear", "ugru_rect", "ugru_attn"]
LABEL = {"gru4rec": "RNN (GRU4Rec, TOP1)", "gru4rec_torch": "RNN (GRU4Rec, TOP1), autograd",
         "rnn_concat": "RNN Concat", "hrnn_init": "HRNN-Init", "hrnn_all": "HRNN-All",
         "ugru_linear": "User GRU, linear", "ugru_rect": "User GRU, rectified", "ugru_attn": "User GRU, attentional"}
DATA_KEYS = ("steps", "warmup", "min_seconds", "rounds", "eval_sessions", "served_events")
#: row counts timed per (k, n, gradients) product kind; others are scaled from the nearest one
GRID = 16


def model_setting(model: str) -> tuple[str, dict]:
    """(registry family, config overrides) of ``model`` as ``benchmarks.personal_tables`` trains it."""
    from benchmarks.personal_tables import MODELS as PT

    if model not in LABEL:
        raise ValueError(f"model {model!r}: choose from {', '.join(LABEL)}")
    fam, sets, _ = PT["gru4rec" if model.startswith("gru4rec") else model]
    over = dict(sets)
    if model == "gru4rec_torch":
        over["train_path"] = "torch"
    return fam, over


# ----------------------------------------------------------------------------- products
def gru4rec_products(layers: list[int], embedding: str, emb_dim: int, R: int, n_cols: int,
                     train: bool = True) -> list[Product]:
    """One session-parallel GRU4Rec step on R rows: per layer the input product (none for the
    one-hot first layer: a row gather of ``Wx0``) and the recurrent ``[R, H] x [H, 3H]`` (weight
    gradient only: the carried state is a constant); output ``[R, H] x [H, n_cols]`` (training:
    the sampled columns; evaluation: the catalogue). ``train=False``: forward only."""
    g = (lambda x: x) if train else (lambda x: 0)
    prods, fan = [], emb_dim if embedding == "separate" else layers[-1]  # tied: the output rows Wy
    for i, H in enumerate(layers):
        if not (i == 0 and embedding == "onehot"):
            prods.append(Product(R, fan, 3 * H, g(2)))
        prods.append(Product(R, H, 3 * H, g(1)))
        fan = H
    prods.append(Product(R, layers[-1], n_cols, g(2)))
    return prods


def hrnn_step_products(variant: str, embedding: str, emb_dim: int, H: int, U: int, R: int, n_start: int,
                       n_cont: int, n_cols: int) -> list[Product]:
    """One user-parallel HRNN / RNN Concat training step (module docstring): R active rows,
    ``n_start`` of them starting a session, ``n_cont`` of those continuing a user (the user GRU
    advances there), ``n_cols`` scored columns (in-batch targets + extra negatives)."""
    hier = variant != "concat"
    prods = []
    c_grad = hier and n_cont > 0  # c (hence W_c c and the initialisation) depends on the weights
    s_grad = hier and n_start > 0  # s_0 = tanh(W_init c + b_init) replaced some rows of s
    if hier and n_start:
        if n_cont:
            prods += [Product(n_cont, H, 3 * U, 1), Product(n_cont, U, 3 * U, 1)]  # user GRU: carried s, c
        prods.append(Product(n_start, U, H, 2 if c_grad else 1))  # W_init c
    if embedding != "onehot":
        prods.append(Product(R, emb_dim if embedding == "separate" else H, 3 * H, 2))
    if variant == "all":
        prods.append(Product(R, U, 3 * H, 2 if c_grad else 1))  # W_c c
    prods.append(Product(R, H, 3 * H, 2 if s_grad else 1))  # recurrent
    prods.append(Product(R, H, n_cols, 2))  # TOP1 / BPR / XE over the sampled columns
    return prods


def hrnn_eval_products(kind: str, variant: str, embedding: str, emb_dim: int, H: int, U: int, rows: int,
                       flagged: int, n_items: int) -> list[Product]:
    """Forward products of one HRNN scorer call on ``rows`` rows (``flagged`` of them starting /
    ending): ``step`` = session GRU + all scores; ``start`` = the initialisation over every row
    (HRNN); ``end`` = the user GRU on the ending rows (HRNN)."""
    hier = variant != "concat"
    if kind == "step":
        prods = []
        if embedding != "onehot":
            prods.append(Product(rows, emb_dim if embedding == "separate" else H, 3 * H, 0))
        if variant == "all":
            prods.append(Product(rows, U, 3 * H, 0))
        return prods + [Product(rows, H, 3 * H, 0), Product(rows, H, n_items, 0)]
    if kind == "start":
        return [Product(rows, U, H, 0)] if hier and flagged else []
    if kind == "end":
        return [Product(flagged, H, 3 * U, 0), Product(flagged, U, 3 * U, 0)] if hier and flagged else []
    raise ValueError(kind)


def ugru_products(cell: str, d: int, n: int, R: int, T: int, n_out: int, n_items: int,
                  train: bool = True) -> list[Product]:
    """A user-GRU window of R rows x T steps (module docstring); ``n_out`` rows through the
    softmax over ``n_items`` (0: no output). ``train=False``: forward only (scorer)."""
    g = (lambda x: x) if train else (lambda x: 0)
    M = R * T
    if cell == "linear":  # e W_i, v W_v, e U_i, v U_v
        prods = [Product(M, d, 2 * n, g(2)), Product(M, d, 2 * n, g(2)), Product(M, d, n, g(2)), Product(M, d, n, g(2))]
    elif cell == "rectified":  # e K_i, v K_v, e W_i, e U_i
        prods = [Product(M, d, 2 * d, g(2)), Product(M, d, 2 * d, g(2)), Product(M, d, 2 * n, g(2)),
                 Product(M, d, n, g(2))]
    elif cell == "attentional":  # e A_i, v A_v
        prods = [Product(M, d, d, g(2)), Product(M, d, d, g(2))]
    else:
        raise ValueError(f"cell {cell!r}")
    for t in range(T):
        gh = g(1 if t == 0 else 2)  # h at t = 0 is the carried (constant) state
        if cell == "rectified":
            prods += [Product(R, n, 2 * d, gh), Product(R, d, 2 * n, g(2)), Product(R, d, n, g(2))]  # h K_h, ṽ W_v, ṽ U_v
        elif cell == "attentional":
            prods += [Product(R, n, d, gh), Product(R, d, 2 * n, g(2)), Product(R, d, 2 * n, g(2)),
                      Product(R, d, n, g(2)), Product(R, d, n, g(2))]  # h A_h, ẽ W_i, ṽ W_v, ẽ U_i, ṽ U_v
        # h W_h; (r ⊙ h) U_h: r depends on the weights, so (r ⊙ h) needs its gradient even at t = 0
        prods += [Product(R, n, 2 * n, gh), Product(R, n, n, g(2))]
    if n_out:
        prods.append(Product(n_out, n, n_items, g(2)))
    return prods


def ugru_eval_products(kind: str, cell: str, d: int, n: int, rows: int, flagged: int, n_items: int,
                       has_last: bool) -> list[Product]:
    """Forward products of one user-GRU scorer call: ``step`` = one cell step + all scores;
    ``end`` with the last clicks (user mode) = one cell step on every row, no scores."""
    if kind == "step":
        return ugru_products(cell, d, n, rows, 1, rows, n_items, train=False)
    if kind == "end" and has_last and flagged:
        return ugru_products(cell, d, n, rows, 1, 0, n_items, train=False)
    return []


def flops(prods) -> float:
    """2 FLOPs per multiply-add, forward + each gradient product (counts per product, no timing)."""
    return sum(2.0 * p.m * p.k * p.n * (1 + p.grads) for p in prods)


class Tally:
    """Products of many steps: Product -> how often; ``events`` for the bound; ``steps`` keeps
    each call's list when ``keep_steps`` (tests)."""

    def __init__(self, keep_steps: bool = False):
        self.count: dict[Product, int] = defaultdict(int)
        self.events = 0
        self.steps: list[list[Product]] | None = [] if keep_steps else None

    def add(self, prods, events: int = 0) -> None:
        prods = [p for p in prods if p.m > 0 and p.k > 0 and p.n > 0]
        for p in prods:
            self.count[p] += 1
        self.events += int(events)
        if self.steps is not None:
            self.steps.append(prods)

    def flops(self) -> float:
        return sum(c * flops([p]) for p, c in self.count.items())


def _mm_time(s: tuple[int, int, int], cache: dict) -> float:
    if s not in cache:
        m, k, n = s
        if 2.0 * m * k * n > 2e10:  # a second or more each: one warm-up, best of 2
            import torch

            a, b = torch.randn(m, k), torch.randn(k, n)
            out = torch.empty(m, n)
            torch.mm(a, b, out=out)
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                torch.mm(a, b, out=out)
                best = min(best, time.perf_counter() - t)
            cache[s] = best
            del a, b, out
        else:
            cache[s] = mm_seconds(m, k, n, reps=3)
    return cache[s]


def tally_bound(tally: Tally, cache: dict | None = None, grid: int = GRID) -> dict:
    """Seconds of every product of ``tally`` (forward + its gradient products at their own
    shapes), each timed with torch.mm; kinds (k, n, gradients) seen with more than ``grid`` row
    counts m are timed at ``grid`` geometric m and scaled linearly to the nearest."""
    import numpy as np

    cache = {} if cache is None else cache
    kinds = defaultdict(list)
    for p, c in tally.count.items():
        kinds[(p.k, p.n, p.grads)].append((p.m, c))
    secs = 0.0
    for (k, n, g), ms in kinds.items():
        distinct = sorted({m for m, _ in ms})
        if len(distinct) <= grid:
            reps = np.array(distinct)
        else:
            reps = np.unique(np.round(np.geomspace(distinct[0], distinct[-1], grid)).astype(np.int64))
        for m, c in ms:
            r = int(reps[np.argmin(np.abs(np.log(reps) - np.log(m)))])
            t = sum(_mm_time(s, cache) for s in Product(r, k, n, g).shapes("own"))
            secs += c * t * m / r
    fl = tally.flops()
    return {"events_per_s": tally.events / secs if secs > 0 else float("nan"), "step_seconds": secs,
            "flops": fl, "flops_per_event": fl / max(tally.events, 1),
            "gflops_at_shapes": fl / secs / 1e9 if secs > 0 else float("nan"), "shapes_timed": len(cache)}


# ----------------------------------------------------------------------------- per-step trackers
class RowStats:
    """Active rows per timed step and the fall-back check (module docstring)."""

    def __init__(self, batch_size: int):
        self.B = batch_size
        self.rows: list[int] = []
        self.users: list[int] = []
        self.fallback_steps = 0  # steps with < B active rows while a user had not started yet
        self.steps_seen = 0

    def summary(self, n_users: int) -> dict:
        import numpy as np

        r = np.asarray(self.rows, np.float64)
        u = np.asarray(self.users, np.float64)
        full = min(self.B, n_users)
        return {"rows_per_step_mean": float(r.mean()) if len(r) else float("nan"),
                "rows_per_step_min": int(r.min()) if len(r) else 0, "rows_per_step_max": int(r.max()) if len(r) else 0,
                "users_per_step_mean": float(u.mean()) if len(u) else float("nan"),
                "users_per_step_min": int(u.min()) if len(u) else 0,
                "rows_possible": full, "rows_mean_vs_batch": float(r.mean()) / self.B if len(r) else float("nan"),
                "fallback_steps": self.fallback_steps, "steps_checked": self.steps_seen}


class HRNNTracker:
    """Wraps ``fam.schedule`` / ``fam.batches`` of an HRNN family to read each step's position in
    its epoch's schedule; ``on_batch`` adds the step's products and rows."""

    def __init__(self, fam):
        self.fam, self.cfg = fam, fam.cfg
        self.tally = Tally()
        self.stats = RowStats(fam.cfg.batch_size)
        self.sch, self.t, self.waiting = None, 0, None
        orig_schedule, orig_batches = fam.schedule, fam.batches

        def schedule(gen):
            self.sch = orig_schedule(gen)
            self.waiting = users_waiting(self.sch)
            return self.sch

        def batches(epoch):
            self.t = 0
            yield from orig_batches(epoch)

        fam.schedule, fam.batches = schedule, batches

    def on_batch(self, b, timed: bool) -> None:
        import numpy as np

        t, sch, B = self.t, self.sch, self.stats.B
        self.t += 1
        act = sch.targets[t] >= 0
        R = int(act.sum())
        assert R == int(b.active.sum()), "HRNNTracker lost its place in the schedule"
        self.stats.steps_seen += 1
        if R < B and self.waiting[t] > 0:
            self.stats.fallback_steps += 1
        if not timed:
            return
        starts = np.flatnonzero(b.session_start)
        n_start, n_cont = len(starts), int((~b.user_start[starts]).sum())
        n_cols = R + (len(b.samples) if b.samples is not None else 0)
        m, c = self.fam.model, self.cfg
        prods = hrnn_step_products(m.variant, m.embedding, getattr(c, "embedding_dim", 0), m.hidden, m.user_hidden,
                                   R, n_start, n_cont, n_cols)
        if n_cols < 2:  # the family runs the GRUs, then returns no loss (nothing to rank): forward only, no scores
            prods = [Product(p.m, p.k, p.n, 0) for p in prods[:-1]]
            self.tally.add(prods, 0)
            return
        self.tally.add(prods, R)
        self.stats.rows.append(R)
        self.stats.users.append(len(np.unique(sch.user[t][act])))


def users_waiting(sch):
    """Per step of a ``UserSchedule``: users of the epoch not started by the end of that step."""
    import numpy as np

    n_steps, B = sch.user.shape
    flat = sch.user.reshape(-1)
    pos = np.flatnonzero(flat != -1)  # -1 = idle (anonymous lanes are <= -2)
    _, first = np.unique(flat[pos], return_index=True)
    first_step = np.sort(pos[first] // B)
    return len(first_step) - np.searchsorted(first_step, np.arange(n_steps), side="right")


class UGRUTracker:
    """Wraps ``fam.batches`` of a user-GRU family: per window the products, the active rows,
    the users in it, and the fall-back check against the users not yet seen in the epoch."""

    def __init__(self, fam):
        import numpy as np

        self.fam, self.cfg = fam, fam.cfg
        self.tally = Tally()
        self.stats = RowStats(fam.cfg.batch_size)
        n_users = fam.model.n_users
        self.n_users = n_users
        self.seen = np.zeros(n_users, bool)
        orig = fam.batches

        def batches(epoch):
            self.seen[:] = False
            yield from orig(epoch)

        fam.batches = batches

    def on_batch(self, b, timed: bool) -> None:
        import numpy as np

        mask = b.targets >= 0
        act = mask.any(1)
        R, T = int(act.sum()), b.inputs.shape[1]
        ur = b.user_rows[mask]
        ur = ur[ur >= 0]
        self.seen[ur] = True
        self.stats.steps_seen += 1
        if R < self.stats.B and not self.seen.all():
            self.stats.fallback_steps += 1
        if not timed or R == 0:
            return
        c, m = self.cfg, self.fam.model
        n = int(mask.sum())
        self.tally.add(ugru_products(c.cell, m.cell.embedding, m.cell.hidden, R, T, n, m.n_items), n)
        self.stats.rows.append(R)
        self.stats.users.append(len(np.unique(ur)))


class GRU4RecTracker:
    """Products of GRU4Rec's session-parallel steps: from the batches (autograd path) or, for
    the fast path, from ``epoch_chunks`` (wrapped in ``training.families.gru4rec``, where the
    fast runner looks it up at every epoch)."""

    def __init__(self, fam):
        self.fam, self.cfg = fam, fam.cfg
        self.tally = Tally()
        self.stats = RowStats(fam.cfg.batch_size)
        self.timed = False

    def _add(self, R: int, n_cols: int) -> None:
        c, m = self.cfg, self.fam.model
        if n_cols < 2:
            return
        self.tally.add(gru4rec_products(list(m.layers), m.embedding, getattr(c, "embedding_dim", 0), R, n_cols), R)
        self.stats.rows.append(R)

    def on_batch(self, b, timed: bool) -> None:
        if timed:
            M, samples = b[3], b[4]
            self._add(int(M), int(M) + (len(samples) if samples is not None else 0))

    def patch_chunks(self) -> None:
        from training.families import gru4rec as G

        orig = G.epoch_chunks

        def epoch_chunks(*a, **k):
            for ch in orig(*a, **k):
                if self.timed:
                    ns = ch.samples.shape[1] if ch.samples is not None else 0
                    for M in ch.n_valid:
                        self._add(int(M), int(M) + ns)
                yield ch

        G.epoch_chunks = epoch_chunks


class CountingScorer:
    """The family's scorer, its calls recorded: (kind, rows, flagged rows, last items given),
    and the seconds spent in each kind of call (``seconds``)."""

    def __init__(self, inner):
        self._inner = inner
        self.calls: list[tuple] = []
        self.seconds = {"step": 0.0, "start": 0.0, "end": 0.0}

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _run(self, kind, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.seconds[kind] += time.perf_counter() - t
        return out

    def step(self, state, *args):
        self.calls.append(("step", int(args[0].shape[0]), int(args[0].shape[0]), False))
        return self._run("step", self._inner.step, state, *args)

    def start_session(self, state, slots, users):
        self.calls.append(("start", int(slots.shape[0]), int(slots.sum()), False))
        return self._run("start", self._inner.start_session, state, slots, users)

    def end_session(self, state, slots, *rest):
        self.calls.append(("end", int(slots.shape[0]), int(slots.sum()), bool(rest)))
        return self._run("end", self._inner.end_session, state, slots, *rest)


def eval_tally(model: str, fam, calls: list[tuple], n_items: int, mode: str) -> Tally:
    t = Tally()
    m, c = fam.model, fam.cfg
    for kind, rows, flagged, has_last in calls:
        if model.startswith("gru4rec"):
            prods = gru4rec_products(list(m.layers), m.embedding, getattr(c, "embedding_dim", 0), rows, n_items,
                                     train=False) if kind == "step" else []
        elif model.startswith("ugru"):
            prods = ugru_eval_products(kind, c.cell, m.cell.embedding, m.cell.hidden, rows, flagged, n_items,
                                       has_last and mode == "user")
        else:
            prods = hrnn_eval_products(kind, m.variant, m.embedding, getattr(c, "embedding_dim", 0), m.hidden,
                                       m.user_hidden, rows, flagged, n_items)
        t.add(prods)
    return t


# ----------------------------------------------------------------------------- one setting
@dataclass
class Opts:
    steps: str = "40"
    warmup: int = 3
    min_seconds: float = 0.0
    rounds: int = 1
    eval_sessions: int = 2000
    served_events: int = 300_000


def _tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _opt_state_mb(opt) -> float:
    import torch

    return _tensor_mb(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def fast_path_timed(runner, fam, data, tracker: GRU4RecTracker, o: Opts) -> dict:
    """GRU4Rec's fast runner: whole epochs (module docstring)."""
    import dataclasses

    import numpy as np

    B = fam.cfg.batch_size
    cum = np.cumsum(data.lengths - 1)

    def sub(events):  # the first sessions (time order of the table) with >= events pairs
        k = int(min(np.searchsorted(cum, events) + 1, data.n_sessions))
        return dataclasses.replace(fam.ctx, data=data.take(np.arange(k)))

    full = fam.ctx
    tracker.patch_chunks()
    if o.steps == "epoch":
        warm_ctx = timed_ctx = full
    else:
        warm_ctx = sub(20 * B)
    runner.ctx = warm_ctx
    t = time.perf_counter()
    w = runner.run_epoch(0)
    rate = w["events"] / max(time.perf_counter() - t, 1e-9)
    if o.steps != "epoch":
        timed_ctx = sub(max(int(o.steps) * B, rate * o.min_seconds * 1.05))
    runner.ctx = timed_ctx
    rss_warm = rss_now_mb()
    tracker.timed = True
    ev = steps = 0
    secs = 0.0
    epoch = 1
    while True:
        t = time.perf_counter()
        r = runner.run_epoch(epoch)
        secs += time.perf_counter() - t
        ev += r["events"]
        steps += r["steps"]
        epoch += 1
        if secs >= o.min_seconds and (o.steps == "epoch" or steps >= int(o.steps)):
            break
    tracker.timed = False
    runner.ctx = full
    return {"steps_timed": steps, "events_timed": ev, "train_seconds": secs,
            "train_events_per_s": ev / secs if secs > 0 else float("nan"), "peak_rss_train_mb": peak_rss_mb(),
            "rss_after_warmup_mb": rss_warm, "rss_after_train_mb": rss_now_mb(), "epochs_timed": epoch - 1,
            "timed_table_sessions": int(timed_ctx.data.n_sessions), "seconds_by_phase": None}


def epoch_steps(fam) -> int:
    """Batches of epoch 0 (the state the family carries is reset by its next ``batches``)."""
    return sum(1 for _ in fam.batches(0))


def one(name: str, split: str, model: str, o: Opts, threads: int) -> dict:
    import numpy as np
    import torch

    load_start = os.getloadavg()[0]
    t_build = time.perf_counter()
    family, over = model_setting(model)
    fam_cls, fam, cfg, index, data, runner = build_family(family, split, threads, over, runner="trainer")
    build_s = time.perf_counter() - t_build
    rss_build = {"rss_after_build_mb": rss_now_mb(), "peak_rss_build_mb": peak_rss_mb()}
    path = getattr(runner, "path", "torch")
    n_users = int(len(np.unique(data.user_ids[data.user_ids >= 0]))) if data.user_ids is not None else 0
    if model.startswith("gru4rec"):
        tracker = GRU4RecTracker(fam)
    elif model.startswith("ugru"):
        tracker = UGRUTracker(fam)
    else:
        tracker = HRNNTracker(fam)
    if path != "torch":
        tr = fast_path_timed(runner, fam, data, tracker, o)
    else:
        steps = epoch_steps(fam) if o.steps == "epoch" else int(o.steps)
        tr = timed_steps(fam, cfg, runner, steps, warmup=o.warmup, min_seconds=o.min_seconds,
                         on_batch=tracker.on_batch)
        tr["epoch_steps" if o.steps == "epoch" else "steps_requested"] = steps
    opt_mb = _opt_state_mb(runner.opt) if hasattr(runner, "opt") else \
        _tensor_mb(runner.step.opt_state[k] for k in runner.step.opt_state if isinstance(runner.step.opt_state[k], torch.Tensor))
    rows = tracker.stats.summary(n_users)
    if not model.startswith("gru4rec"):
        assert rows["fallback_steps"] == 0, f"{name} {model}: {rows['fallback_steps']} steps with idle rows " \
                                            "while users were waiting (user-parallel batching fell back)"
        assert rows["rows_per_step_max"] >= min(cfg.batch_size, n_users, 2), \
            f"{name} {model}: at most {rows['rows_per_step_max']} rows per step"
    # evaluation (user mode, training table as history); HRNN: weights only, states timed below
    sd = {k: v.detach().clone() for k, v in fam.model.state_dict().items()} if family in (
        "hrnn_init", "hrnn_all", "rnn_concat") else None
    holder = {}

    def wrap(sc):
        holder["s"] = CountingScorer(sc)
        return holder["s"]

    ev = eval_speed(fam_cls, fam, cfg, family, index, split, o.eval_sessions, mode="user", history=[data],
                    state_dict=sd, wrap=wrap)
    peak_eval = peak_rss_mb()
    served = {}
    if sd is not None:
        from training.families.hrnn import served_user_states

        k = int(min(np.searchsorted(np.cumsum(data.lengths), o.served_events) + 1, data.n_sessions))
        part = data.take(np.arange(k))
        t = time.perf_counter()
        served_user_states(fam.model, part, torch.device("cpu"))
        s = time.perf_counter() - t
        served = {"served_states_events": int(part.n_events), "served_states_seconds": s,
                  "served_states_events_per_s": part.n_events / s,
                  "served_states_full_table_seconds_est": data.n_events / (part.n_events / s)}
    # limits: every product timed at its shape
    cache: dict = {}
    t = time.perf_counter()
    cb = tally_bound(tracker.tally, cache)
    et = eval_tally(model, fam, holder["s"].calls, index.n_items, "user")
    et.events = ev["eval_events"]
    ecb = tally_bound(et, cache)
    limit_s = time.perf_counter() - t
    eps = tr["train_events_per_s"]
    params = [p for p in fam.model.parameters() if p.requires_grad]
    row = {"load_average_start": load_start, "dataset": name, "model": model, "label": LABEL[model],
           "family": family, "train_path": path, "n_items": index.n_items, "n_users": n_users,
           "train_events": int(data.n_events), "train_sessions": int(data.n_sessions), "build_seconds": build_s,
           **rss_build, **tr, **rows, "batch_size": cfg.batch_size,
           "compute_bound_events_per_s": cb["events_per_s"], "fraction_of_limit": eps / cb["events_per_s"],
           "limit_seconds": cb["step_seconds"], "flops_per_event": cb["flops_per_event"],
           "gflops_at_shapes": cb["gflops_at_shapes"], "distinct_products": len(tracker.tally.count),
           **ev, "eval_compute_bound_events_per_s": ecb["events_per_s"],
           "eval_fraction_of_limit": ev["eval_events_per_s"] / ecb["events_per_s"],
           "eval_flops_per_scored_event": ecb["flops_per_event"], "eval_scorer_calls": len(holder["s"].calls),
           "eval_scorer_calls_by_kind": {k: sum(1 for c in holder["s"].calls if c[0] == k) for k in ("step", "start", "end")},
           "eval_seconds_by_call": holder["s"].seconds,
           **served, "peak_rss_eval_mb": peak_eval, "limit_timing_seconds": limit_s, "shapes_timed": len(cache),
           "n_parameters": sum(p.numel() for p in params), "parameters_mb": _tensor_mb(params),
           "optimizer_state_mb": opt_mb, "threads": threads, "opts": o.__dict__}
    if model.startswith("ugru"):
        row.update(user_table_mb=_tensor_mb([fam.model.E_v]), hidden=cfg.hidden, embedding=cfg.embedding,
                   window=cfg.window)
    else:
        row.update(hidden=cfg.hidden if hasattr(cfg, "hidden") else list(cfg.layers))
    row["load_average"] = os.getloadavg()[0]
    return row


# ----------------------------------------------------------------------------- report
def fastest_rounds(runs: list[dict]) -> list[dict]:
    """``rnn_speed_common.fastest_rounds`` with the limit fractions and the end load of every round."""
    return common_fastest_rounds(runs, ("train_events_per_s", "fraction_of_limit", "eval_events_per_s",
                                        "eval_fraction_of_limit", "load_average_start", "load_average"),
                                 renames={"load_average": "rounds_load_average_end"})


def tables(rows: list[dict]) -> str:
    base = {r["dataset"]: r["train_events_per_s"] for r in rows if r["model"] == "gru4rec_torch"}

    def rel(r):
        return f"{r['train_events_per_s'] / base[r['dataset']]:.2f}x" if r["dataset"] in base else "—"

    speed = markdown_table(rows, [
        ("data", lambda r: r["dataset"], "l"), ("model", lambda r: f"{r['label']} `{r['model']}`", "l"),
        ("path", lambda r: r["train_path"], "l"), ("steps", lambda r: f"{r['steps_timed']:,}", "r"),
        ("train ev/s", lambda r: f"{r['train_events_per_s']:,.0f}", "r"),
        ("all rounds", lambda r: ", ".join(f"{x:,.0f}" for x in r["rounds_train_events_per_s"]), "r"),
        ("limit ev/s", lambda r: f"{r['compute_bound_events_per_s']:,.0f}", "r"),
        ("fraction", lambda r: f"{r['fraction_of_limit']:.1%}", "r"),
        ("vs GRU4Rec autograd", rel, "r"),
        ("eval ev/s scored / stepped", lambda r: f"{r['eval_events_per_s']:,.0f} / {r['eval_stepped_events_per_s']:,.0f}",
         "r"),
        ("eval limit ev/s", lambda r: f"{r['eval_compute_bound_events_per_s']:,.0f}", "r"),
        ("eval fraction", lambda r: f"{r['eval_fraction_of_limit']:.1%}", "r"),
        ("peak RSS MB train / eval", lambda r: f"{r['peak_rss_train_mb']:,.0f} / {r['peak_rss_eval_mb']:,.0f}", "r"),
        ("load start / end", lambda r: f"{r['load_average_start']:.2f} / {r['load_average']:.2f}", "r")])
    batching = markdown_table([r for r in rows if not r["model"].startswith("gru4rec")], [
        ("data", lambda r: r["dataset"], "l"), ("model", lambda r: f"`{r['model']}`", "l"),
        ("batch_size", lambda r: f"{r['batch_size']:,}", "r"), ("users", lambda r: f"{r['n_users']:,}", "r"),
        ("rows/step mean (min..max)",
         lambda r: f"{r['rows_per_step_mean']:,.1f} ({r['rows_per_step_min']:,}..{r['rows_per_step_max']:,})", "r"),
        ("users/step mean (min)", lambda r: f"{r['users_per_step_mean']:,.1f} ({r['users_per_step_min']:,})", "r"),
        ("steps with idle rows while users waited", lambda r: f"{r['fallback_steps']} of {r['steps_checked']:,}", "r")])

    def phases(r):
        p = r.get("seconds_by_phase")
        if not p:
            return "— (fast path)"
        tot = sum(p.values()) or 1.0
        return " / ".join(f"{p[k] / tot:.0%}" for k in ("batches", "loss", "backward", "optimizer"))

    memory = markdown_table(rows, [
        ("data", lambda r: r["dataset"], "l"), ("model", lambda r: f"`{r['model']}`", "l"),
        ("parameters", lambda r: f"{r['n_parameters']:,}", "r"), ("params MB", lambda r: f"{r['parameters_mb']:,.0f}", "r"),
        ("optimizer MB", lambda r: f"{r['optimizer_state_mb']:,.0f}", "r"),
        ("user table MB", lambda r: f"{r['user_table_mb']:,.0f}" if "user_table_mb" in r else "—", "r"),
        ("RSS MB built / trained", lambda r: f"{r['rss_after_build_mb']:,.0f} / {r['rss_after_train_mb']:,.0f}", "r"),
        ("time batches / forward / backward / optimizer", phases, "r"),
        ("GFLOP/s at shapes", lambda r: f"{r['gflops_at_shapes']:,.1f}", "r"),
        ("stored user states (checkpoint)",
         lambda r: f"{r['served_states_events_per_s']:,.0f} ev/s, {r['served_states_full_table_seconds_est']:,.1f} s"
         if "served_states_events_per_s" in r else "—", "r")])
    return speed + "\n\nRows per step (user-parallel batching):\n\n" + batching + "\n\nMemory and time:\n\n" + memory


def parse_data(spec: str, defaults: Opts) -> tuple[str, str, Opts]:
    head, *kvs = spec.split(",")
    name, sep, split = head.partition("=")
    if not sep or not Path(split, "train_full").exists():
        raise SystemExit(f"--data {spec!r}: expected NAME=SPLIT_DIR[,KEY=VALUE...] with SPLIT_DIR/train_full")
    o = Opts(**defaults.__dict__)
    for kv in kvs:
        k, sep, v = kv.partition("=")
        if not sep or k not in DATA_KEYS:
            raise SystemExit(f"--data {spec!r}: {kv!r} is not KEY=VALUE with KEY one of {', '.join(DATA_KEYS)}")
        setattr(o, k, v if k == "steps" else type(getattr(defaults, k))(float(v) if k == "min_seconds" else int(v)))
    if o.steps != "epoch" and not o.steps.isdigit():
        raise SystemExit(f"--data {spec!r}: steps must be an integer or 'epoch', got {o.steps!r}")
    return name, split, o


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", metavar="NAME=SPLIT_DIR[,KEY=VALUE...]", help="required (repeatable)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", default="40", help="timed steps: an integer or 'epoch'")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--eval-sessions", type=int, default=2000)
    ap.add_argument("--served-events", type=int, default=300_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "personal_speed.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one setting, JSON on stdout
    a = ap.parse_args(argv)
    if a.one:
        name, split, model, od = json.loads(a.one)
        print(json.dumps(one(name, split, model, Opts(**od), a.threads)))
        return 0
    if not a.data:
        ap.error("--data NAME=SPLIT_DIR is required")
    models = [m for m in a.models.split(",") if m]
    bad = [m for m in models if m not in LABEL]
    if bad:
        ap.error(f"--models: {bad} not of {list(LABEL)}")
    defaults = Opts(steps=a.steps, warmup=a.warmup, min_seconds=a.min_seconds, rounds=a.rounds,
                    eval_sessions=a.eval_sessions, served_events=a.served_events)
    per_round: list[list] = []
    for spec in a.data:
        name, split, o = parse_data(spec, defaults)
        for r in range(o.rounds):
            while len(per_round) <= r:
                per_round.append([])
            per_round[r] += [[name, split, m, o.__dict__] for m in models]
    t0 = time.time()
    runs = run_in_processes("benchmarks.personal_speed", [s for rnd in per_round for s in rnd],
                            ["--threads", str(a.threads)],
                            lambda r: f"{r['dataset']} {r['model']} ({r['train_path']}): "
                                      f"{r['train_events_per_s']:,.0f} ev/s ({r['fraction_of_limit']:.1%} of "
                                      f"{r['compute_bound_events_per_s']:,.0f}), {r['steps_timed']} steps in "
                                      f"{r['train_seconds']:.0f} s; eval {r['eval_events_per_s']:,.0f} ev/s "
                                      f"({r['eval_fraction_of_limit']:.1%}); load {r['load_average_start']:.2f}")
    rows = fastest_rounds(runs)
    table = tables(rows)
    write_report(a.out, "python -m benchmarks.personal_speed " + " ".join(sys.argv[1:] if argv is None else argv),
                 a.threads, rows, table, wall_s=time.time() - t0)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
