"""Quality gates on small contract-conforming outputs built with pyarrow, then broken on purpose.

    .venv/bin/python -m pytest tests/expectations -x -q
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from expectations import runner as R
from spark_jobs import contract as C
from tests.expectations import builders as B


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    return {s: B.build_out(root / s, strategy=s) for s in ("time", "time_strict")}


@pytest.fixture
def out(pristine, tmp_path):
    """A fresh copy of the GRU4Rec-time-split output for a test to break."""
    dst = tmp_path / "out"
    shutil.copytree(pristine["time"], dst, ignore=shutil.ignore_patterns("quality"))
    return dst


@pytest.fixture
def out_global(pristine, tmp_path):
    dst = tmp_path / "out_global"
    shutil.copytree(pristine["time_strict"], dst, ignore=shutil.ignore_patterns("quality"))
    return dst


def _one_failure(err: R.GateFailed, gate: str) -> R.Failure:
    fs = [f for r in err.results for f in r.failures if f.gate == gate]
    assert fs, f"expected a failure of {gate!r}, got {[f.gate for r in err.results for f in r.failures]}"
    return fs[0]


# --------------------------------------------------------------------------- suites themselves
def test_every_suite_loads_as_gx_suite_and_names_its_frames():
    import great_expectations as gx

    for name in R.SUITES:
        s = R.load_suite(name)
        assert isinstance(s, gx.ExpectationSuite) and s.name == name and len(s.expectations) >= 4
        for frame, exps in R.suite_frames(name).items():
            assert f"{name}.{frame}" in R.INDEX_COLUMNS, f"{name}.{frame} has no offending-row columns"
            assert all(e["meta"].get("gate") for e in exps)


def test_unknown_parameter_is_rejected():
    with pytest.raises(ValueError, match="unknown gate parameter"):
        R.GateParams.from_mapping({"max_dup": "0.1"})


# --------------------------------------------------------------------------- passing
@pytest.mark.parametrize("strategy", ["time", "time_strict"])
def test_all_gates_pass_on_a_conforming_output_and_write_reports(pristine, tmp_path, strategy):
    out = tmp_path / "o"
    shutil.copytree(pristine[strategy], out)
    res = R.run_all_gates(out)
    assert res.success
    assert {(r.suite, r.table) for r in res.results} >= {
        ("raw_events", "events"), ("sessions", "events"), ("sessions", f"splits/{strategy}/test"),
        ("splits", f"splits/{strategy}"), ("model_inputs", f"splits/{strategy}")}
    assert res.data_docs_index == out / "quality" / "data_docs" / "index.html" and res.data_docs_index.is_file()
    html = res.data_docs_index.read_text()
    assert "splits-leakage-splits__" in html  # the derived leakage frame is in the Data Docs
    sp = next(r for r in res.results if r.suite == "splits")
    assert "leakage" not in sp.skipped and "recent" not in sp.skipped
    full = json.loads(sp.result_path.read_text())
    lk = full["frames"]["leakage"]["results"][0]
    assert lk["success"] and lk["result"]["element_count"] == (6 if strategy == "time_strict" else 2)
    summary = json.loads((out / "quality" / "summary.json").read_text())
    assert summary["success"] and len(summary["gates"]) == len(res.results)
    if strategy == "time":  # re-run: same verdict, reports replaced, no temporary leftovers
        before = sorted(p.relative_to(out) for p in (out / "quality").rglob("*.json"))
        assert R.gates_for_demo(out) == res.data_docs_index  # the demo's entry point: a re-run
        assert sorted(p.relative_to(out) for p in (out / "quality").rglob("*.json")) == before
        assert not [p for p in (out / "quality").rglob(".*")]


def test_in_memory_table_and_standalone_docs(tmp_path):
    df = B.make_events(10)
    r = R.validate_table(B.to_table(df), "sessions", out_dir=tmp_path / "q", table="mem")
    assert r.success and r.data_docs_index.is_file()
    assert r.result_path == tmp_path / "q" / "sessions" / "mem" / "result.json"


# --------------------------------------------------------------------------- broken on purpose
def test_out_of_order_events_fail_the_sessions_gate(out):
    sid = B.swap_ts_within_session(out / "splits/time/test")
    with pytest.raises(R.GateFailed) as e:
        R.validate_table(out / "splits/time/test", "sessions")
    f = _one_failure(e.value, "ts non-decreasing within a session")
    assert f.table == "splits/time/test" and f.unexpected_count == 1
    assert f.offending[0]["session_id"] == str(sid) and float(f.offending[0]["ts_step_s"]) < 0
    msg = str(e.value)
    assert "splits/time/test" in msg and "ts_step_s" in msg and "1 of" in msg and str(sid) in msg
    assert "Data Docs:" in msg and e.value.results[0].data_docs_index.is_file()


def test_seq_gap_two_users_and_min_length(out):
    p = out / "splits/time/train"
    df = B.read(p)
    first = df.session_id.iloc[0]
    df.loc[df.index[1], "seq"] = 7  # gap in seq
    second = df.session_id[df.session_id != first].iloc[0]
    df.loc[(df.session_id == second).to_numpy().nonzero()[0][-1], "user_id"] = 999  # a second user
    B.rewrite(p, df)
    with pytest.raises(R.GateFailed) as e:
        R.validate_table(p, "sessions", params={"min_session_length": 3})
    f = _one_failure(e.value, "seq contiguous from 0 within a session")
    assert f.offending[0]["session_id"] == str(first)
    f = _one_failure(e.value, "every session belongs to one user")
    assert f.offending[0]["session_id"] == str(second) and f.offending[0]["n_users"] == "2"
    f = _one_failure(e.value, "session length >= the configured minimum")
    assert f.kwargs["min_value"] == 3 and f.unexpected_count == int((df.groupby("session_id").size() < 3).sum())


def test_raw_events_duplicates_range_and_types(out, tmp_path):
    p = out / "events"
    df = B.read(p)
    dup = pd.concat([df, df.iloc[:5]], ignore_index=True)  # 5 exact duplicates
    B.rewrite(p, dup)
    with pytest.raises(R.GateFailed) as e:
        R.validate_table(p, "raw_events")
    f = _one_failure(e.value, "exact-duplicate events within the allowed fraction")
    assert f.observed == pytest.approx(5 / len(dup))
    assert R.validate_table(p, "raw_events", params={"max_duplicate_fraction": 0.05}).success

    bad = df.copy()
    bad.loc[3, "ts"] = pd.Timestamp("1970-01-02", tz="UTC")
    bad["seq"] = bad["seq"].astype("int64")
    t = pa.Table.from_pandas(bad, preserve_index=False)
    with pytest.raises(R.GateFailed) as e:
        R.validate_table(t, "raw_events", out_dir=tmp_path / "q", table="bad")
    f = _one_failure(e.value, "timestamps in the plausible range")
    assert f.unexpected_count == 1 and f.offending[0]["session_id"] == str(bad.session_id[3])
    f = _one_failure(e.value, "required columns present with the contract's types")
    assert f.offending == [{"column": "seq", "observed_type": "int64", "contract_type": "int32"}]


def test_missing_item_fails_splits_and_model_inputs(out):
    p = out / "splits/time/test"
    df = B.read(p)
    df.loc[0, "item_id"] = 999_999  # an item the index does not know
    B.rewrite(p, df)
    with pytest.raises(R.GateFailed) as e:
        R.validate_split_dir(out / "splits/time")
    f = _one_failure(e.value, "every valid/test item is in the item index")
    assert f.offending == [{"table": "test", "item_id": "999999", "in_index": "0"}]
    with pytest.raises(R.GateFailed) as e:
        R.validate_model_inputs(out / "splits/time")
    f = _one_failure(e.value, "every item fed to a model has an index (no NaN)")
    assert {"table": "test", "item_id": "999999"}.items() <= f.offending[0].items()


def test_training_event_after_the_cut_is_leakage(out, out_global):
    meta = json.loads((out / "splits/time/split.json").read_text())
    p = out / "splits/time/train_full"
    df = B.read(p)
    df.loc[len(df) - 1, "ts"] = pd.Timestamp(meta["cut_ts"]) + pd.Timedelta(seconds=5)
    B.rewrite(p, df)
    with pytest.raises(R.GateFailed) as e:
        R.validate_split_dir(out / "splits/time")
    f = _one_failure(e.value, "no leakage through the time cut")
    assert f.offending[0]["check"] == "max(train_full.ts) < cut_ts"
    assert "no leakage" in str(e.value) and meta["cut_ts"][:19] in str(e.value)

    # global cut: a test event before the cut also leaks
    gm = json.loads((out_global / "splits/time_strict/split.json").read_text())
    p = out_global / "splits/time_strict/test"
    df = B.read(p)
    df.loc[0, "ts"] = pd.Timestamp(gm["cut_ts"]) - pd.Timedelta(hours=1)
    B.rewrite(p, df)
    with pytest.raises(R.GateFailed) as e:
        R.validate_split_dir(out_global / "splits/time_strict")
    checks = {o["check"] for f in e.value.results[0].failures if f.gate == "no leakage through the time cut"
              for o in f.offending}
    assert checks == {"cut_ts <= min(test.ts)", "max(train_full.ts) <= min(test.ts)"}


def test_non_time_split_skips_leakage_with_reason(out):
    B.edit_json(out / "splits/time/split.json", lambda d: d.update(global_cut=False, cut_ts=None, valid_cut_ts=None,
                                                                   strategy="random_users"))
    r = R.validate_split_dir(out / "splits/time")
    assert r.success and "random_users" in r.skipped["leakage"]


def test_nan_index_fails_model_inputs(out):
    p = out / "splits/time/item_index"
    idx = B.read(p)
    idx["item_idx"] = idx["item_idx"].astype("float64")
    idx.loc[2, "item_idx"] = np.nan
    B.write_table(p, pa.Table.from_pandas(idx, preserve_index=False))
    with pytest.raises(R.GateFailed) as e:
        R.validate_model_inputs(out / "splits/time")
    f = _one_failure(e.value, "item indices are not NaN")
    assert f.unexpected_count == 1 and f.offending[0]["item_id"] == str(idx.item_id[2])
    f = _one_failure(e.value, "item index columns have the contract's types")
    assert f.offending[0]["observed_type"] == "double"


def test_manifest_that_lies(out):
    B.edit_json(out / C.MANIFEST, lambda d: d["splits"]["time"]["tables"]["test"].update(
        events=d["splits"]["time"]["tables"]["test"]["events"] + 1))
    with pytest.raises(R.GateFailed) as e:
        R.validate_split_dir(out / "splits/time")
    f = _one_failure(e.value, "manifest counts equal the table counts")
    assert f.unexpected_count == 1
    o = f.offending[0]
    assert (o["source"], o["table"], o["figure"]) == ("manifest.json", "test", "events")
    assert int(o["stated"]) == int(o["observed"]) + 1


def test_session_in_two_tables_and_stale_recent_fraction(out):
    sd = out / "splits/time"
    train, test = B.read(sd / "train"), B.read(sd / "test")
    leaked = train[train.session_id == train.session_id.iloc[0]]
    B.rewrite(sd / "test", pd.concat([test, leaked], ignore_index=True).sort_values(["session_id", "seq"]))
    full = B.read(sd / "train_full")
    starts = full.groupby("session_id").ts.min().sort_values()
    n = B.read(sd / "train_recent_4").session_id.nunique()
    B.rewrite(sd / "train_recent_4", full[full.session_id.isin(starts.index[:n])])  # the OLDEST sessions
    with pytest.raises(R.GateFailed) as e:
        R.validate_split_dir(sd)
    f = _one_failure(e.value, "each session in exactly one of train/valid/test")
    assert f.offending[0] == {"session_id": str(leaked.session_id.iloc[0]), "tables": "train+test", "n_tables": "2"}
    f = _one_failure(e.value, "recent fraction is really the most recent")
    assert f.offending[0]["table"] == "train_recent_4"


def test_cli_exit_codes(out, capsys):
    assert R.main(["--suite", "splits", "--data", str(out / "splits/time")]) == 0
    assert "passed" in capsys.readouterr().out
    B.swap_ts_within_session(out / "events")
    assert R.main(["--suite", "sessions", "--data", str(out / "events")]) == 1
    err = capsys.readouterr().err
    assert "gate 'sessions' on table 'events' failed" in err and "Data Docs:" in err
    assert (out / "quality/sessions/events/data_docs/index.html").is_file()
    assert R.main(["--suite", "sessions", "--data", str(out / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err

