"""Small helpers for the Spark job tests."""
from __future__ import annotations

import os

import pyarrow.dataset as ds


def table(path: str):
    """A Parquet dataset folder as a pandas frame sorted by (session_id, seq)."""
    df = ds.dataset(path, format="parquet").to_table().to_pandas()
    if "seq" in df.columns:
        df = df.sort_values(["session_id", "seq"]).reset_index(drop=True)
    return df


def split_table(out: str, split: str, name: str):
    return table(os.path.join(out, "splits", split, name))


def write_lines(path, lines: list[str] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode()
    with open(path, "wb") as f:
        f.write(data)
    return str(path)
