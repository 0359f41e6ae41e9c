"""evaluation.compare on hand-built evaluation folders (metrics.json + per_event.parquet)."""
import csv
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats as sps

from evaluation import stats
from evaluation.compare import IncompatibleRunsError, compare, main

N_SESSIONS = 40
OUT_FILES = {"comparison.md", "comparison.csv", "comparison.json", "comparison_metrics.png", "comparison_diffs.png"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _events():
    """40 sessions of 2..7 events -> one prediction per event after the first."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 8, N_SESSIONS)
    sid = np.repeat(np.arange(100, 100 + N_SESSIONS), lengths - 1)
    pos = np.concatenate([np.arange(n - 1) for n in lengths])
    slen = np.repeat(lengths, lengths - 1)
    target = rng.integers(1, 500, len(sid))
    return sid, pos, slen, target


def write_eval(folder, rank, *, ties="conservative", table="test", model="m", events=None,
               user_id=None, shuffle=None, extra_columns=None, metrics_override=None):
    """An evaluation output as evaluate.py writes it; metrics.json computed here by hand."""
    sid, pos, slen, target = events if events is not None else _events()
    rank = np.asarray(rank, dtype=float)
    cols = {"session_id": pa.array(sid, pa.int64()), "position": pa.array(pos, pa.int32()),
            "session_length": pa.array(slen, pa.int32()), "target_item_id": pa.array(target, pa.int64()),
            "n_greater": pa.array((rank - 1).astype(np.int64), pa.int64()),
            "n_ties": pa.array(np.zeros(len(rank), np.int64), pa.int64()), "rank": pa.array(rank, pa.float64())}
    if user_id is not None:
        cols["user_id"] = pa.array(user_id, pa.int64())
    for k, v in (extra_columns or {}).items():
        cols[k] = pa.array(v)
    t = pa.table(cols)
    if shuffle is not None:
        t = t.take(pa.array(np.random.default_rng(shuffle).permutation(len(rank))))
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, folder / "per_event.parquet")
    m = {"ties": ties, "table": table, "model": model, "n_events": len(rank),
         "n_sessions": int(len(np.unique(sid)))}
    for k in (5, 20):
        m[f"recall_at_{k}"] = float(np.mean(rank <= k))
        m[f"mrr_at_{k}"] = float(np.mean(np.where(rank <= k, 1 / rank, 0)))
        m[f"precision_at_{k}"] = m[f"recall_at_{k}"] / k
    m.update(metrics_override or {})
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def _ranks(seed, hi):
    return np.random.default_rng(seed).integers(1, hi, len(_events()[0])).astype(float)


@pytest.fixture
def two_runs(tmp_path):
    good, bad = _ranks(1, 30), _ranks(2, 80)
    return (write_eval(tmp_path / "gru", good, model="gru4rec"), good,
            write_eval(tmp_path / "pop", bad, model="pop"), bad)


def _read_csv(path):
    with open(path) as f:
        return {(r["run"], r["metric"]): r for r in csv.DictReader(f)}


def test_compare_writes_table_with_cis_diffs_and_p_values(tmp_path, two_runs):
    gru_dir, good, pop_dir, bad = two_runs
    out = tmp_path / "cmp"
    res = compare({"gru": [gru_dir], "pop": [pop_dir]}, "pop", out, metrics=["recall_at_20", "mrr_at_20"],
                  n_boot=300, seed=3)
    assert {p.name for p in out.iterdir()} == OUT_FILES  # no temp files left behind
    rows = _read_csv(out / "comparison.csv")
    sid = _events()[0]
    hand = {("gru", "recall_at_20"): np.mean(good <= 20), ("pop", "recall_at_20"): np.mean(bad <= 20),
            ("gru", "mrr_at_20"): np.mean(np.where(good <= 20, 1 / good, 0)),
            ("pop", "mrr_at_20"): np.mean(np.where(bad <= 20, 1 / bad, 0))}
    for key, mean in hand.items():
        r = rows[key]
        assert float(r["mean"]) == pytest.approx(mean, rel=1e-12)
        assert float(r["lo"]) <= mean <= float(r["hi"])
        assert int(r["n_events"]) == len(sid) and int(r["n_units"]) == N_SESSIONS
        assert r["unit"] == "session"
    for m in ("recall_at_20", "mrr_at_20"):
        r = rows["gru", m]
        assert float(r["diff"]) == pytest.approx(hand["gru", m] - hand["pop", m], rel=1e-12)
        assert float(r["diff_lo"]) <= float(r["diff"]) <= float(r["diff_hi"])
        assert rows["pop", m]["diff"] == "" and rows["pop", m]["p_value"] == ""
        # p-value: Wilcoxon on per-session means computed here with pandas
        df = pd.DataFrame({"s": sid, "a": stats.event_values(good, m), "b": stats.event_values(bad, m)})
        g = df.groupby("s").mean()
        assert float(r["p_value"]) == pytest.approx(sps.wilcoxon(g["a"], g["b"]).pvalue, rel=1e-9)
        # the diff CI is the paired bootstrap with the same seed
        _, lo, hi = stats.paired_bootstrap_diff(stats.event_values(good, m), stats.event_values(bad, m),
                                                sid, n_boot=300, seed=3)
        assert (float(r["diff_lo"]), float(r["diff_hi"])) == pytest.approx((lo, hi), abs=1e-12)

    md = (out / "comparison.md").read_text()
    r = rows["gru", "recall_at_20"]
    assert f"{float(r['mean']):.4f} [{float(r['lo']):.3f}, {float(r['hi']):.3f}]" in md
    assert f"{float(r['diff']):+.4f} [{float(r['diff_lo']):.3f}, {float(r['diff_hi']):.3f}], p=" in md
    assert re.search(r"\| gru \| 0\.\d{4} \[0\.\d{3}, 0\.\d{3}\] \| [+-]0\.\d{4} \[-?0\.\d{3}, -?0\.\d{3}\], "
                     r"p=[0-9.e-]+ \|", md)
    assert "`test`" in md and "ties: conservative" in md and f"{len(sid)} events in {N_SESSIONS} sessions" in md
    assert "**session**" in md and "300 cluster-bootstrap resamples, seed 3" in md and "command:" in md
    js = json.loads((out / "comparison.json").read_text())
    assert js["metadata"]["n_boot"] == 300 and js["metadata"]["baseline"] == "pop"
    assert js["rows"] == json.loads(json.dumps(res["rows"]))
    assert {(r["run"], r["metric"]) for r in js["rows"]} == set(hand)


def test_rows_in_another_order_are_paired_event_by_event(tmp_path, two_runs):
    gru_dir, good, _, _ = two_runs
    shuffled = write_eval(tmp_path / "gru_shuffled", good, model="gru4rec", shuffle=7)
    res = compare({"a": [shuffled], "b": [gru_dir]}, "b", tmp_path / "cmp", metrics=["mrr_at_20"], n_boot=100)
    row = next(r for r in res["rows"] if r["run"] == "a")
    assert (row["diff"], row["diff_lo"], row["diff_hi"], row["p_value"]) == (0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("change, words", [
    ("drop_event", "per-event rows"), ("other_target", "digest"),
    ("ties", "tie mode 'conservative' vs 'optimistic'"), ("table", "table 'test' vs 'valid'"),
])
def test_runs_on_different_test_tables_are_refused(tmp_path, two_runs, change, words):
    gru_dir, good, _, _ = two_runs
    sid, pos, slen, target = _events()
    kw = {}
    rank = good
    if change == "drop_event":
        kw["events"] = (sid[1:], pos[1:], slen[1:], target[1:])
        rank = good[1:]
    elif change == "other_target":
        target = target.copy()
        target[5] += 1
        kw["events"] = (sid, pos, slen, target)
    elif change == "ties":
        kw["ties"] = "optimistic"
    else:
        kw["table"] = "valid"
    other = write_eval(tmp_path / "other", rank, **kw)
    with pytest.raises(IncompatibleRunsError) as e:
        compare({"gru": [gru_dir], "other": [other]}, "gru", tmp_path / "cmp", n_boot=50)
    msg = str(e.value)
    assert str(gru_dir) in msg and str(other) in msg and words in msg
    assert not (tmp_path / "cmp" / "comparison.md").exists()


def test_seeds_are_averaged_event_by_event(tmp_path, two_runs):
    _, _, pop_dir, bad = two_runs
    s1, s2 = _ranks(11, 30), _ranks(12, 20)
    d1, d2 = write_eval(tmp_path / "s1", s1), write_eval(tmp_path / "s2", s2, shuffle=3)
    res = compare({"gru": [d1, d2], "pop": [pop_dir]}, "pop", tmp_path / "cmp", metrics=["recall_at_5"],
                  n_boot=200, seed=1)
    row = next(r for r in res["rows"] if r["run"] == "gru")
    r1, r2 = np.mean(s1 <= 5), np.mean(s2 <= 5)
    assert row["mean"] == pytest.approx((r1 + r2) / 2, rel=1e-12)
    assert (row["seed_min"], row["seed_max"]) == pytest.approx((min(r1, r2), max(r1, r2)))
    assert row["n_seeds"] == 2
    avg = ((s1 <= 5).astype(float) + (s2 <= 5)) / 2
    _, lo, hi = stats.bootstrap_ci(avg, _events()[0], n_boot=200, seed=1)
    assert (row["lo"], row["hi"]) == pytest.approx((lo, hi), abs=1e-12)
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "gru (2 seeds)" in md and f"seeds {min(r1, r2):.4f}..{max(r1, r2):.4f}" in md


def test_user_id_column_makes_users_the_resampled_unit(tmp_path):
    sid = _events()[0]
    users = (sid - 100) // 4  # 10 users of 4 sessions
    good, bad = _ranks(1, 30), _ranks(2, 80)
    a = write_eval(tmp_path / "a", good, user_id=users)
    b = write_eval(tmp_path / "b", bad, user_id=users, shuffle=1)
    res = compare({"a": [a], "b": [b]}, "b", tmp_path / "cmp", metrics=["recall_at_20"], n_boot=200)
    row = next(r for r in res["rows"] if r["run"] == "a")
    assert res["metadata"]["unit"] == "user" and row["n_units"] == 10
    _, lo, hi = stats.bootstrap_ci((good <= 20).astype(float), users, n_boot=200, seed=0)
    assert (row["lo"], row["hi"]) == pytest.approx((lo, hi), abs=1e-12)
    g = pd.DataFrame({"u": users, "a": good <= 20, "b": bad <= 20}).groupby("u").mean()
    assert row["p_value"] == pytest.approx(sps.wilcoxon(g["a"], g["b"]).pvalue, rel=1e-9)
    res = compare({"a": [a], "b": [b]}, "b", tmp_path / "cmp2", metrics=["recall_at_20"], n_boot=50, unit="session")
    assert res["rows"][0]["n_units"] == N_SESSIONS


def test_anonymous_sessions_make_sessions_the_unit(tmp_path):
    """diginetica: most sessions have no user (null user_id). auto falls back to sessions, two
    runs with the same nulls are compatible (NaN == NaN here), and --unit user refuses."""
    sid = _events()[0]
    users = np.where(sid % 3 == 0, (sid - 100) // 4, -1)
    u = pa.array(users, pa.int64(), mask=users < 0)  # nulls, as evaluate writes anonymous sessions
    a = write_eval(tmp_path / "a", _ranks(1, 30), extra_columns={"user_id": u})
    b = write_eval(tmp_path / "b", _ranks(2, 80), extra_columns={"user_id": u}, shuffle=1)
    res = compare({"a": [a], "b": [b]}, "b", tmp_path / "cmp", metrics=["recall_at_20"], n_boot=50)
    assert res["metadata"]["unit"] == "session" and res["rows"][0]["n_units"] == N_SESSIONS
    with pytest.raises(ValueError, match="have no user_id"):
        compare({"a": [a], "b": [b]}, "b", tmp_path / "cmp2", metrics=["recall_at_20"], n_boot=50, unit="user")


def test_unit_user_without_user_id_is_an_error(tmp_path, two_runs):
    gru_dir, _, pop_dir, _ = two_runs
    with pytest.raises(ValueError, match="user_id"):
        compare({"gru": [gru_dir], "pop": [pop_dir]}, "pop", tmp_path / "cmp", unit="user", n_boot=10)


def test_per_event_column_metric_and_consistency_check(tmp_path, two_runs):
    _, good, pop_dir, _ = two_runs
    hits = (np.random.default_rng(4).random(len(good)) < 0.4).astype(np.int64)
    a = write_eval(tmp_path / "a", good, extra_columns={"hit_at_20_n5": hits})
    b = write_eval(tmp_path / "b", good, extra_columns={"hit_at_20_n5": np.zeros(len(good), np.int64)})
    res = compare({"a": [a], "b": [b]}, "b", tmp_path / "cmp", metrics=["recall_at_20_n5"], n_boot=50)
    row = next(r for r in res["rows"] if r["run"] == "a")
    assert row["mean"] == pytest.approx(hits.mean()) and row["diff"] == pytest.approx(hits.mean())
    with pytest.raises(ValueError, match="neither"):
        compare({"a": [a], "pop": [pop_dir]}, "pop", tmp_path / "cmp", metrics=["auc"], n_boot=10)
    # a metrics.json that disagrees with its per_event.parquet
    c = write_eval(tmp_path / "c", good, metrics_override={"recall_at_20": 0.123})
    with pytest.raises(ValueError, match="do not belong together"):
        compare({"c": [c], "pop": [pop_dir]}, "pop", tmp_path / "cmp", metrics=["recall_at_20"], n_boot=10)


def _assert_png(path):
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    img = mpimg.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # not a blank canvas


def test_cli_with_nested_dirs_seed_groups_and_plots(tmp_path, two_runs, capsys):
    gru_dir, good, _, bad = two_runs
    nested = write_eval(tmp_path / "popeval" / "test", bad, model="pop")
    s2 = write_eval(tmp_path / "gru_seed2", _ranks(9, 25), model="gru4rec")
    out = tmp_path / "cli"
    argv = [str(gru_dir), "--names", "gru", "--run", f"gru3={gru_dir},{s2}",
            "--baseline", str(tmp_path / "popeval"), "--out", str(out),
            "--metrics", "recall_at_20,ndcg_at_10", "--n-boot", "120", "--seed", "5"]
    assert main(argv) == 0
    assert {p.name for p in out.iterdir()} == OUT_FILES
    md = (out / "comparison.md").read_text()
    assert "python -m evaluation.compare " + str(gru_dir) in md and "--n-boot 120" in md
    assert "| pop (baseline) |" in md and "| gru3 (2 seeds) |" in md and str(nested) in md
    rows = _read_csv(out / "comparison.csv")
    assert set(rows) == {(n, m) for n in ("pop", "gru", "gru3") for m in ("recall_at_20", "ndcg_at_10")}
    ndcg = np.where(good <= 10, 1 / np.log2(good + 1), 0).mean()
    assert float(rows["gru", "ndcg_at_10"]["mean"]) == pytest.approx(ndcg, rel=1e-12)
    assert rows["pop", "recall_at_20"]["is_baseline"] == "True"
    _assert_png(out / "comparison_metrics.png")
    _assert_png(out / "comparison_diffs.png")
    assert "p=" in capsys.readouterr().out


def test_cli_baseline_listed_among_the_runs_and_default_names(tmp_path, two_runs):
    gru_dir, _, pop_dir, _ = two_runs
    out = tmp_path / "cli"
    assert main([str(gru_dir), str(pop_dir), "--baseline", str(pop_dir), "--out", str(out), "--n-boot", "50"]) == 0
    rows = _read_csv(out / "comparison.csv")
    assert {r for r, _ in rows} == {"gru4rec", "pop"}  # names from metrics.json "model"
    assert rows["pop", "recall_at_20"]["is_baseline"] == "True"
    assert rows["gru4rec", "mrr_at_5"]["p_value"] != ""


def test_recall_at_k_n_from_the_evaluators_bool_hit_columns(tmp_path):
    """evaluate.py writes hit_at_K_n_N as bool columns: compare reads them as 0/1 values."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evaluation.compare import load_eval, metric_values

    d = tmp_path / "e"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"table": "test", "ties": "conservative"}))
    pq.write_table(pa.table({"session_id": pa.array([1, 1, 2], pa.int64()), "position": pa.array([0, 1, 0], pa.int32()),
                             "target_item_id": pa.array([5, 6, 7], pa.int64()), "rank": pa.array([1.0, 30.0, 2.0]),
                             "hit_at_20_n_5": pa.array([True, False, True])}), d / "per_event.parquet")
    v = metric_values(load_eval(d), "recall_at_20_n_5")
    assert v.tolist() == [1.0, 0.0, 1.0] and v.dtype == np.float64


# --------------------------------------------------------------------------- uplift, by length, future steps


def _sessions(lengths):
    """Events of sessions with these lengths (one prediction per event after the first)."""
    lengths = np.asarray(lengths)
    sid = np.repeat(np.arange(1, len(lengths) + 1), lengths - 1)
    pos = np.concatenate([np.arange(n - 1) for n in lengths])
    return sid, pos, np.repeat(lengths, lengths - 1), np.arange(len(sid)) + 1


def test_uplift_of_a_constant_ratio_is_exact_with_a_degenerate_ci(tmp_path):
    """Every session: baseline 5 of 10 predictions hit (rank 2), the run 6 (rank 1): Recall@20
    0.5 -> 0.6 = +20 % in every resample; MRR@20 0.25 -> 0.6 = +140 %; the baseline's
    Recall@1 is 0 -> no uplift."""
    ev = _sessions([11] * 20)
    base = np.tile([2.0] * 5 + [100.0] * 5, 20)
    run = np.tile([1.0] * 6 + [100.0] * 4, 20)
    b = write_eval(tmp_path / "b", base, events=ev)
    a = write_eval(tmp_path / "a", run, events=ev, shuffle=2)
    out = tmp_path / "cmp"
    compare({"a": [a], "b": [b]}, "b", out, metrics=["recall_at_20", "mrr_at_20", "recall_at_1"], n_boot=200)
    rows = _read_csv(out / "comparison.csv")
    for m, want in (("recall_at_20", 20.0), ("mrr_at_20", 140.0)):
        r = rows["a", m]
        assert float(r["uplift"]) == pytest.approx(want, abs=1e-9)
        assert (float(r["uplift_lo"]), float(r["uplift_hi"])) == pytest.approx((want, want), abs=1e-9)
        assert rows["b", m]["uplift"] == rows["b", m]["uplift_lo"] == ""
    assert rows["a", "recall_at_1"]["uplift"] == rows["a", "recall_at_1"]["uplift_lo"] == ""
    js = {(r["run"], r["metric"]): r for r in json.loads((out / "comparison.json").read_text())["rows"]}
    assert js["a", "recall_at_1"]["uplift"] is None and js["a", "mrr_at_20"]["uplift"] == pytest.approx(140.0)
    md = (out / "comparison.md").read_text()
    assert "| uplift recall_at_20 vs b |" in md
    assert "+20.0 % [+20.0, +20.0]" in md and "+140.0 % [+140.0, +140.0]" in md
    assert re.search(r"^\| a \|.*\| \+0\.6000 \[0\.600, 0\.600\], p=[0-9.e-]+ \| — \|$", md, re.M)  # recall_at_1 last


def test_uplift_ci_is_the_percentile_interval_of_the_paired_resampled_ratio(tmp_path, two_runs):
    gru_dir, good, pop_dir, bad = two_runs
    res = compare({"gru": [gru_dir], "pop": [pop_dir]}, "pop", tmp_path / "cmp", metrics=["mrr_at_20"],
                  n_boot=300, seed=3)
    row = next(r for r in res["rows"] if r["run"] == "gru")
    va, vb = stats.event_values(good, "mrr_at_20"), stats.event_values(bad, "mrr_at_20")
    assert row["uplift"] == pytest.approx((va.mean() - vb.mean()) / vb.mean() * 100, rel=1e-12)
    # slow reference: stats' documented draws (default_rng(seed), n_units indices per resample
    # into the sorted unique units), each resample's event-level means, their ratio
    sid = _events()[0]
    units = np.unique(sid)
    draws = np.random.default_rng(3).integers(0, len(units), size=(300, len(units)))
    ratios = []
    for d in draws:
        sa = sb = n = 0.0
        for u in units[d]:
            sa += va[sid == u].sum()
            sb += vb[sid == u].sum()
            n += (sid == u).sum()
        ratios.append(((sa / n) - (sb / n)) / (sb / n) * 100)
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    assert (row["uplift_lo"], row["uplift_hi"]) == pytest.approx((lo, hi), rel=1e-9)
    assert 0 < row["uplift_lo"] < row["uplift"] < row["uplift_hi"]  # gru is better: positive uplift
    worse = next(r for r in compare({"gru": [gru_dir], "pop": [pop_dir]}, "gru", tmp_path / "cmp2",
                                    metrics=["mrr_at_20"], n_boot=300, seed=3)["rows"] if r["run"] == "pop")
    assert worse["uplift_lo"] < worse["uplift"] < worse["uplift_hi"] < 0


def test_uplift_without_ci_when_a_resample_has_a_baseline_mean_of_zero(tmp_path):
    ev = _sessions([3] * 30)
    base = np.full(60, 100.0)
    base[:2] = 1.0  # only the first session hits: most resamples leave it out
    b = write_eval(tmp_path / "b", base, events=ev)
    a = write_eval(tmp_path / "a", np.tile([1.0, 100.0], 30), events=ev)
    res = compare({"a": [a], "b": [b]}, "b", tmp_path / "cmp", metrics=["recall_at_20"], n_boot=100)
    row = next(r for r in res["rows"] if r["run"] == "a")
    assert row["uplift"] == pytest.approx((0.5 - 2 / 60) / (2 / 60) * 100)
    assert row["uplift_lo"] is None and row["uplift_hi"] is None
    assert f"{row['uplift']:+.1f} % [—, —]" in (tmp_path / "cmp" / "comparison.md").read_text()


LENGTHS = [2, 3, 5, 6, 10, 25, 26, 40] * 5


def test_by_length_selects_exactly_the_events_of_each_bucket(tmp_path):
    ev = _sessions(LENGTHS)
    sid, slen = ev[0], ev[2]
    rng = np.random.default_rng(7)
    ra, rb = rng.integers(1, 25, len(sid)).astype(float), rng.integers(1, 30, len(sid)).astype(float)
    a = write_eval(tmp_path / "a", ra, events=ev, shuffle=4)
    b = write_eval(tmp_path / "b", rb, events=ev)
    out = tmp_path / "cmp"
    res = compare({"a": [a], "b": [b]}, "b", out, metrics=["recall_at_20", "mrr_at_5"], n_boot=150, seed=2,
                  by_length="1-1,2-5,6-25,26-")
    assert {p.name for p in out.iterdir()} == OUT_FILES | {f"comparison_by_length.{e}" for e in ("md", "csv", "json")}
    rows = {(r["bucket"], r["run"], r["metric"]): r for r in res["by_length"]["rows"]}
    assert len(rows) == 4 * 2 * 2
    for label, lo, hi in (("2-5", 2, 5), ("6-25", 6, 25), ("26+", 26, 10**9)):
        idx = [i for i in range(len(sid)) if lo <= slen[i] <= hi]
        n_sess = len({sid[i] for i in idx})
        for m, val in (("recall_at_20", lambda r: float(r <= 20)), ("mrr_at_5", lambda r: 1 / r if r <= 5 else 0.0)):
            ma = sum(val(ra[i]) for i in idx) / len(idx)
            mb = sum(val(rb[i]) for i in idx) / len(idx)
            r, rbase = rows[label, "a", m], rows[label, "b", m]
            assert (r["n_events"], r["n_units"]) == (len(idx), n_sess)
            assert r["mean"] == pytest.approx(ma, rel=1e-12) and rbase["mean"] == pytest.approx(mb, rel=1e-12)
            assert r["uplift"] == pytest.approx((ma - mb) / mb * 100, rel=1e-9)
            assert r["uplift_lo"] <= r["uplift"] <= r["uplift_hi"] and rbase["uplift"] is None
            # resampled over the bucket's own sessions, with the run's seed
            sub = np.array(idx)
            _, clo, chi = stats.bootstrap_ci([val(x) for x in ra[sub]], sid[sub], n_boot=150, seed=2)
            assert (r["lo"], r["hi"]) == pytest.approx((clo, chi), abs=1e-12)
    assert rows["26+", "a", "recall_at_20"]["length_max"] is None
    empty = rows["1", "a", "recall_at_20"]
    assert empty["n_events"] == 0 and empty["mean"] is None and empty["uplift"] is None
    csv_rows = list(csv.DictReader(open(out / "comparison_by_length.csv")))
    assert csv_rows[0]["bucket"] == "1" and csv_rows[0]["mean"] == "" and csv_rows[0]["n_events"] == "0"
    assert json.loads((out / "comparison_by_length.json").read_text()) == json.loads(json.dumps(res["by_length"]))
    md, md_len = (out / "comparison.md").read_text(), (out / "comparison_by_length.md").read_text()
    r = rows["6-25", "a", "recall_at_20"]
    cell = (f"{r['mean']:.4f} [{r['lo']:.3f}, {r['hi']:.3f}]; "
            f"{r['uplift']:+.1f} % [{r['uplift_lo']:+.1f}, {r['uplift_hi']:+.1f}]")
    n625 = sum(1 for x in slen if 6 <= x <= 25)
    for text in (md, md_len):
        assert cell in text and f"6-25 ({n625} events, 15 sessions)" in text and "| 1 (0 events, 0 sessions)" in text
        assert re.search(r"^\| a \| — \| ", text, re.M)  # the empty bucket's cell
    assert "## By session length" in md


@pytest.mark.parametrize("spec, words", [
    ("2-5,x", "bad bucket 'x'"), ("5-2", "1 <= LO <= HI"), (",", "no bucket"), ("2-5,4-8", "overlap"),
    ("2-,6-9", "overlap"), ([(2, 5, 7)], "bad bucket"), ("0-3", "1 <= LO"),
])
def test_bad_by_length_spec_is_a_clear_error(tmp_path, two_runs, spec, words):
    gru_dir, _, pop_dir, _ = two_runs
    with pytest.raises(ValueError, match="by_length.*" + re.escape(words)):
        compare({"gru": [gru_dir], "pop": [pop_dir]}, "pop", tmp_path / "cmp", n_boot=10, by_length=spec)
    assert not (tmp_path / "cmp").exists()


def test_by_length_cli_and_missing_session_length(tmp_path, two_runs, capsys):
    gru_dir, good, pop_dir, _ = two_runs
    with pytest.raises(SystemExit):
        main([str(gru_dir), str(pop_dir), "--baseline", str(pop_dir), "--out", str(tmp_path / "x"),
              "--by-length", "2-5,6+,abc"])
    assert "bad bucket 'abc'" in capsys.readouterr().err
    out = tmp_path / "cli"
    assert main([str(gru_dir), "--baseline", str(pop_dir), "--out", str(out), "--n-boot", "30",
                 "--metrics", "recall_at_20", "--by-length"]) == 0  # alone: Villatel's buckets
    labels = [b["bucket"] for b in json.loads((out / "comparison_by_length.json").read_text())["buckets"]]
    assert labels == ["2-5", "6-25", "26+"]
    assert "comparison_by_length" in capsys.readouterr().out
    d = tmp_path / "nolen"
    d.mkdir()
    t = pq.read_table(gru_dir / "per_event.parquet")
    pq.write_table(t.drop_columns(["session_length"]), d / "per_event.parquet")
    (d / "metrics.json").write_text((gru_dir / "metrics.json").read_text())
    with pytest.raises(ValueError, match="session_length.*" + re.escape(str(d))):
        compare({"x": [d], "pop": [pop_dir]}, "pop", tmp_path / "c2", n_boot=10, by_length="2-5")


def _per_step(folder, seed, n_steps=20, none_at=None):
    """recall_per_step.json as evaluate writes it; returns the recall_at_20 values."""
    rng = np.random.default_rng(seed)
    rows, vals = [], []
    for d in range(1, n_steps + 1):
        v = None if d == none_at else float(rng.random())
        vals.append(v)
        rows.append({"step": d, "n_events": 0 if v is None else 500 - d, "recall_at_5": 0.1,
                     "recall_at_20": v})
    (folder / "recall_per_step.json").write_text(json.dumps(rows))
    return vals


def test_future_steps_plot_and_csv_are_the_per_step_recalls(tmp_path, two_runs):
    gru_dir, _, pop_dir, _ = two_runs
    s2 = write_eval(tmp_path / "gru_s2", _ranks(9, 25), shuffle=1)
    v1, v2, vb = _per_step(gru_dir, 1, none_at=20), _per_step(s2, 2, none_at=20), _per_step(pop_dir, 3, none_at=20)
    out = tmp_path / "cmp"
    res = compare({"gru": [gru_dir, s2], "pop": [pop_dir]}, "pop", out, metrics=["recall_at_20"], n_boot=20)
    assert {p.name for p in out.iterdir()} == OUT_FILES | {"comparison_future_steps.png", "comparison_future_steps.csv"}
    _assert_png(out / "comparison_future_steps.png")
    rows = {(r["run"], int(r["step"])): r for r in csv.DictReader(open(out / "comparison_future_steps.csv"))}
    assert len(rows) == 2 * 20
    for d in range(1, 20):
        g, p = rows["gru", d], rows["pop", d]
        mean = (v1[d - 1] + v2[d - 1]) / 2
        assert float(g["mean"]) == pytest.approx(mean, rel=1e-12) and float(p["mean"]) == pytest.approx(vb[d - 1])
        assert (float(g["seed_min"]), float(g["seed_max"])) == (min(v1[d - 1], v2[d - 1]), max(v1[d - 1], v2[d - 1]))
        assert float(g["uplift"]) == pytest.approx((mean - vb[d - 1]) / vb[d - 1] * 100, rel=1e-9)
        assert g["n_seeds"] == "2" and int(g["n_events"]) == 500 - d and p["uplift"] == ""
    assert rows["gru", 20]["mean"] == "" and rows["gru", 20]["uplift"] == ""  # no item 20 steps ahead
    assert res["future_steps"][0]["run"] == "pop" and "comparison_future_steps.png" in (out / "comparison.md").read_text()
    # one evaluation without the file: no future-step outputs, the rest as before
    (s2 / "recall_per_step.json").unlink()
    out2 = tmp_path / "cmp2"
    res = compare({"gru": [gru_dir, s2], "pop": [pop_dir]}, "pop", out2, metrics=["recall_at_20"], n_boot=20)
    assert {p.name for p in out2.iterdir()} == OUT_FILES and "future_steps" not in res


def test_recall_at_k_n_1_is_the_next_item_under_the_conservative_tie_rule(tmp_path):
    """Villatel's Recall@20,N=1 is always conservative; with optimistic ranks it differs from
    recall_at_20: 1 + n_greater + n_ties <= 20."""
    ev = _sessions([5] * 10)
    rng = np.random.default_rng(1)
    greater, ties = rng.integers(0, 30, 40), rng.integers(0, 5, 40)
    rank = 1.0 + greater  # optimistic
    want = (1 + greater + ties <= 20).astype(float)
    assert want.mean() != np.mean(rank <= 20)
    d = write_eval(tmp_path / "a", rank, events=ev, ties="optimistic",
                   metrics_override={"recall_at_20_n_1": float(want.mean())})
    t = pq.read_table(d / "per_event.parquet")
    t = t.set_column(t.column_names.index("n_ties"), "n_ties", pa.array(ties, pa.int64()))
    pq.write_table(t, d / "per_event.parquet")
    b = write_eval(tmp_path / "b", np.full(40, 100.0), events=ev, ties="optimistic")
    res = compare({"a": [d], "b": [b]}, "b", tmp_path / "cmp", metrics=["recall_at_20_n_1"], n_boot=10)
    assert res["rows"][1]["mean"] == pytest.approx(want.mean(), rel=1e-12)
    (d / "metrics.json").write_text(json.dumps({**json.loads((d / "metrics.json").read_text()),
                                                "recall_at_20_n_1": 0.99}))
    with pytest.raises(ValueError, match="do not belong together"):
        compare({"a": [d], "b": [b]}, "b", tmp_path / "cmp2", metrics=["recall_at_20_n_1"], n_boot=10)


def test_by_user_history_and_input_position_select_exactly_their_events(tmp_path, capsys):
    """Quadrana et al.'s breakdowns with CIs: per bucket of user_history_sessions (0 = a user
    without history) and of the 1-based input position (position + 1), means by hand."""
    ev = _sessions([2, 3, 5, 6, 10] * 6)
    sid, pos = ev[0], ev[1]
    n_s = len(np.unique(sid))
    hist_of_session = np.array([0, 1, 3, 6, 7, 12] * 5)[:n_s]  # history sessions of each session's user
    hist = hist_of_session[sid - 1].astype(np.int32)
    users = (sid % 7).astype(np.int64)
    rng = np.random.default_rng(11)
    ra, rb = rng.integers(1, 25, len(sid)).astype(float), rng.integers(1, 30, len(sid)).astype(float)
    cols = {"user_history_sessions": hist}
    a = write_eval(tmp_path / "a", ra, events=ev, user_id=users, extra_columns=cols, shuffle=3)
    b = write_eval(tmp_path / "b", rb, events=ev, user_id=users, extra_columns=cols)
    out = tmp_path / "cmp"
    res = compare({"a": [a], "b": [b]}, "b", out, metrics=["recall_at_20"], n_boot=100, seed=1,
                  by={"user_history_sessions": "0,1-6,7-", "input_position": "1,2-4,5-"})
    assert {f"comparison_by_{n}.{e}" for n in ("user_history", "position") for e in ("md", "csv", "json")} <= \
        {p.name for p in out.iterdir()}
    assert "comparison_by_length.md" not in {p.name for p in out.iterdir()}
    for col, want in (("user_history_sessions", [("0", lambda i: hist[i] == 0), ("1-6", lambda i: 1 <= hist[i] <= 6),
                                                 ("7+", lambda i: hist[i] >= 7)]),
                      ("input_position", [("1", lambda i: pos[i] == 0), ("2-4", lambda i: 1 <= pos[i] <= 3),
                                          ("5+", lambda i: pos[i] >= 4)])):
        rows = {(r["bucket"], r["run"]): r for r in res["by"][col]["rows"]}
        for label, inside in want:
            idx = [i for i in range(len(sid)) if inside(i)]
            ma, mb = np.mean(ra[idx] <= 20), np.mean(rb[idx] <= 20)
            r = rows[label, "a"]
            assert r["n_events"] == len(idx) and r["column"] == col
            assert r["mean"] == pytest.approx(ma, rel=1e-12) and rows[label, "b"]["mean"] == pytest.approx(mb)
            assert r["uplift"] == pytest.approx((ma - mb) / mb * 100, rel=1e-9)
        csv_rows = list(csv.DictReader(open(out / f"comparison_by_{'user_history' if 'user' in col else 'position'}.csv")))
        assert csv_rows[0]["column"] == col and "length_min" not in csv_rows[0]
    md = (out / "comparison.md").read_text()
    assert "## By user history" in md and "## By input position in the session" in md
    # the CLI: defaults per column, errors name the column
    assert main([str(a), "--baseline", str(b), "--out", str(tmp_path / "cli"), "--n-boot", "20", "--metrics",
                 "recall_at_20", "--by", "user_history_sessions", "--by", "input_position"]) == 0
    got = json.loads((tmp_path / "cli" / "comparison_by_position.json").read_text())
    assert [x["bucket"] for x in got["buckets"]] == ["1-2", "3-4", "5-9", "10+"]
    with pytest.raises(SystemExit):
        main([str(a), "--baseline", str(b), "--out", str(tmp_path / "x"), "--by", "user=0,1-"])
    assert "unknown column 'user'" in capsys.readouterr().err
    nohist = write_eval(tmp_path / "c", ra, events=ev)
    with pytest.raises(ValueError, match="user_history_sessions.*user mode"):
        compare({"c": [nohist], "b": [b]}, "b", tmp_path / "c2", n_boot=10, by={"user_history_sessions": "0-"})
