"""The scale-critical building blocks: one-scan Parquet reading, the session layout, positions."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from spark_jobs import readers, sessionize as S


def _parquet(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = dt.datetime(2014, 4, 1, tzinfo=dt.timezone.utc)
    pq.write_table(pa.table({
        "user_id": pa.array([1] * len(items), pa.int64()),
        "item_id": pa.array(items, pa.int64()),
        "ts": pa.array([t0] * len(items), pa.timestamp("us", tz="UTC")),
    }), path)
    return path


def test_parquet_inputs_keep_command_line_file_order_and_row_order(spark, tmp_path):
    # Given in reverse path order, in a folder whose name needs URL escaping: the file
    # index must follow the command line (it breaks timestamp ties), the row index the file.
    a = _parquet(tmp_path / "a b" / "dt=2" / "p.parquet", [20, 21, 22])
    b = _parquet(tmp_path / "a b" / "dt=1" / "p.parquet", [10, 11])
    res = readers.read_events(spark, [str(a), str(b)], "synthetic")
    got = [(r["_file_idx"], r["_ord"], r["item_key"])
           for r in res.events.orderBy("_file_idx", "_ord").collect()]
    assert got == [(0, 0, 20), (0, 1, 21), (0, 2, 22), (1, 0, 10), (1, 1, 11)]
    counts = {(r["_file_idx"], r["status"]): r["count"] for r in res.status.groupBy("_file_idx", "status").count().collect()}
    assert counts == {(0, None): 3, (1, None): 2}


def test_session_layout_needs_no_shuffle_or_sort_for_per_session_work(spark):
    df = spark.createDataFrame(
        [(s, dt.datetime(2014, 4, 1, 0, i), 0, i, 1, i % 3) for s in (5, 1, 3) for i in range(4)],
        "session_id long, ts timestamp, _file_idx int, _ord long, user_id long, item_id long")
    ev = S.to_layout(df)
    plan = S.add_seq(ev).groupBy("session_id").agg(F.max("seq"))._jdf.queryExecution().executedPlan().toString()
    # Without the known layout Spark would hash-shuffle and sort all events again here.
    assert "Exchange" not in plan and "Sort [" not in plan, plan
    rows = S.add_seq(ev).collect()
    assert [(r["session_id"], r["seq"]) for r in rows] == [(s, i) for s in (1, 3, 5) for i in range(4)]


def test_with_position_is_a_dense_global_rank(spark):
    df = spark.createDataFrame([(k, -k) for k in (7, 3, 9, 1, 5, 8)], "k long, v long").repartition(3)
    got = {r["k"]: r["pos"] for r in S.with_position(df, [F.col("k").desc()], "pos").collect()}
    assert got == {9: 0, 8: 1, 7: 2, 5: 3, 3: 4, 1: 5}


def test_all_tables_written_in_one_scan_keep_contract_order_in_every_file(spark, tmp_path):
    """The partitioned one-scan write: right rows per table, each file in (session, seq) order,
    valid/test renumbered, an empty table still written with its schema, train_recent_1 linked."""
    import glob

    from spark_jobs import contract as C
    from spark_jobs.preprocess import write_split_tables
    from spark_jobs.splits import TABLE_BITS

    names = ["train", "valid", "test", "train_full", "train_recent_2", "train_recent_1"]
    rows = []
    for s in range(300):  # sessions in reverse id order inside the frame would break the check below
        part = "train" if s < 200 else ("valid" if s < 250 else "test")
        for i in range(3):
            m = TABLE_BITS[part] | (TABLE_BITS["train_full"] if part != "test" else 0)
            if part != "test":
                m |= (1 << 5) | ((1 << 4) if s >= 100 else 0)
            rows.append((s, 7, s % 11, dt.datetime(2014, 4, 1, 0, i), i, i - 1 if part != "train" else None, m))
    tagged = spark.createDataFrame(
        rows, "session_id long, user_id long, item_id long, ts timestamp, seq int, _seq_f int, _mask long"
    ).repartitionByRange(3, "session_id").sortWithinPartitions("session_id", "seq")
    # no event of the valid table -> an empty table must still be written
    tagged = tagged.where(~((F.col("_mask").bitwiseAND(2)) != 0) | (F.col("session_id") < 0))
    targets = {C.EVENTS_DIR: str(tmp_path / "events"), **{n: str(tmp_path / "split" / n) for n in names}}
    cols = ["session_id", "user_id", "item_id", "ts", "seq"]
    stats = write_split_tables(tagged, names, cols, targets)

    def read(name):
        return pq.read_table(targets[name]).to_pandas()

    assert len(read(C.EVENTS_DIR)) == 750 and stats["train"]["events"] == 600
    assert read("valid").empty and pq.read_schema(glob.glob(targets["valid"] + "/*.parquet")[0]).names == cols
    test = read("test")
    assert sorted(test.session_id.unique()) == list(range(250, 300)) and sorted(test.seq.unique()) == [-1, 0, 1]
    assert sorted(read("train_recent_2").session_id.unique()) == list(range(100, 200))
    assert len(read("train_full")) == 600 and read("train_recent_1").equals(read("train_full"))
    for f in glob.glob(str(tmp_path / "**" / "*.parquet"), recursive=True):
        t = pq.read_table(f).to_pandas()
        keys = list(zip(t.session_id, t.seq))
        assert keys == sorted(keys), f
    assert not glob.glob(str(tmp_path / "split" / "_stage-*"))


def test_sizing_follows_the_input():
    from spark_jobs.session import BASE_CONF, sizing_conf

    small, big = sizing_conf(300_000, cores=2), sizing_conf(4 << 30, cores=2)
    assert small["spark.sql.shuffle.partitions"] == "2" and "TieredStopAtLevel=1" in small["spark.driver.extraJavaOptions"]
    assert big == {"spark.sql.shuffle.partitions": BASE_CONF["spark.sql.shuffle.partitions"]}
    assert sizing_conf(100 << 20, cores=2)["spark.sql.shuffle.partitions"] == "13"
    assert sizing_conf(None) == {}


def test_sessions_at_ranks_equals_a_full_sort_with_ties_and_the_fallback(spark):
    import random

    from spark_jobs.splits import sessions_at_ranks

    rnd = random.Random(3)
    rows = [(sid, 1_396_000_000_000_000 + rnd.choice([0, 1, 5, 10 ** 6, rnd.randrange(10 ** 11)]))
            for sid in rnd.sample(range(10 ** 6), 2000)]
    sess = spark.createDataFrame(rows, "session_id long, start_us long")
    expected = sorted(((st, sid) for sid, st in rows), reverse=True)
    ranks = [0, 1, 7, 499, 1000, 1999]
    want = {r: expected[r] for r in ranks}
    assert sessions_at_ranks(sess, ranks, buckets=64) == want
    assert sessions_at_ranks(sess, ranks, max_collect=0) == want  # the global-sort fallback
    with pytest.raises(ValueError, match="past"):
        sessions_at_ranks(sess, [2000])
