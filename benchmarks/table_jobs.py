"""The fits behind a results table (``benchmarks.villatel_tables``, ``tan_tables``,
``personal_tables``): one process per fit, at most ``n_jobs`` at a time, each fit started as
soon as the fits it depends on are done.

Every fit is ``benchmarks.baseline_tables.fit_and_score``: trained on ``train`` (never on
``valid`` or ``test``), scored on ``test`` and on the tables in ``also`` in the table's
evaluation mode, and cached in its run dir by settings (a re-run reuses finished fits).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.baseline_tables import fit_and_score

log = logging.getLogger("table_jobs")


def fit_job(run: str, model: str, split: str, run_dir: str, sets: dict, threads: int, mode: str,
            init_from: str | None = None, also: tuple[str, ...] = ()) -> dict:
    """One fit + evaluation (in a worker process); what the tables read of it."""
    logging.basicConfig(level=logging.WARNING)
    r = fit_and_score(model, Path(split), Path(run_dir), "test", "train", sets, threads, mode=mode,
                      also=tuple(also), init_from=None if init_from is None else Path(init_from))
    hist = json.loads((Path(run_dir) / "model" / "history.json").read_text())
    best = hist["run"].get("best_epoch")
    return {"run": run, "model": model, "sets": sets, "init_from": init_from, "run_dir": run_dir,
            "eval_dir": str(r["eval_dir"]), "fit_wall_s": r["fit_wall_s"], "test": r["metrics"],
            **{t: r[f"metrics_{t}"] for t in also},
            "best_epoch": best, "epochs_run": len(hist["epochs"]),
            "valid_best": hist["epochs"][best - 1].get("early_stop_value") if best else None,
            "train_events_per_s": [round(e["events_per_s"]) for e in hist["epochs"] if "events_per_s" in e],
            "train_sessions": hist["run"]["train_sessions"], "train_events": hist["run"]["train_events"]}


@dataclass
class Job:
    """One fit: ``resolve(results)`` gives (family, settings, init_from) once every job named in
    ``deps`` has its result (settings may depend on them: a teacher's path and digest).
    Its run dir is ``work / key``."""
    key: str
    run: str
    seed: int
    fraction: int
    resolve: Callable[[dict], tuple[str, dict, str | None]]
    deps: list[str] = field(default_factory=list)


def fixed(key: str, run: str, model: str, sets: dict, fraction: int = 1) -> Job:
    """A job that depends on nothing: ``model`` with ``sets`` (seed from ``sets['seed']``)."""
    return Job(key, run, int(sets.get("seed", 0)), fraction, lambda _res: (model, sets, None))


def run_jobs(jobs: list[Job], split: Path, work: Path, n_jobs: int, threads: int, mode: str,
             also: tuple[str, ...] = ()) -> dict[str, dict]:
    """Run ``jobs``, at most ``n_jobs`` at a time; whenever a worker is free, the first job in
    list order whose dependencies are done starts. Returns key -> ``fit_job``'s result (with
    ``key``, ``seed`` and ``fraction``), in the order the fits finished."""
    results: dict[str, dict] = {}
    pending = list(jobs)
    running: dict[cf.Future, Job] = {}
    with cf.ProcessPoolExecutor(max_workers=n_jobs) as ex:
        while pending or running:
            ready = [j for j in pending if all(d in results for d in j.deps)]
            for j in ready[:n_jobs - len(running)]:
                pending.remove(j)
                model, sets, init = j.resolve(results)
                running[ex.submit(fit_job, j.run, model, str(split), str(work / j.key), sets, threads, mode,
                                  init, tuple(also))] = j
            if not running:
                raise RuntimeError(f"jobs waiting on runs that never ran: {[(j.key, j.deps) for j in pending]}")
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for f in finished:
                j = running.pop(f)
                r = results[j.key] = {**f.result(), "key": j.key, "seed": j.seed, "fraction": j.fraction}
                val = f", valid R@20 {r['valid']['recall_at_20']:.4f}" if "valid" in r else ""
                log.info("[%d/%d] %s seed %d: %d epochs (best %s)%s, test R@20 %.4f MRR@20 %.4f (%.0f s)",
                         len(results), len(jobs), j.run, j.seed, r["epochs_run"], r["best_epoch"], val,
                         r["test"]["recall_at_20"], r["test"]["mrr_at_20"], r["fit_wall_s"])
    return results
