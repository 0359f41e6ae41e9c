"""Every gate on real preprocess outputs (../shared/data), then on copies broken on purpose.

    .venv/bin/python -m pytest tests/expectations/test_real_data.py -x -q

The outputs come from the real Spark job (spark_jobs.preprocess), once per module:
rsc15-100k with GRU4Rec's time split (test = last day, no extra filtering; not a
global cut, so only "no training event after the cut" is checked) and trivago
re-sessionized by user with the global-cut last-session split (users, user
index, leakage checks both ways). The DIGINETICA sample is validated raw: two
of its sessions carry two user ids, which the sessions gate must name.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from expectations import runner as R
from spark_jobs import contract as C
from spark_jobs.preprocess import PreprocessConfig, run
from tests.conftest import shared_path
from tests.expectations import builders as B


def _rsc(name: str) -> str:
    return str(shared_path("rsc15-100k", f"yoochoose-clicks-100k_{name}.txt"))


CONFIGS = {
    "rsc15": lambda out: PreprocessConfig(input=[_rsc("train_full"), _rsc("test")], format="gru4rec", split="time",
                                          test_days=1, min_item_support=0, min_session_length=0, out=out),
    "trivago": lambda out: PreprocessConfig(
        input=[str(shared_path("trivago-100k", "trivago_val_100k.parquet.snappy"))], format="trivago",
        sessionize_by_user=True, split="last_session_global", out=out),
}


@pytest.fixture(scope="module")
def real(spark, tmp_path_factory, rsc15_out):
    root = tmp_path_factory.mktemp("real")
    outs = {"rsc15": rsc15_out[0]}  # the shared session fixture (same config as CONFIGS["rsc15"])
    for name, cfg in CONFIGS.items():
        if name in outs:
            continue
        out = root / name
        run(cfg(str(out)), spark)
        outs[name] = out
    return outs


@pytest.fixture
def rsc15(real, tmp_path):
    """A private copy of the rsc15 output to break."""
    dst = tmp_path / "rsc15"
    shutil.copytree(real["rsc15"], dst, ignore=shutil.ignore_patterns("quality"))
    return dst


def _failure(err: R.GateFailed, gate: str) -> R.Failure:
    fs = [f for r in err.results for f in r.failures if f.gate == gate]
    assert fs, f"expected {gate!r} to fail; failed: {[f.gate for r in err.results for f in r.failures]}"
    return fs[0]


#: trivago logs repeated clicks on one item within one second (image carousel): 53% of its raw
#: rows repeat (session, user, ts, action, item), so its duplicate threshold is set per dataset.
PARAMS = {"rsc15": {}, "trivago": {"max_duplicate_fraction": 0.65}}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_gate_passes_on_real_output(real, name):
    out = real[name]
    res = R.run_all_gates(out, params=PARAMS[name])
    assert res.success and res.data_docs_index.is_file()
    suites = {r.suite for r in res.results}
    assert suites == set(R.SUITES)
    split = next(r for r in res.results if r.suite == "splits")
    meta = json.loads(next((out / C.SPLITS_DIR).glob("*/split.json")).read_text())
    frames = json.loads(split.result_path.read_text())["frames"]
    assert "leakage" in frames and "recent" in frames and "counts" in frames
    n_checks = frames["leakage"]["results"][0]["result"]["element_count"]
    assert n_checks == (6 if meta["global_cut"] else 2)
    mi = next(r for r in res.results if r.suite == "model_inputs")
    assert ("user_index" in mi.skipped) == (meta["n_users"] == 0)


def test_real_out_of_order_events(rsc15):
    p = rsc15 / "splits/time/test"
    sid = B.swap_ts_within_session(p)
    with pytest.raises(R.GateFailed) as e:
        R.validate_table(p, "sessions")
    f = _failure(e.value, "ts non-decreasing within a session")
    assert f.table == "splits/time/test" and f.unexpected_count == 1 and f.offending[0]["session_id"] == str(sid)
    assert "ts_step_s" in str(e.value)


def test_real_test_item_missing_from_index(rsc15):
    sd = rsc15 / "splits/time"
    idx = B.read(sd / C.ITEM_INDEX)
    test = B.read(sd / "test")
    gone = int(test.item_id.iloc[0])
    idx = idx[idx.item_id != gone]  # the index forgets an item the test set uses
    B.write_table(sd / C.ITEM_INDEX, pa.Table.from_pandas(idx, schema=C.ITEM_INDEX_SCHEMA, preserve_index=False))
    with pytest.raises(R.GateFailed) as e:
        R.validate_split_dir(sd)
    f = _failure(e.value, "every valid/test item is in the item index")
    assert {"table": "test", "item_id": str(gone), "in_index": "0"} in f.offending
    assert f.unexpected_count == sum(int(gone in set(B.read(sd / t).item_id)) for t in ("valid", "test"))
    _failure(e.value, "manifest counts equal the table counts")  # the index no longer has n_items rows


def test_real_training_event_after_the_cut(rsc15):
    sd = rsc15 / "splits/time"
    meta = json.loads((sd / "split.json").read_text())
    df = B.read(sd / "train_full")
    df.loc[len(df) // 2, "ts"] = pd.Timestamp(meta["cut_ts"]) + pd.Timedelta(minutes=1)
    B.rewrite(sd / "train_full", df)
    with pytest.raises(R.GateFailed) as e:
        R.validate_split_dir(sd)
    f = _failure(e.value, "no leakage through the time cut")
    assert f.offending[0]["check"] == "max(train_full.ts) < cut_ts"
    assert meta["cut_ts"][:19] in f.offending[0]["later"]


def test_real_nan_index(rsc15):
    p = rsc15 / "splits/time" / C.ITEM_INDEX
    idx = B.read(p)
    idx["item_idx"] = idx["item_idx"].astype("float64")
    idx.loc[10, "item_idx"] = np.nan
    B.write_table(p, pa.Table.from_pandas(idx, preserve_index=False))
    with pytest.raises(R.GateFailed) as e:
        R.validate_model_inputs(rsc15 / "splits/time")
    f = _failure(e.value, "item indices are not NaN")
    assert f.unexpected_count == 1 and f.offending[0]["item_id"] == str(idx.item_id[10])
    assert "item_idx" in str(e.value) and "splits/time" in str(e.value)


def test_real_manifest_that_lies(rsc15):
    B.edit_json(rsc15 / C.MANIFEST, lambda d: d["splits"]["time"]["tables"]["train"].update(sessions=1))
    with pytest.raises(R.GateFailed) as e:
        R.run_all_gates(rsc15)
    f = _failure(e.value, "manifest counts equal the table counts")
    o = f.offending[0]
    assert (o["source"], o["table"], o["figure"], o["stated"]) == ("manifest.json", "train", "sessions", "1")
    assert int(o["observed"]) == json.loads((rsc15 / "splits/time/split.json").read_text())["tables"]["train"]["sessions"]
    # only that gate failed, and the Data Docs were still written
    assert [r.suite for r in e.value.results] == ["splits"]
    assert e.value.data_docs_index.is_file()


def test_real_diginetica_sessions_with_two_users_are_caught(tmp_path):
    d = pd.read_csv(shared_path("diginetica-sample", "sample_train-item-views.csv"), sep=";",
                    dtype={"user_id": "Int64"})
    d["ts"] = pd.to_datetime(d.eventdate, utc=True) + pd.to_timedelta(d.timeframe, unit="ms")
    d = d.sort_values(["session_id", "ts"], kind="stable")
    d["seq"] = d.groupby("session_id").cumcount().astype("int32")
    t = pa.Table.from_pandas(d[C.EVENT_COLUMNS], schema=C.EVENT_SCHEMA, preserve_index=False)
    assert R.validate_table(t, "raw_events", out_dir=tmp_path, table="diginetica").success
    with pytest.raises(R.GateFailed) as e:
        R.validate_table(t, "sessions", out_dir=tmp_path, table="diginetica")
    f = _failure(e.value, "every session belongs to one user")
    assert f.unexpected_count == 2 and {o["session_id"] for o in f.offending} == {"1691", "2998"}
    assert [x.gate for x in e.value.results[0].failures] == ["every session belongs to one user"]


def test_real_trivago_duplicates_exceed_the_default_threshold(real, tmp_path):
    with pytest.raises(R.GateFailed) as e:
        R.validate_table(real["trivago"] / C.EVENTS_DIR, "raw_events", out_dir=tmp_path)
    f = _failure(e.value, "exact-duplicate events within the allowed fraction")
    assert 0.5 < f.observed < 0.65 and f.kwargs["max_value"] == 0.01
    assert len(f.offending) == 5 and all(o["is_duplicate"] == 1 for o in f.offending)
