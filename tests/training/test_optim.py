"""training/optim.py against references computed independently: plain numpy loops of the
formulas, hand-computed numbers, torch.optim where it is mathematically the same, and the
hand-written FastStep update of training/native/fast_step.py (which must agree bit for bit)."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.native.fast_step import FastStep
from training.optim import Adagrad, Adam, build_optimizer, clip_grad_norm, make_schedule

D64 = torch.float64


def rng(seed=0):
    return np.random.default_rng(seed)


# ---- numpy references ------------------------------------------------------------------

def np_adagrad(p, grads, lr, eps, m=0.0, nesterov=False, wd=0.0):
    """Official GRU4Rec Adagrad(+momentum), element-wise, over a list of dense grads."""
    p, acc, vel = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for g in grads:
        g = g + wd * p
        acc = acc + g * g
        upd = g / np.sqrt(acc + eps)
        if m > 0:
            vel = m * vel - lr * upd
            p = p + (m * vel - lr * upd if nesterov else vel)
        else:
            p = p - lr * upd
    return p, acc, vel


def np_adagrad_rows(p, acc, vel, rows, vals, lr, eps, m, wd=0.0):
    """One sparse step: sum duplicate rows first, then update only those rows (heavy ball)."""
    p, acc, vel = p.copy(), acc.copy(), vel.copy()
    summed = {}
    for r, v in zip(rows, vals):
        summed[r] = summed.get(r, 0.0) + v
    for r, g in summed.items():
        g = g + wd * p[r]
        acc[r] += g * g
        upd = g / np.sqrt(acc[r] + eps)
        vel[r] = m * vel[r] - lr * upd
        p[r] += vel[r] if m > 0 else -lr * upd
    return p, acc, vel


def sparse_grad_step(opt, W, rows, vals):
    """Backward through embedding(sparse=True) so W.grad is an uncoalesced sparse COO."""
    opt.zero_grad(set_to_none=True)
    idx = torch.tensor(rows)
    (F.embedding(idx, W, sparse=True) * torch.as_tensor(vals, dtype=W.dtype)).sum().backward()
    assert W.grad.is_sparse
    opt.step()


# ---- Adagrad ---------------------------------------------------------------------------

@pytest.mark.parametrize("m,nesterov", [(0.0, False), (0.4, False), (0.4, True)])
def test_adagrad_dense_matches_numpy(m, nesterov):
    r = rng(1)
    p0 = r.normal(size=(4, 3))
    grads = [r.normal(size=(4, 3)) for _ in range(5)]
    W = torch.nn.Parameter(torch.tensor(p0))
    opt = Adagrad([W], lr=0.05, eps=1e-6, momentum=m, nesterov=nesterov)
    for g in grads:
        W.grad = torch.tensor(g)
        opt.step()
    ref, acc, vel = np_adagrad(p0, grads, 0.05, 1e-6, m, nesterov)
    np.testing.assert_allclose(W.detach().numpy(), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.state[W]["acc"].numpy(), acc, rtol=1e-12)
    if m > 0:
        np.testing.assert_allclose(opt.state[W]["vel"].numpy(), vel, rtol=1e-12, atol=1e-14)
    else:
        assert "vel" not in opt.state[W]


def test_adagrad_eps_inside_sqrt_matters():
    # with a large eps the official placement differs from torch's sqrt(acc) + eps
    W = torch.nn.Parameter(torch.tensor([1.0], dtype=D64))
    opt = Adagrad([W], lr=1.0, eps=0.5)
    W.grad = torch.tensor([1.0], dtype=D64)
    opt.step()
    assert W.item() == pytest.approx(1.0 - 1.0 / math.sqrt(1.5), rel=1e-14)  # not 1 - 1/1.5


def test_adagrad_dense_matches_torch_adagrad():
    r = rng(2)
    p0 = torch.tensor(r.normal(size=(5, 2)))
    A, B = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ours = Adagrad([A], lr=0.1, eps=1e-10)
    ref = torch.optim.Adagrad([B], lr=0.1, eps=1e-10, lr_decay=0, initial_accumulator_value=0)
    for _ in range(6):
        g = torch.tensor(r.normal(size=(5, 2)))
        A.grad, B.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(A, B, rtol=1e-8, atol=1e-10)


def test_adagrad_sparse_duplicates_and_untouched_rows():
    r = rng(3)
    lr, eps, m = 0.1, 1e-6, 0.5
    p0 = r.normal(size=(6, 3))
    W = torch.nn.Parameter(torch.tensor(p0))
    opt = Adagrad([W], lr=lr, eps=eps, momentum=m)
    acc, vel = np.zeros_like(p0), np.zeros_like(p0)

    rows1, vals1 = [1, 1, 3], r.normal(size=(3, 3))
    sparse_grad_step(opt, W, rows1, vals1)
    ref, acc, vel = np_adagrad_rows(p0, acc, vel, rows1, vals1, lr, eps, m)
    np.testing.assert_allclose(W.detach().numpy(), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.state[W]["acc"].numpy(), acc, rtol=1e-12)
    untouched = [0, 2, 4, 5]
    assert torch.equal(W.detach()[untouched], torch.tensor(p0)[untouched])
    assert not opt.state[W]["acc"][untouched].any() and not opt.state[W]["vel"][untouched].any()

    # step 2 leaves row 1 out: its velocity is NOT decayed and its parameter does not move
    vel1, w1 = opt.state[W]["vel"][1].clone(), W.detach()[1].clone()
    assert vel1.abs().min() > 0
    rows2, vals2 = [3, 2, 3], r.normal(size=(3, 3))
    sparse_grad_step(opt, W, rows2, vals2)
    assert torch.equal(opt.state[W]["vel"][1], vel1)
    assert torch.equal(W.detach()[1], w1)
    ref, acc, vel = np_adagrad_rows(ref, acc, vel, rows2, vals2, lr, eps, m)
    np.testing.assert_allclose(W.detach().numpy(), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.state[W]["vel"].numpy(), vel, rtol=1e-12, atol=1e-14)


def test_adagrad_sparse_weight_decay_only_touched_rows():
    p0 = rng(4).normal(size=(4, 2))
    W = torch.nn.Parameter(torch.tensor(p0))
    opt = Adagrad([W], lr=0.1, weight_decay=0.3)
    vals = np.array([[1.0, -2.0], [0.5, 0.5]])
    sparse_grad_step(opt, W, [2, 2], vals)
    z = np.zeros_like(p0)
    ref, _, _ = np_adagrad_rows(p0, z, z, [2, 2], vals, 0.1, 1e-6, 0.0, wd=0.3)
    np.testing.assert_allclose(W.detach().numpy(), ref, rtol=1e-12)
    assert torch.equal(W.detach()[[0, 1, 3]], torch.tensor(p0)[[0, 1, 3]])


def test_adagrad_element_sparse_grad():
    # sparse_dim 2 (one coordinate per element): the duplicate (0, 1) is summed, only 2 elements move
    p0 = rng(7).normal(size=(2, 3))
    W = torch.nn.Parameter(torch.tensor(p0))
    opt = Adagrad([W], lr=0.1, momentum=0.5)
    idx, vals = torch.tensor([[0, 1, 0], [1, 2, 1]]), torch.tensor([1.0, 3.0, 1.0], dtype=D64)
    W.grad = torch.sparse_coo_tensor(idx, vals, (2, 3), check_invariants=True)
    opt.step()
    g = np.zeros_like(p0)
    g[0, 1], g[1, 2] = 2.0, 3.0
    ref = p0 - 0.1 * g / np.sqrt(g * g + 1e-6) * (g != 0)
    np.testing.assert_allclose(W.detach().numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("m,nesterov", [(0.0, False), (0.3, False), (0.3, True)])
def test_adagrad_sparse_equals_dense_when_all_rows_touched(m, nesterov):
    r = rng(5)
    p0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    Ws, Wd = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    os_, od = (Adagrad([w], lr=0.05, momentum=m, nesterov=nesterov, weight_decay=0.01) for w in (Ws, Wd))
    for _ in range(4):
        idx = torch.tensor(np.concatenate([r.permutation(5), r.integers(0, 5, 3)]))  # all rows + duplicates
        c = torch.randn(len(idx), 4, generator=torch.Generator().manual_seed(int(r.integers(1 << 30))))
        for W, opt, sparse in ((Ws, os_, True), (Wd, od, False)):
            opt.zero_grad()
            (F.embedding(idx, W, sparse=sparse) * c).sum().backward()
            assert W.grad.is_sparse == sparse
            opt.step()
    torch.testing.assert_close(Ws, Wd, rtol=1e-5, atol=1e-6)


def faststep_ns(optimizer, tables, flat=None, momentum=0.0, nesterov=False, lr=0.05, eps=1e-6):
    """The attributes FastStep's optimizer methods read, on the torch (non-native) path."""
    cfg = SimpleNamespace(optimizer=optimizer, learning_rate=lr, adagrad_eps=eps, momentum=momentum,
                          nesterov=nesterov)
    st = {}
    for k, p in tables.items():
        st[f"{k}.acc"], st[f"{k}.mom"] = torch.zeros_like(p), torch.zeros_like(p)
        st[f"{k}.t"] = torch.zeros(p.shape[0])
    if flat is not None:
        st["dense.acc"], st["dense.mom"] = torch.zeros_like(flat), torch.zeros_like(flat)
    return SimpleNamespace(cfg=cfg, opt_state=st, sparse=tables, native=None, flat=flat,
                           gflat=None if flat is None else torch.zeros_like(flat))


@pytest.mark.parametrize("m,nesterov", [(0.0, False), (0.3, False), (0.3, True)])
def test_adagrad_bit_identical_to_faststep(m, nesterov):
    g = torch.Generator().manual_seed(1)
    flat0, tab0 = torch.randn(12, generator=g), torch.randn(6, 3, generator=g)
    ns = faststep_ns("adagrad", {"Wy": tab0.clone()}, flat=flat0.clone(), momentum=m, nesterov=nesterov)
    D, T = torch.nn.Parameter(flat0.clone()), torch.nn.Parameter(tab0.clone())
    opt = Adagrad([D, T], lr=0.05, eps=1e-6, momentum=m, nesterov=nesterov)
    for rows in ([1, 1, 3], [0, 3, 5, 5], [1, 2]):
        gd = torch.randn(12, generator=g)
        vals = torch.randn(len(rows), 3, generator=g)
        idx = torch.tensor(rows)
        ns.gflat.copy_(gd)
        FastStep._dense_update(ns)
        uniq, inv = idx.unique(return_inverse=True)
        FastStep._rows_update(ns, "Wy", uniq, torch.zeros(len(uniq), 3).index_add_(0, inv, vals))
        D.grad = gd.clone()
        T.grad = torch.sparse_coo_tensor(idx[None], vals, (6, 3), check_invariants=True)
        opt.step()
    assert torch.equal(D.detach(), ns.flat) and torch.equal(T.detach(), ns.sparse["Wy"])
    assert torch.equal(opt.state[T]["acc"], ns.opt_state["Wy.acc"])


# ---- Adam ------------------------------------------------------------------------------

@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_dense_matches_torch_adam(wd):
    g = torch.Generator().manual_seed(2)
    p0 = torch.randn(4, 5, generator=g)
    A, B = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ours = Adam([A], lr=0.01, weight_decay=wd)
    ref = torch.optim.Adam([B], lr=0.01, weight_decay=wd)
    for _ in range(7):
        grad = torch.randn(4, 5, generator=g)
        A.grad, B.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(A, B, rtol=1e-6, atol=1e-6)


def test_adam_sparse_all_rows_every_step_matches_torch_adam():
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(5, 3, generator=g)
    A, B = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ours, ref = Adam([A], lr=0.02, weight_decay=0.01), torch.optim.Adam([B], lr=0.02, weight_decay=0.01)
    for _ in range(6):
        idx = torch.cat([torch.randperm(5, generator=g), torch.randint(0, 5, (4,), generator=g)])
        c = torch.randn(len(idx), 3, generator=g)
        for W, opt, sparse in ((A, ours, True), (B, ref, False)):
            opt.zero_grad()
            (F.embedding(idx, W, sparse=sparse) * c).sum().backward()
            opt.step()
    torch.testing.assert_close(A, B, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours.state[A]["row_step"], torch.full((5,), 6.0))


def test_lazy_adam_row_bias_correction_by_hand():
    # row 0 gets grad 1 at step 1 and grad 2 at step 3; step 2 touches only row 1
    W = torch.nn.Parameter(torch.tensor([[0.5], [0.0], [0.0]]))
    opt = Adam([W], lr=0.1)
    for rows, val in (([0], 1.0), ([1], 1.0), ([0], 2.0)):
        W.grad = torch.sparse_coo_tensor(torch.tensor([rows]), torch.tensor([[val]]), (3, 1),
                                         check_invariants=True)
        opt.step()
        if rows == [0] and val == 1.0:
            # t=1: mhat = 1, vhat = 1 -> 0.5 - 0.1 * 1 / (1 + 1e-8)
            assert W[0, 0].item() == pytest.approx(0.4, abs=2e-6)  # float32 bias correction
    # row 0 at its 2nd step (t=2, not 3): m = 0.9*0.1*1 + 0.1*2 = 0.29, v = 0.999*0.001*1 + 0.001*4
    # = 0.004999; mhat = 0.29/0.19 = 1.5263158, vhat = 0.004999/0.001999 = 2.5007504,
    # sqrt = 1.5813761, step = 0.1 * 1.5263158/1.5813761 = 0.0965182 -> 0.4 - 0.0965182
    # (with t=3 it would be 0.4 - 0.0828573 = 0.3171427)
    assert W[0, 0].item() == pytest.approx(0.3034818, abs=2e-6)
    assert W[2, 0].item() == 0.0
    assert opt.state[W]["row_step"].tolist() == [2.0, 1.0, 0.0]
    assert opt.state[W]["exp_avg"][0, 0].item() == pytest.approx(0.29, rel=1e-6)
    # row 1 (touched at step 2 only) kept its moments through step 3; row 2 never moved
    assert opt.state[W]["exp_avg"][1:, 0].tolist() == pytest.approx([0.1, 0.0], rel=1e-6)
    assert opt.state[W]["exp_avg_sq"][1:, 0].tolist() == pytest.approx([0.001, 0.0], rel=1e-6)


def test_lazy_adam_bit_identical_to_faststep():
    g = torch.Generator().manual_seed(4)
    tab0 = torch.randn(6, 2, generator=g)
    ns = faststep_ns("adam", {"E": tab0.clone()}, lr=0.01)
    T = torch.nn.Parameter(tab0.clone())
    opt = Adam([T], lr=0.01)
    for rows in ([1, 1, 3], [0, 3], [5, 1, 1, 1]):
        idx, vals = torch.tensor(rows), torch.randn(len(rows), 2, generator=g)
        uniq, inv = idx.unique(return_inverse=True)
        FastStep._rows_update(ns, "E", uniq, torch.zeros(len(uniq), 2).index_add_(0, inv, vals))
        T.grad = torch.sparse_coo_tensor(idx[None], vals, (6, 2), check_invariants=True)
        opt.step()
    assert torch.equal(T.detach(), ns.sparse["E"])
    assert torch.equal(opt.state[T]["row_step"], ns.opt_state["E.t"])


# ---- param groups ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_weight_decay_per_param_group(name):
    r = rng(6)
    a0, b0 = r.normal(size=3), r.normal(size=(2, 2))
    A, B = torch.nn.Parameter(torch.tensor(a0)), torch.nn.Parameter(torch.tensor(b0))
    opt = build_optimizer(name, [{"params": [A], "weight_decay": 0.2, "lr": 0.03}, {"params": [B]}], lr=0.01)
    ga, gb = [r.normal(size=3) for _ in range(4)], [r.normal(size=(2, 2)) for _ in range(4)]
    for x, y in zip(ga, gb):
        A.grad, B.grad = torch.tensor(x), torch.tensor(y)
        opt.step()
    if name == "adagrad":
        ref_a, ref_b = np_adagrad(a0, ga, 0.03, 1e-6, wd=0.2)[0], np_adagrad(b0, gb, 0.01, 1e-6)[0]
    else:
        def np_adam(p, grads, lr, wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
            m = v = 0.0
            for t, g in enumerate(grads, 1):
                g = g + wd * p
                m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
                p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
            return p
        ref_a, ref_b = np_adam(a0, ga, 0.03, wd=0.2), np_adam(b0, gb, 0.01)
    np.testing.assert_allclose(A.detach().numpy(), ref_a, rtol=1e-10)
    np.testing.assert_allclose(B.detach().numpy(), ref_b, rtol=1e-10)


def test_build_optimizer_names_and_errors():
    W = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer("Adagrad", [W], lr=0.2, momentum=0.1)
    assert isinstance(opt, Adagrad) and opt.param_groups[0]["lr"] == 0.2
    assert opt.param_groups[0]["momentum"] == 0.1
    assert isinstance(build_optimizer("adam", [W], lr=0.001, betas=(0.8, 0.99)), Adam)
    with pytest.raises(ValueError, match="adagrad, adam"):
        build_optimizer("sgd", [W], lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        Adagrad([W], momentum=1.0)


# ---- clip_grad_norm --------------------------------------------------------------------

def test_clip_grad_norm_dense_and_sparse_by_hand():
    A = torch.nn.Parameter(torch.zeros(2))
    E = torch.nn.Parameter(torch.zeros(5, 2))
    A.grad = torch.tensor([3.0, 4.0])  # 9 + 16 = 25
    # rows [1, 1, 3]: coalesced row 1 = [2, 2], row 3 = [0, 2] -> 4 + 4 + 4 = 12
    # (squaring before summing duplicates would give 10)
    vals = torch.tensor([[1.0, 2.0], [1.0, 0.0], [0.0, 2.0]])
    E.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 3]]), vals, (5, 2), check_invariants=True)
    norm = clip_grad_norm([A, E], max_norm=10.0)  # within the bound: nothing scaled
    assert norm.item() == pytest.approx(math.sqrt(37), rel=1e-6)
    assert A.grad.tolist() == [3.0, 4.0]
    norm = clip_grad_norm([A, E], max_norm=1.0)
    assert norm.item() == pytest.approx(math.sqrt(37), rel=1e-6)
    s = 1.0 / (math.sqrt(37) + 1e-6)
    torch.testing.assert_close(A.grad, torch.tensor([3.0, 4.0]) * s)
    dense = torch.zeros(5, 2)
    dense[1], dense[3] = torch.tensor([2.0, 2.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(E.grad.to_dense(), dense * s)
    assert clip_grad_norm([A, E], 10.0).item() == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_matches_torch_on_dense():
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(3, 4, generator=g) * 3, torch.randn(7, generator=g)]
    for max_norm in (0.5, 100.0):
        ours = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
        ref = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
        for p, q, x in zip(ours, ref, grads):
            p.grad, q.grad = x.clone(), x.clone()
        n1 = clip_grad_norm(ours, max_norm)
        n2 = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        torch.testing.assert_close(n1, n2)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.grad, q.grad)


# ---- schedules -------------------------------------------------------------------------

def lrs_after(opt, sched, n):
    out = []
    for _ in range(n):
        opt.step()  # no grads: a no-op, keeps LambdaLR's step-order check quiet
        sched.step()
        out.append(sched.get_last_lr())
    return out


def test_constant_schedule():
    W = torch.nn.Parameter(torch.zeros(1))
    opt = Adagrad([W], lr=0.05)
    sched = make_schedule(opt)
    assert lrs_after(opt, sched, 3) == [[0.05]] * 3 and opt.param_groups[0]["lr"] == 0.05


def test_polynomial_schedule_by_hand():
    W = torch.nn.Parameter(torch.zeros(1))
    opt = Adagrad([W], lr=0.01)
    sched = make_schedule(opt, "polynomial", decay_steps=100, end_lr=0.001, power=0.5)
    lrs = [sched.get_last_lr()[0]] + [x[0] for x in lrs_after(opt, sched, 110)]
    # (0.01 - 0.001) * (1 - s/100)^0.5 + 0.001
    assert lrs[0] == pytest.approx(0.01, rel=1e-12)
    assert lrs[1] == pytest.approx(0.009 * 0.99498743710662 + 0.001, rel=1e-12)  # 0.0099548869
    assert lrs[50] == pytest.approx(0.009 * 0.70710678118655 + 0.001, rel=1e-12)  # 0.0073639610
    assert lrs[100] == pytest.approx(0.001, rel=1e-12)
    assert lrs[110] == pytest.approx(0.001, rel=1e-12)
    assert opt.param_groups[0]["lr"] == lrs[110]


def test_polynomial_schedule_per_group():
    A, B = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = Adam([{"params": [A], "lr": 0.02}, {"params": [B]}], lr=0.01)
    sched = make_schedule(opt, "polynomial", decay_steps=10, end_lr=0.001, power=1.0)
    at5 = lrs_after(opt, sched, 5)[-1]
    # each group goes from its own lr to end_lr: 0.019 * 0.5 + 0.001, 0.009 * 0.5 + 0.001
    assert at5 == pytest.approx([0.0105, 0.0055], rel=1e-12)
    assert lrs_after(opt, sched, 6)[-1] == pytest.approx([0.001, 0.001], rel=1e-12)


def test_schedule_state_dict_round_trip():
    def build():
        W = torch.nn.Parameter(torch.zeros(1))
        opt = Adagrad([W], lr=0.01)
        return opt, make_schedule(opt, "polynomial", decay_steps=50, end_lr=0.001, power=0.5)
    opt, sched = build()
    lrs_after(opt, sched, 17)
    o_sd, s_sd = opt.state_dict(), sched.state_dict()
    expected = lrs_after(opt, sched, 3)

    opt2, sched2 = build()
    opt2.load_state_dict(o_sd)
    sched2.load_state_dict(s_sd)
    assert opt2.param_groups[0]["lr"] == o_sd["param_groups"][0]["lr"]
    assert lrs_after(opt2, sched2, 3) == expected

    # the checkpoint's schedule settings win over the ones the resumed run was built with
    W = torch.nn.Parameter(torch.zeros(1))
    opt3 = Adagrad([W], lr=0.01)
    sched3 = make_schedule(opt3, "polynomial", decay_steps=999, end_lr=0.0, power=2.0)
    opt3.load_state_dict(o_sd)
    sched3.load_state_dict(s_sd)
    assert lrs_after(opt3, sched3, 3) == expected


@pytest.mark.parametrize("kw,arg", [
    (dict(kind="cosine"), "kind"),
    (dict(kind="polynomial", decay_steps=0), "decay_steps"),
    (dict(kind="polynomial", decay_steps=-5), "decay_steps"),
    (dict(kind="polynomial", decay_steps=10, end_lr=0.5), "end_lr"),
    (dict(kind="polynomial", decay_steps=10, power=0.0), "power"),
])
def test_schedule_bad_arguments(kw, arg):
    opt = Adagrad([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    with pytest.raises(ValueError, match=arg):
        make_schedule(opt, **kw)


def test_polynomial_schedule_villatel_values_with_a_real_adam():
    # Villatel et al. 2018: Adam, lr 0.01 -> 0.001, power 0.5, over 50,000 steps, then flat.
    # A float64 scalar with a constant gradient 1 and eps = 0: Adam's bias-corrected step is then
    # exactly lr, so the parameter's move in optimizer step s+1 is the lr at schedule step s.
    torch.set_num_threads(1)
    W = torch.nn.Parameter(torch.zeros(1, dtype=D64))
    W.grad = torch.ones(1, dtype=D64)
    opt = Adam([W], lr=0.01, eps=0.0)
    sched = make_schedule(opt, "polynomial", decay_steps=50_000, end_lr=0.001, power=0.5)
    hand = {0: 0.01, 25_000: 0.009 * math.sqrt(0.5) + 0.001, 50_000: 0.001, 60_000: 0.001}
    assert hand[25_000] == pytest.approx(0.0073639610306789, rel=1e-12)
    got, moved = {}, {}
    for s in range(60_001):
        if s in hand:
            got[s] = (sched.get_last_lr()[0], opt.param_groups[0]["lr"])
            before = W.item()
        opt.step()
        if s in hand:
            moved[s] = before - W.item()
        sched.step()
    for s, lr in hand.items():
        assert got[s][0] == pytest.approx(lr, rel=1e-12), s
        assert got[s][1] == pytest.approx(lr, rel=1e-12), s
        assert moved[s] == pytest.approx(lr, rel=1e-8), s
