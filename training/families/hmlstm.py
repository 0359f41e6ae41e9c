"""HM-LSTM: the hierarchical multiscale LSTM (Chung, Ahn & Bengio, ICLR 2017) as Villatel
et al. (RecSys 2018) use it ("HM-LSTM + RE + LN"): a stack of L >= 2 LSTM layers where layer
l > 1 is updated only when the layer below detects a boundary, and a layer is flushed (its
memory restarted) after it detected one itself. Used by ``training.families.seqrnn``
(embedding -> :class:`HMLSTM` -> tied / untied softmax output).

Equations (layer l = 1..L, h^0_t = x_t, z^0_t ≡ 1, H = ``hidden``)::

    a_t^l = U_l^l h_{t-1}^l + z_{t-1}^l · U_{l+1}^l h_{t-1}^{l+1}      (top-down; absent for l = L)
            + z_t^{l-1} · W_{l-1}^l h_t^{l-1}                           (bottom-up)
    s_t^l = LN(a_t^l) + b_l   (layer_norm)      s_t^l = a_t^l + b_l   (no layer_norm)
    [f, i, o] = σ(s[0:3H]),   g = tanh(s[3H:4H]),   z̃ = hard_sigm(slope · s[4H])
    hard_sigm(a) = clamp((a + 1) / 2, 0, 1)

    FLUSH  (z_{t-1}^l = 1):                     c = i⊙g,            h = o⊙tanh(c)
    UPDATE (z_{t-1}^l = 0, z_t^{l-1} = 1):      c = f⊙c_{t-1} + i⊙g, h = o⊙tanh(c)
    COPY   (z_{t-1}^l = 0, z_t^{l-1} = 0):      c, h, z = c_{t-1}, h_{t-1}, z_{t-1}
    z_t^l = 1[z̃ > 0.5] (= round(z̃)) outside COPY

``s`` holds 4H + 1 pre-activations (gates f, i, o, g, then the boundary) for l < L; the top
layer has no boundary detector (z^L ≡ 0: nothing above it to flush or to feed), so its
``s`` is 4H long and its z in the state stays all zeros.

Boundary gradient: straight-through (Chung et al. §3.3), in plain autograd as
``z = round(z̃) + (z̃ − z̃.detach())``: the forward value is exactly 0 / 1 and dz/ds[4H] is that
of hard_sigm(slope · s[4H]), i.e. slope / 2 where |slope · s[4H]| < 1 and 0 outside. The
modes are mixed with the float z as multiplicative masks (flush = z_{t-1}^l, update =
(1 − z_{t-1}^l) z_t^{l-1}, copy = (1 − z_{t-1}^l)(1 − z_t^{l-1})), so z also receives
gradient through the mode it selects, while a 0/1 mask reproduces each mode exactly (COPY
is bit-for-bit).

Layer normalisation (Ba et al. 2016) choice: one LN over the 4H + 1 (4H at the top) summed
pre-activations a_t^l of a layer, with a learned gain (init 1); the layer's bias b_l is LN's
additive parameter (init 0), so LN sits before the bias and there is no second, redundant
bias. (Ba et al.'s LN-LSTM normalises the recurrent and input terms separately and also c;
with HM-LSTM's three gated terms the sum is the one quantity always present.) eps = 1e-5.

Output module (Chung et al. §3, eq. 11)::

    g^l = σ(w^l · [h^1_t; ...; h^L_t])      (one scalar gate per layer, w^l ∈ R^{L·H})
    out_t = ReLU(Σ_l g^l W_l^e h^l_t)       (W_l^e: [out_dim, H], no bias)

Initialisation (:meth:`reset_parameters`, from a given generator or torch's global RNG):
cell weights W, U ~ U(±1/sqrt(H)) as ``torch.nn.LSTM``; output weights w^l, W_l^e ~
U(±1/sqrt(fan_in)) as ``torch.nn.Linear`` (fan_in = L·H and H); biases 0; LN gains 1.

Parameters (input size E, hidden H, L layers, output size D; r = 4H + 1, r_L = 4H;
LN adds one gain vector per layer)::

    layer 1:        r (E + 2H) + r [+ r]
    layer 1<l<L:    r (3H) + r [+ r]
    layer L:        r_L (2H) + r_L [+ r_L]
    output:         L (L H) + L D H

E = H = D = 100, L = 2, layer_norm: 121,102 + 80,800 + 20,400 = 222,302; with Villatel's
tied 37,483 x 100 item table that is 3.97 M, their Table 3 "HM-LSTM + RE + LN 4 M".

Shapes: ``forward`` runs over a whole [B, T] block (one Python loop over time; the
bottom-up projection of layer 1 is one matmul for all T); ``mask`` [B, T] (False = right
padding) leaves a row's state unchanged at that step.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-5


def _uniform_(t: torch.Tensor, bound: float, gen: torch.Generator | None) -> None:
    with torch.no_grad():
        t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1) * bound)


class HMLSTM(nn.Module):
    """The HM-LSTM stack + output module (module docstring). State: flat list
    ``[h_1, c_1, z_1, ..., h_L, c_L, z_L]``, h / c ``[n, hidden]``, z ``[n, 1]`` (0/1)."""

    def __init__(self, input_size: int, hidden: int, n_layers: int = 2, out_dim: int = 100,
                 layer_norm: bool = True):
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"n_layers must be >= 2 (HM-LSTM is a hierarchy), got {n_layers}")
        for name, v in (("input_size", input_size), ("hidden", hidden), ("out_dim", out_dim)):
            if v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        self.input_size, self.hidden, self.n_layers = input_size, hidden, n_layers
        self.out_dim, self.layer_norm = out_dim, layer_norm
        H, L = hidden, n_layers
        rows = [4 * H + 1] * (L - 1) + [4 * H]
        #: bottom-up W_{l-1}^l, recurrent U_l^l, top-down U_{l+1}^l (layers 1..L-1), bias b_l
        self.W_bu = nn.ParameterList(nn.Parameter(torch.empty(r, input_size if l == 0 else H))
                                     for l, r in enumerate(rows))
        self.U_rec = nn.ParameterList(nn.Parameter(torch.empty(r, H)) for r in rows)
        self.U_td = nn.ParameterList(nn.Parameter(torch.empty(r, H)) for r in rows[:-1])
        self.bias = nn.ParameterList(nn.Parameter(torch.empty(r)) for r in rows)
        self.ln_gain = nn.ParameterList(nn.Parameter(torch.empty(r)) for r in rows) if layer_norm else None
        #: output module: gate weights w^l (row l) and W_l^e
        self.gate_w = nn.Parameter(torch.empty(L, L * H))
        self.W_e = nn.Parameter(torch.empty(L, out_dim, H))
        self.reset_parameters()

    def reset_parameters(self, gen: torch.Generator | None = None) -> None:
        """Fresh weights from ``gen`` (None = torch's global RNG); see the module docstring."""
        k = 1.0 / math.sqrt(self.hidden)
        for l in range(self.n_layers):
            _uniform_(self.W_bu[l], k, gen)
            _uniform_(self.U_rec[l], k, gen)
            if l < self.n_layers - 1:
                _uniform_(self.U_td[l], k, gen)
            self.bias[l].data.zero_()
            if self.layer_norm:
                self.ln_gain[l].data.fill_(1.0)
        _uniform_(self.gate_w, 1.0 / math.sqrt(self.n_layers * self.hidden), gen)
        _uniform_(self.W_e, k, gen)

    def init_state(self, n: int, device=None) -> list[torch.Tensor]:
        """Flat list [h_1, c_1, z_1, h_2, c_2, z_2, ...]: h, c [n, hidden], z [n, 1], all zeros."""
        p = self.W_e
        dev = device if device is not None else p.device
        out = []
        for _ in range(self.n_layers):
            out += [torch.zeros(n, self.hidden, device=dev, dtype=p.dtype),
                    torch.zeros(n, self.hidden, device=dev, dtype=p.dtype),
                    torch.zeros(n, 1, device=dev, dtype=p.dtype)]
        return out

    def forward(self, x: torch.Tensor, state: list[torch.Tensor], mask: torch.Tensor | None = None,
                slope: float = 1.0, return_boundaries: bool = False, reset: torch.Tensor | None = None):
        """x [B, T, input_size] -> (out [B, T, out_dim], new_state) (+ z [B, T, n_layers] if
        ``return_boundaries``). Where ``mask`` [B, T] is False (right padding), row b's state
        is left unchanged at that step (the returned state is the state after each row's
        last real step); out and z there are arbitrary. Where ``reset`` [B, T] is True, row
        b's state is zeroed before step t (a new sequence starts there)."""
        L, H = self.n_layers, self.hidden
        if x.dim() != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"x must be [B, T, {self.input_size}], got {list(x.shape)}")
        if len(state) != 3 * L:
            raise ValueError(f"state must be a flat list of 3 * n_layers = {3 * L} tensors, got {len(state)}")
        B, T, _ = x.shape
        if mask is not None and tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must be [B, T] = [{B}, {T}], got {list(mask.shape)}")
        h, c, z = list(state[0::3]), list(state[1::3]), list(state[2::3])
        bu0 = x @ self.W_bu[0].t()  # layer 1's bottom-up term for all T at once
        one = x.new_ones(B, 1)
        hs, zs = [], []
        keep_t = None if reset is None else (~reset).to(x.dtype).unsqueeze(2)  # [B, T, 1]
        for t in range(T):
            if keep_t is not None:
                k = keep_t[:, t]
                h, c, z = [v * k for v in h], [v * k for v in c], [v * k for v in z]
            nh, nc, nz = [], [], []
            for l in range(L):
                a = h[l] @ self.U_rec[l].t()
                if l < L - 1:
                    a = a + (z[l] * h[l + 1]) @ self.U_td[l].t()
                if l == 0:
                    z_below = one
                    a = a + bu0[:, t]
                else:
                    z_below = nz[l - 1]
                    a = a + (z_below * nh[l - 1]) @ self.W_bu[l].t()
                if self.layer_norm:
                    s = F.layer_norm(a, a.shape[-1:], self.ln_gain[l], self.bias[l], LN_EPS)
                else:
                    s = a + self.bias[l]
                fio = torch.sigmoid(s[:, :3 * H])
                f, i, o = fio[:, :H], fio[:, H:2 * H], fio[:, 2 * H:]
                g = torch.tanh(s[:, 3 * H:4 * H])
                z_prev = z[l]
                copy = (1 - z_prev) * (1 - z_below)
                keep = 1 - copy
                c_cand = i * g + (1 - z_prev) * f * c[l]  # FLUSH: i⊙g; UPDATE: f⊙c + i⊙g
                nc.append(keep * c_cand + copy * c[l])
                nh.append(keep * (o * torch.tanh(c_cand)) + copy * h[l])
                if l < L - 1:
                    zt = torch.clamp((slope * s[:, 4 * H:] + 1) / 2, 0.0, 1.0)
                    z_new = (zt > 0.5).to(zt.dtype) + (zt - zt.detach())  # straight-through
                    nz.append(keep * z_new + copy * z_prev)
                else:
                    nz.append(z_prev)  # z^L ≡ 0
            if mask is not None:
                m = mask[:, t].unsqueeze(1)
                nh = [torch.where(m, a, b) for a, b in zip(nh, h)]
                nc = [torch.where(m, a, b) for a, b in zip(nc, c)]
                nz = [torch.where(m, a, b) for a, b in zip(nz, z)]
            h, c, z = nh, nc, nz
            hs.append(torch.stack(h, 1))  # [B, L, H]
            zs.append(torch.cat(z, 1))  # [B, L]
        hall = torch.stack(hs, 1) if T else x.new_zeros(B, 0, L, H)  # [B, T, L, H]
        gates = torch.sigmoid(hall.flatten(2) @ self.gate_w.t())  # [B, T, L]
        out = torch.relu(torch.einsum("btlh,ldh->btd", gates.unsqueeze(-1) * hall, self.W_e))
        new_state = [v for triple in zip(h, c, z) for v in triple]
        if return_boundaries:
            zall = torch.stack(zs, 1) if T else x.new_zeros(B, 0, L)
            return out, new_state, zall
        return out, new_state
