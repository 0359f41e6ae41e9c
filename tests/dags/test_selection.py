"""Honest model selection in the DAG (evaluation/selection.py wired by dags/pipeline_steps.py).

The data are built so that the old rule is fooled: the most recent quarter of ``train`` is
noise, and ``valid`` follows the same "next = item + 1" pattern as the rest. The fine-tuned
candidate ``gru4rec-recent4`` is fine-tuned on ``train_recent_4``, which is mostly ``valid``
itself, so by the old rule (final models scored on ``valid``) it wins. Its selection copy is
fine-tuned on the recent quarter of ``train`` (the noise) and never sees ``valid``: by the
new rule it loses. (``test`` is only reported; it plays no part in the choice.)
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.training.toy import events_table, random_sessions, write_split

GRU = {"layers": [24], "n_sample": 16, "batch_size": 16, "learning_rate": 0.1, "num_threads": 1}


def _noise(n, n_items, seed, start_id):
    rng = np.random.default_rng(seed)
    return [(start_id + s, [100 + int(i) for i in rng.integers(0, n_items, int(rng.integers(3, 8)))])
            for s in range(n)]


def _split(root):
    """valid's events carry the same timestamps in every table (train_full holds valid)."""
    import pyarrow as pa

    train = random_sessions(300, 40, 0, start_id=1) + _noise(100, 40, 3, 3000)
    valid = random_sessions(100, 40, 2, start_id=5_000)
    test = random_sessions(80, 40, 1, start_id=10_000)
    t_train, t_valid = events_table(train), events_table(valid, t0=1_650_000_000)
    n_recent = (len(train) + len(valid) + 3) // 4  # the most recent quarter of train_full
    recent = pa.concat_tables([events_table(train[len(train) - (n_recent - len(valid)):]), t_valid])
    tables = {t: {"events": 1, "sessions": 1, "items": 1, "users": 0} for t in
              ("train_full", "train", "valid", "test", "train_recent_4")}
    (root / "processed").mkdir(parents=True, exist_ok=True)
    (root / "processed" / "manifest.json").write_text(json.dumps({"splits": {"time_strict": {"tables": tables}}}))
    return write_split(root / "processed" / "splits" / "time_strict", {
        "train_full": pa.concat_tables([t_train, t_valid]), "train": t_train, "valid": t_valid,
        "test": events_table(test, t0=1_700_000_000), "train_recent_4": recent})


def _run(steps, tmp, split, seed=0, **params):
    cfg = steps.resolve({"data_dir": str(tmp), "families": ["gru4rec"], "fractions": [4], "epochs": 3,
                         "device": "cpu", "overrides": {"gru4rec": {**GRU, "seed": seed}},
                         "finetune": {"gru4rec": {"4": {"n_epochs": 3}}}, **params},
                        dag_id="session_rec_pipeline", dag_run_id=f"manual__{seed}",
                        interval_start="2014-04-07T00:00:00Z", interval_end="2014-04-08T00:00:00Z")
    prep = {"processed": str(tmp / "processed"), "split_dir": str(split)}
    parent = steps.start_tracking(cfg, prep, {"quality_dir": str(tmp / "no-quality")})
    pre = [steps.train_one(cfg, s, parent) for s in steps.plan_pretrain(cfg, prep)]
    fine = [steps.train_one(cfg, s, parent) for s in steps.plan_finetune(cfg, pre)]
    evaluated = [steps.evaluate_one(cfg, t) for t in pre + fine]
    return cfg, evaluated, steps.compare_and_register(cfg, evaluated, parent)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import mlflow

    from dags import pipeline_steps as steps

    tmp = tmp_path_factory.mktemp("selection")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    try:
        split = _split(tmp)
        first = _run(steps, tmp, split, seed=0)
        second = _run(steps, tmp, split, seed=1)  # same interval again, other weights
        yield {"tmp": tmp, "split": split, "first": first, "second": second}
    finally:
        mp.undo()
        mlflow.set_tracking_uri(None)


def test_a_candidate_that_trained_on_valid_wins_by_the_old_rule_and_not_now(runs, tmp_path):
    from evaluation.evaluate import evaluate

    cfg, evaluated, summary = runs["first"]
    by = {e["candidate"]: e for e in evaluated}
    # the old rule: the FINAL models (train_full / train_recent_4 contain valid) scored on valid
    old = {c: evaluate(e["run_dir"], runs["split"], tmp_path / c, table="valid", device="cpu")["mrr_at_20"]
           for c, e in by.items()}
    assert max(old, key=old.get) == "gru4rec-recent4", old
    # the new rule: the selection copies (never saw valid) choose
    chosen = {d["model"]: d["candidate"] for d in summary["registry"]}
    assert chosen == {"synthetic-gru4rec": "gru4rec", "synthetic-best": "gru4rec"}
    assert by["gru4rec"]["valid_mrr_at_20"] > by["gru4rec-recent4"]["valid_mrr_at_20"]
    # every candidate says which tables trained, selected and reported it
    assert by["gru4rec-recent4"]["train_table"] == "train_recent_4"
    assert "selection copy trained on train (fine-tuned on its most recent 1/4)" in by["gru4rec-recent4"]["selection"]
    assert by["gru4rec"]["select_train_end_us"] < by["gru4rec"]["final_train_end_us"]


def test_registry_records_tables_lineage_and_why_champion_moved_or_not(runs):
    import mlflow

    c = mlflow.tracking.MlflowClient()
    champ = c.get_model_version_by_alias("synthetic-gru4rec", "champion")
    t = champ.tags
    assert t["rnnrec_train_table"] == "train_full" and t["rnnrec_report_table"] == "test"
    assert t["rnnrec_selection"].startswith("valid") and t["rnnrec_selection_model_uri"].startswith("models:/")
    assert int(t["rnnrec_selection_train_end_us"]) < int(t["rnnrec_final_train_end_us"])
    # the second run of the same interval: the champion's final model trained on this valid, so
    # it is compared through its selection copy; the registry says what happened and why
    _, evaluated2, summary2 = runs["second"]
    d = {x["model"]: x for x in summary2["registry"]}["synthetic-gru4rec"]
    assert d["champion_model"] == "selection" and d["comparison"]["table"] == "valid"
    assert d["action"] in ("promoted", "kept current champion")
    assert ("Wilcoxon p < 0.05" in d["reason"]) and "sessions" in d["reason"]
    m = c.get_registered_model("synthetic-gru4rec")
    assert m.tags["rnnrec_last_decision"].startswith(f"v{d['candidate_version']} {d['action']}")
    # fine-tuning lineage on the child run
    ft = {e["candidate"]: e for e in evaluated2}["gru4rec-recent4"]
    run = c.get_run(ft["child_run_id"])
    assert run.data.tags["rnnrec_parent_candidate"] == "gru4rec"
    assert run.data.tags["rnnrec_parent_run_id"] == {e["candidate"]: e for e in evaluated2}["gru4rec"]["child_run_id"]
    assert run.data.tags["rnnrec_init_optimizer"] == "reset"
    # eval tables logged as mlflow.data inputs, counts as metrics
    ctx = {i.tags[0].value if i.tags else "" for i in run.inputs.dataset_inputs}
    assert {"evaluation:valid", "evaluation:test"} <= ctx
    assert run.data.metrics["n_events"] > 0 and "valid_dropped_short_sessions" in run.data.metrics


def test_promotion_rule_needs_a_better_mean_and_a_significant_paired_test():
    from evaluation.selection import Comparison, promotion_decision

    def comp(diff, p):
        return Comparison("mrr_at_20", "valid", 0.3 + diff, 0.3, diff, p, 100, 500)

    assert promotion_decision(comp(0.01, 0.01))[0] is True
    assert promotion_decision(comp(0.01, 0.2))[0] is False  # better but noise
    assert promotion_decision(comp(-0.01, 0.001))[0] is False  # significant but worse
    assert promotion_decision(comp(0.02, 0.5), margin=0.015)[0] is True
    assert promotion_decision(comp(0.01, 0.001), margin=0.015)[0] is False
    ok, why = promotion_decision(None, reason_if_none="no unseen model")
    assert not ok and why == "no unseen model"


def test_unseen_model_prefers_the_final_model_then_the_selection_copy():
    from evaluation.selection import unseen_model

    tags = {"p_final_train_end_us": "200", "p_final_model_uri": "models:/f",
            "p_selection_train_end_us": "100", "p_selection_model_uri": "models:/s"}
    assert unseen_model(tags, 300, "p_") == ("final", "models:/f")
    assert unseen_model(tags, 150, "p_") == ("selection", "models:/s")
    assert unseen_model(tags, 100, "p_") is None  # ended AT the start: not strictly before
    assert unseen_model({}, 100, "p_") is None


def test_models_with_different_item_indexes_are_compared_on_the_same_events(tmp_path):
    """A champion from an older interval knows other items than the candidate: both are
    evaluated with ``only_items`` = the items both know, so their per-event rows pair up."""
    from evaluation.compare import check_same_test, load_eval
    from evaluation.evaluate import evaluate
    from tests.training.toy import toy_split
    from training import checkpoint as ck
    from training.train import train

    a_split = toy_split(tmp_path / "a", n_train=150, n_test=40, n_items=200, seed=0)
    b_split = toy_split(tmp_path / "b", n_train=20, n_test=40, n_items=200, seed=0)  # fewer items seen
    for name, sp in (("a", a_split), ("b", b_split)):
        train("pop", sp, tmp_path / f"run_{name}", show_progress=False)
    ids = [ck.load_checkpoint(tmp_path / f"run_{n}")["item_index"]["item_id"].numpy() for n in "ab"]
    assert len(ids[0]) != len(ids[1])
    plain = [evaluate(tmp_path / f"run_{n}", a_split, tmp_path / f"plain_{n}", device="cpu")["n_events"]
             for n in "ab"]
    assert plain[0] != plain[1]  # without the restriction they score different events
    common = np.intersect1d(*ids)
    for n in "ab":
        evaluate(tmp_path / f"run_{n}", a_split, tmp_path / f"common_{n}", device="cpu", only_items=common)
    check_same_test(load_eval(tmp_path / "common_a"), load_eval(tmp_path / "common_b"))  # raises if not


def test_another_selection_metric_chooses_and_is_recorded(tmp_path, monkeypatch):
    """``select_metric`` is the key of every decision: registry tag, parent-run best, table."""
    import mlflow

    from dags import pipeline_steps as steps

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        split = _split(tmp_path)
        _, evaluated, summary = _run(steps, tmp_path, split, select_metric="ndcg_at_10")
        c = mlflow.tracking.MlflowClient()
        best = max(evaluated, key=lambda e: e["valid_ndcg_at_10"])
        assert summary["select_key"] == "valid_ndcg_at_10"
        assert {d["metric"] for d in summary["registry"]} == {"ndcg_at_10"}
        assert {d["model"]: d["candidate"] for d in summary["registry"]}["synthetic-best"] == best["candidate"]
        champ = c.get_model_version_by_alias("synthetic-best", "champion")
        assert float(champ.tags["valid_ndcg_at_10"]) == pytest.approx(best["valid_ndcg_at_10"], abs=1e-6)
        parent = c.get_run(summary["parent_run_id"])
        assert parent.data.tags["rnnrec_best_candidate"] == best["candidate"]
        assert parent.data.metrics["best_valid_ndcg_at_10"] == pytest.approx(best["valid_ndcg_at_10"])
    finally:
        mlflow.set_tracking_uri(None)
