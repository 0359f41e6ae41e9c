"""Scale benchmark of the preprocessing: Spark job vs. the single-process pandas reference.

Run (from the repository root; sizes accept k/M suffixes)::

    .venv/bin/python -m benchmarks.preprocess_scale --sizes 1M,10M,31.7M
    .venv/bin/python -m benchmarks.preprocess_scale --sizes 1M --impl spark     # one side only

For every size it (1) generates a YOOCHOOSE-like clickstream with
``spark_jobs.generate`` (cached under ``--work-dir``, default /tmp/rnnrec-bench,
and reused when its parameters match), then (2) runs the same work -- read,
30-minute sessionization by user, support filters to a fixed point, GRU4Rec time
split (1 test day, 1 valid day), recent fractions, item/user index, Parquet
output -- once with the Spark job (``python -m spark_jobs.preprocess``) and once
with ``python -m spark_jobs.reference_pandas``, each in its own subprocess.

Measured per run: wall time, and peak resident memory of the whole process
tree (the Python driver *and* the JVM it launches), sampled every 0.2 s with
psutil; the sum of RSS counts shared pages once per process, so it is an upper
bound. Both implementations' counts are compared table by table (they must
agree: the pandas reference is the oracle).

Results are merged into ``benchmarks/results/preprocess_scale.json`` (keyed by
size and implementation) and rendered as the table in
``benchmarks/README_preprocess.md``. A long measurement: never part of the tests.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "preprocess_scale.json"
README = ROOT / "benchmarks" / "README_preprocess.md"
#: GRU4Rec's RSC15 preparation: item support >= 5, sessions of >= 2 events
DEFAULT_FILTERS = ["--min-item-support", "5", "--min-session-length", "2"]
TARGET = {"events": 31_700_000, "wall_s": 600, "peak_rss_gb": 8.0}


def parse_size(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    return int(round(float(s.rstrip("km")) * mult))


def label(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


# --------------------------------------------------------------------------- the two commands

def spark_command(inp: Path, out: Path, extra: list[str]) -> list[str]:
    """THE call into the lead's Spark entry point (``spark_jobs.preprocess``).

    ``--format synthetic`` reads the generator's Parquet and sessionizes by user
    (its ground-truth session ids are ignored), exactly like the reference.
    """
    return [sys.executable, "-m", "spark_jobs.preprocess", "--input", str(inp), "--format", "synthetic",
            "--split", "time", "--test-days", "1", "--out", str(out), *extra]


def pandas_command(inp: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "spark_jobs.reference_pandas", "--input", str(inp), "--format", "synthetic",
            "--split", "time", "--test-days", "1", "--out", str(out), *extra]


def generate_command(n: int, out: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "spark_jobs.generate", "--events", str(n), "--seed", str(seed),
            "--out", str(out), "--no-progress"]


# --------------------------------------------------------------------------- measuring

def run_measured(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> dict:
    """Run ``cmd`` in its own process group; wall time and peak RSS of its whole tree."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    load_before = round(os.getloadavg()[0], 2)  # other work on the machine skews timings: record it
    peak = {"rss": 0}
    done = threading.Event()
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)

        def poll() -> None:
            try:
                root = psutil.Process(proc.pid)
            except psutil.NoSuchProcess:
                return
            while not done.is_set():
                total = 0
                try:
                    procs = [root] + root.children(recursive=True)
                except psutil.NoSuchProcess:
                    break
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak["rss"] = max(peak["rss"], total)
                done.wait(0.2)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # our own process group only (start_new_session)
            rc = proc.wait()
            rc = 124 if rc in (-9, 137) else rc
        wall = time.perf_counter() - t0
        done.set()
        th.join()
    return {"rc": rc, "wall_s": round(wall, 2), "peak_rss_mb": round(peak["rss"] / 2**20, 1), "log": str(log),
            "load_1m_before": load_before, "load_1m_after": round(os.getloadavg()[0], 2)}


def ensure_input(work: Path, n: int, seed: int, timeout_s: float) -> tuple[Path, dict | None]:
    """Generated input for size n, reused when the cached copy has the same parameters."""
    inp = work / f"input-{label(n)}-seed{seed}"
    meta_f = inp / "_generator.json"
    if meta_f.exists():
        meta = json.loads(meta_f.read_text())
        from spark_jobs.generate import source_sha256

        if (meta.get("events"), meta.get("seed"), meta.get("format"), meta.get("generator_sha256")) == (
                n, seed, "parquet", source_sha256()):
            print(f"[{label(n)}] reusing {inp}", flush=True)
            return inp, None
    print(f"[{label(n)}] generating {n:,} events -> {inp}", flush=True)
    res = run_measured(generate_command(n, inp, seed), work / "logs" / f"generate-{label(n)}.log", timeout_s)
    if res["rc"] != 0:
        raise SystemExit(f"generator failed (rc {res['rc']}), see {res['log']}")
    print(f"[{label(n)}] generated in {res['wall_s']} s, peak {res['peak_rss_mb']} MB", flush=True)
    return inp, res


def table_counts(out: Path) -> dict | None:
    m = out / "manifest.json"
    if not m.exists():
        return None
    man = json.loads(m.read_text())
    tables = man["splits"]["time"]["tables"]
    return {k: {"events": v["events"], "sessions": v["sessions"], "items": v["items"]} for k, v in tables.items()}


def phase_timings(out: Path) -> dict | None:
    """The Spark job's own per-phase wall and JVM CPU seconds (``manifest.json``), if any."""
    m = out / "manifest.json"
    if not m.exists():
        return None
    man = json.loads(m.read_text())
    return {"wall_s": man.get("timings_s"), "jvm_cpu_s": man.get("jvm_cpu_s")} if man.get("timings_s") else None


def machine() -> dict:
    import psutil

    from benchmarks.machine import cpu_info

    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    except (OSError, IndexError):
        java = None
    return {**cpu_info(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "java": java, "os": platform.platform()}


# --------------------------------------------------------------------------- report

def render_table(results: dict) -> str:
    rows = sorted(results["runs"].values(), key=lambda r: (r["events"], r["impl"]))
    lines = ["| events | implementation | wall time (s) | peak RSS, whole tree (GB) | µs / event | output agrees "
             "| load avg before / after | date |",
             "|---:|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        if r["rc"] != 0:
            wall = f"failed (rc {r['rc']}) after {r['wall_s']:.0f}"
        else:
            wall = f"{r['wall_s']:.1f}"
        lines.append(
            f"| {r['events']:,} | {r['impl']} | {wall} | {r['peak_rss_mb'] / 1024:.2f} | "
            f"{1e6 * r['wall_s'] / r['events']:.2f} | {r.get('agrees', 'n/a')} | "
            f"{r.get('load_1m_before', '?')} / {r.get('load_1m_after', '?')} | {r['date'][:16]} |"
        )
    # linear cost <=> the same time per event at every size (from 1M up: below, fixed costs dominate)
    for impl in ("spark", "pandas"):
        ok = [r for r in rows if r["impl"] == impl and r["rc"] == 0 and r["events"] >= 1_000_000]
        if len(ok) >= 2:
            lo, hi = ok[0], ok[-1]
            ratio = (hi["wall_s"] / hi["events"]) / (lo["wall_s"] / lo["events"])
            lines.append(f"\n{impl}: time per event at {label(hi['events'])} is {ratio:.2f}x that at "
                         f"{label(lo['events'])} (1.0 = linear)")
    phased = [r for r in rows if r.get("phases") and r["rc"] == 0]
    if phased:
        lines += ["", "Spark phases, wall s (JVM CPU s), from the job's `manifest.json`:", "",
                  "| events | read | sessionize | filter | split + write | load before / after |",
                  "|---:|---:|---:|---:|---:|---|"]
        for r in phased:
            w, c = r["phases"]["wall_s"], r["phases"].get("jvm_cpu_s") or {}
            cells = [f"{w.get(k, 0):.1f} ({c[k]:.0f})" if k in c else f"{w.get(k, 0):.1f}"
                     for k in ("read", "sessionize", "filter", "split")]
            lines.append(f"| {r['events']:,} | {' | '.join(cells)} | "
                         f"{r.get('load_1m_before', '?')} / {r.get('load_1m_after', '?')} |")
    gens = sorted(results.get("generate", {}).values(), key=lambda r: r["events"])
    if gens:
        lines += ["", "| generator: events | wall time (s) | peak RSS (GB) |", "|---:|---:|---:|"]
        lines += [f"| {g['events']:,} | {g['wall_s']:.1f} | {g['peak_rss_mb'] / 1024:.2f} |" for g in gens]
    return "\n".join(lines)


def update_readme(results: dict) -> None:
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    text = README.read_text() if README.exists() else f"# Preprocessing scale benchmark\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    m = results["machine"]
    fam = (f", family {m['cpu_family']} model {m['cpu_model']}, {m['vector_isa']}"
           if m.get("cpu_family") is not None else "")
    block = (f"{start}\nMachine: {m['nproc']} cores ({m['cpu']}{fam}), {m['ram_gb']} GB RAM, Python {m['python']}, "
             f"{m['java']}. Last run: {results['date']}.\n\nCommand: `{results['command']}`\n\n"
             f"{render_table(results)}\n{end}")
    pre, rest = text.split(start, 1)
    post = rest.split(end, 1)[1]
    README.write_text(pre + block + post)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.preprocess_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1M,10M,31.7M", help="comma list of event counts (k/M suffixes)")
    p.add_argument("--impl", choices=["both", "spark", "pandas"], default="both")
    p.add_argument("--work-dir", default="/tmp/rnnrec-bench", help="generated inputs (cached) and outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-min", type=float, default=40.0, help="per run; a run past it is killed")
    p.add_argument("--compare-rows-max", default="2M",
                   help="also compare both outputs row by row up to this size (counts are compared always)")
    p.add_argument("--keep-outputs", action="store_true", help="keep the preprocessed outputs (they are large)")
    p.add_argument("--no-record", action="store_true", help="do not write results/ and the README table")
    p.add_argument("extra", nargs="*", help="after --: options for both jobs (default: GRU4Rec's "
                   + " ".join(DEFAULT_FILTERS) + ")")
    a = p.parse_args(argv)
    extra = a.extra or DEFAULT_FILTERS
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}, "generate": {}}
    results.update({"machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": "python -m benchmarks.preprocess_scale " + " ".join(argv or sys.argv[1:]),
                    "job_options": extra, "target": TARGET})
    impls = ["spark", "pandas"] if a.impl == "both" else [a.impl]
    timeout = a.timeout_min * 60
    for n in [parse_size(s) for s in a.sizes.split(",") if s.strip()]:
        inp, gres = ensure_input(work, n, a.seed, timeout)
        if gres:
            results.setdefault("generate", {})[label(n)] = {"events": n, **gres}
        counts = {}
        for impl in impls:
            out = work / f"out-{impl}-{label(n)}"
            cmd = (spark_command if impl == "spark" else pandas_command)(inp, out, extra)
            print(f"[{label(n)}] {impl}: {' '.join(cmd)}", flush=True)
            res = run_measured(cmd, work / "logs" / f"{impl}-{label(n)}.log", timeout, env)
            counts[impl] = table_counts(out) if res["rc"] == 0 else None
            print(f"[{label(n)}] {impl}: rc {res['rc']}, {res['wall_s']} s, peak {res['peak_rss_mb']} MB", flush=True)
            rec = {"events": n, "impl": impl, **res, "tables": counts[impl],
                   "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            if res["rc"] == 0 and (ph := phase_timings(out)):
                rec["phases"] = ph
                print(f"[{label(n)}] {impl}: phases {ph}", flush=True)
            results["runs"][f"{label(n)}/{impl}"] = rec
        stored = results["runs"].get(f"{label(n)}/pandas")
        if impls == ["spark"] and counts.get("spark") and stored and stored.get("tables"):
            # one side only: compare with the pandas reference's counts recorded on the same input
            results["runs"][f"{label(n)}/spark"]["agrees"] = (
                "counts (stored pandas run)" if counts["spark"] == stored["tables"] else "NO (counts)")
        stored_spark = results["runs"].get(f"{label(n)}/spark")
        if impls == ["pandas"] and counts.get("pandas") and stored_spark and stored_spark.get("tables"):
            # the reference run after the Spark one: check the stored Spark counts against it
            ok = counts["pandas"] == stored_spark["tables"]
            results["runs"][f"{label(n)}/pandas"]["agrees"] = "counts (stored spark run)" if ok else "NO (counts)"
            stored_spark["agrees"] = "counts (later pandas run)" if ok else "NO (counts)"
        if len(counts) == 2 and all(counts.values()):
            agrees = "counts" if counts["spark"] == counts["pandas"] else "NO (counts)"
            if agrees == "counts" and n <= parse_size(a.compare_rows_max):
                from spark_jobs.reference_pandas import compare_outputs

                diffs = compare_outputs(work / f"out-spark-{label(n)}", work / f"out-pandas-{label(n)}")
                bad = {k: v for k, v in diffs.items() if v}
                agrees = "rows" if not bad else "NO (rows)"
                if bad:
                    print(f"[{label(n)}] ROW MISMATCH: {bad}", flush=True)
            for impl in impls:
                results["runs"][f"{label(n)}/{impl}"]["agrees"] = agrees
            if agrees.startswith("NO"):
                print(f"[{label(n)}] MISMATCH between spark and pandas counts:\n"
                      f"spark  {counts['spark']}\npandas {counts['pandas']}", flush=True)
        for impl in impls:
            out = work / f"out-{impl}-{label(n)}"
            if not a.keep_outputs and out.exists():
                shutil.rmtree(out)
        if not a.no_record:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            update_readme(results)
    print(render_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
