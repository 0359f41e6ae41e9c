"""Improved RNNs for session-based recommendations (Tan, Xu & Liu, DLRS 2016): M1, M3, M4.

One module, four registry names (``--set`` changes any key):

===============  =====  ==================================================================
registry name    paper  what
===============  =====  ==================================================================
``tan``          M1     embedding -> GRU -> fully connected softmax over all items;
                        prefix augmentation, click deletion, truncation at 19 inputs.
                        M2 = ``tan`` fine-tuned with ``--init-from`` on ``train_recent_<k>``
                        (the trainer's fine-tuning, nothing family-specific)
``tan_teacher``  M3     ``tan`` with ``reverse=true``: trained on the reversed future of
                        every prefix (the privileged sequences of their §3.4)
``tan_distill``  M3     an M1 student with the soft labels of a trained ``tan_teacher``
                        (``teacher_run``): loss (1-λ)·CE(label) + λ·CE(teacher)
``tan_emb``      M4     predicts the next item's embedding (fixed, from a trained ``tan``
                        run: ``item_embeddings_from``), cosine loss, ranks by cosine
===============  =====  ==================================================================

Model (their Figure 1; §4.1: 50-d trainable item embeddings, one GRU layer of 100 units)::

    e_t = W_I[x_t];   h_t = GRU(e_t, h_{t-1}), h_0 = 0;   scores = W_O h_t + b_O  (softmax)

The GRU is ``torch.nn.GRU`` (cuDNN form: the reset gate multiplies ``W_hh h + b_hh``; Keras 1,
which they used, applies it before the recurrent product and uses a hard sigmoid for the
gates; neither is stated in the paper). Initialisation as Keras 1's defaults: embedding
U(-0.05, 0.05), input weights Glorot uniform per gate, recurrent weights orthogonal per gate,
output Glorot uniform, biases 0. Parameters: n·E + 3·(E·H + H² + 2H) + n·(H + 1); their Table 2
count (5,705,384 for H = 100 on 37,483 items; 42,548,684 for H = 1000) is this with n + 1 rows
(a padding row) and Keras' single GRU bias: ours + 151 - 3H (tests/training/test_tan.py).

Training examples (their §3.1-3.2, Figure 3)
--------------------------------------------
Each training session is processed on its own (not session-parallel). Every epoch:

1. **Click deletion** (``click_dropout`` = 25 %, their "embedding dropout ... equivalent to a
   preprocessing step that randomly deletes clicks"): every click of every training sequence
   is deleted independently with that probability, drawn from
   ``training.family.generator(seed, epoch)`` (a new draw each epoch, exact ``--resume``).
   Reading of §3.2 / Figure 3: deletion is a *preprocessing of the session*, applied before
   the prefixes are made, so a deleted click is neither an input of any prefix nor a label
   ("shorter, pruned sequences are being generated"); the labels are the clicks that remain.
   A sequence left with fewer than 2 clicks (no (prefix, label) pair) is kept whole for that
   epoch, so no sequence ever drops out of an epoch. ("different clicks are dropped in each
   sequence for every training epoch" is read as: each session gets its own draw, every
   epoch; independent draws per prefix would need every prefix materialised, O(L²).)
2. **Prefix augmentation** (their §3.2, after de Brébisson et al.): every prefix
   ``[s_1..s_k] -> s_{k+1}``, k = 1..L-1, of the pruned sequence ``s`` is a training example,
   **truncated to its last** ``max_len`` (19) **inputs**, run from a zero state. Without
   materialising the prefixes: all prefixes with k <= max_len share the hidden states of ONE
   pass over ``s_1..s_min(L-1, max_len)`` (a GRU's output after k inputs depends on those k
   inputs only), so that row is scored at every position. A prefix with k > max_len starts at
   ``s_{k-max_len+1}`` from a zero state, which is not a state of that pass: it gets its own
   row (the window ``s_{k-max_len+1}..s_k``) scored at its last position only. The result is
   exactly the paper's set of truncated prefixes, each once (tested against one prefix at a
   time); sessions longer than max_len + 1 (1 % of RSC15's) cost max_len steps per extra prefix.
3. Mini-batches hold about ``batch_size`` (512) **examples** (their batch = 512 training
   sequences = prefixes): sequences are shuffled and taken in order, a sequence going to the
   batch where its first example falls (a batch can end one sequence past batch_size). Loss:
   the mean over the batch's examples, every (prefix, label) pair weighing the same.
   (``session_order`` is not used: the sequences are shuffled every epoch.)

Softmax (``softmax``): ``full`` (the paper's) = cross-entropy over all items; ``sampled`` = the
batch's targets plus ``n_sample`` shared negatives ∝ support^``sample_alpha`` with the logQ
correction (as ``training.baselines.coevent``), row-sparse gradients and the lazy Adam of
``training.optim``, for large catalogues. Adam, lr 0.001 (Keras' default: the paper gives
none). Early stopping is the trainer's (their "10 % of the training data as the validation
set"): ``--set train_table=train early_stop_patience=2`` (not a default: the DAG trains final
models on ``train_full``, which holds ``valid``).

Scoring (``eval_history``): ``window`` (default) scores every test prefix as it was trained:
its last ``max_len`` inputs from a zero state (their test sequences were prefixes processed
the same way); the scorer steps the GRU one event at a time and, once a session is longer
than max_len, re-runs its last max_len inputs from zero. ``full``: the whole session's state
carried (``training.scoring.RNNScorer``), what a stateful GRU would do.

M3: privileged information (their §3.4)
---------------------------------------
For a prefix ``[x_1..x_r]`` with label ``x_{r+1}`` of a session of n clicks, the privileged
sequence is ``x* = [x_n, x_{n-1}, ..., x_{r+2}]`` (the future, reversed) with the SAME label.
Every such x* is a prefix of ``z = [x_n, ..., x_2]`` (the reversed session without its first
click), and its label is z's next element: so the teacher (``tan_teacher``, ``reverse=true``)
is an M1 trained on the sequences z, with M1's click deletion, augmentation and truncation;
its examples are exactly the (x*, x_{r+1}) pairs for r = 1..n-2 (x_1 is never a label: no
student prefix predicts it; r = n-1 has an empty x*).

Student (``tan_distill``): per example, (1-λ)·CE(M(x), x_{r+1}) + λ·CE(M(x)/T, softmax(M*(x*)/T))
(λ = ``distill_lambda`` = 0.2, T = ``temperature`` = 1; CE(p, q) = -Σ q log softmax(p); no T²
factor, which the paper does not have). x* is the future in the ORIGINAL session ("n is the
length of the original session before our preprocessing"): not pruned by the student's click
deletion, truncated to the teacher's own max_len (its nearest future clicks). Labels whose
future is empty (the session's last click: x* = []) get the hard label only (λ = 0 for them:
the teacher never saw an empty input). The teacher is frozen, run on the fly per batch (one
row per session covering the futures of up to max_len, plus a window per longer future), so
the soft labels are never held beyond one batch ([examples, n_items]). Full softmax only.

Lineage: ``teacher_run`` stays in the student's config; the family fills ``teacher_digest``
(``training.checkpoint.weights_digest`` of the teacher checkpoint) in place when it is built,
before the trainer writes ``config.json`` and every checkpoint, so the student's run records
which teacher it used (and MLflow logs it as a param). A digest already set (``--resume``,
``--init-from``, ``--set``) must match the teacher file, else the build fails.

M4: embedding output (their §3.5)
---------------------------------
GRU output -> fully connected hidden layer (``emb_hidden`` units, tanh; "we added a fully
connected hidden layer ... improved the model's stability") -> linear to a d-vector, d = the
embedding size of the ``tan`` run named by ``item_embeddings_from``, whose item table ``W_I``
is copied once and kept FIXED (a buffer, never trained). Loss: 1 - cos(prediction, E[label]),
mean over the examples (same examples as M1). Inputs use the same fixed table (one item table
in the model, as their Table 2's M4 count has: the trainable part is the GRU and the two
layers). Scores = cosine between the prediction and every item's embedding. ``emb_hidden`` =
200 = 2H: Table 2's M4 counts fit 2H² + 106H + 50 beyond the table and GRU, i.e. a 2H-unit
hidden layer and the d = 50 output (2H² + 102H + 50) plus 4H unexplained (the activation is
not stated; tanh here). ``item_embeddings_digest`` records the source as ``teacher_digest`` does.

Train / evaluate::

    python -m training.train --model tan --data SPLIT_DIR --out M1 --set train_table=train --set early_stop_patience=2
    python -m training.train --model tan --data SPLIT_DIR --out M2 --init-from M1 --set train_table=train_recent_64
    python -m training.train --model tan_teacher --data SPLIT_DIR --out T
    python -m training.train --model tan_distill --data SPLIT_DIR --out M3 --set teacher_run=T
    python -m training.train --model tan_emb --data SPLIT_DIR --out M4 --set item_embeddings_from=M1
    python -m evaluation.evaluate --model-dir M3 --data SPLIT_DIR --out EVAL_DIR
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import checkpoint as ck
from training.batching import PAD_INPUT, SampleStore
from training.config import ConfigError, TrainConfig, config_from_dict
from training.family import Family, TrainContext, gather_rows, generator, glorot_
from training.losses import xe_loss
from training.scoring import RNNScorer

SOFTMAX = ("full", "sampled")
EVAL_HISTORY = ("window", "full")


@dataclass
class TanConfig(TrainConfig):
    """Tan et al. (2016) M1: GRU, softmax over all items, prefix augmentation, click deletion.

    Every prefix truncated to its last 19 inputs; per-sequence mini-batches of 512 examples."""

    model: str = "tan"
    #: item embedding size (their 50) and GRU units (their 100 or 1000)
    embedding: int = 50
    hidden: int = 100
    #: inputs kept per prefix: the last max_len (their BPTT truncation at 19 steps)
    max_len: int = 19
    #: probability of deleting each click of a training sequence, re-drawn every epoch
    click_dropout: float = 0.25
    #: full (softmax over all items) | sampled (batch targets + n_sample negatives, logQ)
    softmax: str = "full"
    n_sample: int = 2048
    sample_alpha: float = 0.5
    #: train on the reversed futures [x_n..x_2] of the sessions (the M3 teacher)
    reverse: bool = False
    #: window: score each test prefix from its last max_len inputs (as trained) | full: carry
    #: the whole session's state
    eval_history: str = "window"
    #: (prefix, label) examples per mini-batch (their 512)
    batch_size: int = 512
    learning_rate: float = 0.001

    def __post_init__(self):
        m = self.model
        for key, val, choices in (("softmax", self.softmax, SOFTMAX),
                                  ("eval_history", self.eval_history, EVAL_HISTORY)):
            if val not in choices:
                raise ConfigError(f"{m}: {key} {val!r}: choose {' | '.join(choices)}")
        for key in ("embedding", "hidden", "max_len", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{m}: {key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.click_dropout < 1.0:
            raise ConfigError(f"{m}: click_dropout must be in [0, 1), got {self.click_dropout}")
        if self.n_sample < 0 or self.sample_alpha < 0:
            raise ConfigError(f"{m}: n_sample and sample_alpha must be >= 0")


@dataclass
class TanTeacherConfig(TanConfig):
    """Tan et al. (2016) M3 teacher: an M1 trained on the reversed futures of the prefixes."""

    model: str = "tan_teacher"
    reverse: bool = True


@dataclass
class TanDistillConfig(TanConfig):
    """Tan et al. (2016) M3 student: an M1 also fitted to a tan_teacher's soft labels.

    The teacher reads each prefix's privileged sequence (its future, reversed)."""

    model: str = "tan_distill"
    #: run dir (or model.pt) of a trained tan_teacher; required
    teacher_run: str = ""
    #: weights_digest of that checkpoint: filled when the student is built (lineage), checked
    #: against the file when already set
    teacher_digest: str = ""
    #: λ: weight of the teacher's soft labels
    distill_lambda: float = 0.2
    #: T: softmax temperature of both teacher and student in the soft-label term
    temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        m = self.model
        if not 0.0 <= self.distill_lambda <= 1.0:
            raise ConfigError(f"{m}: distill_lambda must be in [0, 1], got {self.distill_lambda}")
        if not self.temperature > 0:
            raise ConfigError(f"{m}: temperature must be > 0, got {self.temperature}")
        if self.softmax != "full":
            raise ConfigError(f"{m}: softmax={self.softmax!r}: distillation needs the full softmax "
                              "(the soft labels are over all items)")
        if self.reverse:
            raise ConfigError(f"{m}: reverse=true makes a teacher; the student reads the sessions forward")


@dataclass
class TanEmbConfig(TanConfig):
    """Tan et al. (2016) M4: predicts the next item's fixed embedding; cosine loss and ranking."""

    model: str = "tan_emb"
    #: run dir (or model.pt) of a trained tan (M1) run whose item table is the fixed embedding; required
    item_embeddings_from: str = ""
    #: weights_digest of that checkpoint: filled when built, checked when already set
    item_embeddings_digest: str = ""
    #: units of the fully connected hidden layer between the GRU and the embedding output
    emb_hidden: int = 200

    def __post_init__(self):
        super().__post_init__()
        m = self.model
        if self.emb_hidden < 1:
            raise ConfigError(f"{m}: emb_hidden must be >= 1, got {self.emb_hidden}")
        if self.softmax != "full":
            raise ConfigError(f"{m}: softmax={self.softmax!r}: tan_emb has no softmax (cosine loss)")
        if self.reverse:
            raise ConfigError(f"{m}: reverse=true is for the M3 teacher, not tan_emb")


# ----------------------------------------------------------------------------- models
class _TanBase(nn.Module):
    """Item table -> one GRU layer -> ``head`` (identity for M1); subclasses give the item
    table (``input_table``), ``head`` and ``all_scores``."""

    def __init__(self, n_items: int, embedding: int, hidden: int):
        super().__init__()
        self.n_items = n_items
        self.gru = nn.GRU(embedding, hidden, batch_first=True)

    def init_state(self, n: int, device=None) -> list[torch.Tensor]:
        return [torch.zeros(n, self.gru.hidden_size, device=device, dtype=self.gru.weight_hh_l0.dtype)]

    def reset_gru(self, gen: torch.Generator) -> None:
        """Keras 1 GRU defaults: Glorot-uniform input weights and orthogonal recurrent weights
        per gate, zero biases."""
        g, H, E = self.gru, self.gru.hidden_size, self.gru.input_size
        with torch.no_grad():
            for k in range(3):
                glorot_(g.weight_ih_l0[k * H:(k + 1) * H], E, H, gen)
                nn.init.orthogonal_(g.weight_hh_l0[k * H:(k + 1) * H], generator=gen)
            g.bias_ih_l0.zero_()
            g.bias_hh_l0.zero_()

    def head(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def forward(self, items: torch.Tensor, state: list[torch.Tensor], lengths: torch.Tensor | None = None,
                sparse: bool = False):
        """items [n] (one event per row: the scorer) or [B, T] (right-padded rows of
        ``lengths`` real inputs, packed so the GRU never runs on padding) -> (outputs [n, D] /
        [B, T, D] (padding positions hold zeros), state after each row's last real input)."""
        step = items.dim() == 1
        x = gather_rows(self.input_table, items[:, None] if step else items, sparse)
        h0 = state[0].unsqueeze(0)
        if lengths is None:
            out, hn = self.gru(x, h0)
        else:
            T = x.shape[1]
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, hn = self.gru(packed, h0)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        out = self.head(out)
        return (out[:, 0] if step else out), [hn[0]]


class TanRNN(_TanBase):
    """M1 (and the M3 teacher and student): softmax output layer with bias over all items."""

    def __init__(self, n_items: int, embedding: int, hidden: int):
        super().__init__(n_items, embedding, hidden)
        self.W_I = nn.Parameter(torch.zeros(n_items, embedding))
        self.W_O = nn.Parameter(torch.zeros(n_items, hidden))
        self.b_O = nn.Parameter(torch.zeros(n_items))

    @property
    def input_table(self) -> torch.Tensor:
        return self.W_I

    def reset_parameters(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            self.W_I.copy_(torch.rand(self.W_I.shape, generator=gen) * 0.1 - 0.05)  # Keras "uniform"
            glorot_(self.W_O, self.W_O.shape[1], self.n_items, gen)  # Dense(n_items) on H inputs
            self.b_O.zero_()
        self.reset_gru(gen)

    def all_scores(self, out: torch.Tensor, cols: torch.Tensor | None = None, sparse: bool = False) -> torch.Tensor:
        """Logits [N, n_items] (or of the items ``cols`` only, [N, len(cols)])."""
        if cols is None:
            return out @ self.W_O.t() + self.b_O
        return out @ gather_rows(self.W_O, cols, sparse).t() + gather_rows(self.b_O, cols, sparse)


class TanEmbRNN(_TanBase):
    """M4: fixed item table E (buffer) -> GRU -> tanh hidden layer -> linear d-vector; scores
    = cosine with every item's embedding."""

    def __init__(self, n_items: int, embedding: int, hidden: int, emb_hidden: int):
        super().__init__(n_items, embedding, hidden)
        self.register_buffer("E", torch.zeros(n_items, embedding))
        self.fc = nn.Linear(hidden, emb_hidden)
        self.proj = nn.Linear(emb_hidden, embedding)

    @property
    def input_table(self) -> torch.Tensor:
        return self.E

    def reset_parameters(self, gen: torch.Generator) -> None:
        with torch.no_grad():
            for lin in (self.fc, self.proj):
                glorot_(lin.weight, lin.in_features, lin.out_features, gen)
                lin.bias.zero_()
        self.reset_gru(gen)

    def head(self, out: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.fc(out)))

    def all_scores(self, out: torch.Tensor) -> torch.Tensor:
        """cos(prediction, E_j) for every item j, [N, n_items]."""
        return F.normalize(out, dim=-1) @ F.normalize(self.E, dim=-1).t()


# ----------------------------------------------------------------------------- examples
def delete_clicks(offsets: np.ndarray, p: float, gen: torch.Generator) -> np.ndarray:
    """Keep-mask [n_events] of the clicks of the sequences ``offsets``: each deleted
    independently with probability ``p`` (from ``gen``); a sequence that would keep fewer
    than 2 clicks is kept whole."""
    n = int(offsets[-1])
    if p <= 0 or n == 0:
        return np.ones(n, bool)
    keep = (torch.rand(n, generator=gen) >= p).numpy()
    lens = np.diff(offsets)
    seq = np.repeat(np.arange(len(lens)), lens)
    kept = np.bincount(seq, weights=keep, minlength=len(lens))
    return keep | (kept < 2)[seq]


@dataclass
class PrefixRows:
    """Right-padded rows ``inputs`` [R, T] (``lengths`` real inputs each) whose GRU outputs at
    (``row``, ``col``) are the states of the requested prefixes, [N] each."""

    inputs: np.ndarray
    lengths: np.ndarray
    row: np.ndarray
    col: np.ndarray


def prefix_rows(items: np.ndarray, offsets: np.ndarray, seq: np.ndarray, k: np.ndarray, max_len: int) -> PrefixRows:
    """Rows for the prefixes ``items[offsets[seq_j] : offsets[seq_j] + k_j]`` (k_j >= 1),
    each truncated to its last ``max_len`` inputs and run from a zero state: one row per
    sequence for its prefixes of k <= max_len (its first max(k) inputs, read at column k-1)
    and one row of max_len inputs per prefix with k > max_len (read at its last column)."""
    seq, k = np.asarray(seq, np.int64), np.asarray(k, np.int64)
    head = k <= max_len
    hseq, inv = np.unique(seq[head], return_inverse=True)
    hlen = np.zeros(len(hseq), np.int64)
    np.maximum.at(hlen, inv, k[head])
    win = np.flatnonzero(~head)
    start = np.concatenate([offsets[hseq], offsets[seq[win]] + k[win] - max_len]).astype(np.int64)
    length = np.concatenate([hlen, np.full(len(win), max_len, np.int64)])
    row = np.empty(len(k), np.int64)
    row[head] = inv
    row[win] = len(hseq) + np.arange(len(win))
    col = np.where(head, k - 1, max_len - 1)
    T = int(length.max()) if len(length) else 0
    j = np.arange(T)
    valid = j < length[:, None]
    inputs = np.where(valid, items[np.minimum(start[:, None] + j, max(len(items) - 1, 0))], PAD_INPUT)
    return PrefixRows(inputs.astype(np.int64), length, row, col)


@dataclass
class TanBatch:
    """One mini-batch of N (prefix, label) examples."""

    rows: PrefixRows  # the prefixes' inputs
    targets: np.ndarray  # [N] label item_idx
    session: np.ndarray  # [N] the example's sequence (= session row of ctx.data)
    label_pos: np.ndarray  # [N] 0-based position of the label in its original (unpruned) sequence
    negatives: torch.Tensor | None = None  # sampled softmax: shared negatives [n_sample]
    teacher: PrefixRows | None = None  # tan_distill: the privileged sequences of the examples in
    has_teacher: np.ndarray | None = None  # [N] bool: the label has a non-empty future


def _outputs(model: _TanBase, rows: PrefixRows, device, sparse: bool = False) -> torch.Tensor:
    """The model's outputs at the requested prefixes, [N, D]."""
    x = torch.from_numpy(rows.inputs).to(device)
    out, _ = model(x, model.init_state(x.shape[0], device), torch.from_numpy(rows.lengths), sparse)
    return out[torch.from_numpy(rows.row).to(device), torch.from_numpy(rows.col).to(device)]


def reversed_futures(data_items: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(items, offsets) of ``z = [x_n, ..., x_2]`` for every session ``x`` (length n - 1):
    the prefix of length k of z is the privileged sequence of the label at position n - k."""
    lens = np.diff(offsets)
    zl = np.maximum(lens - 1, 0)
    zoff = np.r_[0, np.cumsum(zl)].astype(np.int64)
    seq = np.repeat(np.arange(len(lens)), zl)
    j = np.arange(int(zoff[-1])) - zoff[seq]  # position in z
    return data_items[offsets[seq + 1] - 1 - j], zoff


# ----------------------------------------------------------------------------- scorer
class WindowScorer(RNNScorer):
    """Scores every prefix from its last ``max_len`` inputs and a zero state (how the model
    was trained): one GRU step per event while a session has at most max_len events, then the
    last max_len inputs re-run from zero. State: [h, last max_len inputs, inputs seen]."""

    def __init__(self, model: _TanBase, device: torch.device, max_len: int, mixed_precision: bool = False):
        super().__init__(model, device, mixed_precision)
        self.max_len = max_len

    def begin(self, n_slots: int):
        z = torch.zeros(n_slots, dtype=torch.int64, device=self.device)
        return self.model.init_state(n_slots, self.device) + [
            torch.zeros(n_slots, self.max_len, dtype=torch.int64, device=self.device), z]

    def select(self, state, rows):
        return [s.index_select(0, rows) for s in state]

    def start_session(self, state, slots, users):
        h, buf, cnt = state
        keep = ~slots
        return [h * keep.unsqueeze(1).to(h.dtype), buf, cnt * keep]

    @torch.no_grad()
    def step(self, state, items):
        h, buf, cnt = state
        items = items.to(self.device)
        buf = torch.cat([buf[:, 1:], items[:, None]], 1)
        cnt = cnt + 1
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out, (h,) = self.model(items, [h])
            long = torch.nonzero(cnt > self.max_len).squeeze(1)
            if len(long):
                o_w, (h_w,) = self.model(buf[long], self.model.init_state(len(long), self.device))
                out = out.index_copy(0, long, o_w[:, -1].to(out.dtype))
                h = h.index_copy(0, long, h_w.to(h.dtype))
            scores = self.model.all_scores(out)
        return scores.float(), [h.float(), buf, cnt]


# ----------------------------------------------------------------------------- families
def _load_source(path: str, key: str, model: str, ctx: TrainContext, allowed: tuple[str, ...]) -> dict:
    """The checkpoint named by config key ``key``, of one of the ``allowed`` families and of the
    same item index as this run (ConfigError otherwise)."""
    if not path:
        raise ConfigError(f"{model}: {key} is required (a trained {' | '.join(allowed)} run dir or model.pt)")
    try:
        src = ck.load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{model}: {key}={path!r}: {e}") from None
    if src["model"] not in allowed:
        raise ConfigError(f"{model}: {key}={path!r} is a {src['model']!r} checkpoint, not {' | '.join(allowed)}")
    ids = src["item_index"]["item_id"].numpy()
    if not np.array_equal(ids, ctx.index.item_ids):
        raise ConfigError(f"{model}: {key}={path!r} has another item index ({len(ids)} items) than this run "
                          f"({ctx.index.n_items}): train both on the same SPLIT_DIR")
    return src


def _check_digest(cfg, key: str, src: dict) -> None:
    """Fill ``cfg.<key>`` with the source's weights digest in place, or check it."""
    digest = ck.weights_digest(src)
    have = getattr(cfg, key)
    if have and have != digest:
        raise ConfigError(f"{cfg.model}: {key} {have[:12]}... does not match the checkpoint's "
                          f"{digest[:12]}...: the source run changed since this run was configured")
    setattr(cfg, key, digest)


class TanFamily(Family):
    name = "tan"
    Config = TanConfig

    def __init__(self, cfg: TanConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        self.model = self.build_model(ctx.index.n_items, cfg).to(ctx.device)
        d = ctx.data
        self._items, self._offsets = reversed_futures(d.items, d.offsets) if cfg.reverse else (d.items, d.offsets)
        self.sampled = cfg.softmax == "sampled"
        self._logp = torch.log(torch.tensor(np.maximum(ctx.support, 1), dtype=torch.float32)).to(ctx.device)

    @classmethod
    def build_model(cls, n_items: int, cfg) -> _TanBase:
        return TanRNN(n_items, cfg.embedding, cfg.hidden)

    def init_weights(self, gen: torch.Generator) -> None:
        self.model.reset_parameters(gen)

    # ---- examples
    def epoch_sequences(self, epoch: int, gen: torch.Generator | None = None):
        """(order, items, offsets, positions) of the epoch: the sequence order, and the
        sequences after click deletion (``positions``: each kept click's 0-based position in
        its original sequence). ``gen`` = ``generator(seed, epoch)`` unless given."""
        gen = generator(self.cfg.seed, epoch) if gen is None else gen
        n_seq = len(self._offsets) - 1
        order = torch.randperm(n_seq, generator=gen).numpy()
        keep = delete_clicks(self._offsets, self.cfg.click_dropout, gen)
        lens = np.diff(self._offsets)
        seq = np.repeat(np.arange(n_seq), lens)
        pos = (np.arange(len(seq)) - self._offsets[seq])[keep]
        offs = np.r_[0, np.cumsum(np.bincount(seq[keep], minlength=n_seq))].astype(np.int64)
        return order, self._items[keep], offs, pos

    def batches(self, epoch: int):
        c, dev = self.cfg, self.ctx.device
        gen = generator(c.seed, epoch)
        order, items, offs, pos = self.epoch_sequences(epoch, gen)
        n_ex = np.maximum(np.diff(offs) - 1, 0)[order]
        order, n_ex = order[n_ex > 0], n_ex[n_ex > 0]
        first = np.cumsum(n_ex) - n_ex  # index of each sequence's first example in the epoch
        bid = first // c.batch_size
        cuts = np.flatnonzero(np.r_[True, bid[1:] != bid[:-1]])
        store = None
        if self.sampled and c.n_sample > 0 and len(cuts):
            store = SampleStore(self.ctx.support, c.n_sample, c.sample_alpha,
                                min(10_000_000, len(cuts) * c.n_sample), gen, dev)
        for a, b in zip(cuts, np.r_[cuts[1:], len(order)]):
            s, n = order[a:b], n_ex[a:b]
            seq = np.repeat(s, n)
            k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n) + 1  # prefix lengths 1..L-1
            ev = offs[seq] + k  # the label: the (k+1)-th kept click
            batch = TanBatch(rows=prefix_rows(items, offs, seq, k, c.max_len), targets=items[ev],
                             session=seq, label_pos=pos[ev],
                             negatives=store.take(1)[0] if store is not None else None)
            yield self.add_teacher(batch)

    def add_teacher(self, batch: TanBatch) -> TanBatch:
        return batch

    # ---- loss
    def outputs(self, b: TanBatch) -> torch.Tensor:
        return _outputs(self.model, b.rows, self.ctx.device, self.sampled)

    def loss(self, b: TanBatch):
        h = self.outputs(b)
        y = torch.from_numpy(b.targets).to(self.ctx.device)
        N = int(y.shape[0])
        if not self.sampled:
            return F.cross_entropy(self.model.all_scores(h), y), N
        # columns = the examples' targets (row r's target is column r) + shared negatives
        cols = y if b.negatives is None else torch.cat([y, b.negatives])
        if cols.shape[0] < 2:
            return None
        R = self.model.all_scores(h, cols, sparse=True)
        w = torch.ones(cols.shape[0], device=R.device)
        if b.negatives is not None:  # targets ∝ support, negatives ∝ support^alpha
            w[N:] = self.cfg.sample_alpha
        return xe_loss(R, self._logp[cols] * w) / N, N

    # ---- evaluation
    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        cfg = config_from_dict(ckpt["config"])
        model = cls.build_model(int(ckpt["item_index"]["item_id"].shape[0]), cfg)
        model.load_state_dict(ckpt["state_dict"])
        if cfg.eval_history == "full":
            return RNNScorer(model, device, cfg.eval_mixed_precision)
        return WindowScorer(model, device, cfg.max_len, cfg.eval_mixed_precision)


class TanTeacherFamily(TanFamily):
    """M3 teacher: ``tan`` on the reversed futures (its scorer reads sessions forward like any
    other, so its evaluation on ``test`` measures nothing the paper uses it for)."""

    name = "tan_teacher"
    Config = TanTeacherConfig


class TanDistillFamily(TanFamily):
    name = "tan_distill"
    Config = TanDistillConfig
    source_runs = {"teacher_run": ("tan_teacher", "tan")}

    def __init__(self, cfg: TanDistillConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        src = _load_source(cfg.teacher_run, "teacher_run", cfg.model, ctx, self.source_runs["teacher_run"])
        tcfg = config_from_dict(src["config"], f"teacher_run {cfg.teacher_run}")
        if not tcfg.reverse:
            raise ConfigError(f"{cfg.model}: teacher_run={cfg.teacher_run!r} was not trained on reversed "
                              "futures (reverse=false): train it as tan_teacher")
        _check_digest(cfg, "teacher_digest", src)
        self.teacher = TanRNN(ctx.index.n_items, tcfg.embedding, tcfg.hidden)
        self.teacher.load_state_dict(src["state_dict"])
        self.teacher.to(ctx.device).eval().requires_grad_(False)
        self.teacher_max_len = tcfg.max_len
        d = ctx.data
        self._z_items, self._z_offsets = reversed_futures(d.items, d.offsets)
        self._n = np.diff(d.offsets)

    def add_teacher(self, b: TanBatch) -> TanBatch:
        """Rows of the teacher's privileged sequences: the label at position i of a session of
        n clicks has the future of n - 1 - i clicks (none for the last click)."""
        k = self._n[b.session] - 1 - b.label_pos
        has = k >= 1
        if has.any():
            b.teacher = prefix_rows(self._z_items, self._z_offsets, b.session[has], k[has], self.teacher_max_len)
        b.has_teacher = has
        return b

    @torch.no_grad()
    def soft_labels(self, b: TanBatch) -> torch.Tensor | None:
        """softmax(M*(x*) / T) [examples with a future, n_items] (None when none has one)."""
        if b.teacher is None:
            return None
        logits = self.teacher.all_scores(_outputs(self.teacher, b.teacher, self.ctx.device))
        return torch.softmax(logits / self.cfg.temperature, dim=1)

    def loss(self, b: TanBatch):
        c = self.cfg
        logits = self.model.all_scores(self.outputs(b))
        y = torch.from_numpy(b.targets).to(self.ctx.device)
        per = F.cross_entropy(logits, y, reduction="none")
        q = self.soft_labels(b)
        if q is not None:
            idx = torch.from_numpy(np.flatnonzero(b.has_teacher)).to(self.ctx.device)
            soft = -(q * torch.log_softmax(logits[idx] / c.temperature, dim=1)).sum(1)
            per = per.index_put((idx,), (1 - c.distill_lambda) * per[idx] + c.distill_lambda * soft)
        return per.mean(), int(y.shape[0])


class TanEmbFamily(TanFamily):
    name = "tan_emb"
    Config = TanEmbConfig
    source_runs = {"item_embeddings_from": ("tan", "tan_distill")}

    def __init__(self, cfg: TanEmbConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        src = _load_source(cfg.item_embeddings_from, "item_embeddings_from", cfg.model, ctx,
                           self.source_runs["item_embeddings_from"])
        E = src["state_dict"]["W_I"]
        if E.shape[1] != cfg.embedding:
            raise ConfigError(f"{cfg.model}: item_embeddings_from={cfg.item_embeddings_from!r} has {E.shape[1]}-d "
                              f"embeddings; set embedding={E.shape[1]}")
        _check_digest(cfg, "item_embeddings_digest", src)
        with torch.no_grad():
            self.model.E.copy_(E)

    @classmethod
    def build_model(cls, n_items: int, cfg) -> _TanBase:
        return TanEmbRNN(n_items, cfg.embedding, cfg.hidden, cfg.emb_hidden)

    def loss(self, b: TanBatch):
        pred = self.outputs(b)
        y = torch.from_numpy(b.targets).to(self.ctx.device)
        return (1 - F.cosine_similarity(pred, self.model.E[y], dim=1)).mean(), int(y.shape[0])
