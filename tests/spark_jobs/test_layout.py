"""The scale-critical building blocks: one-scan Parquet reading, the session layout, positions."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
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
