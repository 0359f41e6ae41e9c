"""BPR-MF: the matrix-factorisation baseline of Hidasi et al. (ICLR 2016), session = user.

Model (Rendle et al. 2009, BPR-MF, on the (session, item) incidence of the training table)::

    x_si = S_s · I_i (+ b_i with item_bias)        (S: session factors, I: item factors)
    loss = -log σ(x_si - x_sj)                     i an item of session s, j a sampled negative

A new (test) session has no trained factor: as in the paper it is represented by "the average
of item feature vectors of the items that had occurred in it so far", so at step t::

    score(k) = mean(I_{i_1}, ..., I_{i_t}) · I_k (+ b_k)

The session factors are only needed for training: the checkpoint keeps them (exact
``--resume``; ``--init-from`` on a recent table keeps the factors of the sessions it shares
with the pre-trained run, by session id, and draws fresh ones for the others), the scorer reads
the item factors and biases only.

Batches: every event of the training table is one (session, item, negative) triple; an epoch is
a permutation of all events drawn from ``training.family.generator(seed, epoch)``, with one
negative per triple drawn from the same generator (so ``--resume`` is exact), cut into
mini-batches of ``batch_size`` (the loss is the batch mean).

Defaults and where they come from. The paper gives no BPR-MF hyperparameters; its code
(GRU4Rec's ``baselines.py``, kept in rn5l/session-rec ``algorithms/baselines/bpr.py``) uses
100 factors, uniform init in ±0.05, no regularisation, 10 epochs of per-event SGD with lr
0.01, and scores with the item bias term (which that code never updates, i.e. 0). Here:

* ``n_factors=100``, ``sigma=0.05`` (uniform ±sigma), ``n_epochs=10``: the paper's code.
* ``item_bias=False``: the paper code's scores (its bias is never trained, i.e. 0).
  ``item_bias=true`` adds a trained item bias b_i (Rendle's BPR-MF); on rsc15-100k
  ``train`` -> ``valid`` it lost (R@20 0.488 vs 0.553 at lr 0.05): with uniform negatives
  the bias learns popularity, which outweighs the session's own items.
* ``neg_sampling="uniform"`` (Rendle's BPR: j uniform over the catalogue; j = i is possible
  and then gives a zero gradient); ``"popularity"`` draws j ∝ support^``sample_alpha``.
* optimizer: the trainer offers no plain SGD, so ``adagrad`` (``training.optim``, row-sparse:
  ``training.family.gather_rows`` gives row-sparse gradients, so a step touches only the rows
  of its batch's sessions and items, as the paper code's SGD does), ``batch_size=256`` (a
  mini-batch instead of per-event steps, for speed), ``learning_rate=0.1``: the best of
  {0.02, 0.05, 0.1} on rsc15-100k ``train`` -> ``valid`` (R@20 at lr 0.05 / 0.1: 0.553 /
  0.575; lr 0.02 with bias: 0.358; lazy row-sparse ``adam`` lr 0.01: 0.553; popularity
  negatives: 0.549; 20 epochs at lr 0.05: 0.578).
* L2: ``lambda_session`` / ``lambda_item`` (item factors and bias), both 0 as in the paper
  code; applied to the rows a step touches (the paper code's SGD rule). The common
  ``weight_decay`` is refused (it would not say which table).
* ``session_order`` is not used: triples are shuffled over the whole table every epoch.

Memory: the session table is n_sessions × n_factors float32, plus the same again for the
Adagrad accumulator (adam: twice): on the full RSC15 (7M sessions, 100 factors) about 2.8 GB
each. Train / evaluate::

    python -m training.train --model bprmf --data SPLIT_DIR --out RUN_DIR [--set key=value]
    python -m evaluation.evaluate --model-dir RUN_DIR --data SPLIT_DIR --out EVAL_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.batching import alias_tables
from training.config import ConfigError, TrainConfig
from training.family import Family, TrainContext, gather_rows, generator
from training.scoring import SessionScorerBase

NEG_SAMPLING = ("uniform", "popularity")


@dataclass
class BPRMFConfig(TrainConfig):
    """BPR-MF (Hidasi et al. 2016's baseline): sampled BPR on (session, item); a test session
    is the mean of its items' factors."""

    model: str = "bprmf"
    n_factors: int = 100
    #: init: uniform in ±sigma (the paper code's default)
    sigma: float = 0.05
    #: a trained item bias b_i in x_si (score = mean factor · I_k + b_k)
    item_bias: bool = False
    #: uniform | popularity (p(j) ∝ support^sample_alpha)
    neg_sampling: str = "uniform"
    sample_alpha: float = 1.0
    #: L2 on the session factors / on the item factors and bias (touched rows only)
    lambda_session: float = 0.0
    lambda_item: float = 0.0
    optimizer: str = "adagrad"
    learning_rate: float = 0.1
    batch_size: int = 256
    n_epochs: int = 10

    def __post_init__(self):
        if self.n_factors <= 0:
            raise ConfigError(f"bprmf: n_factors must be > 0, got {self.n_factors}")
        if self.sigma <= 0:
            raise ConfigError(f"bprmf: sigma must be > 0, got {self.sigma}")
        if self.neg_sampling not in NEG_SAMPLING:
            raise ConfigError(f"bprmf: neg_sampling {self.neg_sampling!r}: choose {' | '.join(NEG_SAMPLING)}")
        if self.sample_alpha < 0:
            raise ConfigError(f"bprmf: sample_alpha must be >= 0, got {self.sample_alpha}")
        if self.lambda_session < 0 or self.lambda_item < 0:
            raise ConfigError("bprmf: lambda_session and lambda_item must be >= 0")
        if self.weight_decay != 0:
            raise ConfigError("bprmf: weight_decay is not used; set lambda_session (session factors) "
                              "and/or lambda_item (item factors and bias)")
        if self.batch_size <= 0:
            raise ConfigError(f"bprmf: batch_size must be > 0, got {self.batch_size}")


class BPRMF(nn.Module):
    """Session factors S [n_sessions, d], item factors I [n_items, d], item bias b [n_items]."""

    def __init__(self, n_sessions: int, n_items: int, d: int, item_bias: bool):
        super().__init__()
        self.n_items = n_items
        self.S = nn.Parameter(torch.zeros(n_sessions, d))
        self.I = nn.Parameter(torch.zeros(n_items, d))
        self.b = nn.Parameter(torch.zeros(n_items)) if item_bias else None
        # which training session each row of S is (maps factors across tables on --init-from)
        self.register_buffer("session_ids", torch.zeros(n_sessions, dtype=torch.int64))

    def forward(self, s: torch.Tensor, i: torch.Tensor, j: torch.Tensor, sparse: bool = True) -> torch.Tensor:
        """x_si - x_sj for triples (s, i, j): THE model (training)."""
        u = gather_rows(self.S, s, sparse)
        diff = gather_rows(self.I, i, sparse) - gather_rows(self.I, j, sparse)
        x = (u * diff).sum(1)
        if self.b is not None:
            x = x + gather_rows(self.b, i, sparse) - gather_rows(self.b, j, sparse)
        return x


def bpr_loss(x_diff: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -log σ(x_si - x_sj)."""
    return -F.logsigmoid(x_diff).mean()


class BPRMFScorer(SessionScorerBase):
    """Per-slot running sum of the session's item factors and its length; scores = the mean
    factor · item factors (+ item bias). ``state`` = (sums [rows, d], counts [rows])."""

    def __init__(self, item_factors: torch.Tensor, item_bias: torch.Tensor | None, device: torch.device):
        self.device = device
        self.I = item_factors.to(device=device, dtype=torch.float32).contiguous()
        self.b = item_bias.to(device=device, dtype=torch.float32) if item_bias is not None else None
        self.n_items = int(self.I.shape[0])

    def begin(self, n_slots: int):
        return (torch.zeros(n_slots, self.I.shape[1], device=self.device),
                torch.zeros(n_slots, device=self.device))

    def select(self, state, rows):
        sums, counts = state
        return sums.index_select(0, rows), counts.index_select(0, rows)

    def start_session(self, state, slots, users):
        sums, counts = state
        keep = (~slots.to(self.device)).to(torch.float32)
        return sums * keep.unsqueeze(1), counts * keep

    @torch.no_grad()
    def step(self, state, items):
        sums, counts = state
        sums = sums + self.I.index_select(0, items.to(self.device))
        counts = counts + 1
        u = sums / counts.unsqueeze(1)
        scores = u @ self.I.t() if self.b is None else torch.addmm(self.b, u, self.I.t())
        return scores, (sums, counts)


class BPRMFFamily(Family):
    name = "bprmf"
    Config = BPRMFConfig

    def __init__(self, cfg: BPRMFConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        d = ctx.data
        self.model = BPRMF(d.n_sessions, ctx.index.n_items, cfg.n_factors, cfg.item_bias).to(ctx.device)
        self.model.session_ids.copy_(torch.from_numpy(d.session_ids.astype(np.int64)))
        # (session row, item) of every event: the positives, fixed for the whole run
        self._sess = torch.from_numpy(np.repeat(np.arange(d.n_sessions, dtype=np.int64), d.lengths))
        self._item = torch.from_numpy(d.items.astype(np.int64))
        self._alias = None
        if cfg.neg_sampling == "popularity":
            w = ctx.support.astype(np.float64) ** cfg.sample_alpha
            w[ctx.support <= 0] = 0.0  # never sample items absent from the training table
            if w.sum() <= 0:
                raise ConfigError("bprmf: no item has positive support: cannot sample negatives")
            self._alias = alias_tables(w / w.sum())

    # ---- weights --------------------------------------------------------------------
    def init_weights(self, gen: torch.Generator) -> None:
        s = self.cfg.sigma
        with torch.no_grad():
            self.model.S.copy_(torch.rand(self.model.S.shape, generator=gen) * 2 * s - s)
            self.model.I.copy_(torch.rand(self.model.I.shape, generator=gen) * 2 * s - s)
            if self.model.b is not None:
                self.model.b.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        # no clone on CPU: the trainer serialises the dict at once, and the session table can
        # be GBs (detach().cpu() shares storage on CPU, copies from an accelerator)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_weights(self, state_dict: dict) -> None:
        """Resume (same table): everything. ``--init-from`` on another table (e.g.
        train_recent_k): item factors and bias, and the session factors of the sessions both
        tables share (by session id); the other sessions get fresh factors (seeded by
        ``cfg.seed``)."""
        m = self.model
        sd = dict(state_dict)
        old_ids = sd.pop("session_ids")
        old_S = sd.pop("S")
        if old_S.shape[1] != m.S.shape[1]:
            raise ConfigError(f"bprmf: checkpoint has {old_S.shape[1]} factors, config n_factors={m.S.shape[1]}")
        if ("b" in sd) != (m.b is not None):
            raise ConfigError("bprmf: checkpoint and config disagree on item_bias")
        with torch.no_grad():
            m.I.copy_(sd["I"])
            if m.b is not None:
                m.b.copy_(sd["b"])
            ids = m.session_ids.cpu()
            if torch.equal(old_ids, ids):
                m.S.copy_(old_S)
                return
            s = self.cfg.sigma
            S = torch.rand(m.S.shape, generator=torch.Generator().manual_seed(self.cfg.seed)) * 2 * s - s
            order = torch.argsort(old_ids)
            sorted_ids = old_ids[order]
            pos = torch.searchsorted(sorted_ids, ids).clamp(max=max(len(sorted_ids) - 1, 0))
            if len(sorted_ids):
                hit = sorted_ids[pos] == ids
                S[hit] = old_S[order[pos[hit]]]
            m.S.copy_(S)

    def param_groups(self) -> list[dict]:
        m, c = self.model, self.cfg
        items = [m.I] + ([m.b] if m.b is not None else [])
        return [{"params": [m.S], "weight_decay": c.lambda_session},
                {"params": items, "weight_decay": c.lambda_item}]

    # ---- training -----------------------------------------------------------------------
    def _negatives(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self._alias is None:
            return torch.randint(0, self.ctx.index.n_items, (n,), generator=gen)
        prob, alias = self._alias
        bucket = torch.randint(0, len(prob), (n,), generator=gen)
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        return torch.where(u < prob[bucket], bucket, alias[bucket])

    def batches(self, epoch: int):
        """(session rows, items, negatives) of ``batch_size`` shuffled events."""
        gen = generator(self.cfg.seed, epoch)
        n = len(self._item)
        perm = torch.randperm(n, generator=gen)
        neg = self._negatives(n, gen)
        dev = self.ctx.device
        s, i, j = self._sess[perm].to(dev), self._item[perm].to(dev), neg.to(dev)
        B = self.cfg.batch_size
        for a in range(0, n, B):
            yield s[a:a + B], i[a:a + B], j[a:a + B]

    def loss(self, batch):
        s, i, j = batch
        return bpr_loss(self.model(s, i, j, sparse=True)), int(s.shape[0])

    # ---- evaluation -------------------------------------------------------------------
    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        sd = ckpt["state_dict"]
        return BPRMFScorer(sd["I"], sd.get("b"), device)
