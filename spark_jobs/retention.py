"""Housekeeping of the interval-keyed output tree: retention of old intervals, and the sweep
of folders and files that killed runs left behind.

Layout (``dags/pipeline_steps.py``)::

    <data_dir>/pipeline/<dataset>/<start>_<end>/      one folder per data interval
        ...                                           (e.g. 20140403T000000Z_20140404T000000Z)

Every output of the project is written to a temp name and renamed into place
(``spark_jobs.contract.replace_dir`` / ``atomic_write``), so a run killed at the
wrong moment leaves one of these behind, never a half-written output:

- ``<name>.tmp-<hex>`` / ``.<name>.tmp-<hex|pid>``: an output being written
  (Spark job, training run, evaluation, generated input);
- ``.<name>.old-<hex>``: the previous output, renamed away just before its
  replacement (removed right after the swap). When ``<name>`` itself is missing and a
  temp of it (``<name>.tmp-*`` / ``.<name>.tmp-*``) lies beside it, a run was killed
  between the two renames of the swap: the sweep renames the old output back to
  ``<name>`` (:func:`spark_jobs.contract.recover_dir`) instead of removing the only
  complete copy;
- ``.<name>.<random>.tmp``: a file being written by ``atomic_write``.

:func:`sweep_leftovers` removes those that have not been touched for
``min_age_s`` (a run still writing one touches it), :func:`prune_intervals` removes
interval folders beyond the ``keep`` newest. Both return what they removed (and
what they kept and why), and neither follows symbolic links out of the tree.

    python -m spark_jobs.retention --root data/pipeline/synthetic --keep 7 --min-age-hours 24 [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

#: names a killed writer leaves (see the module docstring)
LEFTOVER = re.compile(r"^(?:\.?.+\.tmp-[0-9A-Za-z]+|\..+\.old-[0-9a-f]+|\..+\.[^./]+\.tmp)$")
#: an interval folder: <start>_<end> in the compact UTC form the DAG writes
INTERVAL = re.compile(r"^(\d{8}T\d{6}Z)_(\d{8}T\d{6}Z)$")


@dataclass
class Housekeeping:
    removed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # path -> why it was kept
    freed_bytes: int = 0
    restored: dict[str, str] = field(default_factory=dict)  # output -> the .old-* folder renamed back to it


def _interrupted_swap(p: Path) -> Path | None:
    """The output ``p`` (a ``.<name>.old-<hex>`` folder) was renamed away from, when a swap into it
    was interrupted between its two renames: ``<name>`` is missing and a temp of it is beside it."""
    m = re.match(r"^\.(.+)\.old-[0-9a-f]+$", p.name)
    if not m or not p.is_dir() or p.is_symlink():
        return None
    dest = p.with_name(m.group(1))
    if dest.exists() or dest.is_symlink():
        return None
    temp = re.compile(rf"^\.?{re.escape(dest.name)}\.tmp-[0-9A-Za-z]+$")
    return dest if any(temp.match(q.name) for q in p.parent.iterdir()) else None


def _size(p: Path) -> int:
    if p.is_symlink() or p.is_file():
        return p.lstat().st_size
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def _newest_mtime(p: Path) -> float:
    """The latest modification anywhere inside ``p`` (a writer still at work keeps it fresh)."""
    t = p.lstat().st_mtime
    if p.is_dir() and not p.is_symlink():
        for dirpath, dirnames, filenames in os.walk(p):
            for n in dirnames + filenames:
                try:
                    t = max(t, os.lstat(os.path.join(dirpath, n)).st_mtime)
                except FileNotFoundError:  # removed while we looked: the writer is alive
                    return time.time()
    return t


def _remove(p: Path, out: Housekeeping, dry_run: bool) -> None:
    out.freed_bytes += _size(p)
    out.removed.append(str(p))
    if dry_run:
        return
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def sweep_leftovers(root: str | os.PathLike, min_age_s: float = 24 * 3600, now: float | None = None,
                    dry_run: bool = False) -> Housekeeping:
    """Remove the temp / old outputs killed runs left anywhere under ``root`` once nothing in them
    has changed for ``min_age_s`` seconds (younger ones may belong to a run in progress)."""
    root = Path(root)
    out = Housekeeping()
    if not root.exists():
        return out
    now = time.time() if now is None else now
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            if not LEFTOVER.match(name):
                continue
            p = Path(dirpath) / name
            if not p.exists() and not p.is_symlink():  # renamed back to its output just before
                continue
            age = now - _newest_mtime(p)
            if age < min_age_s:
                out.kept[str(p)] = f"touched {age:.0f} s ago (< {min_age_s:.0f} s): may be a run in progress"
                continue
            dest = _interrupted_swap(p)
            if dest is not None:  # the only complete copy of the output: put it back
                if dry_run:
                    out.restored[str(dest)] = str(p)
                else:
                    from spark_jobs.contract import recover_dir

                    out.restored[str(dest)] = str(recover_dir(dest))
                if name in dirnames:
                    dirnames.remove(name)
                continue
            _remove(p, out, dry_run)
            if name in dirnames:
                dirnames.remove(name)  # do not walk into what was removed
    return out


def prune_intervals(dataset_root: str | os.PathLike, keep: int, protect: tuple[str, ...] = (),
                    dry_run: bool = False) -> Housekeeping:
    """Keep the ``keep`` newest interval folders (by interval end) under ``dataset_root`` and
    remove the older ones; folders named in ``protect`` (e.g. the running interval) always stay.
    Anything that is not an interval folder is left alone. Registered models do not depend on
    these folders: MLflow holds its own copy of every logged model."""
    if keep < 1:
        raise ValueError(f"retention keep = {keep}: at least 1 (the newest interval)")
    root = Path(dataset_root)
    out = Housekeeping()
    if not root.exists():
        return out
    intervals = sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and INTERVAL.match(p.name)),
                       key=lambda p: (INTERVAL.match(p.name).group(2), p.name), reverse=True)
    for i, p in enumerate(intervals):
        if p.name in protect:
            out.kept[str(p)] = "protected (the running interval)"
        elif i < keep:
            out.kept[str(p)] = f"among the {keep} newest"
        else:
            _remove(p, out, dry_run)
    return out


def housekeep(root: str | os.PathLike, keep: int | None, min_age_s: float, protect: tuple[str, ...] = (),
              dry_run: bool = False) -> dict:
    """:func:`sweep_leftovers` then, with ``keep``, :func:`prune_intervals` of a dataset's folder;
    what was removed, restored and kept (the CLI's output, the DAG's ``housekeeping`` result)."""
    sw = sweep_leftovers(root, min_age_s, dry_run=dry_run)
    pr = prune_intervals(root, keep, protect=protect, dry_run=dry_run) if keep is not None else Housekeeping()
    return {"dry_run": dry_run, "swept": sw.removed, "restored": sw.restored, "pruned": pr.removed,
            "freed_bytes": sw.freed_bytes + pr.freed_bytes, "kept": {**sw.kept, **pr.kept}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m spark_jobs.retention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="a dataset's folder: <data_dir>/pipeline/<dataset>")
    ap.add_argument("--keep", type=int, default=None, help="interval folders to keep (newest); none = no pruning")
    ap.add_argument("--min-age-hours", type=float, default=24.0, help="sweep leftovers untouched this long")
    ap.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    a = ap.parse_args(argv)
    print(json.dumps(housekeep(a.root, a.keep, a.min_age_hours * 3600, dry_run=a.dry_run), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
