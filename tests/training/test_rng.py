"""training.rng: the counter-based streams of GRU4Rec's negatives and dropout masks."""
import numpy as np
import pytest
import torch

from training import native, rng
from training.batching import SampleStore, alias_tables

needs_lib = pytest.mark.skipif(native.load() is None, reason=f"C kernels unavailable: {native.why_not()}")


def test_raw_is_splitmix64():
    """Independent reference: the published splitmix64 outputs for the seed 1234567 (Vigna's
    splitmix64.c: state += 0x9E3779B97F4A7C15, then the mix), i.e. our positions 0..4."""
    want = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
            16408922859458223821]
    assert rng.raw(1234567, 0, 5).tolist() == want
    assert rng.raw(1234567, 3, 2).tolist() == want[3:]


def test_keys_differ_per_part_and_order():
    ks = {rng.stream_key(s, e, p) for s in range(3) for e in range(3) for p in (1, 2)}
    assert len(ks) == 18
    assert rng.stream_key(1, 2) != rng.stream_key(2, 1)


@needs_lib
@pytest.mark.parametrize("n", [7, 100_003])  # below / above the kernels' threading threshold
def test_c_draws_equal_the_numpy_reference(n, monkeypatch):
    prob, alias = alias_tables(np.random.default_rng(0).dirichlet(np.ones(997) * 0.3))
    for p in (0.05, 0.4, 0.5):
        c = rng.CounterStream(3, 1, rng.DROPOUT)
        a = c.mask((n,), p)
        b = torch.from_numpy(rng.mask_numpy(c.key, 0, n, p, float(np.float32(1 / (1 - p)))))
        assert torch.equal(a, b), p
    s = rng.CounterStream(3, 1, rng.SAMPLES)
    s.pos = 12345
    x = s.alias(n, prob, alias)
    assert torch.equal(x, torch.from_numpy(rng.alias_numpy(s.key, 12345, n, prob.numpy(), alias.numpy())))
    # the fallback path (no kernels) gives the same stream
    monkeypatch.setenv("RNNREC_NATIVE_RNG", "0")
    f = rng.CounterStream(3, 1, rng.SAMPLES)
    assert f.lib is None
    f.pos = 12345
    assert torch.equal(f.alias(n, prob, alias), x)


def test_draws_do_not_depend_on_how_they_are_split():
    a, b = rng.CounterStream(9, 0, rng.DROPOUT), rng.CounterStream(9, 0, rng.DROPOUT)
    whole = a.mask((6, 50), 0.3)
    parts = torch.cat([b.mask((2, 50), 0.3), b.mask((4, 50), 0.3)])
    assert torch.equal(whole, parts)


def test_mask_and_alias_distributions():
    m = rng.CounterStream(1, 0, rng.DROPOUT).mask((1000, 1000), 0.4)
    assert abs(float((m == 0).float().mean()) - 0.4) < 0.002  # 1M Bernoulli: sd 0.0005
    assert float(m.max()) == pytest.approx(1 / 0.6)
    p = np.random.default_rng(2).dirichlet(np.ones(50))
    p[7] = 0.0
    p /= p.sum()
    prob, alias = alias_tables(p)
    n = 2_000_000
    x = rng.CounterStream(1, 0, rng.SAMPLES).alias(n, prob, alias).numpy()
    freq = np.bincount(x, minlength=50) / n
    assert freq[7] == 0.0  # an item of probability 0 is never drawn
    sd = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 5 * sd + 1e-9), np.max(np.abs(freq - p) / (sd + 1e-12))


def test_sample_store_takes_a_counter_stream():
    support = np.arange(1, 201)
    st = SampleStore(support, n_sample=64, alpha=0.5, store_size=64 * 10,
                     generator=rng.CounterStream(0, 0, rng.SAMPLES), device=torch.device("cpu"))
    a = st.take(25)  # spans three refills of 10 rows
    st2 = SampleStore(support, n_sample=64, alpha=0.5, store_size=64 * 30,
                      generator=rng.CounterStream(0, 0, rng.SAMPLES), device=torch.device("cpu"))
    assert a.shape == (25, 64) and int(a.min()) >= 0 and int(a.max()) < 200
    assert torch.equal(a, st2.take(25))  # refill size does not change the stream


def test_epoch_chunks_do_not_depend_on_the_chunk_size(monkeypatch):
    """GRU4Rec's epoch stream (schedule, negatives, both dropout masks) is the same whether
    an epoch is cut into chunks of 256 steps, 7, or the mask-budget size: the chunk size is a
    memory / speed knob only (gru4rec.chunk_steps)."""
    from tests.training.toy import zipf_train_context
    from training.families import gru4rec

    ctx = zipf_train_context(2, n_sessions=200, max_len=12, n_items=90)
    cfg = gru4rec.GRU4RecConfig(batch_size=8, layers=[12, 10], n_sample=20, dropout_embed=0.3,
                                dropout_hidden=0.2)
    model = gru4rec.GRU4RecModel(90, cfg)

    def stream(chunk):
        monkeypatch.setattr(gru4rec, "CHUNK", chunk)
        chs = list(gru4rec.epoch_chunks(cfg, model, ctx, epoch=1))
        assert max(c.c1 - c.c0 for c in chs) == min(chunk, chs[-1].c1)
        cat = lambda f: torch.cat([f(c) for c in chs])
        return [cat(lambda c: c.X), cat(lambda c: c.Y), cat(lambda c: c.keep), cat(lambda c: c.samples),
                cat(lambda c: c.emb), cat(lambda c: c.hid[0]), cat(lambda c: c.hid[1])]

    ref = stream(256)
    for chunk in (7, 16):
        for a, b in zip(ref, stream(chunk)):
            assert torch.equal(a, b)
    monkeypatch.setattr(gru4rec, "MASK_BYTES", 8 * 4 * (10 + 12 + 10) * 9)  # 9 steps' masks (tied: width 10)
    assert gru4rec.chunk_steps(cfg, model) == 16  # never below 16
    monkeypatch.setattr(gru4rec, "CHUNK", 256)
    monkeypatch.setattr(gru4rec, "MASK_BYTES", 8 * 4 * (10 + 12 + 10) * 40)
    assert gru4rec.chunk_steps(cfg, model) == 40
