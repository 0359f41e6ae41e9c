"""The FLOP model of benchmarks/gru4rec_settings.py (issue 13) against counts written out by hand."""
from benchmarks.gru4rec_settings import OFFICIAL_BEST, flops_per_step, our_config, step_products


def test_rsc15_step_flops_by_hand():
    # B=32, H=100, S=2048, tied embedding (input size 100), one layer:
    #   input product  [32,100]x[100,300]: forward + weight grad + input grad = 3 x 2*32*100*300 = 5,760,000
    #   hidden product [32,100]x[100,300]: forward + weight grad (no BPTT)   = 2 x 2*32*100*300 = 3,840,000
    #   scores         [32,100]x[100,2080]: forward + dOut + dWy             = 3 x 2*32*100*2080 = 39,936,000
    assert flops_per_step([100], 32, 2048) == 5_760_000 + 3_840_000 + 39_936_000
    # ~1.55 MFLOP per training event (the figure of benchmarks/README_gru4rec.md)
    assert flops_per_step([100], 32, 2048) / 32 == 1_548_000


def test_two_layers_small_by_hand():
    # B=4, layers [6, 5], S=3, tied: layer 1 input = H_last = 5, layer 2 input = 6
    l1_in = 3 * 2 * 4 * 5 * 18
    l1_h = 2 * 2 * 4 * 6 * 18
    l2_in = 3 * 2 * 4 * 6 * 15
    l2_h = 2 * 2 * 4 * 5 * 15
    scores = 3 * 2 * 4 * 5 * (4 + 3)
    assert flops_per_step([6, 5], 4, 3) == l1_in + l1_h + l2_in + l2_h + scores
    # the hidden products carry only the weight gradient; the one-hot input has no input product
    grads = {label.split(" [")[0]: p.grads for label, p in step_products([6, 5], 4, 3)}
    assert grads == {"layer1 input": 2, "layer1 hidden": 1, "layer2 input": 2, "layer2 hidden": 1, "scores": 2}
    assert flops_per_step([6], 4, 3, embedding="onehot") == 2 * 2 * 4 * 6 * 18 + 3 * 2 * 4 * 6 * 7


def test_official_sets_map_onto_our_config():
    from training.config import resolve_config

    for name, (_, p) in OFFICIAL_BEST.items():
        cfg = resolve_config("gru4rec", overrides=our_config(p))
        assert cfg.layers == p["layers"] and cfg.batch_size == p["batch_size"], name
        assert cfg.final_act == ("softmax" if p["loss"] == "cross-entropy" else f"elu-{p['elu_param']:g}"), name


def test_dense_params_by_hand():
    from benchmarks.gru4rec_settings import dense_params
    # yoochoose: one layer of 480 with a tied input of 480: W_ih + W_hh 2 x 3*480*480, biases 6*480
    assert dense_params([480], 480) == 2 * 3 * 480 * 480 + 6 * 480 == 1_385_280
    # two layers [6, 5], tied input 5: (18*5 + 18*6 + 36) + (15*6 + 15*5 + 30)
    assert dense_params([6, 5], 5) == (90 + 108 + 36) + (90 + 75 + 30)


def test_optimizer_bytes_by_hand():
    from benchmarks.gru4rec_settings import optimizer_bytes
    # weight + accumulator read and written, float32: 16 B per value; + momentum: 24 B
    assert optimizer_bytes(1000, 10.0, 7, momentum=False) == 16 * (1000 + 10 * 8)
    assert optimizer_bytes(1000, 10.0, 7, momentum=True) == 24 * (1000 + 10 * 8)


def test_expected_unique_rows_against_simulation():
    """The closed form against counting distinct items over simulated steps."""
    import numpy as np

    from benchmarks.gru4rec_settings import expected_unique_rows
    rng = np.random.default_rng(0)
    sup = rng.zipf(1.6, 300).astype(float)
    ev = sup / sup.sum()
    sp = sup ** 0.4
    sp /= sp.sum()
    B, S = 8, 50
    got = [len(np.unique(np.r_[rng.choice(300, 2 * B, p=ev), rng.choice(300, S, p=sp)])) for _ in range(4000)]
    assert abs(expected_unique_rows(ev, sp, B, S) - np.mean(got)) < 4 * np.std(got) / np.sqrt(len(got))
    # nothing drawn -> no rows; one item only -> one row
    assert expected_unique_rows(ev, sp, 0, 0) == 0.0
    one = np.r_[1.0, np.zeros(299)]
    assert abs(expected_unique_rows(one, one, B, S) - 1.0) < 1e-12
