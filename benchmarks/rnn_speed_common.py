"""Shared machinery of the RNN speed benchmarks (``benchmarks.seqrnn_speed``, issue 17;
``benchmarks.tan_speed``, issue 16): each setting in a fresh process, the real training loop,
a compute-bound limit from timed matrix products, the one evaluation loop, and the report.

* :func:`mm_seconds` / :func:`products_bound`: the events/s a step would reach if it were
  nothing but its matrix products, each timed with ``torch.mm`` at its shape on this machine;
* :func:`build_family`: the family as the trainer builds it (``resolve_config`` -> family ->
  ``init_weights`` -> the trainer's own :class:`training.trainer.AutogradRunner`);
* :func:`timed_steps`: optimizer steps of that loop (``fam.batches`` -> ``fam.loss`` ->
  backward -> clipping -> optimizer -> LR schedule, as ``AutogradRunner.run_epoch``) after
  warm-up steps, over as many epochs as it takes;
* :func:`eval_speed`: the first test sessions (``SessionData.take``) through
  ``evaluation.loop.evaluate_sessions`` (full ranking);
* :func:`run_in_processes`: ``python -m MODULE --one JSON`` per setting, one JSON row back;
* :func:`markdown_table`, :func:`write_report`.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]


def loop_seconds(f: Callable[[], object], reps: int = 7) -> float:
    """Wall time of one call of ``f``: best of ``reps`` timings, each a loop of enough calls to
    last >= 20 ms (small calls take microseconds), after one warm-up call."""
    f()
    t = time.perf_counter()
    f()
    loops = max(1, int(0.02 / max(time.perf_counter() - t, 1e-7)))
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(loops):
            f()
        best = min(best, (time.perf_counter() - t) / loops)
    return best


def mm_seconds(m: int, k: int, n: int, reps: int = 7) -> float:
    """Wall time of one [m, k] @ [k, n] float32 product (:func:`loop_seconds`)."""
    import torch

    if min(m, k, n) <= 0:
        return 0.0
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    return loop_seconds(lambda: torch.mm(a, b, out=out), reps)


@dataclass(frozen=True)
class Product:
    """One forward matrix product [m, k] @ [k, n] of a step and the gradients taken through it:
    ``grads`` = 2 (input and weight: backward = 2 products of the forward's FLOPs), 1 (weight
    only: the input needs no gradient, e.g. a fixed embedding), 0 (forward only: a frozen
    teacher)."""

    m: int
    k: int
    n: int
    grads: int = 2

    def shapes(self, backward: str) -> list[tuple[int, int, int]]:
        """(m, k, n) of each product run for it. ``backward="as_forward"``: the backward
        products timed at the forward's shape; ``"own"``: at their own shapes (input gradient
        [m, n] @ [n, k], weight gradient [k, m] @ [m, n])."""
        m, k, n = self.m, self.k, self.n
        if backward == "as_forward":
            return [(m, k, n)] * (1 + self.grads)
        if backward != "own":
            raise ValueError(f"backward must be as_forward | own, got {backward!r}")
        return [(m, k, n)] + ([(k, m, n)] if self.grads >= 1 else []) + ([(m, n, k)] if self.grads >= 2 else [])


def products_bound(prods: Iterable[Product], events: float, backward: str = "as_forward",
                   cache: dict | None = None) -> dict:
    """Events/s of a step of ``events`` events that were nothing but ``prods`` (2 FLOPs per
    multiply-add), each product timed at its shape (``cache``: shape -> seconds, shared
    between calls)."""
    cache = {} if cache is None else cache
    secs = flops = 0.0
    for p in prods:
        for s in p.shapes(backward):
            if s not in cache:
                cache[s] = mm_seconds(*s)
            secs += cache[s]
            flops += 2.0 * s[0] * s[1] * s[2]
    return {"events_per_s": events / secs if secs > 0 else float("nan"), "flops_per_event": flops / events,
            "gflops_at_shapes": flops / secs / 1e9 if secs > 0 else float("nan"), "step_seconds": secs}


def build_family(variant: str, split: str, threads: int, overrides: dict | None = None, table: str = "train_full",
                 sets: list[str] | None = None, runner: str = "autograd"):
    """(family class, family, config, item index, training data, runner) for ``variant`` on
    ``split``'s ``table``, on the CPU with ``threads`` torch threads, weights initialised with
    seed 0, the optimizer and schedule the trainer's ``AutogradRunner`` builds. ``overrides``
    (typed) and ``sets`` ("KEY=VALUE" strings, as ``--set``) change the config.
    ``runner="trainer"``: the runner ``training.trainer.train`` would use instead
    (``make_runner``: a family's own fast path where it has one, e.g. GRU4Rec's; its ``path``
    says which)."""
    import torch

    from training import registry
    from training.config import resolve_config
    from training.data import read_events, read_item_index
    from training.family import TrainContext
    from training.trainer import AutogradRunner, make_runner, table_support

    torch.set_num_threads(threads)
    cfg = resolve_config(variant, overrides={**(overrides or {}), "num_threads": threads, "device": "cpu"},
                         sets=list(sets or ()))
    index = read_item_index(split)
    data = read_events(split, table, index, min_session_length=2)
    fam_cls = registry.get(variant)
    fam = fam_cls(cfg, TrainContext(index=index, data=data, support=table_support(data, index.n_items),
                                    device=torch.device("cpu")))
    fam.init_weights(torch.Generator().manual_seed(0))
    if runner not in ("autograd", "trainer"):
        raise ValueError(f"runner must be autograd | trainer, got {runner!r}")
    run = AutogradRunner(fam, cfg, torch.device("cpu")) if runner == "autograd" else \
        make_runner(fam, cfg, torch.device("cpu"))
    return fam_cls, fam, cfg, index, data, run


def _endless_batches(fam):
    """``fam.batches(0)``, then epoch 1, ... (stops if an epoch has no batch)."""
    epoch = 0
    while True:
        got = False
        for b in fam.batches(epoch):
            got = True
            yield b
        if not got:
            return
        epoch += 1


def timed_steps(fam, cfg, runner, steps: int, warmup: int = 3, min_seconds: float = 0.0,
                on_batch: Callable[[object, bool], None] | None = None) -> dict:
    """``warmup`` + ``steps`` optimizer steps of the trainer's loop, the steps after the warm-up
    timed (more than ``steps`` of them while under ``min_seconds``). ``on_batch(batch, timed)``
    is called before each step's loss. Returns the timed steps, their events (the ``n`` of
    ``fam.loss``) and wall seconds, the RSS after the warm-up and after the last step, the
    peak RSS so far (MB), and the timed seconds by phase (``seconds_by_phase``: next batch,
    loss (forward), backward, clipping + optimizer + schedule)."""
    from training.optim import clip_grad_norm

    opt, sched = runner.opt, runner.sched
    fam.model.train()
    it = _endless_batches(fam)
    n_ev, done, t0, rss_warm = 0, 0, None, float("nan")
    phase = {"batches": 0.0, "loss": 0.0, "backward": 0.0, "optimizer": 0.0}
    k = -1
    while True:
        k += 1
        if k >= steps + warmup and (t0 is None or time.perf_counter() - t0 >= min_seconds):
            break
        timed = k >= warmup
        if timed and t0 is None:
            rss_warm = rss_now_mb()
            t0 = time.perf_counter()
        c0 = time.perf_counter()
        try:
            b = next(it)
        except StopIteration:
            break
        if on_batch is not None:
            on_batch(b, timed)
        c1 = time.perf_counter()
        res = fam.loss(b)
        c2 = time.perf_counter()
        if timed:
            phase["batches"] += c1 - c0
            phase["loss"] += c2 - c1
        if res is None:
            continue
        loss, n = res
        loss.backward()
        c3 = time.perf_counter()
        if cfg.grad_clip > 0:
            clip_grad_norm(runner.params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if timed:
            phase["backward"] += c3 - c2
            phase["optimizer"] += time.perf_counter() - c3
            n_ev += int(n)
            done += 1
    secs = time.perf_counter() - t0 if t0 is not None else float("nan")
    return {"steps_timed": done, "events_timed": n_ev, "train_seconds": secs,
            "train_events_per_s": n_ev / secs if secs > 0 else float("nan"), "peak_rss_train_mb": peak_rss_mb(),
            "rss_after_warmup_mb": rss_warm, "rss_after_train_mb": rss_now_mb(), "seconds_by_phase": phase}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    """Resident memory of this process now (MB; /proc/self/statm, NaN where there is none)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def eval_speed(fam_cls, fam, cfg, variant: str, index, split: str, eval_sessions: int, n_slots: int = 512,
               mode: str = "session", history=None, state_dict: dict | None = None,
               wrap: Callable | None = None) -> dict:
    """The trained weights (a checkpoint dict as the trainer writes, not saved) through the
    family's scorer and ``evaluate_sessions`` on the first ``eval_sessions`` test sessions.
    ``mode`` / ``history`` (a list of ``SessionData``, e.g. the training table): the loop's
    user mode, the test users' history sessions fed first, unscored (``eval_stepped_events``
    counts them with the scored ones). ``state_dict``: instead of ``fam.state_dict()``.
    ``wrap(scorer)``: a scorer wrapped around the family's (e.g. to count its calls)."""
    import numpy as np
    import torch

    from evaluation.loop import evaluate_sessions
    from training import checkpoint as ck
    from training.config import config_to_dict
    from training.data import read_events

    ckpt = {"model": variant, "config": config_to_dict(cfg),
            "state_dict": fam.state_dict() if state_dict is None else state_dict,
            "item_index": ck.item_index_to_ckpt(index)}
    scorer = fam_cls.scorer(ckpt, torch.device("cpu"))
    if wrap is not None:
        scorer = wrap(scorer)
    test = read_events(split, "test", index, min_session_length=2)
    sub = test.take(np.arange(min(eval_sessions, test.n_sessions)))
    er = evaluate_sessions(scorer, sub, n_slots=n_slots, mode=mode, history=history)
    step = er.step_seconds
    stepped = er.n_events + er.n_history_steps
    return {"eval_mode": mode, "eval_users": er.n_users, "eval_history_sessions": er.n_history_sessions,
            "eval_history_steps": er.n_history_steps, "eval_stepped_events": stepped,
            "eval_stepped_events_per_s": stepped / max(er.seconds, 1e-9),
            "eval_events_per_s": er.n_events / max(er.seconds, 1e-9), "eval_events": er.n_events,
            "eval_sessions": sub.n_sessions, "eval_seconds": er.seconds,
            "predict_us_per_event": 1e6 * er.seconds / max(er.n_events, 1),
            "eval_step_ms_median": float(np.median(step)) * 1e3 if len(step) else float("nan"),
            "eval_step_rows_median": float(np.median(er.step_rows)) if len(er.step_rows) else float("nan")}


def run_in_processes(module: str, settings: list[list], args: list[str],
                     describe: Callable[[dict], str] | None = None) -> list[dict]:
    """For each setting: ``python -m module --one JSON(setting) *args`` in a fresh process (its
    peak RSS is its own); the last stdout line is the row (JSON)."""
    rows = []
    for s in settings:
        r = subprocess.run([sys.executable, "-m", module, "--one", json.dumps(s), *args],
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{module} setting {s} failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        if describe is not None:
            print(describe(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown_table(rows: list[dict], columns: list[tuple[str, Callable[[dict], str], str]]) -> str:
    """``columns``: (header, row -> cell text, alignment "l" | "r")."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---:" if a == "r" else "---" for _, _, a in columns) + "|"]
    lines += ["| " + " | ".join(f(r) for _, f, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: str | Path, command: str, threads: int, rows: list[dict], table: str, **extra) -> dict:
    """``out`` (JSON): CPU label, date, threads, load average, command, rows, table."""
    from benchmarks.machine import cpu_label

    rep = {"machine": cpu_label(), "date": time.strftime("%Y-%m-%d %H:%M"), "threads": threads,
           "load_average_after": os.getloadavg(), "command": command, **extra, "rows": rows, "table": table}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rep, indent=1))
    return rep


def fastest_rounds(runs: list[dict], keys=("train_events_per_s", "eval_events_per_s", "load_average_start"),
                   renames: dict[str, str] | None = None) -> list[dict]:
    """Per (dataset, model), in first-seen order: the run of the most training events/s (the
    one least slowed by other work on the machine), with ``rounds=`` the number of rounds and
    ``rounds_<key>`` every round's value of each of ``keys`` (``renames``: key -> another
    output name)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["model"]), []).append(r)
    rows = []
    for g in groups.values():
        best = dict(max(g, key=lambda r: r["train_events_per_s"]))
        best["rounds"] = len(g)
        for k in keys:
            best[(renames or {}).get(k, f"rounds_{k}")] = [r[k] for r in g]
        rows.append(best)
    return rows
