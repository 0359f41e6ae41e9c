"""Deterministic synthetic clickstream that looks like YOOCHOOSE (RecSys Challenge 2015).

Run::

    python -m spark_jobs.generate --events 1000000 --seed 0 --out /tmp/clicks
    python -m spark_jobs.generate --events 100000 --format yoochoose --out /tmp/yc

Only numpy + pyarrow (no Spark): it streams one day at a time, so memory stays
bounded by the largest day (~200 bytes per event of that day), and 31.7M events
take a few minutes on 2 cores.

What the data looks like, and why:

* **Items** have Zipf-like popularity (weight ``1/(rank+k0)^a``) and belong to
  one latent *topic*, written as ``category`` (1-based, like YOOCHOOSE's 1..12).
* **Sequential structure a model can learn.** Every item has a few fixed
  successors in its topic. The next click is: a repeat of the current item
  (YOOCHOOSE has many), a return to an item seen earlier in the session (history
  dependent: an RNN can learn it, a first-order Markov chain cannot), one of the
  current item's successors (the bulk), a popular item of the same topic, or a
  jump to any item by global popularity. So next-item prediction from the
  current item beats POP by a wide margin.
* **Users** have a heavy-tailed activity level and a preferred topic; each user
  has several sessions spread over the days, so user-level models and the
  5..199-sessions-per-user filter have something to work on.
* **Time.** Sessions start along a diurnal curve. Within a session the gap
  between clicks is always < 30 min (lognormal, median ~1 min, a few just under
  30 min); two sessions of one user are always separated by > 30 min (a few
  just over 30 min). No session crosses midnight and every session ends before
  23:29:59 UTC, so the 30-minute rule also holds across days. Hence the
  ground-truth ``session_id`` equals a 30-minute idle re-sessionization by user,
  which tests can check exactly.
* **Lengths** are geometric (mean ~4.5, P(len=1) ~0.22, capped at 200).
* **Days**: the requested number of events is split exactly over the days with a
  weekly rhythm; each day is drawn from its own seed ``(seed, day)`` (only the
  session-id offset carries over from earlier days), so output is bit-for-bit
  reproducible.

Output (``--format parquet``, the default)::

    OUT/_generator.json                  parameters and per-day counts
    OUT/dt=YYYY-MM-DD/part-00000.parquet user_id int64, session_id int64,
                                         item_id int64, ts timestamp[us, UTC],
                                         category int32  (sorted by ts)

``--format yoochoose`` writes the raw ``yoochoose-clicks.dat`` layout instead:
``OUT/dt=YYYY-MM-DD/part-00000.dat`` with lines
``SessionId,2014-04-07T10:51:09.277Z,ItemId,Category`` and no header (no user id,
as in the original). ``--bad-fraction F`` (yoochoose only) then replaces about F
of the lines with bad ones -- unparseable timestamp, missing item id, wrong
column count, non-UTF-8 bytes -- and lists each (file, line, kind) under
``bad_lines`` in ``_generator.json``, for fault-injection tests.

The output directory is written to a temporary sibling and renamed into place,
so a re-run replaces it atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from spark_jobs.contract import replace_dir

#: Schema of a generated day (ground truth, before any preprocessing).
GENERATED_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("session_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("category", pa.int32(), nullable=False),
    ]
)

SESSION_GAP_S = 30 * 60
DAY_MS = 86_400_000
#: every session ends by this offset in its day, so a user's sessions on
#: consecutive days are > 30 min apart too
DAY_END_MS = DAY_MS - (SESSION_GAP_S + 1) * 1000
#: within-session gaps never reach the 30-minute boundary ...
MAX_IN_SESSION_GAP_MS = (SESSION_GAP_S - 1) * 1000
#: ... and gaps between sessions of one user always exceed it.
MIN_BETWEEN_SESSIONS_MS = (SESSION_GAP_S + 1) * 1000
ITEM_ID_BASE = 214_500_000  # YOOCHOOSE-looking item ids, deliberately not 0..n-1


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Shape parameters of the synthetic world (defaults give YOOCHOOSE-like data)."""

    zipf_a: float = 1.1  # item popularity exponent
    zipf_k0: float = 10.0  # popularity offset: flattens the head (top-20 items ~15-20% of clicks)
    items_per_topic: int = 250  # ~ number of items per latent topic (category)
    n_successors: int = 6  # fixed likely successors per item
    successor_weights: tuple[float, ...] = (0.3, 0.22, 0.16, 0.12, 0.11, 0.09)
    successor_pop_exponent: float = 0.8  # successors favour popular items (keeps the Zipf tail)
    # next-click mixture; the remainder (0.16) jumps anywhere by global popularity
    p_repeat: float = 0.15  # same item again (consecutive repeat; ~20% of pairs like YOOCHOOSE)
    p_back: float = 0.07  # an item seen earlier in this session
    p_successor: float = 0.42  # one of the current item's successors
    p_topic: float = 0.2  # popular item of the same topic
    p_start_user_topic: float = 0.6  # first click from the user's preferred topic
    mean_session_len: float = 4.5
    max_session_len: int = 200
    user_activity_sigma: float = 1.0  # lognormal activity of users ...
    user_activity_cap: float = 30.0  # ... capped at this multiple of the median
    gap_median_s: float = 60.0  # within-session gap, lognormal
    gap_sigma: float = 1.1
    repeat_gap_median_s: float = 8.0  # repeats come quickly
    p_gap_near_boundary: float = 0.005  # in-session gaps in [25, 30) min
    p_return_soon: float = 0.05  # next session of a user starts 30..40 min later
    weekly_amplitude: float = 0.12


def default_days(n_events: int) -> int:
    """~200k events a day like YOOCHOOSE (33M over 183 days), at least a week."""
    return int(min(183, max(7, round(n_events / 200_000))))


def default_items(n_events: int) -> int:
    """YOOCHOOSE has ~53k items for 33M clicks (1 per 600 events); a small slice of
    it sees relatively more items (rsc15-100k: 2.9k items in 84k clicks), hence
    the 5*sqrt(n) floor: 100k -> 1.6k, 1M -> 5k, 10M -> 16.7k, 31.7M -> 52.8k."""
    return int(min(60_000, max(200, n_events // 600, 5 * math.isqrt(n_events))))


def default_users(n_events: int) -> int:
    """~20 events (≈4.4 sessions) per user on average."""
    return int(max(50, n_events // 20))


@dataclasses.dataclass
class _World:
    """Everything shared by all days: items, topics, successors, users."""

    item_ids: np.ndarray  # item index -> external item id
    item_topic: np.ndarray  # item index -> topic (0-based)
    pop_cdf: np.ndarray  # global popularity cdf over item indices
    topic_items: np.ndarray  # item indices grouped by topic
    topic_cdf: np.ndarray  # topic k's cdf shifted by +k (one searchsorted for all)
    topic_start: np.ndarray  # offset of topic k in topic_items
    successors: np.ndarray  # (n_items, n_successors) item indices
    succ_cdf: np.ndarray  # cdf of successor_weights
    user_cdf: np.ndarray  # activity cdf over user indices
    user_topic: np.ndarray  # preferred topic of each user
    day_events: np.ndarray  # events per day, sums exactly to n_events


def _cdf(w: np.ndarray) -> np.ndarray:
    c = np.cumsum(w, dtype=np.float64)
    c /= c[-1]
    c[-1] = 1.0
    return c


def _split_exact(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer split of ``total`` proportional to weights (largest remainder)."""
    raw = total * weights / weights.sum()
    base = np.floor(raw).astype(np.int64)
    rest = total - int(base.sum())
    if rest:
        base[np.argsort(-(raw - base), kind="stable")[:rest]] += 1
    return base


def _build_world(n_events, n_days, n_users, n_items, seed, cfg: GeneratorConfig) -> _World:
    rng = np.random.default_rng([seed, 0x5EED])
    # Popularity: random rank per item, so popularity is unrelated to id or topic.
    rank = rng.permutation(n_items)
    pop = 1.0 / (rank + cfg.zipf_k0) ** cfg.zipf_a
    n_topics = max(2, n_items // cfg.items_per_topic)
    item_topic = rng.integers(0, n_topics, n_items)
    # make sure every topic has at least two items (successors need a sibling)
    item_topic[: 2 * n_topics] = np.repeat(np.arange(n_topics), 2)
    item_topic = item_topic[rng.permutation(n_items)]
    order = np.lexsort((np.arange(n_items), item_topic))
    topic_items = order
    topic_start = np.searchsorted(item_topic[order], np.arange(n_topics + 1))
    topic_cdf = np.empty(n_items, dtype=np.float64)
    for k in range(n_topics):  # n_topics is small (<= 240): a loop is fine here
        a, b = topic_start[k], topic_start[k + 1]
        topic_cdf[a:b] = k + _cdf(pop[order[a:b]])
        topic_cdf[b - 1] = k + 1.0 - 1e-12  # a draw k+u with u<1 always lands in topic k
    # Successors: sampled inside the item's own topic, mildly favouring popular items.
    succ_w = pop ** cfg.successor_pop_exponent
    successors = np.empty((n_items, cfg.n_successors), dtype=np.int64)
    for k in range(n_topics):
        members = order[topic_start[k] : topic_start[k + 1]]
        c = _cdf(succ_w[members])
        draw = members[np.searchsorted(c, rng.random((members.size, cfg.n_successors)), side="right").clip(0, members.size - 1)]
        # no self-loops through the successor route (repeats have their own route)
        self_hit = draw == members[:, None]
        at = np.broadcast_to(np.arange(members.size)[:, None], draw.shape)[self_hit]
        draw[self_hit] = members[(at + 1) % members.size]  # the next sibling instead
        successors[members] = draw
    item_ids = ITEM_ID_BASE + rng.choice(n_items * 20, size=n_items, replace=False).astype(np.int64)
    act = rng.lognormal(0.0, cfg.user_activity_sigma, n_users).clip(max=cfg.user_activity_cap)
    user_topic = np.searchsorted(_cdf(np.bincount(item_topic, weights=pop, minlength=n_topics)), rng.random(n_users), side="right").clip(0, n_topics - 1)
    d = np.arange(n_days)
    day_w = 1.0 + cfg.weekly_amplitude * np.cos(2 * np.pi * (d - 2) / 7) + rng.normal(0, 0.03, n_days)
    return _World(
        item_ids=item_ids,
        item_topic=item_topic,
        pop_cdf=_cdf(pop),
        topic_items=topic_items,
        topic_cdf=topic_cdf,
        topic_start=topic_start,
        successors=successors,
        succ_cdf=_cdf(np.asarray(cfg.successor_weights, dtype=np.float64)),
        user_cdf=_cdf(act),
        user_topic=user_topic,
        day_events=_split_exact(n_events, day_w.clip(0.2)),
    )


def _diurnal_cdf() -> np.ndarray:
    """Minute-of-day density: quiet nights, a midday bump, an evening peak."""
    h = np.arange(1440) / 60.0
    w = 0.15 + 0.6 * np.exp(-((h - 12.5) ** 2) / 8) + np.exp(-((h - 20) ** 2) / 6)
    return _cdf(w)


_DIURNAL = _diurnal_cdf()


def _sample(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.searchsorted(cdf, u, side="right").clip(0, cdf.size - 1)


def _topic_sample(w: _World, topics: np.ndarray, u: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(w.topic_cdf, topics + u, side="right")
    # guard the float edge: stay inside the topic's segment
    pos = np.minimum(np.maximum(pos, w.topic_start[topics]), w.topic_start[topics + 1] - 1)
    return w.topic_items[pos]


def _place_sessions(rng, users, dur_ms, cfg: GeneratorConfig):
    """Start offsets (ms in the day) for sessions; NaN-free, -1 marks dropped ones.

    Candidate starts follow the diurnal curve; then, per user in start order,
    a session is pushed to at least ``previous end + gap`` (gap > 30 min).
    The push is the max-plus recurrence s'_i = max(s_i, s'_{i-1} + d_{i-1} + g_i),
    solved in closed form as C_i + cummax_j<=i(s_j - C_j) with C the per-user
    running sum of (d + g): a grouped cummax, vectorised with per-user offsets.
    """
    n = users.size
    minute = _sample(_DIURNAL, rng.random(n))
    start = minute * 60_000 + rng.integers(0, 60_000, n)
    gap = MIN_BETWEEN_SESSIONS_MS + rng.exponential(20 * 60_000, n).astype(np.int64)
    soon = rng.random(n) < cfg.p_return_soon
    gap[soon] = MIN_BETWEEN_SESSIONS_MS + rng.integers(0, 9 * 60_000, int(soon.sum()))
    order = np.lexsort((start, users))
    u, s, d, g, soon = users[order], start[order], dur_ms[order], gap[order], soon[order]
    first = np.ones(n, dtype=bool)
    first[1:] = u[1:] != u[:-1]
    # "return soon" sessions ignore their own candidate start: placed right after the previous one
    s = np.where(soon & ~first, -(10**9), s)
    step = np.where(first, 0, np.concatenate(([0], d[:-1] + g[1:])))  # d_{i-1} + g_i
    grp = np.cumsum(first) - 1
    csum = np.cumsum(step)
    c = csum - (csum - step)[np.flatnonzero(first)][grp]  # per-user running sum, 0 at first
    big = np.int64(10**11)
    key = grp * big + (s - c)
    placed = np.maximum.accumulate(key) - grp * big + c
    out = np.empty(n, dtype=np.int64)
    out[order] = placed
    out[out + dur_ms > DAY_END_MS] = -1
    out[out < 0] = -1
    return out


def _generate_day(w: _World, day: int, n_target: int, seed: int, cfg: GeneratorConfig):
    """Events of one day as numpy arrays (users, session-local order, items, ms offsets)."""
    rng = np.random.default_rng([seed, day])
    p_len = 1.0 / cfg.mean_session_len
    factor = 1.3
    while True:  # oversample sessions, drop what does not fit in the day, keep n_target events
        n_sess = int(math.ceil(n_target * p_len * factor)) + 8
        lens = np.minimum(rng.geometric(p_len, n_sess), cfg.max_session_len)
        users = _sample(w.user_cdf, rng.random(n_sess))
        off = np.concatenate(([0], np.cumsum(lens)))
        n_ev = int(off[-1])
        # within-session gaps (ms); position 0 of each session gets gap 0
        gaps = np.exp(rng.normal(math.log(cfg.gap_median_s * 1000), cfg.gap_sigma, n_ev))
        near = rng.random(n_ev) < cfg.p_gap_near_boundary
        gaps[near] = rng.uniform(25 * 60_000, MAX_IN_SESSION_GAP_MS, int(near.sum()))
        gaps = gaps.clip(1000, MAX_IN_SESSION_GAP_MS).astype(np.int64)
        gaps[off[:-1]] = 0
        elapsed = np.cumsum(gaps)
        dur = elapsed[off[1:] - 1] - elapsed[off[:-1]]
        start = _place_sessions(rng, users, dur, cfg)
        kept = np.flatnonzero(start >= 0)
        cum = np.cumsum(lens[kept])
        if cum.size and cum[-1] >= n_target:
            break
        factor *= 1.5
    n_keep = int(np.searchsorted(cum, n_target)) + 1
    kept = kept[:n_keep]
    klens = lens[kept].copy()
    klens[-1] -= int(cum[n_keep - 1] - n_target)  # trim the last session to hit the count
    # offsets of the kept sessions' events in the oversampled arrays
    sess_local = np.repeat(np.arange(kept.size), klens)
    koff = np.concatenate(([0], np.cumsum(klens)))
    pos = np.arange(n_target) - koff[sess_local]
    src = off[kept][sess_local] + pos
    ts_ms = start[kept][sess_local] + (elapsed[src] - elapsed[off[kept]][sess_local])
    items = _walk_items(w, rng, users[kept], klens, koff, cfg)
    # repeats come quickly: shrink their gap (keeps the ordering, only moves them earlier)
    rep = np.zeros(n_target, dtype=bool)
    rep[1:] = (items[1:] == items[:-1]) & (pos[1:] > 0)
    if rep.any():
        fast = np.exp(rng.normal(math.log(cfg.repeat_gap_median_s * 1000), 0.8, n_target)).astype(np.int64).clip(200)
        g = np.diff(ts_ms, prepend=ts_ms[0])
        g[rep] = np.minimum(g[rep], fast[rep])
        g[pos == 0] = 0
        # rebuild times from the session start with the shortened gaps
        cg = np.cumsum(g)
        ts_ms = start[kept][sess_local] + cg - cg[koff[:-1]][sess_local]
    return users[kept], sess_local, klens, items, ts_ms


def _walk_items(w: _World, rng, users, lens, off, cfg: GeneratorConfig) -> np.ndarray:
    """Markov-with-memory walk per session, vectorised across sessions step by step."""
    n = int(off[-1])
    items = np.empty(n, dtype=np.int64)
    n_s = lens.size
    u0 = rng.random(n_s)
    from_user = rng.random(n_s) < cfg.p_start_user_topic
    first = _sample(w.pop_cdf, u0)
    first[from_user] = _topic_sample(w, w.user_topic[users[from_user]], u0[from_user])
    items[off[:-1]] = first
    # sessions sorted by length descending: the active ones at step t are a prefix
    by_len = np.argsort(-lens, kind="stable")
    sorted_lens = lens[by_len]
    c1 = cfg.p_repeat
    c2 = c1 + cfg.p_back
    c3 = c2 + cfg.p_successor
    c4 = c3 + cfg.p_topic
    for t in range(1, int(lens.max(initial=1))):
        n_act = int(np.searchsorted(-sorted_lens, -t, side="left"))  # sessions with len > t
        if n_act == 0:
            break
        act = by_len[:n_act]
        base = off[act]
        cur = items[base + t - 1]
        r = rng.random(n_act)
        u = rng.random(n_act)
        nxt = cur.copy()  # r < c1: repeat
        m = (r >= c1) & (r < c2)
        if m.any():  # back to an earlier item of this session
            nxt[m] = items[base[m] + (u[m] * t).astype(np.int64)]
        m = (r >= c2) & (r < c3)
        if m.any():
            nxt[m] = w.successors[cur[m], np.searchsorted(w.succ_cdf, u[m], side="right").clip(0, w.succ_cdf.size - 1)]
        m = (r >= c3) & (r < c4)
        if m.any():
            nxt[m] = _topic_sample(w, w.item_topic[cur[m]], u[m])
        m = r >= c4
        if m.any():
            nxt[m] = _sample(w.pop_cdf, u[m])
        items[base + t] = nxt
    return items


def generate(
    n_events: int,
    n_days: int | None = None,
    n_users: int | None = None,
    n_items: int | None = None,
    seed: int = 0,
    start_date: str | dt.date = "2014-04-01",
    config: GeneratorConfig = GeneratorConfig(),
) -> Iterator[tuple[dt.date, pa.Table]]:
    """Yield ``(day, table)`` for each day, tables with :data:`GENERATED_SCHEMA`, sorted by ts.

    Exactly ``n_events`` rows in total. Session ids are global, dense from 1, and
    numbered by session start time. Pure and deterministic in all its arguments.
    """
    if n_events < 1:
        raise ValueError(f"n_events must be >= 1, got {n_events}")
    n_days = default_days(n_events) if n_days is None else int(n_days)
    n_users = default_users(n_events) if n_users is None else int(n_users)
    n_items = default_items(n_events) if n_items is None else int(n_items)
    p = config.p_repeat + config.p_back + config.p_successor + config.p_topic
    if not 0 <= p <= 1:
        raise ValueError(f"next-click probabilities sum to {p:.3f}, must be within [0, 1]")
    if n_days < 1 or n_users < 1 or n_items < 4:
        raise ValueError(f"need days >= 1, users >= 1, items >= 4; got {n_days}, {n_users}, {n_items}")
    if isinstance(start_date, str):
        start_date = dt.date.fromisoformat(start_date)
    w = _build_world(n_events, n_days, n_users, n_items, seed, config)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    next_session = 1
    for day in range(n_days):
        n_day = int(w.day_events[day])
        date = start_date + dt.timedelta(days=day)
        if n_day == 0:
            yield date, GENERATED_SCHEMA.empty_table()
            continue
        users, sess_local, lens, items, ts_ms = _generate_day(w, day, n_day, seed, config)
        # number sessions by start time (ties by generation order) from the running counter
        koff = np.concatenate(([0], np.cumsum(lens)))
        rank = np.empty(lens.size, dtype=np.int64)
        rank[np.lexsort((np.arange(lens.size), ts_ms[koff[:-1]]))] = np.arange(lens.size)
        session_id = next_session + rank[sess_local]
        next_session += lens.size
        day_us = int((dt.datetime(date.year, date.month, date.day, tzinfo=dt.timezone.utc) - epoch).total_seconds()) * 1_000_000
        ts_us = day_us + ts_ms * 1000
        # log order: by time; a stable sort keeps each session's click order on ties
        order = np.argsort(ts_us, kind="stable")
        table = pa.table(
            {
                "user_id": pa.array(users[sess_local][order] + 1, pa.int64()),
                "session_id": pa.array(session_id[order], pa.int64()),
                "item_id": pa.array(w.item_ids[items[order]], pa.int64()),
                "ts": pa.array(ts_us[order], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                "category": pa.array(w.item_topic[items[order]] + 1, pa.int32()),
            },
            schema=GENERATED_SCHEMA,
        )
        yield date, table


def yoochoose_lines(table: pa.Table) -> pa.Table:
    """Table in the raw ``yoochoose-clicks.dat`` layout (all strings, no user id)."""
    ts = pc.strftime(table["ts"].cast(pa.timestamp("ms", tz="UTC")), format="%Y-%m-%dT%H:%M:%S")
    ts = pc.binary_join_element_wise(ts, pa.scalar("Z"), "")
    return pa.table(
        {
            "SessionId": table["session_id"],
            "Timestamp": ts,
            "ItemId": table["item_id"],
            "Category": table["category"],
        }
    )


#: kinds of bad lines ``--bad-fraction`` injects into the yoochoose CSV (for quarantine tests)
BAD_KINDS = ("unparseable timestamp", "missing item id", "wrong column count", "non-UTF-8 bytes")


def corrupt_lines(data: bytes, fraction: float, rng: np.random.Generator) -> tuple[bytes, list[dict]]:
    """Replace about ``fraction`` of the lines of a CSV day with bad ones.

    Returns (new bytes, [{"line": 1-based, "kind": one of BAD_KINDS}, ...]) so a
    test can check that exactly these lines end up in quarantine with the right reason.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    n_bad = int(rng.binomial(len(lines), fraction)) if lines else 0
    where = np.sort(rng.choice(len(lines), size=n_bad, replace=False))
    kinds = rng.integers(0, len(BAD_KINDS), n_bad)
    report = []
    for i, k in zip(where.tolist(), kinds.tolist()):
        f = lines[i].split(b",")
        if k == 0:
            f[1] = b"2014-13-45T25:61:00.000Z"
        elif k == 1:
            f[2] = b""
        elif k == 2:
            f = f[:2] + f[3:]
        else:
            f[2] = f[2][:-1] + b"\xff\xfe"
        lines[i] = b",".join(f)
        report.append({"line": i + 1, "kind": BAD_KINDS[k]})
    return b"\n".join(lines) + b"\n", report


def source_sha256() -> str:
    """Hash of this module's source: identifies the generator version that wrote a dataset."""
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def write(
    out: str | Path,
    n_events: int,
    n_days: int | None = None,
    n_users: int | None = None,
    n_items: int | None = None,
    seed: int = 0,
    start_date: str = "2014-04-01",
    fmt: str = "parquet",
    progress: bool = True,
    bad_fraction: float = 0.0,
) -> dict:
    """Generate and write the whole dataset atomically; returns the metadata written.

    ``bad_fraction`` > 0 (yoochoose format only) replaces that fraction of the
    lines with bad ones (see :func:`corrupt_lines`); ``_generator.json`` lists them.
    """
    if fmt not in ("parquet", "yoochoose"):
        raise ValueError(f"unknown --format {fmt!r}: use parquet or yoochoose")
    if bad_fraction and fmt != "yoochoose":
        raise ValueError("--bad-fraction needs --format yoochoose (Parquet is typed: no bad lines)")
    if not 0.0 <= bad_fraction < 1.0:
        raise ValueError(f"--bad-fraction must be in [0, 1), got {bad_fraction}")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    n_days_ = default_days(n_events) if n_days is None else n_days
    meta = {
        "generator": "spark_jobs.generate",
        "format": fmt,
        "events": n_events,
        "days": n_days_,
        "users": default_users(n_events) if n_users is None else n_users,
        "items": default_items(n_events) if n_items is None else n_items,
        "seed": seed,
        "start_date": str(start_date),
        "bad_fraction": bad_fraction,
        "config": dataclasses.asdict(GeneratorConfig()),
        "generator_sha256": source_sha256(),
        "per_day": {},
    }
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_events, unit="ev", unit_scale=True, desc="generate", file=sys.stderr)
    try:
        for date, table in generate(n_events, n_days, n_users, n_items, seed, start_date):
            part = tmp / f"dt={date.isoformat()}"
            part.mkdir()
            if fmt == "parquet":
                pq.write_table(table, part / "part-00000.parquet", compression="snappy")
            else:
                target = part / "part-00000.dat"
                opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
                if bad_fraction > 0:
                    buf = pa.BufferOutputStream()
                    pacsv.write_csv(yoochoose_lines(table), buf, write_options=opts)
                    day = (date - dt.date.fromisoformat(str(start_date))).days
                    data, bad = corrupt_lines(buf.getvalue().to_pybytes(), bad_fraction,
                                              np.random.default_rng([seed, day, 0xBAD]))
                    target.write_bytes(data)
                    meta.setdefault("bad_lines", {})[f"{part.name}/{target.name}"] = bad
                else:
                    pacsv.write_csv(yoochoose_lines(table), target, write_options=opts)
            sess = pc.count_distinct(table["session_id"]).as_py() if table.num_rows else 0
            meta["per_day"][date.isoformat()] = {"events": table.num_rows, "sessions": sess}
            if bar is not None:
                bar.update(table.num_rows)
        # "_" prefix: Spark and pyarrow datasets skip it when reading the folder
        (tmp / "_generator.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spark_jobs.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, required=True, help="total number of events (exact)")
    p.add_argument("--days", type=int, default=None, help="number of days (default: ~200k events/day, 7..183)")
    p.add_argument("--users", type=int, default=None, help="number of users (default: events/20)")
    p.add_argument("--items", type=int, default=None, help="number of items (default: max(events/600, 5*sqrt(events)), 200..60000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start-date", default="2014-04-01", help="first day, YYYY-MM-DD (UTC)")
    p.add_argument("--format", choices=["parquet", "yoochoose"], default="parquet")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--bad-fraction", type=float, default=0.0,
                   help="yoochoose only: replace this fraction of lines with bad ones (fault injection)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    meta = write(a.out, a.events, a.days, a.users, a.items, a.seed, a.start_date, a.format, not a.no_progress,
                 a.bad_fraction)
    n_sess = sum(d["sessions"] for d in meta["per_day"].values())
    n_bad = sum(len(v) for v in meta.get("bad_lines", {}).values())
    print(f"wrote {meta['events']:,} events, {n_sess:,} sessions over {meta['days']} days to {a.out}"
          + (f" ({n_bad:,} of the lines made bad on purpose, listed in _generator.json)" if n_bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
