"""The on-disk data contract shared by every stage (no Spark import here).

Everything downstream of ``spark_jobs`` (expectations, training, evaluation,
dags) depends on this module and on the Parquet it describes, never on Spark.

Layout of a preprocessing output directory ``OUT``::

    OUT/
      manifest.json                 inputs + checksums, parameters, counts after
                                    every step, time ranges, software versions
      events/                       all sessionized + filtered events (Parquet dataset)
      quarantine/                   rows rejected by a reader, with file/row/reason
      splits/<name>/                one folder per split strategy ("SPLIT_DIR")
          train/                    training events, disjoint from valid and test
          valid/                    validation events (filtered to `train` items)
          test/                     test events (filtered to `train_full` items)
          train_full/               train + the raw validation sessions: what the
                                    final model is trained on (GRU4Rec's train_full)
          train_recent_<k>/         most recent 1/k of train_full sessions (Tan M2)
          item_index/               item_id -> item_idx over train_full, with support
          user_index/               user_id -> user_idx over train_full (if users)
          split.json                split parameters and per-table counts

Every events table has the columns of :data:`EVENT_COLUMNS`, sorted by
(session_id, ts, original order) and ``seq`` counting 0.. within a session.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa

#: name -> pyarrow type of every events table.
EVENT_SCHEMA = pa.schema(
    [
        pa.field("session_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=True),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("seq", pa.int32(), nullable=False),
    ]
)
EVENT_COLUMNS = [f.name for f in EVENT_SCHEMA]
OPTIONAL_EVENT_COLUMNS = ["event_type"]

ITEM_INDEX_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("support", pa.int64(), nullable=False),
    ]
)
USER_INDEX_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("user_idx", pa.int32(), nullable=False),
        pa.field("n_sessions", pa.int64(), nullable=False),
    ]
)

MANIFEST = "manifest.json"
SPLIT_META = "split.json"
EVENTS_DIR = "events"
QUARANTINE_DIR = "quarantine"
SPLITS_DIR = "splits"
TRAIN, VALID, TEST, TRAIN_FULL = "train", "valid", "test", "train_full"
ITEM_INDEX, USER_INDEX = "item_index", "user_index"

#: Tan et al. 2016: fractions of the training sessions, most recent first.
DEFAULT_RECENT_FRACTIONS = (256, 64, 16, 4, 1)


def recent_table(k: int) -> str:
    """Name of the table holding the most recent 1/k of train_full sessions."""
    return f"train_recent_{k}"


#: Fault injection for tests only (tests/reliability/test_faults_spark.py): seconds
#: :func:`replace_dir` sleeps between its two renames, so that a test can kill a job exactly
#: there. Unset (the default everywhere else) means no pause.
SWAP_PAUSE_ENV = "RNNREC_FAULT_SWAP_PAUSE_S"


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Swap the finished folder ``tmp`` in as ``dest`` (same filesystem: two renames).

    Every output folder of the pipeline is written this way: a reader sees the old
    output or the new one, never a half-written one; the old one is removed afterwards.
    The old output is first renamed to ``.<name>.old-<hex>`` (the hex starts with the
    time in ns, so the names sort by age). A process killed between the two renames
    leaves ``dest`` missing and the old output complete under that name:
    :func:`recover_dir` renames it back (the next preprocessing run calls it first; the
    retention sweep calls it when the killed run's temp folder is still beside it).
    """
    tmp, dest = Path(tmp), Path(dest)
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{time.time_ns():016x}{uuid.uuid4().hex[:4]}")
        os.replace(dest, old)
        if os.environ.get(SWAP_PAUSE_ENV):
            time.sleep(float(os.environ[SWAP_PAUSE_ENV]))
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(dest: str | os.PathLike) -> Path | None:
    """Undo a :func:`replace_dir` killed between its two renames.

    When ``dest`` is missing and its previous content waits as ``.<name>.old-<hex>``
    beside it, the newest such folder is renamed back to ``dest``; returns the folder it
    came from, or None when there is nothing to undo (``dest`` exists, or no old copy).
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink() or not dest.parent.is_dir():
        return None
    prefix = f".{dest.name}.old-"
    olds = sorted((p for p in dest.parent.iterdir()
                   if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()), key=lambda p: p.name)
    if not olds:
        return None
    os.replace(olds[-1], dest)
    return olds[-1]


# --------------------------------------------------------------------------- shared helpers
# Every file and folder the project writes goes through these two (temp + rename), and every
# ``key=value`` option list through parse_key_values.

def atomic_write(path: str | os.PathLike, write) -> Path:
    """Write ``path`` atomically: ``write(tmp_path)`` fills a temp file in the same folder,
    which is then renamed over ``path`` (readers see the old file or the new one)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are shared (MLflow, Airflow workers)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    def w(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, w)


def write_json(path: str | os.PathLike, obj) -> Path:
    import json

    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def parse_key_values(items, source: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` or ``"a=1,b=x"`` -> ``{"a": "1", "b": "x"}`` (values stay strings:
    the consumer types them). A malformed item raises ValueError naming ``source``."""
    if isinstance(items, str):
        items = items.split(",")
    out: dict[str, str] = {}
    for it in items or []:
        it = it.strip()
        if not it:
            continue
        k, sep, v = it.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"{source}: {it!r} is not key=value")
        out[k.strip()] = v.strip()
    return out
