"""Every reader on small hand-written files (and the real DIGINETICA sample)."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spark_jobs import readers
from spark_jobs.preprocess import PreprocessConfig, config_from_args
from tests.conftest import shared_path
from tests.spark_jobs.helpers import write_lines

T0 = 1_396_437_466  # 2014-04-02T11:17:46Z


def _rows(spark, path, fmt, **kw):
    res = readers.read_events(spark, [str(path)], fmt, **kw)
    ev = res.events.orderBy("_file_idx", "_ord").toPandas()
    return ev, res


def _utc(s):
    return dt.datetime.fromisoformat(s).replace(tzinfo=None)


def test_yoochoose(spark, tmp_path):
    p = write_lines(tmp_path / "clicks.dat", ["1,2014-04-07T10:51:09.277Z,214536502,0",
                                              "1,2014-04-07T10:54:09.868Z,214536500,S"])
    ev, res = _rows(spark, p, "yoochoose")
    assert ev.item_key.tolist() == ["214536502", "214536500"]
    assert ev.session_key.tolist() == ["1", "1"]
    assert ev.ts.iloc[0] == _utc("2014-04-07T10:51:09.277")
    assert res.has_sessions


def test_movielens_variants(spark, tmp_path):
    udata = write_lines(tmp_path / "u.data", [f"196\t242\t3\t{T0}", f"186\t302\t3\t{T0 + 1}"])
    dat = write_lines(tmp_path / "ratings.dat", [f"1::1193::5::{T0}"])
    inter = write_lines(tmp_path / "ml.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float",
                                                f"7\t8\t4\t{T0}"])
    for path, users, items in ((udata, ["196", "186"], ["242", "302"]), (dat, ["1"], ["1193"]), (inter, ["7"], ["8"])):
        ev, res = _rows(spark, path, "movielens")
        assert ev.user_key.tolist() == users and ev.item_key.tolist() == items
        assert ev.session_key.isna().all() and not res.has_sessions


def test_lastfm_string_ids_and_missing_track_id(spark, tmp_path):
    p = write_lines(tmp_path / "lfm.tsv", [
        "user_000001\t2009-05-04T23:08:57Z\tf1b1cf71\tDeep Dish\t\tFuck Me Im Famous",
        "user_000001\t2009-05-04T13:54:10Z\ta7f7df4a\tAtom\tb3b1\tMc2",
    ])
    ev, res = _rows(spark, p, "lastfm")
    assert ev.item_key.tolist() == ["Deep Dish / Fuck Me Im Famous", "b3b1"]
    assert set(res.string_ids) == {"user_key", "item_key"}


def test_generic_csv_and_parquet(spark, tmp_path):
    csv = write_lines(tmp_path / "e.csv", ["uid,when,what", f"5,{T0 * 1000},77"])
    ev, _ = _rows(spark, csv, "csv", columns="user_id=uid,item_id=what,ts=when", ts_unit="ms")
    assert ev.ts.iloc[0] == dt.datetime.utcfromtimestamp(T0)
    pq.write_table(pa.table({"u": [1, 2], "i": [10, 11], "t": [T0, T0 + 5]}), tmp_path / "e.parquet")
    ev, _ = _rows(spark, tmp_path / "e.parquet", "parquet", columns="user_id=u,item_id=i,ts=t")
    assert ev.item_key.tolist() == [10, 11]  # typed integer ids stay integers (no string round trip)
    with pytest.raises(readers.InputError, match="columns"):
        readers.read_events(spark, [str(tmp_path / "e.parquet")], "parquet", columns="item_id=i")


def test_trivago_keeps_item_actions_only(spark):
    path = shared_path("trivago-100k", "trivago_val_100k.parquet.snappy")
    res = readers.read_events(spark, [str(path)], "trivago")
    counts = {r["status"]: r["count"] for r in res.status.groupBy("status").count().collect()}
    import pyarrow.compute as pc

    t = pq.read_table(path, columns=["action_type"])
    n_item = int(pc.sum(pc.is_in(t["action_type"], pa.array(readers.TRIVAGO_ITEM_ACTIONS))).as_py())
    assert counts.get(None, 0) + sum(v for k, v in counts.items() if k and k.startswith("bad:")) == n_item
    assert counts["skip:non_item_action"] == t.num_rows - n_item


def test_diginetica_sample(spark):
    path = shared_path("diginetica-sample", "sample_train-item-views.csv")
    ev, res = _rows(spark, path, "diginetica")
    assert len(ev) == 12_391
    # anonymous sessions keep a null user; timeframe (ms) is added to the event day
    assert ev.user_key.isna().sum() == 12_391 - 4_710
    first = ev.iloc[0]
    assert first.ts == _utc("2016-05-09") + dt.timedelta(milliseconds=526309)


def test_glob_and_missing_input(spark, tmp_path):
    for d in range(3):
        write_lines(tmp_path / f"day{d}.tsv", ["SessionId\tItemId\tTime", f"{d}\t1\t{T0 + d}"])
    assert len(readers.expand_inputs(str(tmp_path / "day*.tsv"))) == 3
    with pytest.raises(readers.InputError, match="matches no file"):
        readers.expand_inputs(str(tmp_path / "nope*.tsv"))
    with pytest.raises(readers.InputError, match="does not exist"):
        readers.expand_inputs(str(tmp_path / "missing.tsv"))


def test_yaml_config_and_cli_override(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("input: [a.tsv]\nformat: gru4rec\nmin_item_support: 5\nrecent_fractions: [4, 1]\n")
    cfg = config_from_args(["--config", str(cfg_file), "--out", "o", "--min-item-support", "10"])
    assert isinstance(cfg, PreprocessConfig)
    assert (cfg.min_item_support, cfg.recent_fractions, cfg.input) == (10, [4, 1], ["a.tsv"])
    cfg_file.write_text("input: [a]\nformat: gru4rec\nmin_itme_support: 5\n")
    with pytest.raises(SystemExit, match="unknown option"):
        config_from_args(["--config", str(cfg_file), "--out", "o"])


def test_diginetica_sessions_with_two_users_are_quarantined_not_fatal(spark, tmp_path):
    from spark_jobs.preprocess import run

    path = shared_path("diginetica-sample", "sample_train-item-views.csv")
    out = tmp_path / "dg"
    m = run(PreprocessConfig(input=[str(path)], format="diginetica", split="time", recent_fractions=[],
                             out=str(out)), spark)
    import pandas as pd

    raw = pd.read_csv(path, sep=";", na_values=["NA"])
    users = raw.dropna(subset=["user_id"]).groupby("session_id").user_id.nunique()
    conflicted = set(users[users > 1].index)
    assert conflicted  # the sample has such sessions (1691 and 2998)
    n_conf_rows = int(raw.session_id.isin(conflicted).sum())
    assert m["read"]["quarantine_reasons"]["session has more than one user id"] == n_conf_rows
    assert m["events"]["events"] == len(raw) - n_conf_rows  # every other row kept
    q = pd.read_parquet(out / "quarantine")
    assert (q.reason == "session has more than one user id").sum() == n_conf_rows
