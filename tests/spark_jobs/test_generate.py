"""Tests of the synthetic clickstream generator (numpy + pyarrow only; ~5 s in all).

Run: .venv/bin/python -m pytest tests/spark_jobs/test_generate.py -q
"""
from __future__ import annotations

import datetime as dt
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pytest

from spark_jobs import generate as gen

GAP_US = 30 * 60 * 1_000_000


def _frame(n, **kw) -> pd.DataFrame:
    parts = []
    for date, t in gen.generate(n, **kw):
        d = t.to_pandas()
        d["dt"] = date
        parts.append(d)
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def big() -> pd.DataFrame:
    """200k events, 8 days, 2k items: enough for popularity and transition statistics."""
    return _frame(200_000, n_days=8, n_items=2_000, seed=7)


def test_schema_count_and_day_partitions(tmp_path):
    meta = gen.write(tmp_path / "out", 30_000, n_days=5, seed=3, progress=False)
    out = tmp_path / "out"
    days = sorted(p.name for p in out.iterdir() if p.name.startswith("dt="))
    assert days == [f"dt=2014-04-0{d}" for d in range(1, 6)]
    total = 0
    for d in days:
        files = list((out / d).glob("*.parquet"))
        assert len(files) == 1
        t = pds.dataset(files[0]).to_table()
        assert t.schema == gen.GENERATED_SCHEMA
        ts = t["ts"].cast(pa.int64()).to_numpy()
        assert np.all(np.diff(ts) >= 0), f"{d} not sorted by time"
        day0 = dt.datetime.fromisoformat(d[3:] + "T00:00:00+00:00").timestamp() * 1e6
        assert ts.min() >= day0 and ts.max() < day0 + 86_400e6, f"events of {d} outside that day"
        total += t.num_rows
    assert total == 30_000 == meta["events"]
    assert sum(v["events"] for v in meta["per_day"].values()) == 30_000
    assert json.loads((out / "_generator.json").read_text())["seed"] == 3


@pytest.mark.parametrize("n,days", [(1, 1), (5, 7), (10_000, 7), (123_457, 3)])
def test_exact_event_count(n, days):
    tables = list(gen.generate(n, n_days=days, seed=1))
    assert len(tables) == days
    assert sum(t.num_rows for _, t in tables) == n
    ids = np.concatenate([t["session_id"].to_numpy() for _, t in tables])
    # global ids, dense from 1, no session shared between days
    assert np.array_equal(np.unique(ids), np.arange(1, np.unique(ids).size + 1))


def test_deterministic_bytes_and_seed_sensitivity(tmp_path):
    a = gen.write(tmp_path / "a", 20_000, n_days=3, seed=11, progress=False)
    b = gen.write(tmp_path / "b", 20_000, n_days=3, seed=11, progress=False)
    assert a == b
    fa = sorted((tmp_path / "a").rglob("*.parquet"))
    fb = sorted((tmp_path / "b").rglob("*.parquet"))
    assert [p.relative_to(tmp_path / "a") for p in fa] == [p.relative_to(tmp_path / "b") for p in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
    t1 = pa.concat_tables(t for _, t in gen.generate(20_000, n_days=3, seed=11))
    t2 = pa.concat_tables(t for _, t in gen.generate(20_000, n_days=3, seed=12))
    assert t1.num_rows == t2.num_rows
    assert not t1.equals(t2)


def test_sessions_and_idle_gaps(big):
    """Ground-truth sessions == 30-minute re-sessionization by user, with cases near the edge."""
    d = big.sort_values(["user_id", "ts"], kind="stable")
    ts = d["ts"].astype("int64").to_numpy()  # microseconds
    user = d["user_id"].to_numpy()
    sess = d["session_id"].to_numpy()
    same_user = user[1:] == user[:-1]
    same_sess = sess[1:] == sess[:-1]
    gap = np.diff(ts)
    # a session belongs to one user, and its events are contiguous in the user's timeline
    assert big.groupby("session_id").user_id.nunique().max() == 1
    assert (same_sess & ~same_user).sum() == 0
    assert np.unique(sess).size == 1 + (~same_sess).sum()
    inside = gap[same_sess]
    between = gap[same_user & ~same_sess]
    assert inside.max() < GAP_US
    assert between.min() > GAP_US
    # the boundary is exercised from both sides, so an off-by-one in a sessionizer shows
    assert ((inside > 25 * 60e6) & (inside < GAP_US)).sum() > 10
    assert ((between > GAP_US) & (between < 35 * 60e6)).sum() > 10
    # users come back: several sessions per user, some users with many
    spu = big.groupby("user_id").session_id.nunique()
    assert spu.mean() > 2.5 and (spu >= 5).mean() > 0.1
    lens = big.groupby("session_id").size()
    assert 3.5 < lens.mean() < 5.5
    assert 0.1 < (lens == 1).mean() < 0.35 and lens.max() >= 20
    # some consecutive repeats of the same item inside sessions
    s = big.sort_values(["session_id", "ts"], kind="stable")
    same = s.session_id.to_numpy()[1:] == s.session_id.to_numpy()[:-1]
    rep = (s.item_id.to_numpy()[1:] == s.item_id.to_numpy()[:-1]) & same
    assert 0.05 < rep.sum() / same.sum() < 0.3


def test_zipf_like_popularity(big):
    counts = np.sort(big.item_id.value_counts().to_numpy())[::-1]
    n = counts.size
    top1 = counts[: max(1, n // 100)].sum() / counts.sum()
    assert top1 > 0.15, f"top 1% of items hold only {top1:.1%} of clicks"
    # a long tail too: the median item is far below the top item
    assert counts[0] > 30 * np.median(counts)
    # categories are per item (one latent topic each)
    assert big.groupby("item_id").category.nunique().max() == 1
    assert big.category.min() >= 1


def test_learnable_sequential_structure(big):
    """A first-order Markov predictor fitted on the first days beats POP on the last day."""
    s = big.sort_values(["session_id", "ts"], kind="stable")
    sid = s.session_id.to_numpy()
    items = s.item_id.to_numpy()
    same = sid[1:] == sid[:-1]
    pairs = pd.DataFrame({"a": items[:-1][same], "b": items[1:][same], "dt": s.dt.to_numpy()[1:][same]})
    last = big.dt.max()
    train, test = pairs[pairs.dt < last], pairs[pairs.dt == last]
    k = 20
    pop = big[big.dt < last].item_id.value_counts().index[:k]
    pop_recall = test.b.isin(pop).mean()
    cnt = train.groupby(["a", "b"]).size().rename("n").reset_index()
    cnt = cnt.sort_values(["a", "n", "b"], ascending=[True, False, True])
    topk = cnt[cnt.groupby("a").cumcount() < k][["a", "b"]]
    hit = test.merge(topk, on=["a", "b"], how="left", indicator=True)["_merge"].eq("both")
    markov_recall = hit.mean()
    assert markov_recall > pop_recall + 0.25, (markov_recall, pop_recall)
    assert markov_recall > 2 * pop_recall


def test_yoochoose_format(tmp_path):
    gen.write(tmp_path / "yc", 5_000, n_days=2, seed=5, fmt="yoochoose", progress=False)
    files = sorted((tmp_path / "yc").glob("dt=*/*.dat"))
    assert [f.parent.name for f in files] == ["dt=2014-04-01", "dt=2014-04-02"]
    lines = [ln for f in files for ln in f.read_text().splitlines()]
    assert len(lines) == 5_000
    pat = re.compile(r"^\d+,\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z,\d+,\d+$")
    bad = [ln for ln in lines if not pat.match(ln)]
    assert not bad, bad[:3]
    # same content as the parquet form (ms precision)
    ref = pa.concat_tables(t for _, t in gen.generate(5_000, n_days=2, seed=5)).to_pandas()
    first = lines[0].split(",")
    assert int(first[0]) == ref.session_id.iloc[0] and int(first[2]) == ref.item_id.iloc[0]
    assert pd.Timestamp(first[1]) == ref.ts.iloc[0].floor("ms")


def test_bad_lines_are_injected_and_listed(tmp_path):
    meta = gen.write(tmp_path / "bad", 20_000, n_days=2, seed=5, fmt="yoochoose", progress=False, bad_fraction=0.02)
    pat = re.compile(rb"^\d+,\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z,\d+,\d+$")

    def valid(line: bytes) -> bool:
        if not pat.match(line):
            return False
        try:
            dt.datetime.fromisoformat(line.split(b",")[1].decode())
        except ValueError:
            return False
        return True

    listed = {(f, b["line"]): b["kind"] for f, bad in meta["bad_lines"].items() for b in bad}
    assert 200 < len(listed) < 600 and set(listed.values()) == set(gen.BAD_KINDS)
    n_lines = 0
    for f in sorted((tmp_path / "bad").glob("dt=*/*.dat")):
        rel = f"{f.parent.name}/{f.name}"
        for i, line in enumerate(f.read_bytes().split(b"\n")[:-1], start=1):
            n_lines += 1
            assert valid(line) != ((rel, i) in listed), (rel, i, line)
            if listed.get((rel, i)) == "non-UTF-8 bytes":
                with pytest.raises(UnicodeDecodeError):
                    line.decode("utf-8")
    assert n_lines == 20_000
    # the good lines are unchanged: same as a clean run
    clean = gen.write(tmp_path / "clean", 20_000, n_days=2, seed=5, fmt="yoochoose", progress=False)
    assert clean["per_day"] == meta["per_day"]
    with pytest.raises(ValueError, match="yoochoose"):
        gen.write(tmp_path / "p", 100, fmt="parquet", progress=False, bad_fraction=0.1)


def test_rerun_replaces_atomically(tmp_path, monkeypatch):
    out = tmp_path / "out"
    gen.write(out, 3_000, n_days=3, seed=1, progress=False)
    gen.write(out, 2_000, n_days=2, seed=2, progress=False)  # fewer days: old ones must go
    assert sorted(p.name for p in out.glob("dt=*")) == ["dt=2014-04-01", "dt=2014-04-02"]
    assert json.loads((out / "_generator.json").read_text())["seed"] == 2
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    real = gen.generate

    def broken(*a, **k):  # fault injection: the generator dies after the first day
        yield next(real(*a, **k))
        raise RuntimeError("disk full")

    monkeypatch.setattr(gen, "generate", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        gen.write(out, 3_000, n_days=3, seed=9, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "temporary folders left behind"


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_events"):
        next(gen.generate(0))
    with pytest.raises(ValueError, match="format"):
        gen.write("/tmp/never-written", 10, fmt="csv", progress=False)


def test_cli(tmp_path, capsys):
    assert gen.main(["--events", "2000", "--days", "2", "--seed", "4", "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "2,000 events" in capsys.readouterr().out
    assert len(list((tmp_path / "c").glob("dt=*/part-00000.parquet"))) == 2
