"""GRU4Rec (Hidasi et al., ICLR 2016, and the later official versions): one module.

Train / evaluate::

    python -m training.train --model gru4rec --data SPLIT_DIR --out RUN_DIR [--set key=value ...]
    python -m evaluation.evaluate --model-dir RUN_DIR --data SPLIT_DIR --out EVAL_DIR

Defaults = the official best RSC15 setting (``rsc15_xe_shared_100_best``): cross-entropy
with logQ 1.0, tied embedding, 100 units, batch 32, hidden dropout 0.4, Adagrad lr 0.2
with momentum 0.2, 2048 extra negatives drawn ∝ support^0.5, 10 epochs.

Cell (every layer, PyTorch GRUCell convention, gates ordered r, z, n)::

    r = σ(W_ir x + b_ir + W_hr h + b_hr)     z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))     h' = (1 − z) ⊙ n + z ⊙ h

As in the official code the hidden dropout mask is applied to the layer output *and
that dropped-out output is the state carried to the next step*; each step is its own
update (no BPTT: the carried state is a constant). Training runs on session-parallel
mini-batches (``training.batching.session_parallel_schedule``) and scores only the
mini-batch's targets plus the shared sampled negatives (never all items).

Training paths (``train_path``; the one that ran is logged as ``train_path`` in
history.json and MLflow): ``torch`` = autograd on :meth:`GRU4RecModel.forward` with the
row-sparse Adagrad of ``training.optim`` (the reference; ``torch.compile`` of it was
measured and did not help on CPU, so it is no path: benchmarks/README_gru4rec.md);
``native`` / ``chunk`` / ``manual`` = the hand-written fast path
in ``training/native`` (C kernels per step / whole 256-step chunks in one C call / torch
ops without C), tested equal to the reference. ``auto`` (default) = ``chunk`` where the
setting has it on CPU, else ``native`` on CPU, else ``torch``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from training.batching import SampleStore, StreamedSchedule
from training.config import ConfigError, TrainConfig, config_from_dict
from training.family import Family, TrainContext, gather_rows, glorot_
from training import rng
from training.losses import check_loss_config, sampled_loss
from training.rng import CounterStream
from training.scoring import RNNScorer

log = logging.getLogger("training")

TRAIN_PATHS = ("auto", "chunk", "native", "manual", "torch")


@dataclass
class GRU4RecConfig(TrainConfig):
    """GRU4Rec (Hidasi et al. 2016 + the later official versions); defaults = the official
    best RSC15 setting."""

    #: keys of earlier versions, ignored when an old checkpoint is loaded
    RETIRED_KEYS = ("native_kernels",)

    model: str = "gru4rec"
    layers: list[int] = field(default_factory=lambda: [100])
    #: "tied" (constrained: input embedding = output weights), "separate" (own table of
    #: size ``embedding_dim``) or "onehot" (1-of-N input straight into the first GRU layer)
    embedding: str = "tied"
    embedding_dim: int = 0
    #: top1 | bpr | top1-max | bpr-max | cross-entropy
    loss: str = "cross-entropy"
    #: linear | tanh | relu | elu-<alpha> | leaky-<slope> | softmax (cross-entropy only)
    final_act: str = "softmax"
    bpreg: float = 0.0
    logq: float = 1.0
    #: drop probabilities (not keep probabilities)
    dropout_embed: float = 0.0
    dropout_hidden: float = 0.4
    optimizer: str = "adagrad"
    learning_rate: float = 0.2
    momentum: float = 0.2
    n_sample: int = 2048
    sample_alpha: float = 0.5
    #: the official sample cache size (10M ids); kept for configs and checkpoints, but it no
    #: longer changes anything: the counter-based negatives (training.rng) are drawn per chunk
    #: of steps, the same draws whatever the store size, with no 80 MB store (issue 13)
    sample_store_size: int = 10_000_000
    #: auto | chunk | native | manual | torch (module docstring)
    train_path: str = "auto"


class GRU4RecModel(nn.Module):
    """Embedding (tied / separate / one-hot) -> GRU layer(s) -> scores over items."""

    def __init__(self, n_items: int, cfg: GRU4RecConfig):
        super().__init__()
        if not cfg.layers or any(h <= 0 for h in cfg.layers):
            raise ValueError(f"layers must be positive sizes, got {cfg.layers}")
        if cfg.embedding not in ("tied", "separate", "onehot"):
            raise ValueError(f"embedding must be tied|separate|onehot, got {cfg.embedding!r}")
        if cfg.embedding == "separate" and cfg.embedding_dim <= 0:
            raise ValueError("embedding=separate needs embedding_dim > 0")
        check_loss_config(cfg.loss, cfg.final_act)
        self.n_items = n_items
        self.layers = list(cfg.layers)
        self.embedding = cfg.embedding
        H = self.layers
        if cfg.embedding == "tied":
            n_in = H[-1]
        elif cfg.embedding == "separate":
            n_in = cfg.embedding_dim
            self.E = nn.Parameter(torch.empty(n_items, n_in))
        else:
            n_in = None
            self.Wx0 = nn.Parameter(torch.empty(n_items, 3 * H[0]))
        self.W_ih = nn.ParameterList()
        self.W_hh = nn.ParameterList()
        self.b_ih = nn.ParameterList()
        self.b_hh = nn.ParameterList()
        for i, h in enumerate(H):
            if i == 0 and n_in is None:
                self.W_ih.append(nn.Parameter(torch.empty(0)))  # placeholder: input is Wx0 rows
            else:
                self.W_ih.append(nn.Parameter(torch.empty(3 * h, n_in if i == 0 else H[i - 1])))
            self.W_hh.append(nn.Parameter(torch.empty(3 * h, h)))
            self.b_ih.append(nn.Parameter(torch.zeros(3 * h)))
            self.b_hh.append(nn.Parameter(torch.zeros(3 * h)))
        self.Wy = nn.Parameter(torch.empty(n_items, H[-1]))
        self.By = nn.Parameter(torch.zeros(n_items))

    def reset_parameters(self, gen: torch.Generator) -> None:
        """Glorot-uniform per gate block (fan = in + out of one gate), zero biases."""
        H = self.layers
        if self.embedding == "separate":
            glorot_(self.E, self.n_items, self.E.shape[1], gen)
        if self.embedding == "onehot":
            for g in range(3):
                glorot_(self.Wx0.data[:, g * H[0]:(g + 1) * H[0]], self.n_items, H[0], gen)
        for i, h in enumerate(H):
            W = self.W_ih[i]
            if W.numel():
                for g in range(3):
                    glorot_(W.data[g * h:(g + 1) * h], W.shape[1], h, gen)
            for g in range(3):
                glorot_(self.W_hh[i].data[g * h:(g + 1) * h], h, h, gen)
            self.b_ih[i].data.zero_()
            self.b_hh[i].data.zero_()
        glorot_(self.Wy, self.n_items, H[-1], gen)
        self.By.data.zero_()

    # ---- autograd path (evaluation, reference) -------------------------------------------
    def init_state(self, n: int, device=None) -> list[torch.Tensor]:
        return [torch.zeros(n, h, device=device or self.Wy.device) for h in self.layers]

    def input_vectors(self, x: torch.Tensor, sparse: bool = False) -> torch.Tensor | None:
        if self.embedding == "tied":
            return gather_rows(self.Wy, x, sparse)
        if self.embedding == "separate":
            return gather_rows(self.E, x, sparse)
        return None

    @staticmethod
    def cell(gi: torch.Tensor, h: torch.Tensor, W_hh, b_hh) -> torch.Tensor:
        H = h.shape[1]
        gh = torch.addmm(b_hh, h, W_hh.t())
        rz = torch.sigmoid(gi[:, :2 * H] + gh[:, :2 * H])
        r, z = rz[:, :H], rz[:, H:]
        n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        return n + z * (h - n)

    def forward(self, x: torch.Tensor, state: list[torch.Tensor], masks: dict | None = None,
                sparse: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One event per row: returns (output of the last layer, new state). THE definition
        of the model; the fast paths (training/native) are tested equal to it.

        ``masks`` (training only) = {"embed": [B, in] or None, "hidden": [per layer or None]},
        already scaled by 1/(1-p). ``sparse``: row-sparse gradients for the item tables.
        """
        masks = masks or {}
        inp = self.input_vectors(x, sparse)
        if inp is not None and masks.get("embed") is not None:
            inp = inp * masks["embed"]
        new = []
        for i in range(len(self.layers)):
            if i == 0 and inp is None:
                gi = gather_rows(self.Wx0, x, sparse) + self.b_ih[0]
            else:
                gi = torch.addmm(self.b_ih[i], inp, self.W_ih[i].t())
            h = self.cell(gi, state[i], self.W_hh[i], self.b_hh[i])
            hm = (masks.get("hidden") or [None] * len(self.layers))[i]
            if hm is not None:
                h = h * hm
            new.append(h)
            inp = h
        return inp, new

    def sampled_scores(self, out: torch.Tensor, y: torch.Tensor, sparse: bool = False) -> torch.Tensor:
        """Scores of the output rows ``y`` only (training: never all items, checklist 2)."""
        return torch.addmm(gather_rows(self.By, y, sparse), out, gather_rows(self.Wy, y, sparse).t())


    def all_scores(self, out: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.By, out, self.Wy.t())

    def output_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``all_scores(out) == out @ Wy.T + By``: the item table and bias (blocked evaluation)."""
        return self.Wy, self.By



def mask_streams(cfg: GRU4RecConfig, model: GRU4RecModel, epoch: int) -> list[CounterStream]:
    """One counter stream per dropout mask (the embedding's, then each layer's): each mask's
    draws are then the same whatever the chunk size (training.rng)."""
    return [CounterStream(cfg.seed, epoch, rng.DROPOUT, k) for k in range(1 + len(model.layers))]


def dropout_masks(cfg: GRU4RecConfig, model: GRU4RecModel, n_steps: int, B: int, streams: list[CounterStream],
                  device: torch.device) -> tuple:
    """Inverted-dropout masks (DROP probabilities, checklist 4) for a chunk of steps, drawn at
    once from :func:`mask_streams`: embedding ``[n_steps, B, d]`` or None, and one
    ``[n_steps, B, H_i]`` (or None) per layer (``u >= p`` keeps a unit, scaled by 1 / (1 - p))."""
    c, m = cfg, model
    emb = None
    if c.dropout_embed > 0 and m.embedding != "onehot":
        emb = streams[0].mask((n_steps, B, mask_width(m)), c.dropout_embed).to(device)
    hid = []
    for i, h in enumerate(m.layers):
        p = layer_dropout(c, m, i)
        hid.append(streams[1 + i].mask((n_steps, B, h), p).to(device) if p > 0 else None)
    return emb, hid


def mask_width(model: GRU4RecModel) -> int:
    """Width of the embedding dropout mask (the input row)."""
    return model.Wy.shape[1] if model.embedding == "tied" else model.E.shape[1]


def layer_dropout(cfg: GRU4RecConfig, model: GRU4RecModel, i: int) -> float:
    # official one-hot quirk: the first layer plays the embedding, so it takes dropout_embed
    return cfg.dropout_embed if (i == 0 and model.embedding == "onehot") else cfg.dropout_hidden


def chunk_steps(cfg: GRU4RecConfig, model: GRU4RecModel) -> int:
    """Steps per chunk: ``CHUNK``, fewer where one chunk's dropout masks would exceed
    ``MASK_BYTES`` (512 units at batch 128: 134 MB of masks at 256 steps, 17 MB at 32), never
    below 16 (the C call's per-chunk overhead). Results do not depend on it (mask_streams)."""
    per_step = sum(h for i, h in enumerate(model.layers) if layer_dropout(cfg, model, i) > 0)
    if cfg.dropout_embed > 0 and model.embedding != "onehot":
        per_step += mask_width(model)
    per_step *= 4 * cfg.batch_size
    if not per_step:
        return CHUNK
    return min(CHUNK, max(16, MASK_BYTES // per_step))


@dataclass
class Chunk:
    """``CHUNK`` consecutive steps of an epoch's session-parallel schedule, on the device."""

    c0: int
    c1: int
    X: torch.Tensor  # [n, B] inputs (-1 idle)
    Y: torch.Tensor  # [n, B] targets (-1 idle)
    keep: torch.Tensor  # [n, B, 1] 0 where the slot starts a new session (reset its state)
    n_valid: np.ndarray  # [n] active slots
    samples: torch.Tensor | None  # [n, n_sample] shared extra negatives
    emb: torch.Tensor | None
    hid: list


#: steps per chunk (at most; chunk_steps): masks and samples are drawn per chunk, and the C path
#: runs a chunk per call
CHUNK = 256
#: memory budget of one chunk's dropout masks (chunk_steps)
MASK_BYTES = 16 << 20


def epoch_chunks(cfg: GRU4RecConfig, model: GRU4RecModel, ctx: TrainContext, epoch: int):
    """The epoch's schedule, negatives and dropout masks, chunk by chunk. Every path consumes
    exactly this stream (same counter-based streams, same order of draws), so paths differ only in
    arithmetic, never in data."""
    c, dev = cfg, ctx.device
    B = c.batch_size
    # counter-based streams (training.rng), one per (seed, epoch, purpose): drawn in C
    smp_gen, mask_gen = CounterStream(c.seed, epoch, rng.SAMPLES), mask_streams(c, model, epoch)
    order = ctx.data.order(c.session_order, np.random.default_rng([c.seed, epoch]))
    # built chunk by chunk: memory O(sessions + CHUNK x B), not O(events) (StreamedSchedule)
    sch = StreamedSchedule(ctx.data.items, ctx.data.offsets, order, B)
    # a counter stream: each take() draws its rows, no store (sample_store_size has no effect)
    store = SampleStore(ctx.support, c.n_sample, c.sample_alpha, c.sample_store_size, smp_gen, dev) \
        if c.n_sample > 0 else None
    for part in sch.chunks(chunk_steps(c, model)):
        c0, c1 = part.c0, part.c1
        samples = store.take(c1 - c0) if store is not None else None
        emb, hid = dropout_masks(c, model, c1 - c0, B, mask_gen, dev)
        keep = torch.from_numpy(~part.reset).to(torch.float32).unsqueeze(-1).to(dev)
        yield Chunk(c0, c1, torch.from_numpy(part.inputs).to(dev), torch.from_numpy(part.targets).to(dev), keep,
                    part.n_valid, samples, emb, hid)


def logq_weights(cfg: GRU4RecConfig, M: int) -> torch.Tensor | None:
    """logQ weight per sampled column: in-batch targets were drawn ∝ support (weight logq),
    the extra negatives ∝ support^alpha (weight logq * alpha)."""
    if cfg.loss != "cross-entropy" or cfg.logq <= 0:
        return None
    return torch.cat([torch.full((M,), cfg.logq), torch.full((cfg.n_sample,), cfg.logq * cfg.sample_alpha)])


#: the official cross-entropy's epsilon (training/native/kernels.c xe_row_loss)
XE_EPS = 1e-24


def official_xe_loss(R: torch.Tensor, logq_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax cross-entropy in the official code's form (gru4rec_pytorch.py
    ``xe_loss_with_softmax``): sum over rows of ``-log(p_target + 1e-24)``. Equal to
    ``training.losses.xe_loss`` while the target's probability is above ~1e-17; below, the row
    loss is capped at -log(1e-24) = 55.26 and its gradient (softmax - one-hot, times
    p / (p + 1e-24)) vanishes. Rows reach that only when the carried hidden state has blown
    up along a long session (the dropped-out output is the state); without the cap they reported
    losses in the thousands and trained on them (issue 13, benchmarks/README_gru4rec.md)."""
    if logq_cols is not None:
        R = R - logq_cols
    lp = torch.log_softmax(R, dim=1).diagonal()
    return -torch.log(lp.exp() + XE_EPS).sum()


class GRU4RecFamily(Family):
    name = "gru4rec"
    Config = GRU4RecConfig

    def __init__(self, cfg: GRU4RecConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        if cfg.train_path not in TRAIN_PATHS:
            raise ConfigError(f"train_path {cfg.train_path!r}: choose one of {', '.join(TRAIN_PATHS)}")
        self.model = GRU4RecModel(ctx.index.n_items, cfg).to(ctx.device)
        # official P0 = raw counts of the training table; the clamp only guards unseen items
        self.logp = torch.log(torch.tensor(np.maximum(ctx.support, 1), dtype=torch.float32)).to(ctx.device)
        self._state = None

    def init_weights(self, gen: torch.Generator) -> None:
        self.model.reset_parameters(gen)

    # ---- the autograd reference -------------------------------------------------------
    def batches(self, epoch: int):
        """One session-parallel step per batch; the hidden state is carried by the family."""
        B = self.cfg.batch_size
        self._state = self.model.init_state(B, self.ctx.device)
        for ch in epoch_chunks(self.cfg, self.model, self.ctx, epoch):
            for k in range(ch.c1 - ch.c0):
                yield (ch.X[k], ch.Y[k], ch.keep[k], int(ch.n_valid[k]),
                       ch.samples[k] if ch.samples is not None else None,
                       ch.emb[k] if ch.emb is not None else None, [h[k] if h is not None else None for h in ch.hid])

    def loss(self, batch):
        x, y, keep, M, samples, emb, hid = batch
        B = self.cfg.batch_size
        rows = None
        if M == B:
            state = [h * keep for h in self._state]
        else:  # tail: sessions ran out, the batch shrinks to the active slots
            rows = torch.nonzero(y >= 0).squeeze(1)
            state = [h.index_select(0, rows) * keep[rows] for h in self._state]
            x, y, emb = x[rows], y[rows], emb[rows] if emb is not None else None
            hid = [h[rows] if h is not None else None for h in hid]
        cols = torch.cat([y, samples]) if samples is not None else y
        if cols.shape[0] < 2:  # a single row with no negatives cannot be ranked
            return None
        out, new = self.model(x, state, {"embed": emb, "hidden": hid}, sparse=True)
        R = self.model.sampled_scores(out, cols, sparse=True)
        w = logq_weights(self.cfg, x.shape[0])
        lq = self.logp[cols] * w.to(R.device) if w is not None else None
        if self.cfg.loss == "cross-entropy":
            loss = official_xe_loss(R, lq) / B
        else:
            loss = sampled_loss(R, self.cfg.loss, self.cfg.final_act, self.cfg.bpreg, lq) / B
        new = [h.detach() for h in new]
        if rows is None:
            self._state = new
        else:
            for i, h in enumerate(self._state):
                h.index_copy_(0, rows, new[i])
        return loss, x.shape[0]

    # ---- the fast path ------------------------------------------------------------------
    def runner(self):
        path = self.cfg.train_path
        if path == "torch":
            return None
        cpu = self.ctx.device.type == "cpu"
        from training import native

        if path == "auto":
            if not cpu or native.load() is None:
                log.info("train_path=auto: %s, using the autograd path",
                         "not on CPU" if not cpu else "no C kernels (see the warning above)")
                return None
            path = "chunk"
        if path in ("chunk", "native") and (not cpu or native.load() is None):
            raise ConfigError(f"train_path={path} needs the C kernels on CPU "
                              f"({'device is ' + str(self.ctx.device) if not cpu else native.why_not()})")
        from training.native.fast_step import FastRunner

        return FastRunner(self.model, self.cfg, self.ctx, path, strict=self.cfg.train_path == "chunk")

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        cfg = config_from_dict(ckpt["config"])
        model = GRU4RecModel(int(ckpt["item_index"]["item_id"].shape[0]), cfg)
        model.load_state_dict(ckpt["state_dict"])
        return RNNScorer(model, device, mixed_precision=cfg.eval_mixed_precision)
