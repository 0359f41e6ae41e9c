"""benchmarks.tan_speed's compute-bound accounting: the shapes it reads off a real tan batch
and the matrix products it counts per model, against a toy batch counted by hand; and
benchmarks.rnn_speed_common's FLOP sum with fake product times (no timing in the test)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.rnn_speed_common import Product, products_bound
from benchmarks.tan_speed import BatchShapes, tan_products
from tests.training.test_tan import _ctx, _family, _save_teacher

# session 0 = items 0, 1, 2 (examples: [0] -> 1, [0, 1] -> 2); session 1 = 3, 4 ([3] -> 4).
# One row per session (its prefixes share one pass): lengths 2 and 1, width T = 2; N = 3.
# Futures (M3): the label 1 of session 0 has the future [2]; labels 2 and 4 are last clicks.
SESSIONS, N_ITEMS = [[0, 1, 2], [3, 4]], 7
KW = dict(embedding=8, hidden=12, max_len=5, click_dropout=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _shapes(fam, teacher_max_len=0):
    s = BatchShapes(fam.cfg.max_len, teacher_max_len)
    for b in fam.batches(0):
        s.add(b)
    return s.mean()


def test_m1_shapes_and_products_by_hand():
    fam = _family("tan", _ctx(SESSIONS, N_ITEMS), **KW)
    shp = _shapes(fam)
    assert (shp["events_per_step"], shp["rows_per_step"], shp["width"], shp["inputs_per_step"]) == (3, 2, 2, 3)
    assert shp["running_per_t"] == [2, 1, 0, 0, 0]
    assert shp["m4_head_positions"] == 4
    got = [(p.m, p.k, p.n, p.grads) for p in tan_products("tan", fam.cfg, N_ITEMS, shp)]
    # inputs [3, E] x [E, 3H]; recurrent at t = 0 (weight grad only: h_0 = 0) and t = 1; softmax
    assert got == [(3, 8, 36, 2), (2, 12, 36, 1), (1, 12, 36, 2), (3, 12, 7, 2)]


def test_m4_has_no_catalogue_product_and_its_head_runs_on_every_padded_position(tmp_path):
    ctx = _ctx(SESSIONS, N_ITEMS)
    src = tmp_path / "m1"
    from training import checkpoint as ck
    from training.config import config_to_dict
    from training.families import tan as T

    m1 = T.TanRNN(N_ITEMS, 8, 12)
    ck.save_checkpoint(src, {"model": "tan", "config": config_to_dict(T.TanConfig(**KW)), "optimizer": {},
                             "epoch": 1, "history": [], "state_dict": m1.state_dict(),
                             "item_index": ck.item_index_to_ckpt(ctx.index)})
    fam = _family("tan_emb", ctx, item_embeddings_from=str(src), emb_hidden=10, **KW)
    got = [(p.m, p.k, p.n, p.grads) for p in tan_products("tan_emb", fam.cfg, N_ITEMS, _shapes(fam))]
    # fixed table: the input products need no input gradient; head on R*T = 4 positions
    assert got == [(3, 8, 36, 1), (2, 12, 36, 1), (1, 12, 36, 2), (4, 12, 10, 2), (4, 10, 8, 2)]
    assert all(N_ITEMS not in (p[1], p[2]) for p in got)


def test_m3_adds_the_teacher_forward_only(tmp_path):
    ctx = _ctx(SESSIONS, N_ITEMS)
    t, _ = _save_teacher(tmp_path / "t", ctx, embedding=6, hidden=4, max_len=3)
    fam = _family("tan_distill", ctx, teacher_run=str(t), **KW)
    shp = _shapes(fam, teacher_max_len=3)
    assert (shp["teacher_examples_per_step"], shp["teacher_inputs_per_step"]) == (1, 1)
    assert shp["teacher_running_per_t"] == [1, 0, 0]
    cfg_t = type("C", (), {"embedding": 6, "hidden": 4})
    got = [(p.m, p.k, p.n, p.grads) for p in tan_products("tan_distill", fam.cfg, N_ITEMS, shp, cfg_t)]
    assert got == [(3, 8, 36, 2), (2, 12, 36, 1), (1, 12, 36, 2), (3, 12, 7, 2),
                   (1, 6, 12, 0), (1, 4, 12, 0), (1, 4, 7, 0)]


def test_backward_shapes_and_flop_sum():
    p = Product(5, 3, 7, 2)
    assert p.shapes("own") == [(5, 3, 7), (3, 5, 7), (5, 7, 3)]
    assert p.shapes("as_forward") == [(5, 3, 7)] * 3
    assert Product(5, 3, 7, 1).shapes("own") == [(5, 3, 7), (3, 5, 7)]
    assert Product(5, 3, 7, 0).shapes("own") == [(5, 3, 7)]
    fake = {(5, 3, 7): 1.0, (3, 5, 7): 2.0, (5, 7, 3): 4.0, (2, 2, 2): 0.5}
    r = products_bound([Product(5, 3, 7, 2), Product(2, 2, 2, 0)], events=10, backward="own", cache=fake)
    assert r["step_seconds"] == pytest.approx(7.5)
    assert r["events_per_s"] == pytest.approx(10 / 7.5)
    assert r["flops_per_event"] == pytest.approx((3 * 2 * 105 + 2 * 8) / 10)
