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
