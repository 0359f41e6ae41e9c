"""CoEvent MF: the low-rank bigram baseline of Villatel et al. (RecSys 2018), untied and tied.

Model (their §4.1: "x_{t+1} = Uᵀ V x_t", x one-hot items, U and V of size N_E × N_I)::

    score(j | current item i) = U[:, j] · V[:, i]          softmax over all items j

i.e. a rank-N_E factorisation of the item-to-next-item (co-event) matrix. It looks at the
current item only: nothing is carried from earlier steps of the session. Here the tables are
stored row-major, one row per item (``U[j]``, ``V[i]`` are the d-vectors of item j / i).

* ``coevent`` (:class:`CoEventFamily`): U and V separate, 2 · n_items · d parameters.
* ``coevent_tied`` (:class:`TiedCoEventFamily`, the paper's "CoEvent MF + RE"): U = V, ONE
  table, n_items · d parameters (their Table 3: 7.5 M / 3.75 M on Yoochoose = 2 · 37,483 ·
  100 / 37,483 · 100: no bias term, so none here). The tied form is symmetric and scores the
  current item itself |W_i|², so it favours repeats; B can outrank A itself after A only if
  |W_B| cos(W_A, W_B) > |W_A| (tests/training/test_mf_baselines.py shows both).

Training: softmax cross-entropy of the next item on every consecutive (current, next) pair of
the training sessions; an epoch is a permutation of all pairs from
``training.family.generator(seed, epoch)`` (exact ``--resume``), cut into mini-batches of
``batch_size``, loss = batch mean.

* ``softmax="auto"`` (default): the full softmax over all items when n_items <=
  ``full_softmax_max_items`` (20,000), else ``sampled``: the batch's targets plus
  ``n_sample`` shared negatives ∝ support^``sample_alpha`` (drawn before scoring), with the
  logQ correction (GRU4Rec's official cross-entropy recipe: 2048, alpha 0.5), so that a
  53k-item catalogue trains in minutes. Full softmax: dense gradients and dense Adam (every
  output row is touched anyway; TF1's Adam, which the paper used, updates every row's moments
  too). Sampled: row-sparse gradients (``training.family.gather_rows``) and the lazy
  row-sparse Adam of ``training.optim``.

Defaults (Villatel et al. Table 2, the same for all their models): N_E ``dim=100``, Adam,
``learning_rate=0.01`` decaying polynomially to ``lr_end=0.001`` with power 0.5 over
``lr_decay_steps=50000`` steps, ``batch_size=128``. The paper states no epoch count and no
initialisation: ``n_epochs=10`` (on rsc15-100k ``train`` -> ``valid`` R@20 is flat from 5 to
25 epochs: 0.590-0.594 untied, 0.648-0.651 tied), Glorot-uniform init (TF1's default
initializer). No L2
(``weight_decay=0``). ``session_order`` is not used (pairs are shuffled every epoch).

Train / evaluate::

    python -m training.train --model coevent --data SPLIT_DIR --out RUN_DIR [--set key=value]
    python -m training.train --model coevent_tied --data SPLIT_DIR --out RUN_DIR
    python -m evaluation.evaluate --model-dir RUN_DIR --data SPLIT_DIR --out EVAL_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.batching import SampleStore
from training.config import ConfigError, VillatelTrainConfig, config_from_dict
from training.family import Family, TrainContext, gather_rows, generator, glorot_
from training.losses import xe_loss
from training.scoring import SessionScorerBase

SOFTMAX = ("auto", "full", "sampled")


@dataclass
class CoEventConfig(VillatelTrainConfig):
    """CoEvent MF (Villatel et al. 2018): next-item scores U[j]·V[i] from the current item i,
    softmax cross-entropy; U and V separate."""

    model: str = "coevent"
    #: N_E, the factorisation rank
    dim: int = 100
    #: auto (full when n_items <= full_softmax_max_items, else sampled) | full | sampled
    softmax: str = "auto"
    full_softmax_max_items: int = 20_000
    #: sampled softmax: shared negatives per batch, drawn ∝ support^sample_alpha (logQ-corrected)
    n_sample: int = 2048
    sample_alpha: float = 0.5

    def __post_init__(self):
        if self.dim <= 0:
            raise ConfigError(f"{self.model}: dim must be > 0, got {self.dim}")
        if self.softmax not in SOFTMAX:
            raise ConfigError(f"{self.model}: softmax {self.softmax!r}: choose {' | '.join(SOFTMAX)}")
        if self.n_sample < 0:
            raise ConfigError(f"{self.model}: n_sample must be >= 0, got {self.n_sample}")
        if self.sample_alpha < 0:
            raise ConfigError(f"{self.model}: sample_alpha must be >= 0, got {self.sample_alpha}")
        if self.batch_size <= 0:
            raise ConfigError(f"{self.model}: batch_size must be > 0, got {self.batch_size}")


@dataclass
class TiedCoEventConfig(CoEventConfig):
    """CoEvent MF + RE (Villatel et al. 2018): U = V, one item table, scores V[j]·V[i]."""

    model: str = "coevent_tied"


class CoEventMF(nn.Module):
    """Input table V [n_items, d], output table U [n_items, d]; tied: one table W = U = V."""

    def __init__(self, n_items: int, d: int, tied: bool):
        super().__init__()
        self.n_items = n_items
        self.tied = tied
        if tied:
            self.W = nn.Parameter(torch.zeros(n_items, d))
        else:
            self.V = nn.Parameter(torch.zeros(n_items, d))
            self.U = nn.Parameter(torch.zeros(n_items, d))

    @property
    def input_table(self) -> torch.Tensor:
        return self.W if self.tied else self.V

    @property
    def output_table(self) -> torch.Tensor:
        return self.W if self.tied else self.U

    def forward(self, cur: torch.Tensor, cols: torch.Tensor | None = None, sparse: bool = False) -> torch.Tensor:
        """Scores [B, n_items] of every item after ``cur`` (or of the items ``cols`` only,
        [B, len(cols)]): THE model, for training and scoring."""
        v = gather_rows(self.input_table, cur, sparse)
        U = self.output_table if cols is None else gather_rows(self.output_table, cols, sparse)
        return v @ U.t()


class CoEventScorer(SessionScorerBase):
    """Stateless: scores depend on the current item only (state is None)."""

    def __init__(self, model: CoEventMF, device: torch.device):
        self.model = model.to(device).eval()
        self.device = device
        self.n_items = model.n_items

    def begin(self, n_slots: int):
        return None

    def select(self, state, rows):
        return state

    def start_session(self, state, slots, users):
        return state

    @torch.no_grad()
    def step(self, state, items):
        return self.model(items.to(self.device)).float(), state


class CoEventFamily(Family):
    name = "coevent"
    Config = CoEventConfig
    tied = False

    def __init__(self, cfg: CoEventConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        n = ctx.index.n_items
        self.model = CoEventMF(n, cfg.dim, self.tied).to(ctx.device)
        self.sampled = cfg.softmax == "sampled" or (cfg.softmax == "auto" and n > cfg.full_softmax_max_items)
        if self.sampled and cfg.n_sample == 0 and cfg.batch_size < 2:
            raise ConfigError(f"{cfg.model}: sampled softmax needs n_sample > 0 or batch_size >= 2")
        d = ctx.data
        last = np.zeros(d.n_events, bool)
        last[d.offsets[1:] - 1] = True  # the last event of a session has no next item
        cur = np.flatnonzero(~last)
        self._cur = torch.from_numpy(d.items[cur].astype(np.int64))
        self._nxt = torch.from_numpy(d.items[cur + 1].astype(np.int64))
        self._logp = torch.log(torch.tensor(np.maximum(ctx.support, 1), dtype=torch.float32)).to(ctx.device)

    def init_weights(self, gen: torch.Generator) -> None:
        for p in self.model.parameters():  # Glorot uniform (fan = n_items + d)
            glorot_(p, p.shape[0], p.shape[1], gen)

    def batches(self, epoch: int):
        """(current items, next items, shared negatives or None) of ``batch_size`` pairs."""
        c, dev = self.cfg, self.ctx.device
        gen = generator(c.seed, epoch)
        n = len(self._cur)
        perm = torch.randperm(n, generator=gen)
        cur, nxt = self._cur[perm].to(dev), self._nxt[perm].to(dev)
        B = c.batch_size
        n_batches = -(-n // B)
        store = None
        if self.sampled and c.n_sample > 0 and n_batches:
            store = SampleStore(self.ctx.support, c.n_sample, c.sample_alpha,
                                min(10_000_000, n_batches * c.n_sample), gen, dev)
        for a in range(0, n, B):
            yield cur[a:a + B], nxt[a:a + B], store.take(1)[0] if store is not None else None

    def loss(self, batch):
        cur, nxt, neg = batch
        B = int(cur.shape[0])
        if not self.sampled:
            return F.cross_entropy(self.model(cur), nxt), B
        # sampled softmax: columns = the batch's targets (row r's target is column r) + negatives
        cols = nxt if neg is None else torch.cat([nxt, neg])
        if cols.shape[0] < 2:
            return None
        R = self.model(cur, cols, sparse=True)
        w = torch.ones(cols.shape[0], device=R.device)
        if neg is not None:  # in-batch targets were drawn ∝ support, the negatives ∝ support^alpha
            w[B:] = self.cfg.sample_alpha
        return xe_loss(R, self._logp[cols] * w) / B, B

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        cfg = config_from_dict(ckpt["config"])
        sd = ckpt["state_dict"]
        model = CoEventMF(int(ckpt["item_index"]["item_id"].shape[0]), cfg.dim, cls.tied)
        model.load_state_dict(sd)
        return CoEventScorer(model, device)


class TiedCoEventFamily(CoEventFamily):
    name = "coevent_tied"
    Config = TiedCoEventConfig
    tied = True
