"""Bad input: each kind of broken raw file has a defined, asserted outcome, and the rows add up.

    .venv/bin/python -m pytest tests/reliability/test_bad_input.py -q            # all cases
    .venv/bin/python -m pytest tests/reliability/test_bad_input.py -k epoch_zero  # one case

Each case writes small raw files in ``tmp_path`` (mostly the GRU4Rec TSV
``SessionId<TAB>ItemId<TAB>Time``) and runs the real job (:func:`spark_jobs.preprocess.run`)
on the one shared SparkSession. The outcome is either

* quarantined: the bad rows are in ``OUT/quarantine`` with file, line and reason, every
  valid row is in ``OUT/events`` (compared row by row), and the manifest's row
  accounting holds (read = skipped + quarantined + removed by each step + written), or
* a clear failure whose message names the file, the line and the reason, with no output.

docs/reliability.md lists every case with its measured outcome.
"""
from __future__ import annotations

import gzip
import json
import os
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from spark_jobs.preprocess import PreprocessConfig, QuarantineThresholdExceeded, run
from spark_jobs.readers import InputChangedError, InputError

T0 = 1_396_310_400  # 2014-04-01T00:00:00Z
HEADER = "SessionId\tItemId\tTime"
N_GOOD = 200


def good_rows(n: int = N_GOOD, sid0: int = 1) -> list[tuple[int, int, int]]:
    """Sessions of 4 events, one an hour, over ~8 days; 13 items."""
    return [(sid0 + i // 4, 100 + (i * 7) % 13, T0 + i * 3600) for i in range(n)]


def tsv(rows) -> list[str]:
    return [f"{s}\t{i}\t{t}" for s, i, t in rows]


def write(path: Path, lines: list[str | bytes], end: bytes = b"\n") -> str:
    data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + end
    path.write_bytes(data)
    return str(path)


def preprocess(tmp_path: Path, inputs, spark, fmt: str = "gru4rec", **kw) -> tuple[dict, Path]:
    out = tmp_path / "out"
    cfg = dict(input=[str(p) for p in inputs], format=fmt, split="time", test_days=1, recent_fractions=[],
               out=str(out))
    cfg.update(kw)
    return run(PreprocessConfig(**cfg), spark), out


def events(out: Path) -> list[tuple[int, int, int]]:
    t = pads.dataset(str(out / "events"), format="parquet").to_table().to_pandas()
    return sorted(zip(t.session_id.astype(int), t.item_id.astype(int), (t.ts.astype("int64") // 10**6).astype(int)))


def quarantine(out: Path) -> list[tuple[str, int, str]]:
    q = out / "quarantine"
    if not q.exists():
        return []
    t = pads.dataset(str(q), format="parquet").to_table().to_pandas()
    return sorted(zip(t.file, t.line.astype(int), t.reason))


def assert_accounting(m: dict, out: Path) -> dict:
    """The manifest's accounting, re-checked independently of the job's own check."""
    acc = m["accounting"]
    with open(out / "manifest.json") as f:
        assert json.load(f)["accounting"] == json.loads(json.dumps(acc))
    prev = None
    for s in acc["steps"]:
        assert s["rows_in"] == s["rows_out"] + sum(s["removed"].values()), s
        if prev is not None:
            assert s["rows_in"] == prev["rows_out"], (prev, s)
        prev = s
    for f in acc["files"]:
        assert f["rows_read"] == (sum(f["skipped"].values()) + sum(f["quarantined"].values())
                                  + f["removed"] + f["written"]), f
        assert f["removed"] >= 0
    assert sum(f["rows_read"] for f in acc["files"]) == acc["steps"][0]["rows_in"]
    written = pads.dataset(str(out / "events"), format="parquet").count_rows()
    assert sum(f["written"] for f in acc["files"]) == acc["steps"][-1]["rows_out"] == written
    # every quarantined row is in OUT/quarantine
    assert sum(sum(f["quarantined"].values()) for f in acc["files"]) == len(quarantine(out))
    return acc


# --------------------------------------------------------------------------- quarantined rows
def _future():
    return [("57\t7\t4102444800", "timestamp in the future")]  # 2100-01-01


#: case -> (bad lines, their reasons, where they go: "middle" or "end" without a final newline,
#:          extra valid rows that must be kept)
QUARANTINE_CASES = {
    # a writer cut off mid-row: the last line lost its newline and the end of its timestamp
    "truncated_last_line": ([f"51\t107\t{str(T0)[:5]}"], ["timestamp before 1990-01-01"], "end", []),
    "non_utf8": ([b"52\t\xff\xfe7\t1396310400", "53\t7\t1396310400 caf\xe9".encode("latin-1")],
                 ["non-UTF-8 bytes", "non-UTF-8 bytes"], "middle", []),
    "unparseable_timestamp": (["54\t7\t2014-04-01 10:00", "55\t7\t", "56\t7\tnan"],
                              ["unparseable timestamp"] * 3, "middle", []),
    "future_timestamp": ([x for x, _ in _future()], [r for _, r in _future()], "middle", []),
    "epoch_zero_timestamp": (["58\t7\t0", "59\t7\t-1"], ["timestamp before 1990-01-01"] * 2, "middle", []),
    "negative_id": (["-60\t7\t1396310400", "61\t-7\t1396310400"],
                    ["session id is negative: -60", "item id is negative: -7"], "middle", []),
    # 2^63 does not fit in int64; 2^63 - 1 does and is kept (it was quarantined before: ids had to be <= 18 digits)
    "int64_overflow_id": (["9223372036854775808\t7\t1396310400", "62\t9223372036854775808\t1396310400"],
                          ["session id does not fit in int64: 9223372036854775808",
                           "item id does not fit in int64: 9223372036854775808"], "middle",
                          [(9223372036854775807, 101, T0 + 10), (9223372036854775807, 101, T0 + 20)]),
    "missing_column_in_rows": (["63\t7", "1396310400\t64"], ["expected 3 '\\t'-separated columns, got 2"] * 2,
                               "middle", []),
}


@pytest.mark.parametrize("case", list(QUARANTINE_CASES))
def test_quarantined(case, spark, tmp_path):
    bad, reasons, where, extra = QUARANTINE_CASES[case]
    good = good_rows()
    k = 100
    if where == "end":
        lines = [HEADER, *tsv(good), *tsv(extra), *bad]
        first_bad = 2 + len(good) + len(extra)
        path = write(tmp_path / "raw.tsv", lines, end=b"")
    else:
        lines = [HEADER, *tsv(good[:k]), *bad, *tsv(extra), *tsv(good[k:])]
        first_bad = 2 + k
        path = write(tmp_path / "raw.tsv", lines)
    m, out = preprocess(tmp_path, [path], spark, max_bad_fraction=0.05)
    assert quarantine(out) == sorted((path, first_bad + j, r) for j, r in enumerate(reasons))
    assert events(out) == sorted(good + extra)  # every valid row kept
    acc = assert_accounting(m, out)
    f = acc["files"][0]
    assert f["rows_read"] == 1 + len(good) + len(extra) + len(bad)
    assert f["skipped"] == {"header_line": 1} and f["written"] == len(good) + len(extra) and f["removed"] == 0
    assert sum(f["quarantined"].values()) == len(bad)


def test_duplicated_rows_are_kept_counted_and_flagged_by_the_gate(spark, tmp_path):
    """Exact duplicates may be real double clicks: kept and accounted; the raw_events gate flags > 1%."""
    from expectations import runner as R

    good = good_rows()
    dups = good[10:20]
    path = write(tmp_path / "raw.tsv", [HEADER, *tsv(good), *tsv(dups)])
    m, out = preprocess(tmp_path, [path], spark)
    assert events(out) == sorted(good + dups) and quarantine(out) == []
    assert assert_accounting(m, out)["files"][0]["written"] == N_GOOD + 10
    res = R.validate_table(out / "events", "raw_events", raise_on_failure=False, run=R.QualityRun(tmp_path / "q"))
    fails = [f for f in res.failures if "duplicate" in f.gate]
    assert not res.success and fails, [f.gate for f in res.failures]


def test_after_interval_end_is_removed_by_a_counted_step(spark, tmp_path):
    """A scheduled run (--end-ts) drops later rows as a named step, not as bad rows."""
    good = good_rows()
    end = T0 + 150 * 3600
    path = write(tmp_path / "raw.tsv", [HEADER, *tsv(good)])
    m, out = preprocess(tmp_path, [path], spark, end_ts="2014-04-07T06:00:00+00:00")
    assert events(out) == sorted(r for r in good if r[2] < end) and quarantine(out) == []
    acc = assert_accounting(m, out)
    step = next(s for s in acc["steps"] if s["step"] == "before_end_ts")
    assert step["removed"] == {"at or after end_ts": 50}
    assert acc["files"][0]["removed"] == 50


# --------------------------------------------------------------------------- whole files
def test_wrong_delimiter_fails_naming_file_line_and_reason(spark, tmp_path):
    lines = [HEADER, *tsv(good_rows())]
    path = write(tmp_path / "commas.tsv", [x.replace("\t", ",") for x in lines])
    with pytest.raises(QuarantineThresholdExceeded) as e:
        preprocess(tmp_path, [path], spark)
    msg = str(e.value)
    assert path in msg and "201 of 201 rows are bad" in msg and "first at line 1" in msg
    assert "expected 3 '\\t'-separated columns, got 1" in msg
    assert not (tmp_path / "out").exists() and (tmp_path / "out.quarantine").exists()


def test_missing_column_in_header_fails_naming_file_and_column(spark, tmp_path):
    path = write(tmp_path / "ev.csv", ["user,item", *[f"{s},{i}" for s, i, _ in good_rows()]])
    with pytest.raises(InputError, match=r"ev\.csv: column 'time' not in header \['user', 'item'\]"):
        preprocess(tmp_path, [path], spark, fmt="csv", columns="user_id=user,item_id=item,ts=time")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["empty_file", "header_only"])
def test_empty_and_header_only_files(case, spark, tmp_path):
    """Alone: a clear failure naming the file. Beside a good file: read as 0 rows (or 1 header line)."""
    lines = [] if case == "empty_file" else [HEADER]
    empty = tmp_path / f"{case}.tsv"
    empty.write_bytes(("\n".join(lines) + "\n").encode() if lines else b"")
    with pytest.raises(InputError) as e:
        preprocess(tmp_path, [empty], spark)
    assert "no valid events" in str(e.value) and str(empty) in str(e.value)
    assert not (tmp_path / "out").exists()
    good = write(tmp_path / "good.tsv", [HEADER, *tsv(good_rows())])
    m, out = preprocess(tmp_path, [empty, good], spark)
    assert events(out) == sorted(good_rows())
    acc = assert_accounting(m, out)
    f = acc["files"][0]
    assert f["file"] == str(empty) and f["written"] == 0 and f["quarantined"] == {}
    assert (f["rows_read"], f["skipped"]) == ((0, {}) if case == "empty_file" else (1, {"header_line": 1}))
    if case == "empty_file":  # the generic CSV reader needs a header: it says which file lacks it
        with pytest.raises(InputError, match=f"{empty}: empty file, expected a header line"):
            preprocess(tmp_path, [empty], spark, fmt="csv", columns="user_id=user,item_id=item,ts=time")


def test_mixed_formats_in_one_glob_fail_naming_the_odd_file(spark, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write(d / "a.tsv", [HEADER, *tsv(good_rows())])
    # the raw YOOCHOOSE format (comma separated, ISO time) in a glob read as gru4rec
    odd = write(d / "b.csv", [f"{s},2014-04-0{1 + k % 7}T10:00:00.000Z,{i},0"
                              for k, (s, i, _) in enumerate(good_rows(sid0=1000))])
    with pytest.raises(QuarantineThresholdExceeded) as e:
        preprocess(tmp_path, [str(d / "*")], spark)
    assert odd in str(e.value) and "first at line 1" in str(e.value) and "got 1" in str(e.value)
    # a Parquet file in the glob is named before any Spark work
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), d / "c.parquet")
    os.remove(odd)
    with pytest.raises(InputError, match=r"c\.parquet: line 1: the file is a Parquet file"):
        preprocess(tmp_path, [str(d / "*")], spark)


def test_gzip_named_csv_fails_and_reads_once_renamed(spark, tmp_path):
    data = ("\n".join([HEADER, *tsv(good_rows())]) + "\n").encode()
    hidden = tmp_path / "clicks.csv"
    hidden.write_bytes(gzip.compress(data))
    with pytest.raises(InputError) as e:
        preprocess(tmp_path, [hidden], spark)
    assert str(e.value) == (f"{hidden}: line 1: the file is gzip-compressed, but its name does not say so "
                            f"(Spark decompresses by file name: rename it to end in .gz)")
    named = tmp_path / "clicks.tsv.gz"
    os.rename(hidden, named)
    m, out = preprocess(tmp_path, [named], spark)
    assert events(out) == sorted(good_rows())
    assert assert_accounting(m, out)["files"][0]["rows_read"] == N_GOOD + 1


def test_huge_single_line_is_quarantined_and_the_rest_kept(spark, tmp_path):
    """50 MB without a newline at the end of a file: one bad row (raw text cut to 500 chars)."""
    path = tmp_path / "huge.tsv"
    write(path, [HEADER, *tsv(good_rows())])
    with open(path, "ab") as f:
        f.write(b"9" * (50 << 20))
    m, out = preprocess(tmp_path, [path], spark)
    assert quarantine(out) == [(str(path), N_GOOD + 2, "expected 3 '\\t'-separated columns, got 1")]
    q = pads.dataset(str(out / "quarantine"), format="parquet").to_table().to_pandas()
    assert q.raw.str.len().tolist() == [500]
    assert events(out) == sorted(good_rows())
    assert assert_accounting(m, out)["files"][0]["quarantined"] == {"expected 3 '\\t'-separated columns, got 1": 1}


def test_file_growing_while_read_fails_naming_the_file(spark, tmp_path):
    """Appends during the job: the job fails (it would otherwise count rows of two versions)."""
    path = write(tmp_path / "live.tsv", [HEADER, *tsv(good_rows())])
    stop = threading.Event()
    appended = []

    def writer():
        s = 10_000
        while not stop.is_set():
            with open(path, "a") as f:
                f.write(f"{s}\t101\t{T0 + s}\n")
            appended.append(s)
            s += 1
            time.sleep(0.05)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        with pytest.raises(InputChangedError) as e:
            preprocess(tmp_path, [path], spark)
    finally:
        stop.set()
        t.join()
    msg = str(e.value)
    assert msg.startswith(f"{path}: the file changed while the job read it") and "bytes" in msg, msg
    assert len(appended) > 1 and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the accounting itself
def test_accounting_with_filters_and_the_gate(spark, tmp_path):
    """Filters remove rows by name; the GX gate passes, then fails naming the step whose count is tampered."""
    from expectations import runner as R

    good = good_rows() + [(900, 555, T0 + 5), (901, 101, T0 + 7)]  # item 555 once; session 901 of length 1
    path = write(tmp_path / "raw.tsv", [HEADER, *tsv(good), "x\t1\t1"])
    m, out = preprocess(tmp_path, [path], spark, min_item_support=2, min_session_length=2, max_bad_fraction=0.05)
    acc = assert_accounting(m, out)
    by = {s["step"]: s for s in acc["steps"]}
    assert by["r1:min_item_support"]["removed"] == {"min_item_support": 1}
    assert by["r1:min_session_length"]["removed"] == {"min_session_length": 1}  # 901 (900 went with item 555)
    assert acc["files"][0]["removed"] == 2 and acc["files"][0]["written"] == N_GOOD
    q = R.QualityRun(tmp_path / "q")  # no Data Docs per call: quicker
    assert R.validate_accounting(out, run=q).success
    mpath = out / "manifest.json"
    d = json.loads(mpath.read_text())
    next(s for s in d["accounting"]["steps"] if s["step"] == "r1:min_item_support")["rows_out"] += 1
    mpath.write_text(json.dumps(d))
    with pytest.raises(R.GateFailed) as e:
        R.validate_accounting(out, run=q)
    msg = str(e.value)
    assert "rows in = rows out + removed" in msg and "r1:min_item_support" in msg
    # ... and the next step no longer starts where it ended
    assert "r1:min_session_length" in msg


def test_a_step_that_loses_rows_fails_the_job_naming_it(spark, tmp_path, monkeypatch):
    from pyspark.sql import functions as F

    from spark_jobs import sessionize as S
    from spark_jobs.accounting import RowAccountingError

    layout = S.to_layout
    monkeypatch.setattr(S, "to_layout", lambda df: layout(df.where(F.col("item_id") != 101)))
    path = write(tmp_path / "raw.tsv", [HEADER, *tsv(good_rows())])
    with pytest.raises(RowAccountingError) as e:
        preprocess(tmp_path, [path], spark)
    n101 = sum(1 for _, i, _ in good_rows() if i == 101)
    assert str(e.value) == (f"row accounting does not add up at step 'sessionize': rows in {N_GOOD} != rows out "
                            f"{N_GOOD - n101} + removed 0 (nothing); {n101} row(s) lost without being counted")
    assert not (tmp_path / "out").exists()
