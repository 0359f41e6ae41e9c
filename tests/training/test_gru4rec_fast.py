"""The hand-written fast training step == autograd + the official optimizer semantics.

Reference: autograd gradients of the same loss, then IndexedAdagradM as the
official code applies it (dense tensors fully; item tables only on the rows the
step touched, duplicates summed; heavy-ball momentum).
"""
import copy

import numpy as np
import pytest
import torch

from training.families.gru4rec import GRU4RecConfig, GRU4RecModel
from training.native.fast_step import FastStep
from training.losses import sampled_loss

N_ITEMS, B, NS = 15, 4, 6


def make(loss, embedding, layers, optimizer="adagrad", momentum=0.3, logq=0.0, native=True):
    act = {"cross-entropy": "softmax", "bpr-max": "elu-0.5", "top1": "tanh"}.get(loss, "linear")
    cfg = GRU4RecConfig(layers=layers, embedding=embedding, embedding_dim=5, loss=loss, final_act=act,
                        bpreg=1.0, logq=logq, batch_size=B, n_sample=NS, learning_rate=0.1,
                        momentum=momentum, optimizer=optimizer, dropout_hidden=0.0)
    m = GRU4RecModel(N_ITEMS, cfg)
    m.reset_parameters(torch.Generator().manual_seed(3))
    return cfg, m


def reference_steps(cfg, model, batches, support):
    model = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.numel()]
    params = {n: p for n, p in model.named_parameters() if p.numel()}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    mom = {n: torch.zeros_like(p) for n, p in params.items()}
    logp = torch.log(torch.tensor(np.maximum(support, 1), dtype=torch.float32))
    state = model.init_state(B)
    for x, y, masks in batches:
        out, state = model(x, state, masks)
        R = model.sampled_scores(out, y)
        cols = None
        if cfg.loss == "cross-entropy" and cfg.logq > 0:
            w = torch.full((y.shape[0],), cfg.logq * cfg.sample_alpha)
            w[:B] = cfg.logq
            cols = logp[y] * w
        loss = sampled_loss(R, cfg.loss, cfg.final_act, cfg.bpreg, cols) / B
        grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names])))
        state = [h.detach() for h in state]
        rows = {"Wy": torch.cat([x, y]) if cfg.embedding == "tied" else y, "By": y, "E": x, "Wx0": x}
        with torch.no_grad():
            for n in names:
                g = grads[n]
                if n in rows:
                    r = torch.unique(rows[n])
                    g = g[r]
                    a = acc[n][r] + g * g
                    acc[n][r] = a
                    upd = -cfg.learning_rate * g / torch.sqrt(a + cfg.adagrad_eps)
                    if cfg.momentum > 0:
                        upd = mom[n][r] * cfg.momentum + upd
                        mom[n][r] = upd
                    params[n][r] += upd
                else:
                    acc[n] += g * g
                    upd = -cfg.learning_rate * g / torch.sqrt(acc[n] + cfg.adagrad_eps)
                    if cfg.momentum > 0:
                        mom[n] = mom[n] * cfg.momentum + upd
                        upd = mom[n]
                    params[n] += upd
    return model, state


@pytest.mark.parametrize("native", [True, False], ids=["c-kernels", "torch-ops"])
@pytest.mark.parametrize("loss", ["cross-entropy", "top1", "bpr", "top1-max", "bpr-max"])
@pytest.mark.parametrize("embedding,layers", [("tied", [6]), ("separate", [6, 5]), ("onehot", [5])])
def test_fast_step_matches_autograd_and_official_optimizer(loss, embedding, layers, native):
    """Both step implementations (fused C kernels, the default on CPU; plain torch ops, the
    fallback) against autograd + the official optimizer."""
    cfg, model = make(loss, embedding, layers, logq=1.0 if loss == "cross-entropy" else 0.0,
                      native=native)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randint(0, N_ITEMS, (B,), generator=g)
        y = torch.randint(0, N_ITEMS, (B + NS,), generator=g)
        y[1] = x[0]  # an input row that is also an output row (tied: both grads hit one row)
        y[B + 2] = y[0]  # a target duplicated among the extra negatives
        hid = [(torch.rand(B, h, generator=g) >= 0.3).float() / 0.7 for h in layers]
        emb = (torch.rand(B, 5 if embedding == "separate" else layers[-1], generator=g) >= 0.2).float() / 0.8
        batches.append((x, y, {"embed": None if embedding == "onehot" else emb, "hidden": hid}))
    support = np.arange(1, N_ITEMS + 1) * 3
    ref, ref_state = reference_steps(cfg, model, batches, support)
    fast_model = copy.deepcopy(model)
    step = FastStep(fast_model, cfg, support, torch.device("cpu"), native=native)
    state = fast_model.init_state(B)
    for x, y, masks in batches:
        loss_val = step(x, y, state, masks)
        assert torch.isfinite(loss_val)
    for (n, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast_model.named_parameters()):
        assert torch.allclose(p_ref, p_fast, atol=2e-6, rtol=1e-4), n
    for a, b in zip(ref_state, state):  # carried state = dropped-out layer output, as official
        assert torch.allclose(a, b, atol=1e-6)


def test_adam_differs_from_adagrad_and_both_learn():
    """Checklist 5: the configured optimizer is the one that runs."""
    outs = {}
    for opt in ("adagrad", "adam"):
        cfg, model = make("cross-entropy", "tied", [6], optimizer=opt, momentum=0.0)
        step = FastStep(model, cfg, np.ones(N_ITEMS), torch.device("cpu"))
        x = torch.arange(B)
        y = torch.cat([torch.arange(1, B + 1), torch.arange(B + 1, B + 1 + NS)])
        losses = [float(step(x, y, model.init_state(B), {})) for _ in range(30)]
        assert losses[-1] < losses[0]
        outs[opt] = model.Wy.detach().clone()
    assert not torch.allclose(outs["adagrad"], outs["adam"])
    with pytest.raises(ValueError, match="optimizer"):
        cfg, model = make("cross-entropy", "tied", [6], optimizer="sgd")
        FastStep(model, cfg, np.ones(N_ITEMS), torch.device("cpu"))
