"""Real data (issue 13): a non-default loss reaches the official code's accuracy on rsc15-100k.

The official retailrocket best setting (GRU4Rec_PyTorch_Official @ d1fc311,
``paramfiles/retailrocket_bprmax_shared_best.py``: bpr-max, bpreg 1.95, ELU 0.5, tied embedding,
224 units, batch 80, dropout embed 0.5 / hidden 0.05, Adagrad lr 0.05 momentum 0.4, 2048 extra
negatives, alpha 0.4, no logQ, 10 epochs = ``benchmarks/gru4rec_retailrocket_bprmax.yaml``), the
cheapest of the measured bpr-max settings, trained on ``train_full`` (the session fixture's
Spark-built split) and tested on ``test`` (full ranking, conservative ties). Its Recall@20 must be
within 0.01 of the official code's on the same data: the mean over seeds committed in
``benchmarks/results/gru4rec_loss_settings_accuracy.json`` (how it was measured:
benchmarks/README_gru4rec.md, "Non-default losses against the official code (issue 13)").
"""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "gru4rec_loss_settings_accuracy.json"
SETTING = "retailrocket_bprmax"
# the official code's Recall@20 for SETTING, 10 epochs (mean over its seeds; pinned here so that a
# change of the results file cannot silently move the bar: the test checks both agree)
OFFICIAL_RECALL_AT_20 = 0.6855  # official seeds 1 and 2: 0.68814, 0.68282


@pytest.fixture(scope="session")
def rsc15_split(rsc15_out):
    """The shared rsc15 split built by the project's Spark job (tests/conftest.py)."""
    return rsc15_out[0] / "splits" / "time"


def _official_figure() -> float:
    summary = json.loads(RESULTS.read_text())["summary"]
    row = next(r for r in summary if r["setting"] == SETTING and r["epochs"] == 10)
    return row["official_recall_at_20"]


def test_committed_official_figure_matches_the_pin():
    assert _official_figure() == pytest.approx(OFFICIAL_RECALL_AT_20, abs=5e-5)


def test_retailrocket_bprmax_setting_within_001_of_official(rsc15_split, tmp_path):
    from evaluation.evaluate import evaluate
    from training.train import train

    res = train("gru4rec", rsc15_split, tmp_path / "run", str(ROOT / "benchmarks" / f"gru4rec_{SETTING}.yaml"),
                ["seed=1", "num_threads=1"], show_progress=False)
    cfg = res["config"]
    # the YAML IS the official file: guard against silent drift
    assert (cfg["loss"], cfg["bpreg"], cfg["final_act"], cfg["embedding"], cfg["layers"], cfg["batch_size"]) == \
        ("bpr-max", 1.95, "elu-0.5", "tied", [224], 80)
    assert (cfg["dropout_embed"], cfg["dropout_hidden"], cfg["learning_rate"], cfg["momentum"]) == (0.5, 0.05, 0.05, 0.4)
    assert (cfg["n_sample"], cfg["sample_alpha"], cfg["logq"], cfg["n_epochs"], cfg["optimizer"]) == \
        (2048, 0.4, 0.0, 10, "adagrad")
    hist = res["history"]
    assert len(hist) == 10 and hist[-1]["loss"] < hist[0]["loss"]
    m = evaluate(tmp_path / "run", rsc15_split, tmp_path / "eval")
    print(json.dumps({k: m[k] for k in ("recall_at_20", "mrr_at_20")}))
    assert m["ties"] == "conservative" and m["n_items_ranked"] == 2933
    assert m["n_events"] == 13568 - 3416
    assert abs(m["recall_at_20"] - OFFICIAL_RECALL_AT_20) <= 0.01, (m["recall_at_20"], OFFICIAL_RECALL_AT_20)
