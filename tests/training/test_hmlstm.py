"""HM-LSTM (training/families/hmlstm.py) against the equations of Chung et al. (2017).

Every expected number is computed here from the equations in the module docstring with
explicitly set weights (matmuls written out in the test, or a slow per-row loop with the
three modes as if/else), never with the module's own code. Modes are forced through the
boundary biases: ±50 on the boundary pre-activation puts z̃ at exactly 1 / 0.
"""
import math

import pytest
import torch

from training.families.hmlstm import HMLSTM

torch.set_num_threads(1)

E, H = 3, 2  # input size, hidden size of the hand-built models
BIG = 50.0


def sig(v):
    return 1 / (1 + torch.exp(-v))


def pre(a, bias, gain=None):
    """s = a + b, or LN(a) with gain and the bias as LN's shift (eps 1e-5, biased variance)."""
    if gain is None:
        return a + bias
    mu = a.mean(-1, keepdim=True)
    var = ((a - mu) ** 2).mean(-1, keepdim=True)
    return (a - mu) / torch.sqrt(var + 1e-5) * gain + bias


def gates(s):
    """[f, i, o, g] from the first 4H pre-activations."""
    return sig(s[..., 0:H]), sig(s[..., H:2 * H]), sig(s[..., 2 * H:3 * H]), torch.tanh(s[..., 3 * H:4 * H])


def filled(shape, scale, phase):
    """Explicit, deterministic small weights: scale * sin(1 + phase + 0.7 k), k = 0, 1, ..."""
    n = math.prod(shape)
    return scale * torch.sin(1.0 + phase + 0.7 * torch.arange(n, dtype=torch.float32)).reshape(shape)


def hand_model(n_layers=2, layer_norm=False, out_dim=2, boundary=()):
    """Model with hand-set weights; ``boundary[l]`` = bias of layer l's boundary unit."""
    m = HMLSTM(E, H, n_layers, out_dim, layer_norm)
    with torch.no_grad():
        for l in range(n_layers):
            m.W_bu[l].copy_(filled(m.W_bu[l].shape, 0.4, 10 * l))
            m.U_rec[l].copy_(filled(m.U_rec[l].shape, 0.3, 10 * l + 3))
            if l < n_layers - 1:
                m.U_td[l].copy_(filled(m.U_td[l].shape, 0.5, 10 * l + 5))
            m.bias[l].copy_(filled(m.bias[l].shape, 0.2, 10 * l + 7))
            if layer_norm:
                m.ln_gain[l].copy_(1 + filled(m.ln_gain[l].shape, 0.3, 10 * l + 8))
        for l, v in enumerate(boundary):
            m.bias[l][4 * H] = v
        m.gate_w.copy_(filled(m.gate_w.shape, 0.6, 40))
        m.W_e.copy_(filled(m.W_e.shape, 0.8, 50))
    return m


def hand_state(n_layers, z_prev, c_scale=1.0):
    """One-row state: h, c with distinct values, z^l_{t-1} = z_prev[l] (top: 0)."""
    st = []
    for l in range(n_layers):
        st += [filled((1, H), 0.7, 20 + l), c_scale * filled((1, H), 1.5, 30 + l),
               torch.tensor([[float(z_prev[l]) if l < n_layers - 1 else 0.0]])]
    return st


X1 = torch.tensor([[[0.5, -1.0, 0.8]]])  # [B=1, T=1, E]


def s_of(m, l, state, h_below_t, z_below_t, layer_norm):
    """s_t^l by hand: U_l^l h_{t-1}^l + z_{t-1}^l U_{l+1}^l h_{t-1}^{l+1} + z_t^{l-1} W h_t^{l-1} + b."""
    L = m.n_layers
    h, z = state[3 * l], state[3 * l + 2]
    a = h @ m.U_rec[l].detach().t() + z_below_t * (h_below_t @ m.W_bu[l].detach().t())
    if l < L - 1:
        a = a + z * (state[3 * (l + 1)] @ m.U_td[l].detach().t())
    return pre(a, m.bias[l].detach(), m.ln_gain[l].detach() if layer_norm else None)


# ---- construction ------------------------------------------------------------------------
def test_one_layer_is_refused():
    with pytest.raises(ValueError, match="n_layers"):
        HMLSTM(E, H, n_layers=1)


def param_formula(E_, H_, L, D, ln):
    r, rL = 4 * H_ + 1, 4 * H_
    k = 2 if ln else 1  # bias (+ LN gain)
    first = r * (E_ + 2 * H_) + k * r
    middle = (L - 2) * (r * 3 * H_ + k * r)
    top = rL * 2 * H_ + k * rL
    return first + middle + top + L * L * H_ + L * D * H_


@pytest.mark.parametrize("E_,H_,L,D,ln", [(100, 100, 2, 100, True), (7, 5, 3, 4, False), (7, 5, 4, 6, True)])
def test_parameter_count(E_, H_, L, D, ln):
    m = HMLSTM(E_, H_, L, D, ln)
    assert sum(p.numel() for p in m.parameters()) == param_formula(E_, H_, L, D, ln)


def test_villatel_size():
    """Villatel Table 3: HM-LSTM + RE + LN with the tied 37,483 x 100 table is "4 M"."""
    n = param_formula(100, 100, 2, 100, True)
    assert n == 222_302
    assert round((n + 37_483 * 100) / 1e6, 1) == 4.0


def test_shapes_and_zero_state():
    m = HMLSTM(E, 4, n_layers=3, out_dim=5)
    st = m.init_state(6)
    assert len(st) == 9
    for l in range(3):
        assert st[3 * l].shape == (6, 4) and st[3 * l + 1].shape == (6, 4) and st[3 * l + 2].shape == (6, 1)
        assert all(not t.any() for t in st)
    out, new, z = m(torch.randn(6, 7, E), st, return_boundaries=True)
    assert out.shape == (6, 7, 5) and z.shape == (6, 7, 3)
    assert [t.shape for t in new] == [t.shape for t in st]
    assert (out >= 0).all()  # ReLU output
    assert len(m(torch.randn(6, 7, E), st)) == 2


def test_reset_parameters_uses_the_generator():
    a, b = HMLSTM(E, H, 2, 3), HMLSTM(E, H, 2, 3)
    a.reset_parameters(torch.Generator().manual_seed(5))
    b.reset_parameters(torch.Generator().manual_seed(5))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    b.reset_parameters(torch.Generator().manual_seed(6))
    assert not torch.equal(a.W_bu[0], b.W_bu[0]) and not torch.equal(a.W_e, b.W_e)
    assert (a.ln_gain[0] == 1).all() and not a.bias[0].any()
    assert a.U_rec[1].abs().max() <= 1 / math.sqrt(H)


# ---- the three modes -----------------------------------------------------------------------
@pytest.mark.parametrize("layer_norm", [False, True])
def test_copy_keeps_c_h_z_bit_for_bit(layer_norm):
    """z^1_t = 0 -> layer 2 COPY (its own boundary unit says 1, yet z stays 0) -> layer 3 COPY."""
    m = hand_model(3, layer_norm, boundary=(-BIG, BIG))
    st = hand_state(3, z_prev=(0, 0))
    _, new, z = m(X1, st, return_boundaries=True)
    assert z[0, 0].tolist() == [0.0, 0.0, 0.0]
    for k in range(3, 9):  # h, c, z of layers 2 and 3
        assert torch.equal(new[k], st[k]), k
    assert not torch.equal(new[0], st[0])  # layer 1 did update


@pytest.mark.parametrize("layer_norm", [False, True])
def test_flush_forgets_the_old_memory(layer_norm):
    """z^1_{t-1} = 1 -> layer 1 FLUSH: c = i⊙g, h = o⊙tanh(c), with the top-down term on."""
    m = hand_model(2, layer_norm, boundary=(BIG,))
    st = hand_state(2, z_prev=(1,), c_scale=100.0)  # a large old c that must not leak in
    _, new, z = m(X1, st, return_boundaries=True)
    s1 = s_of(m, 0, st, X1[:, 0], 1.0, layer_norm)
    f, i, o, g = gates(s1)
    c1 = i * g
    h1 = o * torch.tanh(c1)
    torch.testing.assert_close(new[1], c1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(new[0], h1, rtol=1e-6, atol=1e-7)
    assert z[0, 0, 0] == 1.0 and new[2].item() == 1.0
    # layer 2: z^1_t = 1 -> UPDATE with the new h^1 as input
    s2 = s_of(m, 1, st, h1, 1.0, layer_norm)
    f2, i2, o2, g2 = gates(s2)
    c2 = f2 * st[4] + i2 * g2
    torch.testing.assert_close(new[4], c2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(new[3], o2 * torch.tanh(c2), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_update_is_the_lstm_step(layer_norm):
    """z^1_{t-1} = 0 (top-down gated off), z^0 = 1 -> layer 1 UPDATE; z^1_t = 0 -> layer 2 COPY."""
    m = hand_model(2, layer_norm, boundary=(-BIG,))
    st = hand_state(2, z_prev=(0,), c_scale=3.0)
    _, new, z = m(X1, st, return_boundaries=True)
    h1_old, c1_old = st[0], st[1]
    a = h1_old @ m.U_rec[0].detach().t() + X1[:, 0] @ m.W_bu[0].detach().t()  # no U_2^1 h^2 term
    s1 = pre(a, m.bias[0].detach(), m.ln_gain[0].detach() if layer_norm else None)
    f, i, o, g = gates(s1)
    c1 = f * c1_old + i * g
    torch.testing.assert_close(new[1], c1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(new[0], o * torch.tanh(c1), rtol=1e-6, atol=1e-7)
    assert z[0, 0, 0] == 0.0
    assert torch.equal(new[3], st[3]) and torch.equal(new[4], st[4])


def test_output_module_by_hand():
    m = hand_model(2, True, out_dim=4, boundary=(BIG,))
    st = hand_state(2, z_prev=(0,))
    out, new = m(X1, st)
    h1, h2 = new[0], new[3]
    hcat = torch.cat([h1, h2], 1)
    gw, We = m.gate_w.detach(), m.W_e.detach()
    g1, g2 = sig(hcat @ gw[0]), sig(hcat @ gw[1])
    want = torch.relu(g1[:, None] * (h1 @ We[0].t()) + g2[:, None] * (h2 @ We[1].t()))
    torch.testing.assert_close(out[:, 0], want, rtol=1e-6, atol=1e-7)
    assert (want == 0).any() and (want > 0).any()  # the ReLU is exercised


# ---- straight-through boundary ---------------------------------------------------------------
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("slope,v,z_want,grad_want", [
    (1.0, 0.3, 1.0, 0.5), (1.0, -0.6, 0.0, 0.5), (1.0, 1.5, 1.0, 0.0), (1.0, -2.0, 0.0, 0.0),
    (3.0, 0.2, 1.0, 1.5), (3.0, -0.25, 0.0, 1.5), (3.0, 0.5, 1.0, 0.0), (3.0, -0.4, 0.0, 0.0),
])
def test_straight_through_gradient(layer_norm, slope, v, z_want, grad_want):
    """All weights 0 -> the boundary pre-activation of layer 1 is its bias v (LN of a zero
    vector is 0): z = round(hard_sigm(slope v)) exactly, dz/dv = slope/2 inside |slope v| < 1."""
    m = HMLSTM(E, H, 2, 2, layer_norm)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.bias[0][4 * H] = v
    _, _, z = m(X1, m.init_state(1), slope=slope, return_boundaries=True)
    assert z[0, 0, 0].item() == z_want
    (gb,) = torch.autograd.grad(z.sum(), m.bias[0])
    assert gb[4 * H].item() == pytest.approx(grad_want, abs=1e-6)
    assert not gb[:4 * H].any()


# ---- a slow reference with the modes as if/else ---------------------------------------------
def reference(m, x, state, slope, layer_norm):
    """Per row, per step, per layer; returns final state, out [B, T, D], z [B, T, L], mode counts."""
    L = m.n_layers
    P = {k: v.detach() for k, v in m.named_parameters()}
    B, T, _ = x.shape
    outs = torch.zeros(B, T, m.out_dim)
    zs = torch.zeros(B, T, L)
    final = [t.clone() for t in state]
    modes = {"flush": 0, "update": 0, "copy": 0}
    for b in range(B):
        h = [state[3 * l][b].clone() for l in range(L)]
        c = [state[3 * l + 1][b].clone() for l in range(L)]
        z = [state[3 * l + 2][b, 0].item() for l in range(L)]
        for t in range(T):
            nh, nc, nz = list(h), list(c), list(z)
            for l in range(L):
                zb = 1.0 if l == 0 else nz[l - 1]
                hb = x[b, t] if l == 0 else nh[l - 1]
                if z[l] == 0 and zb == 0:
                    modes["copy"] += 1
                    continue
                a = P[f"U_rec.{l}"] @ h[l] + zb * (P[f"W_bu.{l}"] @ hb)
                if l < L - 1:
                    a = a + z[l] * (P[f"U_td.{l}"] @ h[l + 1])
                s = pre(a, P[f"bias.{l}"], P[f"ln_gain.{l}"] if layer_norm else None)
                f, i, o, g = gates(s)
                if z[l] == 1:
                    modes["flush"] += 1
                    nc[l] = i * g
                else:
                    modes["update"] += 1
                    nc[l] = f * c[l] + i * g
                nh[l] = o * torch.tanh(nc[l])
                nz[l] = (1.0 if min(max((slope * s[4 * H].item() + 1) / 2, 0), 1) > 0.5 else 0.0) if l < L - 1 else 0.0
            h, c, z = nh, nc, nz
            hcat = torch.cat(h)
            acc = torch.zeros(m.out_dim)
            for l in range(L):
                acc = acc + sig(P["gate_w"][l] @ hcat) * (P["W_e"][l] @ h[l])
            outs[b, t] = torch.relu(acc)
            zs[b, t] = torch.tensor(z)
        for l in range(L):
            final[3 * l][b], final[3 * l + 1][b], final[3 * l + 2][b, 0] = h[l], c[l], z[l]
    return final, outs, zs, modes


@pytest.mark.parametrize("layer_norm", [False, True])
def test_matches_the_slow_reference(layer_norm):
    H_ = H
    m = HMLSTM(E, H_, 3, 3, layer_norm)
    m.reset_parameters(torch.Generator().manual_seed(1))
    with torch.no_grad():  # boundary units biased so that all three modes happen
        m.bias[0][4 * H_] = 0.3
        m.bias[1][4 * H_] = 0.5
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 8, E, generator=gen)
    st = [torch.randn(t.shape, generator=gen) if k % 3 != 2 else t for k, t in enumerate(m.init_state(5))]
    st[2] = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0]])
    slope = 2.0
    out, new, z = m(x, st, slope=slope, return_boundaries=True)
    want_state, want_out, want_z, modes = reference(m, x, st, slope, layer_norm)
    assert min(modes.values()) >= 3, modes
    assert torch.equal(z, want_z)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    for k, (a, b) in enumerate(zip(new, want_state)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"state[{k}]")


def test_boundaries_binary_top_layer_never_fires():
    m = HMLSTM(E, 4, 3, 3)
    m.reset_parameters(torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.bias[-1].normal_(0, 5, generator=torch.Generator().manual_seed(4))
    x = torch.randn(6, 20, E, generator=torch.Generator().manual_seed(5))
    _, new, z = m(x, m.init_state(6), slope=2.0, return_boundaries=True)
    assert ((z == 0) | (z == 1)).all()
    assert (z[..., 0] == 1).any() and (z[..., 0] == 0).any()
    assert not z[..., -1].any() and not new[-1].any()


# ---- mask -----------------------------------------------------------------------------------
def test_masked_row_keeps_its_state():
    m = HMLSTM(E, H, 2, 2)
    m.reset_parameters(torch.Generator().manual_seed(6))
    gen = torch.Generator().manual_seed(7)
    st = [torch.randn(t.shape, generator=gen) if k % 3 != 2 else torch.ones_like(t)
          for k, t in enumerate(m.init_state(2))]
    x = torch.randn(2, 1, E, generator=gen)
    _, new = m(x, st, mask=torch.tensor([[True], [False]]))
    for k in range(6):
        assert torch.equal(new[k][1], st[k][1]), k
    assert not torch.equal(new[0][0], st[0][0])


@pytest.mark.parametrize("layer_norm", [False, True])
def test_right_padding_leaves_the_final_state(layer_norm):
    m = HMLSTM(E, 3, 3, 2, layer_norm)
    m.reset_parameters(torch.Generator().manual_seed(8))
    with torch.no_grad():
        m.bias[0][12] = 0.4
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 6, E, generator=gen)  # the padding positions hold junk, not zeros
    lengths = [6, 2, 4]
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    _, padded = m(x, m.init_state(3), mask=mask)
    for b, n in enumerate(lengths):
        _, alone = m(x[b:b + 1, :n], m.init_state(1))
        for k in range(9):
            torch.testing.assert_close(padded[k][b:b + 1], alone[k], rtol=1e-6, atol=1e-7)


def test_backward_is_finite():
    m = HMLSTM(E, 4, 3, 5, True)
    m.reset_parameters(torch.Generator().manual_seed(10))
    x = torch.randn(4, 9, E, generator=torch.Generator().manual_seed(11))
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 6:] = False
    out, new, z = m(x, m.init_state(4), mask=mask, return_boundaries=True)
    (out.square().sum() + sum(t.sum() for t in new) + z.sum()).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert m.bias[0].grad[16] != 0  # the boundary unit learns
