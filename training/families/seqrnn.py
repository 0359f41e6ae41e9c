"""Long- and short-term sequence RNNs (Villatel et al., RecSys 2018): one family, ``seqrnn``.

Embedding -> recurrent module -> output module -> softmax over all items (their §3.2)::

    e_t = W_I[x_t]                                  input module (N_E = ``embedding``)
    h_t = f_rec(e_t, h_{t-1})                       GRU / LN-GRU, 1+ layers, or HM-LSTM
    o_t = W_O h_t   (untied)   or   W_I h_t (tied, "RE": one item table, output = W_Iᵀ h)

Every row of their Table 4 is a config of this one module, registered under its own name
(so the DAG, MLflow and the registry can hold them side by side; ``--set`` changes any key):

=========================  ======================  ===================================================
Table 4 row                registry name           config
=========================  ======================  ===================================================
GRU                        ``seqrnn``              (defaults)
GRU + RE                   ``seqrnn_re``           ``tied=true``
GRU + LN                   ``seqrnn_ln``           ``layer_norm=true``
GRU + RE + LN              ``seqrnn_re_ln``        ``tied=true layer_norm=true``
Stacked GRU + RE + LN      ``seqrnn_stack_re_ln``  ``tied=true layer_norm=true n_layers=2``
HM-LSTM + RE + LN          ``hmlstm_re_ln``        ``cell=hmlstm tied=true layer_norm=true n_layers=2``
=========================  ======================  ===================================================

GRU cell (their eq. 4, TF1's GRUCell form: the reset gate multiplies the previous state
*before* the recurrent product, unlike cuDNN / torch.nn.GRU)::

    r = σ(W_e^r e + W_h^r h + b_r)        z = σ(W_e^z e + W_h^z h + b_z)
    h̃ = tanh(W_e^h e + W_h^h (r ⊙ h) + b_h)          h' = (1 − z) ⊙ h + z ⊙ h̃

Layer-normalised GRU (Ba et al. 2016, LN inside the gates): every input product and every
recurrent product is normalised on its own, over its H units, with its own gain (init 1)
and bias (init 0; the LN biases replace b_r, b_z, b_h)::

    r = σ(LN(W_e^r e) + LN(W_h^r h))      z = σ(LN(W_e^z e) + LN(W_h^z h))
    h̃ = tanh(LN(W_e^h e) + LN(W_h^h (r ⊙ h)))

Stacked: layer l + 1 reads layer l's outputs; the top layer's output is scored. HM-LSTM:
``training.families.hmlstm.HMLSTM`` (its output module gives the N_E-vector that is scored);
the slope of its boundary detector is annealed per epoch, ``slope = min(slope_max, 1 +
slope_anneal · epoch)`` (Chung et al.'s slope annealing; the forward boundaries do not depend
on the slope, only their straight-through gradient does, so scoring needs no slope).

Parameters (no output bias, as their Table 3 counts: GRU 7.6 M / GRU + RE 3.8 M on Yoochoose
= 2 · 37,483 · 100 (+ 60.3 k GRU) / 37,483 · 100 (+ 60.3 k); an output bias would make the
Internal untied count 41.8 M instead of their 41.7 M): item tables n_items · N_E (· 2 untied),
per GRU layer 3 · H · (in + H) + 3 H biases (LN: 12 H gains and biases instead of the 3 H).

Sequences (``sequence``):

* ``session`` (their Yoochoose setup): every session is a sequence; every evaluated
  session starts from a zero state.
* ``user`` (their "Internal" setup: a user's browsing across sessions): a user's sessions,
  in time order, concatenated into one sequence (sessions without a user stay on their own).
  In the evaluation loop's user mode (``evaluation.evaluate --mode user``) the state is
  carried from one session of a user to the next (history sessions fed unscored first, then
  the test sessions) and reset only for a new user; in session mode it is reset at every
  session, as the protocol says. Recall@K,N looks at the next N items of the *session*
  (the loop truncates at the session end), not across the user's next session.

Training: truncated BPTT. ``bptt="parallel"`` (default): the sequences laid out
session-parallel (a row takes the next sequence as soon as its current one ends, its state
zeroed there: ``training.batching.stream_windows``) and cut into windows of ``window`` steps,
the state carried from one window to the next; nothing is dropped and nothing is padded but
the epoch's tail. ``bptt="split"``: every sequence cut into windows of ``max_len`` pairs, one
window per row (``training.batching.sequence_batches``; rows padded to the longest, which on
short sessions is mostly padding: 3-4x slower on rsc15-100k). ``bptt="truncate"``: only each
sequence's last ``max_len`` pairs (their Internal dataset kept the last 40 items). Padding
never updates the state (the cells freeze masked rows) and is never scored. Loss: softmax cross-entropy over all items (their eq. 7), the mean
over the batch's real pairs. Sequences are shuffled every epoch from
``training.family.generator(seed, epoch)`` (exact ``--resume``).

Defaults = their Table 2: Adam, lr 0.01 decaying polynomially to 0.001 with power 0.5 over
50,000 steps, N_E = N_H = 100, batch 128. Not stated there, chosen here: 10 epochs,
``max_len`` 50, Glorot-uniform weights (TF1's default initializer), GRU gate biases 1 and
candidate bias 0 (TF1 GRUCell's), no dropout.

Train / evaluate::

    python -m training.train --model seqrnn --data SPLIT_DIR --out RUN_DIR --set tied=true --set layer_norm=true
    python -m evaluation.evaluate --model-dir RUN_DIR --data SPLIT_DIR --out EVAL_DIR [--mode user]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.batching import sequence_batches, stream_windows
from training.config import ConfigError, VillatelTrainConfig, config_from_dict
from training.data import SessionData
from training.family import Family, TrainContext, generator, glorot_
from training.scoring import SessionScorerBase

CELLS = ("gru", "hmlstm")
SEQUENCES = ("session", "user")
BPTT = ("parallel", "split", "truncate")


@dataclass
class SeqRNNConfig(VillatelTrainConfig):
    """Villatel et al. (2018) sequence RNNs: GRU / LN-GRU / stacked / HM-LSTM, tied or not,
    softmax cross-entropy over all items."""

    model: str = "seqrnn"
    #: gru | hmlstm (hierarchical multiscale LSTM, n_layers >= 2)
    cell: str = "gru"
    #: layer normalisation inside the gates (Ba et al. 2016)
    layer_norm: bool = False
    #: tie the output projection to the input item table ("RE"): needs hidden == embedding
    tied: bool = False
    n_layers: int = 1
    #: N_E and N_H
    embedding: int = 100
    hidden: int = 100
    #: session: every session is a sequence | user: a user's sessions concatenated in time order
    sequence: str = "session"
    #: parallel: session-parallel streams in windows of `window` steps, state carried (truncated
    #: BPTT, no padding) | split: each sequence cut into windows of max_len pairs, one per row |
    #: truncate: each sequence's last max_len pairs only
    bptt: str = "parallel"
    #: parallel: steps per window (BPTT length; B · window events per optimizer step)
    window: int = 10
    #: split / truncate: pairs per window / pairs kept per sequence
    max_len: int = 50
    #: dropout on the input embedding and on every layer's output (not in the paper: 0)
    dropout: float = 0.0
    #: HM-LSTM slope annealing: slope = min(slope_max, 1 + slope_anneal * epoch)
    slope_anneal: float = 0.04
    slope_max: float = 5.0

    def __post_init__(self):
        m = self.model
        for key, val, choices in (("cell", self.cell, CELLS), ("sequence", self.sequence, SEQUENCES),
                                  ("bptt", self.bptt, BPTT)):
            if val not in choices:
                raise ConfigError(f"{m}: {key} {val!r}: choose {' | '.join(choices)}")
        for key in ("embedding", "hidden", "batch_size", "max_len", "window", "n_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{m}: {key} must be >= 1, got {getattr(self, key)}")
        if self.cell == "hmlstm" and self.n_layers < 2:
            raise ConfigError(f"{m}: cell=hmlstm needs n_layers >= 2 (a hierarchy), got {self.n_layers}")
        if self.tied and self.cell == "gru" and self.hidden != self.embedding:
            raise ConfigError(f"{m}: tied=true scores W_I h, so hidden ({self.hidden}) must equal "
                              f"embedding ({self.embedding})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{m}: dropout must be in [0, 1), got {self.dropout}")
        if self.slope_anneal < 0 or self.slope_max < 1:
            raise ConfigError(f"{m}: slope_anneal must be >= 0 and slope_max >= 1")


# ----------------------------------------------------------------------------- the cells
class GRULayer(nn.Module):
    """One GRU layer (module docstring), optionally layer-normalised, run over ``[B, T]``."""

    def __init__(self, input_size: int, hidden: int, layer_norm: bool):
        super().__init__()
        H = hidden
        self.hidden, self.layer_norm = H, layer_norm
        self.W_e = nn.Parameter(torch.zeros(input_size, 3 * H))  # [r | z | h] input products
        self.W_hrz = nn.Parameter(torch.zeros(H, 2 * H))  # [r | z] recurrent products
        self.W_hh = nn.Parameter(torch.zeros(H, H))  # candidate's recurrent product (of r ⊙ h)
        if layer_norm:  # gains / biases of LN(W_e^g e) (3 of them) and LN(W_h^g h) (3)
            self.ln_e_g = nn.Parameter(torch.ones(3, H))
            self.ln_e_b = nn.Parameter(torch.zeros(3, H))
            self.ln_h_g = nn.Parameter(torch.ones(3, H))
            self.ln_h_b = nn.Parameter(torch.zeros(3, H))
        else:
            self.b = nn.Parameter(torch.zeros(3 * H))

    def reset_parameters(self, gen: torch.Generator) -> None:
        H = self.hidden
        with torch.no_grad():
            for w in (self.W_e, self.W_hrz, self.W_hh):  # Glorot uniform per gate block
                glorot_(w, w.shape[0], H, gen)
            if self.layer_norm:
                self.ln_e_g.fill_(1.0), self.ln_h_g.fill_(1.0)
                self.ln_e_b.zero_(), self.ln_h_b.zero_()
            else:  # TF1 GRUCell: gate biases 1, candidate bias 0
                self.b.zero_()
                self.b[:2 * H].fill_(1.0)

    @staticmethod
    def _ln(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LayerNorm over the last axis of ``x [..., k, H]`` with gains/biases ``[k, H]``."""
        return F.layer_norm(x, x.shape[-1:]) * g + b

    def forward(self, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None = None,
                reset: torch.Tensor | None = None):
        """x [B, T, in], h [B, H] -> (outputs [B, T, H], state after each row's last real step).
        Where ``mask`` [B, T] is False the row's state is left as it was; where ``reset`` [B, T]
        is True it is zeroed before the step (a new sequence starts there)."""
        B, T, _ = x.shape
        H = self.hidden
        xe = (x @ self.W_e).view(B, T, 3, H)  # every input product at once
        if self.layer_norm:
            xe = self._ln(xe, self.ln_e_g, self.ln_e_b)
        else:
            xe = xe + self.b.view(3, H)
        keep_t = None if reset is None else (~reset).to(x.dtype).unsqueeze(2)  # [B, T, 1]
        outs = []
        for t in range(T):
            if keep_t is not None:
                h = h * keep_t[:, t]
            hrz = (h @ self.W_hrz).view(B, 2, H)
            if self.layer_norm:
                hrz = self._ln(hrz, self.ln_h_g[:2], self.ln_h_b[:2])
            rz = torch.sigmoid(xe[:, t, :2] + hrz)
            r, z = rz[:, 0], rz[:, 1]
            hh = (r * h) @ self.W_hh
            if self.layer_norm:
                hh = self._ln(hh, self.ln_h_g[2], self.ln_h_b[2])
            cand = torch.tanh(xe[:, t, 2] + hh)
            h_new = (1 - z) * h + z * cand
            if mask is not None:
                h_new = torch.where(mask[:, t, None], h_new, h)
            h = h_new
            outs.append(h)
        return torch.stack(outs, 1), h


class SeqRNN(nn.Module):
    """Item table -> GRU layers or HM-LSTM -> tied / untied output (no bias); THE model."""

    def __init__(self, n_items: int, cfg: SeqRNNConfig):
        super().__init__()
        self.n_items = n_items
        self.cell, self.tied = cfg.cell, cfg.tied
        self.W_I = nn.Parameter(torch.zeros(n_items, cfg.embedding))
        if cfg.cell == "gru":
            sizes = [cfg.embedding] + [cfg.hidden] * cfg.n_layers
            self.layers = nn.ModuleList(GRULayer(sizes[i], cfg.hidden, cfg.layer_norm)
                                        for i in range(cfg.n_layers))
            out_dim = cfg.hidden
        else:
            from training.families.hmlstm import HMLSTM

            out_dim = cfg.embedding if cfg.tied else cfg.hidden
            self.hm = HMLSTM(cfg.embedding, cfg.hidden, cfg.n_layers, out_dim, cfg.layer_norm)
        if not cfg.tied:
            self.W_O = nn.Parameter(torch.zeros(n_items, out_dim))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.slope = 1.0  # HM-LSTM boundary slope (set per epoch by the family)

    @property
    def output_table(self) -> torch.Tensor:
        return self.W_I if self.tied else self.W_O

    def init_state(self, n: int, device=None) -> list[torch.Tensor]:
        if self.cell == "hmlstm":
            return self.hm.init_state(n, device)
        return [torch.zeros(n, layer.hidden, device=device, dtype=self.W_I.dtype) for layer in self.layers]

    def forward(self, items: torch.Tensor, state: list[torch.Tensor], mask: torch.Tensor | None = None,
                reset: torch.Tensor | None = None):
        """items [B, T] (item_idx) -> (sequence outputs [B, T, D] to score, new state); ``mask``
        False = padding (state kept), ``reset`` True = zero the state before this step."""
        x = self.drop(F.embedding(items, self.W_I))
        if self.cell == "hmlstm":
            out, state = self.hm(x, state, mask, slope=self.slope, reset=reset)
            return self.drop(out), state
        new = []
        for layer, h in zip(self.layers, state):
            x, h = layer(x, h, mask, reset)
            x = self.drop(x)
            new.append(h)
        return x, new

    def all_scores(self, out: torch.Tensor) -> torch.Tensor:
        return out @ self.output_table.t()

    def step(self, items: torch.Tensor, state: list[torch.Tensor]):
        """One event per row (the scorer's interface): items [n] -> (outputs [n, D], state)."""
        out, state = self(items.unsqueeze(1), state)
        return out[:, 0], state


def user_sequences(data: SessionData, by: str) -> tuple[np.ndarray, np.ndarray]:
    """(items, offsets) of the training sequences: the sessions themselves (``session``) or
    each user's sessions in time order (ties by session id) concatenated (``user``; sessions
    with no user, -1, stay sequences of their own), users in order of their first session."""
    if by == "session" or data.user_ids is None:
        return data.items, data.offsets
    u = data.user_ids
    lane = np.where(u >= 0, u, -(np.arange(data.n_sessions) + 2))  # anonymous: a lane each
    order = np.lexsort((data.session_ids, data.start_ts, lane))
    lens = np.diff(data.offsets)[order]
    idx = np.concatenate([np.arange(data.offsets[s], data.offsets[s + 1]) for s in order]) \
        if len(order) else np.zeros(0, np.int64)
    lane_o = lane[order]
    first = np.r_[True, lane_o[1:] != lane_o[:-1]]
    seq_len = np.add.reduceat(lens, np.flatnonzero(first)) if len(order) else np.zeros(0, np.int64)
    return data.items[idx], np.r_[0, np.cumsum(seq_len)].astype(np.int64)


# ----------------------------------------------------------------------------- scorer
class SeqRNNScorer(SessionScorerBase):
    """State = the model's state + the user id each row last started (-2: none). In user mode
    a ``sequence=user`` model keeps the state across sessions of the same user."""

    wants_mode = True  # the evaluation loop says which mode it runs (begin(..., mode=))
    wants_last_item = True  # a user sequence trained on each session's last click as an input

    def __init__(self, model: SeqRNN, device: torch.device, carry_users: bool):
        self.model = model.to(device).eval()
        self.device = device
        self.n_items = model.n_items
        self.carry_users = carry_users
        self.mode = "session"

    def begin(self, n_slots: int, mode: str = "session"):
        self.mode = mode
        return self.model.init_state(n_slots, self.device) + [
            torch.full((n_slots,), -2, dtype=torch.int64, device=self.device)]

    def select(self, state, rows):
        return [s.index_select(0, rows) for s in state]

    def start_session(self, state, slots, users):
        *st, last = state
        reset = slots
        if self.carry_users and self.mode == "user" and users is not None:
            same = (users >= 0) & (users == last)
            reset = slots & ~same
            last = torch.where(slots, users, last)
        keep = (~reset).unsqueeze(1)
        return [s * keep.to(s.dtype) for s in st] + [last]

    @torch.no_grad()
    def step(self, state, items):
        *st, last = state
        out, st = self.model.step(items.to(self.device), st)
        return self.model.all_scores(out).float(), list(st) + [last]

    @torch.no_grad()
    def end_session(self, state, slots, last_items=None):
        """In user mode a user sequence goes on into the user's next session: the ending rows
        take their session's last click into the state (as in training); otherwise nothing."""
        if last_items is None or not self.carry_users or self.mode != "user":
            return state
        *st, last = state
        _, nxt = self.model.step(last_items.to(self.device), st)
        m = slots.to(self.device)
        return [torch.where(m.view(-1, *([1] * (a.dim() - 1))), b, a) for a, b in zip(st, nxt)] + [last]


# ----------------------------------------------------------------------------- family
class SeqRNNFamily(Family):
    name = "seqrnn"
    Config = SeqRNNConfig

    @classmethod
    def eval_mode(cls, cfg) -> str:
        return "user" if cfg.sequence == "user" else "session"

    def __init__(self, cfg: SeqRNNConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        self.model = SeqRNN(ctx.index.n_items, cfg).to(ctx.device)
        self._items, self._offsets = user_sequences(ctx.data, cfg.sequence)
        self._carry: list[torch.Tensor] | None = None

    def init_weights(self, gen: torch.Generator) -> None:
        m = self.model
        for w in [m.W_I] + ([] if m.tied else [m.W_O]):  # Glorot uniform over (n_items, d)
            glorot_(w, w.shape[0], w.shape[1], gen)
        if m.cell == "hmlstm":
            m.hm.reset_parameters(gen)
        else:
            for layer in m.layers:
                layer.reset_parameters(gen)

    def batches(self, epoch: int):
        c = self.cfg
        self.model.slope = min(c.slope_max, 1.0 + c.slope_anneal * epoch)
        gen = generator(c.seed, epoch)
        n_seq = len(self._offsets) - 1
        order = torch.randperm(n_seq, generator=gen).numpy()
        self._carry = None
        if c.bptt == "parallel":
            yield from stream_windows(self._items, self._offsets, order, c.batch_size, c.window)
        else:
            yield from sequence_batches(self._items, self._offsets, order, c.batch_size, c.max_len,
                                        mode=c.bptt, pack=c.bptt == "truncate")

    def loss(self, b):
        dev = self.ctx.device
        x = torch.from_numpy(b.inputs).to(dev)
        y = torch.from_numpy(b.targets).to(dev)
        mask = y >= 0
        state = self.model.init_state(x.shape[0], dev)
        reset = None
        if self.cfg.bptt == "parallel":  # rows continue from the previous window; resets inside
            reset = torch.from_numpy(b.reset).to(dev)
            if self._carry is not None:
                state = self._carry
        elif self._carry is not None and b.carry.any():  # split: continue these rows
            keep = torch.from_numpy(b.carry).to(dev).unsqueeze(1)
            state = [torch.where(keep, c, s) for c, s in zip(self._carry, state)]
        out, state = self.model(x, state, mask, reset)
        if self.cfg.bptt != "truncate":
            self._carry = [s.detach() for s in state]
        n = int(mask.sum())
        if n == 0:
            return None
        return F.cross_entropy(self.model.all_scores(out[mask]), y[mask]), n

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        cfg = config_from_dict(ckpt["config"])
        model = SeqRNN(int(ckpt["item_index"]["item_id"].shape[0]), cfg)
        model.load_state_dict(ckpt["state_dict"])
        return SeqRNNScorer(model, device, carry_users=cfg.sequence == "user")


# ----------------------------------------------------------------------------- Table 4 presets
# Each row of Villatel et al.'s Table 4 under its own name, so that the DAG's ``families``
# Param, MLflow and the registry can hold several of them side by side; each is the same
# family with other config defaults (and can still be changed with --set).
def _preset(cls: str, name: str, doc: str, **defaults):
    fields = {"model": name, **defaults}
    cfg = dataclass(type(f"{cls}Config", (SeqRNNConfig,), {
        "__annotations__": {k: type(getattr(SeqRNNConfig, k)) for k in fields},
        "__doc__": doc, "__module__": __name__, **fields}))
    fam = type(f"{cls}Family", (SeqRNNFamily,), {"name": name, "Config": cfg, "__doc__": doc,
                                                   "__module__": __name__})
    return cfg, fam


SeqRNNREConfig, SeqRNNREFamily = _preset("SeqRNNRE", "seqrnn_re", "GRU + RE: tied item table.", tied=True)
SeqRNNLNConfig, SeqRNNLNFamily = _preset("SeqRNNLN", "seqrnn_ln", "GRU + LN.", layer_norm=True)
SeqRNNRELNConfig, SeqRNNRELNFamily = _preset("SeqRNNRELN", "seqrnn_re_ln", "GRU + RE + LN.", tied=True,
                                             layer_norm=True)
StackedRELNConfig, StackedRELNFamily = _preset("StackedRELN", "seqrnn_stack_re_ln", "Stacked GRU + RE + LN.",
                                               tied=True, layer_norm=True, n_layers=2)
HMLSTMRELNConfig, HMLSTMRELNFamily = _preset("HMLSTMRELN", "hmlstm_re_ln", "HM-LSTM + RE + LN.", cell="hmlstm",
                                             tied=True, layer_norm=True, n_layers=2)
#: registry name -> Table 4 row
TABLE4 = {"seqrnn": "GRU", "seqrnn_re": "GRU + RE", "seqrnn_ln": "GRU + LN", "seqrnn_re_ln": "GRU + RE + LN",
          "seqrnn_stack_re_ln": "Stacked GRU + RE + LN", "hmlstm_re_ln": "HM-LSTM + RE + LN"}
