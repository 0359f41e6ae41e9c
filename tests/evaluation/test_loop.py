"""The evaluation loop: state reset per session, full ranking, CLI outputs, any family."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from evaluation.evaluate import evaluate
from evaluation.loop import evaluate_sessions
from evaluation.metrics import ranks
from training.baselines.pop import PopScorer
from tests.training.toy import events_table, toy_split, write_split
from training.data import SessionData, read_events, read_item_index
from training.families.gru4rec import GRU4RecConfig, GRU4RecModel
from training.scoring import RNNScorer, Scorer
from training.train import train


def _model(n_items=12):
    m = GRU4RecModel(n_items, GRU4RecConfig(layers=[8], dropout_hidden=0.0))
    m.reset_parameters(torch.Generator().manual_seed(1))
    return m


def test_parallel_evaluation_equals_each_session_alone():
    """Checklist 1: with 2 slots, every prediction equals the one made with the session run
    alone from a zero state (so the reset hits the right slot at the right step)."""
    lengths = [3, 2, 5, 2, 4]
    items = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4], np.int64)
    off = np.r_[0, np.cumsum(lengths)]
    data = SessionData(items=items, offsets=off, session_ids=np.arange(5) + 50,
                       start_ts=np.arange(5), user_ids=None)
    m = _model()
    sc = RNNScorer(m, torch.device("cpu"))
    res = evaluate_sessions(sc, data, n_slots=2)
    assert res.n_events == sum(L - 1 for L in lengths)
    for k in range(res.n_events):
        s, p = res.session_idx[k], res.position[k]
        seq = items[off[s]:off[s + 1]]
        st = m.init_state(1)
        with torch.no_grad():
            for j in range(p + 1):
                out, st = m(torch.tensor([seq[j]]), st)
            sc_alone = m.all_scores(out)
        r_alone = ranks(sc_alone, torch.tensor([seq[p + 1]])).item()
        assert res.target[k] == seq[p + 1]
        assert 1 + res.greater[k] + res.ties[k] == r_alone


def test_pop_scorer_through_the_same_loop():
    support = torch.tensor([5, 1, 9, 3])
    sc = PopScorer(support, torch.device("cpu"))
    assert isinstance(sc, Scorer)
    data = SessionData(items=np.array([0, 2, 2, 1]), offsets=np.array([0, 2, 4]),
                       session_ids=np.array([1, 2]), start_ts=np.array([0, 1]), user_ids=None)
    res = evaluate_sessions(sc, data, n_slots=4)
    # targets 2 (most popular -> rank 1) and 1 (least popular -> rank 4)
    got = sorted(zip(res.target.tolist(), (1 + res.greater + res.ties).tolist()))
    assert got == [(1, 4), (2, 1)]


def test_unknown_items_dropped_then_short_sessions(tmp_path):
    """Checklist 7: unknown test items are removed first, then sessions < 2 events."""
    root = write_split(tmp_path, {
        "train_full": events_table([(1, [10, 11, 12]), (2, [11, 12])]),
        "test": events_table([(5, [10, 99, 11]), (6, [98, 12]), (7, [12, 97, 96])]),
    })
    idx = read_item_index(root)
    d = read_events(root, "test", idx)
    assert d.n_unknown_dropped == 4
    assert d.n_short_dropped == 2  # session 6 -> [12], session 7 -> [12]
    assert d.session_ids.tolist() == [5]
    assert idx.item_ids[d.items].tolist() == [10, 11]


def test_test_events_sorted_by_time_within_session(tmp_path):
    """Checklist 10: events are put in time order whatever the file order, and whatever ``seq``
    says: session 2's ``seq`` runs backwards against its timestamps (so an order by ``seq``
    alone, or by file position, gives a different answer than time)."""
    import pyarrow as pa

    t = events_table([(1, [10, 11, 12]), (2, [11, 12, 10])])
    t = t.set_column(t.schema.get_field_index("seq"), "seq", pa.array([0, 1, 2, 2, 1, 0], pa.int32()))
    shuffled = t.take([5, 0, 3, 2, 4, 1])
    root = write_split(tmp_path, {"train_full": t, "test": shuffled})
    d = read_events(root, "test", read_item_index(root))
    idx = read_item_index(root)
    assert idx.item_ids[d.items].tolist() == [10, 11, 12, 11, 12, 10]


@pytest.mark.parametrize("model", ["pop", "gru4rec"])
def test_evaluate_cli_outputs(tmp_path, model):
    root = toy_split(tmp_path / "split", n_train=120, n_test=30)
    run = tmp_path / "run"
    train(model, root, run, sets=["n_epochs=1", "n_sample=16", "batch_size=8", "layers=16"],
          show_progress=False) if model == "gru4rec" else train(model, root, run, show_progress=False)
    from evaluation.evaluate import main
    assert main(["--model-dir", str(run), "--data", str(root), "--out", str(tmp_path / "ev")]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for k in (1, 5, 10, 20):
        for name in ("recall", "mrr", "precision"):
            assert 0.0 <= m[f"{name}_at_{k}"] <= 1.0
    assert m["ties"] == "conservative" and m["model"] == model
    pe = pq.read_table(tmp_path / "ev" / "per_event.parquet")
    assert pe.num_rows == m["n_events"] > 0
    r = pe.column("rank").to_numpy()
    assert m["recall_at_20"] == pytest.approx(float((r <= 20).mean()))
    bl = json.loads((tmp_path / "ev" / "breakdowns.json").read_text())
    assert sum(b["n_events"] for b in bl["session_length"]) == m["n_events"]
    assert sum(b["n_events"] for b in bl["position"]) == m["n_events"]
    assert (tmp_path / "ev" / "breakdown_length.csv").read_text().startswith("bucket,n_events")
