"""Byte-level identity of Spark's Parquet output, as far as Spark can give it.

Spark (parquet-mr 1.17) writes the same data pages for the same rows, but lists each column
chunk's encodings in its footer from a Java ``HashSet`` of enum constants, whose order follows
identity hash codes and so changes from one JVM run to the next (e.g. ``BIT_PACKED,
PLAIN_DICTIONARY, RLE`` vs ``BIT_PACKED, RLE, PLAIN_DICTIONARY``). :func:`parquet_digest` hashes
every byte before the footer (magic and data pages) as it is, and the footer's content with each
encodings list sorted; everything else in the footer (schema, row groups, offsets, sizes,
statistics, key-value metadata) must match as it is.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path


def parquet_digest(path: str | Path) -> str:
    import pyarrow.parquet as pq

    raw = Path(path).read_bytes()
    if raw[:4] != b"PAR1" or raw[-4:] != b"PAR1":
        raise ValueError(f"{path}: not a Parquet file")
    footer_len = struct.unpack("<I", raw[-8:-4])[0]
    body = raw[:len(raw) - 8 - footer_len]
    md = pq.read_metadata(path)
    footer = md.to_dict()
    for rg in footer["row_groups"]:
        for col in rg["columns"]:
            col["encodings"] = sorted(col["encodings"])
    kv = {k.decode(): v.decode(errors="replace") for k, v in (md.metadata or {}).items()}
    h = hashlib.sha256(body)
    h.update(json.dumps({"footer": footer, "kv": kv, "footer_len": footer_len}, sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def parquet_tree_digests(folder: str | Path, skip_parts: tuple[str, ...] = ("quality",)) -> dict[str, str]:
    """:func:`parquet_digest` of every Parquet file under ``folder``, keyed by its relative path with
    Spark's random job id taken out of part-file names."""
    folder = Path(folder)
    return {re.sub(r"part-(\d+)-[0-9a-f-]{36}", r"part-\1", str(p.relative_to(folder))): parquet_digest(p)
            for p in sorted(folder.rglob("*.parquet")) if not set(skip_parts) & set(p.parts)}
