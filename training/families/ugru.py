"""User-based GRUs (Donkers, Loepp & Ziegler, RecSys 2017): a user embedding inside the GRU cell.

One family, three registered presets (``cell`` picks the user integration; ``--set cell=...``
changes it on any of them):

=====================================  ===============  ==================
their variant                          registry name    config
=====================================  ===============  ==================
Linear User-based GRU (§3.2.1)         ``ugru_linear``  ``cell=linear``
Rectified Linear User-based GRU        ``ugru_rect``    ``cell=rectified``
Attentional User-based GRU (§3.2.3)    ``ugru_attn``    ``cell=attentional``
=====================================  ===============  ==================

Notation (the paper's, with the parentheses that the typeset equations carry restored):
``h`` = h^{t-1} (n = ``hidden``), ``e = E_i i^t`` (the item's row of the item table, d =
``embedding``), ``v = E_v v^t`` (the user's row of the user table, also d wide), ``T_{k,l} x =
W x + b`` an affine map, σ the logistic sigmoid, ⊙ element-wise. The paper sets d = n (their
§3.2.1 "for notational simplicity"; §4.1.3 "the dimension equal to the hidden dimension");
here d and n may differ, so their ``T_{n,n}`` on an embedding is a d -> n map and ξ, κ live in R^d.

Output and loss (eq. 1 and §4.1.3): ``o^t = T_{n,|I|} h^t`` (W_o, b_o), softmax over ALL items,
cross-entropy against the next item.

**Linear** (eq. 3-5)::

    [u; r] = σ(T_{3n,2n} [h; e; v])                                   (3)   u first, then r
    k      = tanh(T_{n,n}(r ⊙ h) + T_{n,n} e + T_{n,n} v)            (4)
    h^t    = (1_n − u) ⊙ h + u ⊙ k                                    (5)

**Rectified linear** (eq. 6-7): thresholds from the previous state, the item and the user,
then a leaky filter on every component l of the user vector, and eq. 3-5 on the filtered ṽ::

    [κ1; κ2] = T_{3n,2n} [h; e; v]                                    (7)   κ1 first
    ṽ_l = 0          if v_l <  κ1_l
          ω · v_l    if κ1_l <= v_l < κ2_l                            (6)   ω = ``omega`` = 0.2
          v_l        otherwise (v_l >= κ2_l and v_l >= κ1_l)
    [u; r] = σ(T [h; e; ṽ]),  k = tanh(T(r ⊙ h) + T e + T ṽ),  h^t by (5)

Eq. 6 is written as an assignment (``E_v v_l ← ...``), so ṽ replaces v in both the gates (3)
(as their text says) and the state update (4). The thresholds see the unfiltered v (eq. 7).
Ties: eq. 6 leaves ``v_l = κ1_l`` to "else" (identity); here ``v_l = κ1_l`` takes the ω branch
and ``v_l = κ2_l`` the identity (a set of measure zero; only the open intervals are the
paper's). When κ2 <= κ1 there is no ω band: ṽ_l = 0 below κ1, v_l above.
Gradient of the thresholds: eq. 6 is a step function of κ, whose derivative is 0 almost
everywhere, so by autograd alone T_{3n,2n} of eq. 7 would never learn. The paper does not say
how it was learnt. Here the forward value is exactly eq. 6, and the backward pass is that of
the smooth gate ``s(v−κ1) (ω + (1 − ω) s(v−κ2))`` with ``s(x) = σ(x / τ)``, τ =
``kappa_temperature`` (straight-through: ``g = g_hard + g_soft − stop_grad(g_soft)``); τ = 0
gives the pure autograd gradient of eq. 6 (the thresholds then stay at their initial map).

**Attentional** (eq. 8-10)::

    ξ      = σ(T_{n,n} h + T_{n,n} e + T_{n,n} v)                      (8)
    [u; r] = σ(T_{3n,2n} [h; (1_n − ξ) ⊙ e; ξ ⊙ v])                    (9)
    k      = tanh(T(r ⊙ h) + T((1_n − ξ) ⊙ e) + T(ξ ⊙ v)),  h^t by (5)  (10)

"Parameters for the attention gate should be initialized with values close to zero such that
the network behaves similar to a standard GRU at the beginning": weights near zero alone give
ξ = σ(0) = 0.5 (half the item signal, half the user's: not a standard GRU), so the stated
purpose is followed: the gate's weights are drawn from U(−``attn_init_scale``,
``attn_init_scale``) = U(−0.001, 0.001) and its bias is ``attn_bias_init`` = −5, so ξ ≈ σ(−5) ≈
0.007 ≈ 0 at initialisation: (1 − ξ) ⊙ e ≈ e and ξ ⊙ v ≈ 0, a plain GRU on the items.

Parameterisation: each sum of affine maps above (eq. 4, 7, 8, 10, and eq. 3 / 9 read as one
map on the concatenation) is one weight block per input and ONE bias (a sum of biases is one
bias): gates ``W_h [n, 2n]``, ``W_i [d, 2n]``, ``W_v [d, 2n]``, ``b_g [2n]``; candidate
``U_h [n, n]``, ``U_i [d, n]``, ``U_v [d, n]``, ``b_k [n]``; rectified ``K_h [n, 2d]``, ``K_i``,
``K_v [d, 2d]``, ``b_kappa [2d]``; attentional ``A_h [n, d]``, ``A_i``, ``A_v [d, d]``, ``b_xi
[d]`` (row vectors: ``x @ W``). Item table ``E_i [|I|, d]``, user table ``E_v [|Y|, d]``,
output ``W_o [|I|, n]`` and ``b_o [|I|]``.

**Users.** The user table holds one row per user id of the training table (sorted ids, kept in
the checkpoint as the buffer ``user_ids`` next to ``E_v``), so evaluation and the serving
pyfunc (``start_session(state, mask, users)`` with the request's ``user_id``) look a known
user up by id with no training data at hand. **Fallback:** a user id that is not in the table
(unseen in training), ``-1`` (anonymous) or no user at all gets the **mean user embedding**
(the unweighted mean of the table's rows). Training sessions without a user id are sequences
of their own with that (detached) mean. Fine-tuning (``--init-from``) keeps every
pre-trained user row; users new in the fine-tuning table start from the pre-trained mean
(their fallback), so they begin where serving would have put them (``init_optimizer=carry`` is
then refused: those rows have no optimizer state).

The evaluation loop steps every event that has a next one in its session; the LAST click of
each session is fed at ``end_session`` (the scorer's ``wants_last_item``), so in user mode the
state carried to the user's next session has every click, as in training.

**Sequences and scoring.** Training: each user's events in time order (their sessions by
start time, concatenated: ``training.families.seqrnn.user_sequences``), laid out user-parallel
by ``training.batching.stream_windows`` (a row takes the next user as soon as its user ends,
the state zeroed there) and cut into windows of ``window`` = 20 steps, the paper's "unfold
dimension": truncated BPTT with the state carried from one window to the next. Every pair of
consecutive events of a user is a training pair, across session boundaries too (the paper
has no sessions: one sequence per user). Evaluation (``evaluation.loop``): in user mode
(``--mode user``) a slot walks one user: the history sessions (training table) first,
unscored, then the test sessions; the state is carried across that user's sessions and
zeroed for a new user (and at every session of an anonymous row). In session mode every
session starts from h = 0 but still with the user's embedding when the user id is given.

**Regularisation.** Dropout (their §4.1.3: "keep probability of 0.8 for item and 0.5 for user
vectors") on e and on v (inverted dropout, training only). L2 "on user side ... contribution
weight 0.01" as Adam's (coupled) ``weight_decay`` on the user parameters only
(``Family.param_groups``): the gradient gets ``user_l2 · θ``, i.e. the penalty
``(user_l2 / 2) ‖θ‖²`` (= ``user_l2 · tf.nn.l2_loss``); the trainer clips the data gradient
before the optimizer adds it. "User parameters" (``user_l2_params``): ``all`` = the user table
``E_v`` and every weight block that multiplies the user vector (``W_v``, ``U_v``, ``K_v``,
``A_v``); ``embedding`` = ``E_v`` only. Every other parameter gets ``weight_decay`` (0).

Config keys (defaults, and where each comes from):

* ``cell`` linear | rectified | attentional (the preset's; §3.2.1-3.2.3)
* ``hidden`` 1000 (Table 1 "Hidden Units 1000"), ``embedding`` 1000 (§4.1.3: equal to hidden)
* ``window`` 20 (Table 1 "Unfold Dimension 20": steps per truncated-BPTT window)
* ``batch_size`` 1000 (Table 1), ``n_epochs`` 10 (Table 1 "Iterations 10", §4.1.3)
* ``optimizer`` adam, ``learning_rate`` 0.001 (Table 1, §4.1.3), ``grad_clip`` 5.0 (Table 1
  "Gradient Cap 5.0": the global norm)
* ``item_keep`` 0.8, ``user_keep`` 0.5 (Table 1 "Dropout 0.8", "User Dropout 0.5"; §4.1.3)
* ``user_l2`` 0.01 (§4.1.3), ``user_l2_params`` all | embedding (ours: "user side" read as all
  user-input weights), ``weight_decay`` 0 on the rest
* ``omega`` 0.2 (§4.1.3, rectified only)
* ``init_scale`` 0.1 (§4.1.3: weights and biases from U(−0.1, 0.1); the embedding tables too)
* ``attn_init_scale`` 0.001, ``attn_bias_init`` −5.0 (ours; see Attentional above)
* ``kappa_temperature`` 0.1 (ours; see Rectified above; 0 = no threshold gradient)

Train / evaluate / serve::

    python -m training.train --model ugru_attn --data SPLIT_DIR --out RUN_DIR [--set hidden=100]
    python -m evaluation.evaluate --model-dir RUN_DIR --data SPLIT_DIR --out EVAL_DIR --mode user
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.batching import stream_windows
from training.config import ConfigError, TrainConfig, config_from_dict
from training.data import SessionData
from training.families.seqrnn import user_sequences
from training.family import Family, TrainContext, generator
from training.scoring import SessionScorerBase

CELLS = ("linear", "rectified", "attentional")
L2_SCOPES = ("all", "embedding")


@dataclass
class UGRUConfig(TrainConfig):
    """Donkers et al. (2017) user-based GRU: linear / rectified linear / attentional user
    integration, softmax cross-entropy over all items (defaults: their Table 1 and §4.1.3)."""

    model: str = "ugru_linear"
    #: user integration: linear (eq. 3-5) | rectified (eq. 6-7) | attentional (eq. 8-10)
    cell: str = "linear"
    #: n, the GRU state (Table 1: 1000)
    hidden: int = 1000
    #: d, item and user embedding width (§4.1.3: equal to the hidden dimension)
    embedding: int = 1000
    #: steps per truncated-BPTT window (Table 1 "Unfold Dimension": 20)
    window: int = 20
    #: rows of the user-parallel stream (Table 1: 1000)
    batch_size: int = 1000
    n_epochs: int = 10
    optimizer: str = "adam"
    learning_rate: float = 0.001
    #: global gradient-norm clip (Table 1 "Gradient Cap": 5.0)
    grad_clip: float = 5.0
    #: dropout keep probability on the item embedding (Table 1 "Dropout": 0.8)
    item_keep: float = 0.8
    #: dropout keep probability on the user embedding (Table 1 "User Dropout": 0.5)
    user_keep: float = 0.5
    #: L2 (Adam weight_decay) on the user parameters only (§4.1.3: 0.01)
    user_l2: float = 0.01
    #: which parameters are "user side": all (E_v and every weight on the user vector) | embedding (E_v)
    user_l2_params: str = "all"
    #: rectified cell: leak ω of eq. 6 (§4.1.3: 0.2)
    omega: float = 0.2
    #: rectified cell: temperature of the surrogate threshold gradient (ours; 0 = exact eq. 6 gradient)
    kappa_temperature: float = 0.1
    #: every weight, bias and embedding from U(-init_scale, init_scale) (§4.1.3: 0.1)
    init_scale: float = 0.1
    #: attentional cell: gate weights from U(-s, s) (their "close to zero"; ours: 0.001)
    attn_init_scale: float = 0.001
    #: attentional cell: gate bias at init, so that ξ = σ(bias) ≈ 0 (ours: -5, ξ ≈ 0.007)
    attn_bias_init: float = -5.0

    def __post_init__(self):
        m = self.model
        for key, val, choices in (("cell", self.cell, CELLS), ("user_l2_params", self.user_l2_params, L2_SCOPES)):
            if val not in choices:
                raise ConfigError(f"{m}: {key} {val!r}: choose {' | '.join(choices)}")
        for key in ("hidden", "embedding", "window", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{m}: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("item_keep", "user_keep"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise ConfigError(f"{m}: {key} (a keep probability) must be in (0, 1], got {getattr(self, key)}")
        if not 0.0 < self.omega < 1.0:
            raise ConfigError(f"{m}: omega must be in (0, 1) (eq. 6), got {self.omega}")
        for key in ("kappa_temperature", "user_l2", "init_scale", "attn_init_scale"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{m}: {key} must be >= 0, got {getattr(self, key)}")


# ----------------------------------------------------------------------------- the cells
def rectify(v: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, omega: float,
            temperature: float = 0.0) -> torch.Tensor:
    """Eq. 6: ``v`` where ``v >= κ2`` (and ``>= κ1``), ``ω v`` where ``κ1 <= v < κ2``, 0 where
    ``v < κ1``. The forward value is exactly that; with ``temperature > 0`` (and autograd on)
    the gradient is that of the smooth gate σ((v−κ1)/τ)(ω + (1−ω)σ((v−κ2)/τ)) (module
    docstring), so the thresholds can learn."""
    g = (v >= k1).to(v.dtype) * (omega + (1.0 - omega) * (v >= k2).to(v.dtype))
    if temperature > 0 and torch.is_grad_enabled() and (v.requires_grad or k1.requires_grad or k2.requires_grad):
        soft = torch.sigmoid((v - k1) / temperature) * (omega + (1.0 - omega) * torch.sigmoid((v - k2) / temperature))
        g = g + (soft - soft.detach())
    return v * g


class UserGRUCell(nn.Module):
    """The three user-based GRU cells (module docstring); row vectors, ``x @ W``."""

    #: weight blocks that multiply the user vector (the "user side" besides E_v)
    USER_BLOCKS = ("W_v", "U_v", "K_v", "A_v")

    def __init__(self, embedding: int, hidden: int, cell: str, omega: float = 0.2,
                 kappa_temperature: float = 0.0):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell {cell!r}: choose {' | '.join(CELLS)}")
        d, n = embedding, hidden
        self.cell, self.hidden, self.embedding = cell, n, d
        self.omega, self.kappa_temperature = float(omega), float(kappa_temperature)
        z = lambda *s: nn.Parameter(torch.zeros(*s))  # noqa: E731
        self.W_h, self.W_i, self.W_v, self.b_g = z(n, 2 * n), z(d, 2 * n), z(d, 2 * n), z(2 * n)  # eq. 3 [u | r]
        self.U_h, self.U_i, self.U_v, self.b_k = z(n, n), z(d, n), z(d, n), z(n)  # eq. 4
        if cell == "rectified":  # eq. 7 [κ1 | κ2]
            self.K_h, self.K_i, self.K_v, self.b_kappa = z(n, 2 * d), z(d, 2 * d), z(d, 2 * d), z(2 * d)
        if cell == "attentional":  # eq. 8
            self.A_h, self.A_i, self.A_v, self.b_xi = z(n, d), z(d, d), z(d, d), z(d)

    def user_blocks(self) -> list[nn.Parameter]:
        return [getattr(self, k) for k in self.USER_BLOCKS if hasattr(self, k)]

    def attention_params(self) -> list[nn.Parameter]:
        return [self.A_h, self.A_i, self.A_v] if self.cell == "attentional" else []

    def precompute(self, e: torch.Tensor, v: torch.Tensor) -> tuple:
        """The parts of a step that do not depend on h, for all steps at once (``[..., T, *]``)."""
        if self.cell == "linear":
            return (e @ self.W_i + v @ self.W_v + self.b_g, e @ self.U_i + v @ self.U_v + self.b_k)
        if self.cell == "rectified":
            return (e @ self.K_i + v @ self.K_v + self.b_kappa, e @ self.W_i + self.b_g, e @ self.U_i + self.b_k)
        return (e @ self.A_i + v @ self.A_v + self.b_xi,)

    def step(self, pre: tuple, e: torch.Tensor, v: torch.Tensor, h: torch.Tensor):
        """One step: ``pre`` = this step's slice of :meth:`precompute`, e / v [B, d], h [B, n] ->
        (h^t, aux) with aux = {} (linear), {"kappa1", "kappa2", "v_filtered"} (rectified) or
        {"xi"} (attentional)."""
        aux: dict = {}
        if self.cell == "linear":
            gx, kx = pre
        elif self.cell == "rectified":
            kap = pre[0] + h @ self.K_h  # eq. 7
            k1, k2 = kap.chunk(2, -1)
            vf = rectify(v, k1, k2, self.omega, self.kappa_temperature)  # eq. 6
            gx, kx = pre[1] + vf @ self.W_v, pre[2] + vf @ self.U_v
            aux = {"kappa1": k1, "kappa2": k2, "v_filtered": vf}
        else:
            xi = torch.sigmoid(pre[0] + h @ self.A_h)  # eq. 8
            ef, vf = (1.0 - xi) * e, xi * v
            gx = ef @ self.W_i + vf @ self.W_v + self.b_g  # eq. 9
            kx = ef @ self.U_i + vf @ self.U_v + self.b_k  # eq. 10 (input part)
            aux = {"xi": xi}
        u, r = torch.sigmoid(gx + h @ self.W_h).chunk(2, -1)  # eq. 3 / 9
        k = torch.tanh(kx + (r * h) @ self.U_h)  # eq. 4 / 10
        return (1.0 - u) * h + u * k, aux  # eq. 5

    def one_step(self, e: torch.Tensor, v: torch.Tensor, h: torch.Tensor):
        """:meth:`step` with its own :meth:`precompute` (e / v [B, d], h [B, n])."""
        return self.step(self.precompute(e, v), e, v, h)


class UserGRU(nn.Module):
    """Item table + user table (keyed by ``user_ids``) -> user-based GRU cell -> affine output over
    all items (eq. 1); THE model."""

    def __init__(self, n_items: int, user_ids: np.ndarray | torch.Tensor, cfg: UGRUConfig):
        super().__init__()
        ids = torch.as_tensor(np.asarray(user_ids), dtype=torch.int64)
        if ids.dim() != 1 or (len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all())):
            raise ValueError("user_ids must be a sorted 1-D array of distinct ids")
        self.n_items = n_items
        d, n = cfg.embedding, cfg.hidden
        self.E_i = nn.Parameter(torch.zeros(n_items, d))
        self.E_v = nn.Parameter(torch.zeros(len(ids), d))
        self.register_buffer("user_ids", ids)
        self.cell = UserGRUCell(d, n, cfg.cell, cfg.omega, cfg.kappa_temperature)
        self.W_o = nn.Parameter(torch.zeros(n_items, n))
        self.b_o = nn.Parameter(torch.zeros(n_items))
        self.item_drop = nn.Dropout(1.0 - cfg.item_keep) if cfg.item_keep < 1 else nn.Identity()
        self.user_drop = nn.Dropout(1.0 - cfg.user_keep) if cfg.user_keep < 1 else nn.Identity()

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    def init_state(self, n: int, device=None) -> torch.Tensor:
        return torch.zeros(n, self.cell.hidden, device=device, dtype=self.W_o.dtype)

    def mean_user(self) -> torch.Tensor:
        """The fallback embedding: the mean of the user table's rows (zeros for an empty table)."""
        if self.n_users == 0:
            return torch.zeros(self.E_v.shape[1], dtype=self.E_v.dtype, device=self.E_v.device)
        return self.E_v.detach().mean(0)

    def user_rows(self, users: torch.Tensor) -> torch.Tensor:
        """User ids -> rows of ``E_v``; -1 for ids not in the table (and for ids < 0)."""
        users = users.to(self.user_ids.device, torch.int64)
        if self.n_users == 0:
            return torch.full_like(users, -1)
        pos = torch.searchsorted(self.user_ids, users).clamp(max=self.n_users - 1)
        found = (self.user_ids[pos] == users) & (users >= 0)
        return torch.where(found, pos, torch.full_like(pos, -1))

    def user_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of ``E_v`` (any shape of row indices); row -1 -> the mean user embedding."""
        v = F.embedding(rows.clamp(min=0), self.E_v)
        if bool((rows < 0).any()):
            v = torch.where((rows >= 0).unsqueeze(-1), v, self.mean_user().to(v.dtype))
        return v

    def forward(self, items: torch.Tensor, user_rows: torch.Tensor, h: torch.Tensor,
                mask: torch.Tensor | None = None, reset: torch.Tensor | None = None):
        """items, user_rows [B, T] (row -1 = mean user), h [B, n] -> (states [B, T, n], last state).
        ``mask`` False: the step leaves the state as it was (padding); ``reset`` True: the state
        is zeroed before the step (a new user's sequence starts there)."""
        e = self.item_drop(F.embedding(items, self.E_i))
        v = self.user_drop(self.user_vectors(user_rows))
        pre = self.cell.precompute(e, v)
        keep = None if reset is None else (~reset).to(h.dtype).unsqueeze(2)
        outs = []
        for t in range(items.shape[1]):
            if keep is not None:
                h = h * keep[:, t]
            h_new, _ = self.cell.step(tuple(p[:, t] for p in pre), e[:, t], v[:, t], h)
            if mask is not None:
                h_new = torch.where(mask[:, t, None], h_new, h)
            h = h_new
            outs.append(h)
        return torch.stack(outs, 1), h

    def scores(self, out: torch.Tensor) -> torch.Tensor:
        """Eq. 1: o = W_o h + b_o over all items."""
        return out @ self.W_o.t() + self.b_o


def user_event_sequences(data: SessionData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(items, offsets, user id of every event) of the training sequences: each user's sessions in
    time order concatenated (``seqrnn.user_sequences``; a session without a user, -1, is a
    sequence of its own)."""
    items, offsets = user_sequences(data, "user")
    ev_user = np.repeat(np.asarray(data.user_ids, np.int64), np.diff(data.offsets))
    users, offs_u = user_sequences(dataclasses.replace(data, items=ev_user), "user")  # same order
    assert np.array_equal(offs_u, offsets)
    return items, offsets, users


# ----------------------------------------------------------------------------- scorer
class UGRUScorer(SessionScorerBase):
    """State = [h [n, hidden], the user id each row last started (-2: none), the row's user
    vector [n, d]]. User mode carries h across sessions of the same user id (>= 0), session
    mode zeroes it at every session; both use the user's embedding (or the mean)."""

    wants_mode = True  # the evaluation loop says which mode it runs (begin(..., mode=))

    def __init__(self, model: UserGRU, device: torch.device):
        self.model = model.to(device).eval()
        self.device = device
        self.n_items = model.n_items
        self.mode = "session"
        self._mean: torch.Tensor | None = None

    def begin(self, n_slots: int, mode: str = "session"):
        self.mode = mode
        m = self.model
        return [m.init_state(n_slots, self.device),
                torch.full((n_slots,), -2, dtype=torch.int64, device=self.device),
                self._mean_user().expand(n_slots, -1).clone()]

    def select(self, state, rows):
        return [s.index_select(0, rows) for s in state]

    @torch.no_grad()
    def start_session(self, state, slots, users):
        h, last, uvec = state
        if users is None:
            users = torch.full_like(last, -1)
        users = users.to(last.device, torch.int64)
        reset = slots
        if self.mode == "user":
            reset = slots & ~((users >= 0) & (users == last))
        last = torch.where(slots, users, last)
        idx = torch.nonzero(slots.to(last.device)).squeeze(1)
        if idx.numel():  # only the starting rows; the mean (fallback) once per weights / dtype
            m = self.model
            rows = m.user_rows(users[idx])
            v = F.embedding(rows.clamp(min=0), m.E_v)
            if bool((rows < 0).any()):
                v = torch.where((rows >= 0).unsqueeze(1), v, self._mean_user().to(v.dtype))
            uvec = uvec.clone()
            uvec[idx] = v.to(uvec.dtype)
        return [h * (~reset).unsqueeze(1).to(h.dtype), last, uvec]

    def _mean_user(self) -> torch.Tensor:
        """``model.mean_user()`` computed once (the scorer's weights do not change; a change of
        dtype or device, e.g. ``model.double()``, recomputes it)."""
        E = self.model.E_v
        if self._mean is None or self._mean.dtype != E.dtype or self._mean.device != E.device:
            self._mean = self.model.mean_user()
        return self._mean

    @torch.no_grad()
    def step(self, state, items):
        h, last, uvec = state
        m = self.model
        e = F.embedding(items.to(self.device), m.E_i)
        h, _ = m.cell.one_step(e, uvec, h)
        return m.scores(h).float(), [h, last, uvec]

    wants_last_item = True  # one sequence per user: a session's last click is an input in training

    @torch.no_grad()
    def end_session(self, state, slots, last_items=None):
        """User mode: the ending rows take their session's last click into h (the user's
        sequence goes on); session mode resets at every start anyway."""
        if last_items is None or self.mode != "user":
            return state
        h, last, uvec = state
        e = F.embedding(last_items.to(self.device), self.model.E_i)
        nh, _ = self.model.cell.one_step(e, uvec, h)
        return [torch.where(slots.to(self.device).unsqueeze(1), nh, h), last, uvec]


# ----------------------------------------------------------------------------- family
@dataclass
class UGRUBatch:
    """A ``stream_windows`` window ``[B, T]`` with the user row of every cell (-1: mean user)."""

    inputs: np.ndarray
    targets: np.ndarray
    reset: np.ndarray
    user_rows: np.ndarray


class UGRUFamily(Family):
    name = "ugru_linear"
    Config = UGRUConfig

    @classmethod
    def eval_mode(cls, cfg) -> str:
        return "user"  # the hidden state runs on across a user's sessions

    def __init__(self, cfg: UGRUConfig, ctx: TrainContext):
        super().__init__(cfg, ctx)
        data = ctx.data
        if data.user_ids is None or not (data.user_ids >= 0).any():
            raise ConfigError(f"{cfg.model}: training table {cfg.train_table!r} has no user ids; the "
                              "user-based GRU needs them (a session model, e.g. seqrnn, does not)")
        users = np.unique(data.user_ids[data.user_ids >= 0])
        self.model = UserGRU(ctx.index.n_items, users, cfg).to(ctx.device)
        self._items, self._offsets, self._ev_user = user_event_sequences(data)
        self._carry: torch.Tensor | None = None

    def init_weights(self, gen: torch.Generator) -> None:
        c, m = self.cfg, self.model
        with torch.no_grad():
            for _, p in m.named_parameters():  # §4.1.3: U(-0.1, 0.1) for all weights and biases
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 * c.init_scale - c.init_scale)
            for p in m.cell.attention_params():  # their "close to zero"
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 * c.attn_init_scale - c.attn_init_scale)
            if m.cell.cell == "attentional":
                m.cell.b_xi.fill_(c.attn_bias_init)  # ξ ≈ σ(attn_bias_init) ≈ 0

    def load_weights(self, state_dict: dict) -> None:
        """Load a checkpoint; its user table may differ from this training table's users
        (fine-tuning on train_recent_k): every pre-trained user keeps its row, a user new here
        starts from the pre-trained mean user embedding (the serving fallback). New users and
        ``init_optimizer=carry`` are refused (their rows have no optimizer state)."""
        sd = dict(state_dict)
        old_ids = sd["user_ids"].to(torch.int64).cpu()
        old_tab = sd["E_v"]
        cur = self.model.user_ids.cpu()
        ids = torch.from_numpy(np.union1d(old_ids.numpy(), cur.numpy()).astype(np.int64))
        if not torch.equal(ids, old_ids):
            if getattr(self.cfg, "init_optimizer", "reset") == "carry":
                raise ConfigError(
                    f"{self.cfg.model}: init_optimizer=carry: {self.cfg.train_table!r} has "
                    f"{len(ids) - len(old_ids)} user(s) the pre-trained run has no row (and no optimizer "
                    "state) for; fine-tune with init_optimizer=reset")
            mean = old_tab.mean(0) if len(old_ids) else torch.zeros(old_tab.shape[1], dtype=old_tab.dtype)
            tab = mean.expand(len(ids), -1).clone()
            tab[torch.searchsorted(ids, old_ids)] = old_tab
            sd["user_ids"], sd["E_v"] = ids, tab
        m = self.model
        if not torch.equal(sd["user_ids"], cur):
            dev = m.E_v.device
            m.E_v = nn.Parameter(torch.zeros(sd["E_v"].shape, dtype=m.E_v.dtype, device=dev))
            m.user_ids = torch.zeros(len(sd["user_ids"]), dtype=torch.int64, device=dev)
        m.load_state_dict(sd)

    def param_groups(self) -> list[dict]:
        m, c = self.model, self.cfg
        user = [m.E_v] + (m.cell.user_blocks() if c.user_l2_params == "all" else [])
        ids = {id(p) for p in user}
        rest = [p for p in m.parameters() if id(p) not in ids and p.requires_grad and p.numel()]
        return [{"params": rest, "weight_decay": c.weight_decay},
                {"params": [p for p in user if p.numel()], "weight_decay": c.user_l2}]

    def batches(self, epoch: int):
        c = self.cfg
        gen = generator(c.seed, epoch)
        n_seq = len(self._offsets) - 1
        order = torch.randperm(n_seq, generator=gen).numpy()
        self._carry = None
        # user row + 1 of every event (0 = no user / unknown: the mean), streamed through the same
        # schedule as the items (same offsets and order, so the same cells)
        rows = self.model.user_rows(torch.from_numpy(self._ev_user)).cpu().numpy()
        code = rows + 1
        for bi, bu in zip(stream_windows(self._items, self._offsets, order, c.batch_size, c.window),
                          stream_windows(code, self._offsets, order, c.batch_size, c.window)):
            yield UGRUBatch(bi.inputs, bi.targets, bi.reset, bu.inputs - 1)

    def loss(self, b: UGRUBatch):
        dev = self.ctx.device
        mask_np = b.targets >= 0
        if self._carry is None or self._carry.shape[0] != b.inputs.shape[0]:
            self._carry = self.model.init_state(b.inputs.shape[0], dev)
        # rows whose users have all run out never become active again: skip them
        act = np.flatnonzero(mask_np.any(1))
        if len(act) == 0:
            return None
        a = torch.from_numpy(act).to(dev)
        x = torch.from_numpy(b.inputs[act]).to(dev)
        y = torch.from_numpy(b.targets[act]).to(dev)
        u = torch.from_numpy(b.user_rows[act]).to(dev)
        mask = y >= 0
        reset = torch.from_numpy(b.reset[act]).to(dev)
        out, h = self.model(x, u, self._carry.index_select(0, a), mask, reset)
        carry = self._carry.clone()
        carry[a] = h.detach()
        self._carry = carry
        n = int(mask.sum())
        return F.cross_entropy(self.model.scores(out[mask]), y[mask]), n

    @classmethod
    def scorer(cls, ckpt: dict, device: torch.device):
        cfg = config_from_dict(ckpt["config"])
        sd = ckpt["state_dict"]
        model = UserGRU(int(ckpt["item_index"]["item_id"].shape[0]), sd["user_ids"].numpy(), cfg)
        model.load_state_dict(sd)
        return UGRUScorer(model, device)


# ----------------------------------------------------------------------------- presets
@dataclass
class UGRURectConfig(UGRUConfig):
    """Rectified linear user-based GRU (eq. 6-7)."""

    model: str = "ugru_rect"
    cell: str = "rectified"


@dataclass
class UGRUAttnConfig(UGRUConfig):
    """Attentional user-based GRU (eq. 8-10)."""

    model: str = "ugru_attn"
    cell: str = "attentional"


class UGRURectFamily(UGRUFamily):
    name = "ugru_rect"
    Config = UGRURectConfig


class UGRUAttnFamily(UGRUFamily):
    name = "ugru_attn"
    Config = UGRUAttnConfig


#: registry name -> the paper's name of the variant (their Table 2)
VARIANTS = {"ugru_linear": "Linear User-based GRU", "ugru_rect": "Rectified Linear User-based GRU",
            "ugru_attn": "Attentional User-based GRU"}
