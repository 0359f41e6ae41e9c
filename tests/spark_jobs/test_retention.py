"""Retention of interval folders and the sweep of killed runs' leftovers (spark_jobs/retention.py).

    .venv/bin/python -m pytest tests/spark_jobs/test_retention.py -q
"""
from __future__ import annotations

import json
import os
import time

import pytest

from spark_jobs import contract as C
from spark_jobs.retention import main, prune_intervals, sweep_leftovers

DAY = 24 * 3600


def _interval(root, start_day: int) -> str:
    name = f"201404{start_day:02d}T000000Z_201404{start_day + 1:02d}T000000Z"
    (root / name / "processed").mkdir(parents=True)
    (root / name / "processed" / "manifest.json").write_text("{}")
    return name


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (t, t))
    os.utime(path, (t, t))


def test_prune_keeps_the_newest_intervals_and_the_protected_one(tmp_path):
    names = [_interval(tmp_path, d) for d in (3, 4, 5, 6, 7)]
    (tmp_path / "notes").mkdir()  # not an interval: never touched
    r = prune_intervals(tmp_path, keep=2, protect=(names[0],))
    assert sorted(os.path.basename(p) for p in r.removed) == [names[1], names[2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[3], names[4], "notes"])
    assert r.freed_bytes == 4  # two manifest.json of 2 bytes
    assert "protected" in r.kept[str(tmp_path / names[0])]
    with pytest.raises(ValueError, match="keep = 0"):
        prune_intervals(tmp_path, keep=0)


def test_prune_orders_by_interval_end_not_by_modification_time(tmp_path):
    old, new = _interval(tmp_path, 3), _interval(tmp_path, 9)
    _age(tmp_path / new, 10 * DAY)  # re-touched order must not matter
    r = prune_intervals(tmp_path, keep=1)
    assert [os.path.basename(p) for p in r.removed] == [old]


def test_sweep_removes_only_old_leftovers_of_every_writer(tmp_path):
    iv = tmp_path / _interval(tmp_path, 3)
    leftovers = [iv / "processed.tmp-1a2b3c4d",             # Spark job's output being written
                 iv / "models" / ".gru4rec.tmp-deadbeef",    # training run (replace_dir's temp)
                 iv / "models" / ".pop.old-0badf00d",        # the previous output, renamed away
                 iv / "eval" / ".result.json.k3j_x9a2.tmp"]  # atomic_write's temp file
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".tmp":
            p.write_text("partial")
        else:
            p.mkdir()
            (p / "part-0.parquet").write_bytes(b"x" * 10)
    young = iv / "models" / ".tan.tmp-cafe1234"  # a run writing right now
    young.mkdir()
    keep_files = [iv / "models" / "gru4rec" / "model.pt", iv / "processed.quarantine" / "q.parquet"]
    for p in keep_files:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"keep")
    _age(tmp_path, 2 * DAY)
    (young / "part-0.parquet").write_bytes(b"fresh")  # touched now

    dry = sweep_leftovers(tmp_path, min_age_s=DAY, dry_run=True)
    assert sorted(dry.removed) == sorted(map(str, leftovers)) and all(p.exists() for p in leftovers)
    r = sweep_leftovers(tmp_path, min_age_s=DAY)
    assert sorted(r.removed) == sorted(map(str, leftovers))
    assert not any(p.exists() for p in leftovers)
    assert young.exists() and "run in progress" in r.kept[str(young)]
    assert all(p.exists() for p in keep_files)  # outputs and a failed run's quarantine stay
    assert r.freed_bytes == 3 * 10 + len("partial")


def test_what_the_project_writes_is_recognised_as_leftover_names(tmp_path):
    """The temp names come from the project's own writers: a renamed writer must not escape the sweep."""
    seen = []
    orig = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst)))
        return orig(src, dst)

    import unittest.mock as m

    (tmp_path / "d").mkdir()
    with m.patch("os.replace", spy):
        C.write_text(tmp_path / "f.json", "{}")
        tmp = tmp_path / ".d.tmp-0123abcd"
        tmp.mkdir()
        C.replace_dir(tmp, tmp_path / "d")
    from spark_jobs.retention import LEFTOVER

    outputs = {"f.json", "d"}
    # every name a rename moves something from or to, except the outputs themselves, is a temp name
    temps = {n for pair in seen for n in pair} - outputs
    assert len(temps) == 3 and all(LEFTOVER.match(n) for n in temps), seen
    assert not any(LEFTOVER.match(n) for n in outputs)


def test_cli_dry_run_reports_without_removing(tmp_path, capsys):
    names = [_interval(tmp_path, d) for d in (3, 4, 5)]
    assert main(["--root", str(tmp_path), "--keep", "1", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and sorted(os.path.basename(p) for p in out["pruned"]) == names[:2]
    assert all((tmp_path / n).exists() for n in names)
