"""Faults of the Spark preprocessing job (issue 19): what a killed, starved or failing run leaves.

    .venv/bin/python -m pytest tests/reliability/test_faults_spark.py -q

Every case runs the real job. Cases 1-3 start ``python -m spark_jobs.preprocess`` as a
subprocess in its own process group (the py4j JVM is in that group) on the first 20,000
lines of rsc15-100k ``train_full``; the output sits where the DAG puts it,
``<root>/<interval>/processed``, and already holds a previous complete output (a copy of
a first run's, made once for the module).

1. ``kill -9`` of the whole process group while Parquet files are being written into
   ``processed.tmp-<hex>``: ``processed`` stays byte for byte the previous output, the temp
   folder is the only trace, ``python -m spark_jobs.retention`` sweeps exactly it, and a
   re-run writes the same output as the first run.
2. ``kill -9`` between the two renames of the swap (the test-only pause
   ``RNNREC_FAULT_SWAP_PAUSE_S`` in :func:`spark_jobs.contract.replace_dir`): ``processed``
   is missing, its previous content is complete in ``.processed.old-<hex>``; the sweep
   renames it back (and removes the temp folder), and so does the next run of the job
   even when that run fails.
3. A full disk under the output: a small tmpfs (``mount -t tmpfs``, we are root in the
   container) filled up to 400 KB, or where mounting is not allowed, ``RLIMIT_FSIZE`` on the
   job (SIGXFSZ ignored so writes fail with EFBIG). Force one with
   ``RNNREC_FAULT_DISK_FULL=tmpfs|rlimit``. The job exits 2 with a message naming the
   output and the reason; inputs, the previous interval, the previous output and the
   free space are as before.
4. Two failed runs of the same interval (too many bad rows, in process on the shared
   SparkSession): each keeps its rejected rows in its own ``processed.quarantine/<UTC
   time>-<id>/``.

docs/reliability.md lists the measured outcomes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from spark_jobs import contract as C
from spark_jobs.preprocess import PreprocessConfig, QuarantineThresholdExceeded, run
from tests.conftest import ROOT, shared_path
from tests.services import pid_alive
from tests.spark_jobs.test_standalone_cluster import assert_same_output, comparable_manifest

N_LINES = 20_000  # header + 19,999 clicks of rsc15-100k train_full
INTERVAL = "20140406T000000Z_20140407T000000Z"
PREV_INTERVAL = "20140405T000000Z_20140406T000000Z"
JOB_TIMEOUT_S = 180
KILL_POLL_S = 0.01
UUID_RE = re.compile(r"-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# --------------------------------------------------------------------------- helpers
def job_cmd(inp: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "spark_jobs.preprocess", "--input", str(inp), "--format", "gru4rec",
            "--split", "time", "--test-days", "1", "--out", str(out)]


def start_job(inp: Path, out: Path, log: Path, env: dict | None = None, preexec_fn=None) -> subprocess.Popen:
    """The job in its own session / process group (pgid = its pid); its JVM is in that group."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), "RNNREC_SPARK_LOG_LEVEL": "ERROR",
         # Spark's scratch space of every run in one place the test can look at (not in the data tree)
         "SPARK_LOCAL_DIRS": str(log.parent / "spark-local"), **(env or {})}
    with open(log, "wb") as f:
        return subprocess.Popen(job_cmd(inp, out), cwd=ROOT, env=e, stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec_fn)


def group_members(pgid: int) -> dict[int, str]:
    """Live (non-zombie) processes of process group ``pgid``: pid -> command line."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                out[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
    return out


def wait_group_gone(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Reap ``proc`` and wait until nothing of its process group is alive (a JVM outlives its
    Python parent by a moment and holds its files open)."""
    deadline = time.monotonic() + timeout
    proc.wait(timeout=timeout)
    while group_members(proc.pid):
        assert time.monotonic() < deadline, f"process group {proc.pid} still alive: {group_members(proc.pid)}"
        time.sleep(0.1)


def kill_group(proc: subprocess.Popen) -> dict[int, str]:
    """SIGKILL the whole process group of ``proc`` (Python and JVM); returns who was in it."""
    members = group_members(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_group_gone(proc)
    return members


def run_job(inp: Path, out: Path, log: Path, **kw) -> tuple[int, str]:
    proc = start_job(inp, out, log, **kw)
    try:
        rc = proc.wait(timeout=JOB_TIMEOUT_S)
        wait_group_gone(proc)
    finally:
        if proc.poll() is None or group_members(proc.pid):
            kill_group(proc)
    return rc, log.read_text(errors="replace")


def snapshot(root: Path) -> dict[str, str]:
    """Every file (hidden ones included) and folder under ``root``: relative path -> sha256 / 'dir'."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            snap[os.path.relpath(os.path.join(dirpath, n), root) + "/"] = "dir"
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                snap[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return snap


def parquet_files(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, _, fs in os.walk(root) for n in fs if n.endswith(".parquet")]


def assert_same_as_first_run(got: Path, want: Path) -> None:
    """A re-run wrote what the first run wrote. Spark names part files by a random write-job id and
    parquet-mr writes a footer's encoding list in hash-set order, so the Parquet bytes may differ:
    the same files (ids masked), each with the same rows in the same order and schema, the same
    side files byte for byte, and the same manifest but for its volatile fields."""
    assert_same_output(got, want)  # every table row for row (sorted), and the job's JSON files

    def files(root):
        return {UUID_RE.sub("-<id>", str(p.relative_to(root))): p for p in root.rglob("*") if p.is_file()}

    g, w = files(got), files(want)
    assert sorted(g) == sorted(w)
    for rel, p in w.items():
        if rel.endswith(".parquet"):
            a, b = pq.read_table(g[rel]), pq.read_table(p)
            assert a.schema.equals(b.schema) and a.equals(b), f"{rel}: rows differ (file order kept)"
        elif not rel.endswith(".crc") and rel != C.MANIFEST:
            assert g[rel].read_bytes() == p.read_bytes(), rel
    m_got, m_want = (json.loads((x / C.MANIFEST).read_text()) for x in (got, want))
    assert comparable_manifest(m_got) == comparable_manifest(m_want)


def sweep_cli(root: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "spark_jobs.retention", "--root", str(root), "--keep", "7",
                        "--min-age-hours", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def poll(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = JOB_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert proc.poll() is None, f"the job exited ({proc.returncode}) before {what}:\n" + \
            log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(KILL_POLL_S)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def clicks(tmp_path_factory) -> Path:
    """The first 20,000 lines of rsc15-100k train_full (header included)."""
    src = shared_path("rsc15-100k", "yoochoose-clicks-100k_train_full.txt")
    p = tmp_path_factory.mktemp("input") / "clicks.tsv"
    with open(src, "rb") as f, open(p, "wb") as g:
        for _, line in zip(range(N_LINES), f):
            g.write(line)
    return p


@pytest.fixture(scope="module")
def first_run(clicks, tmp_path_factory) -> Path:
    """A first complete run of the job (CLI): the previous output every case starts from. Read only."""
    d = tmp_path_factory.mktemp("first")
    t0 = time.monotonic()
    rc, log = run_job(clicks, d / "processed", d / "job.log")
    assert rc == 0, log[-3000:]
    print(f"\nfirst run: {time.monotonic() - t0:.1f} s")
    return d / "processed"


def previous_output(first_run: Path, out: Path) -> dict[str, str]:
    """``out`` holds the previous complete output (a copy of the first run's); returns its snapshot."""
    shutil.copytree(first_run, out, copy_function=shutil.copy2)
    return snapshot(out)


# --------------------------------------------------------------------------- 1. kill -9 mid-write
def test_kill_9_mid_write_leaves_the_previous_output(clicks, first_run, tmp_path):
    root = tmp_path / "pipeline" / "rsc15"
    out = root / INTERVAL / "processed"
    before = previous_output(first_run, out)
    log = tmp_path / "killed.log"
    proc = start_job(clicks, out, log)
    try:
        def writing():  # the temp output exists and Parquet files are arriving in it
            for tmp in out.parent.glob("processed.tmp-*"):
                files = parquet_files(tmp)
                if files:
                    return tmp, files
            return None

        tmp, files_at_kill = poll(writing, proc, log, "Parquet file in processed.tmp-*")
        killed = kill_group(proc)
    finally:
        if proc.poll() is None or group_members(proc.pid):
            kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    jvm = [pid for pid, cmd in killed.items() if "java" in cmd.split(" ", 1)[0]]
    assert jvm, f"no JVM in the job's process group at the kill: {killed}"
    assert not any(pid_alive(p) for p in killed), "a process of the killed job (JVM?) is still alive"
    print(f"\nkilled pids {sorted(killed)} (JVM {jvm}) with {len(files_at_kill)} Parquet file(s) in {tmp.name}, "
          f"e.g. {os.path.relpath(files_at_kill[0], tmp)}")

    # the next step sees exactly the previous output; the temp folder is the only trace
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["processed", tmp.name])
    assert not (tmp / C.MANIFEST).exists()  # it was killed mid-write, not after the job's end
    scratch = sorted(p.name for p in (tmp_path / "spark-local").iterdir())
    print(f"left in the killed JVM's spark.local.dir (outside the data tree): {scratch}")

    # the sweep: a young leftover may be a run in progress; with --min-age-hours 0 it goes, nothing else
    from spark_jobs.retention import sweep_leftovers

    assert "run in progress" in sweep_leftovers(root).kept[str(tmp)] and tmp.exists()
    swept = sweep_cli(root)
    assert swept["swept"] == [str(tmp)] and swept["restored"] == {} and swept["pruned"] == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["processed"] and snapshot(out) == before

    # a re-run writes what the first run wrote
    rc, text = run_job(clicks, out, tmp_path / "rerun.log")
    assert rc == 0, text[-3000:]
    assert_same_as_first_run(out, first_run)
    assert sorted(p.name for p in out.parent.iterdir()) == ["processed"]


# --------------------------------------------------------------------------- 2. kill -9 inside the swap
def test_kill_9_between_the_swap_renames_is_recovered(clicks, first_run, tmp_path, spark, caplog):
    root = tmp_path / "pipeline" / "rsc15"
    iv = root / INTERVAL
    out = iv / "processed"
    before = previous_output(first_run, out)
    log = tmp_path / "killed.log"
    proc = start_job(clicks, out, log, env={C.SWAP_PAUSE_ENV: "120"})
    try:
        def in_window():  # the old output renamed away, the new one not yet in place
            olds = list(iv.glob(".processed.old-*"))
            return olds if olds and not out.exists() else None

        poll(in_window, proc, log, "swap window")
        kill_group(proc)
    finally:
        if proc.poll() is None or group_members(proc.pid):
            kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    # the window: no processed/, the previous output complete under .processed.old-*, the new one in the temp
    names = sorted(p.name for p in iv.iterdir())
    assert len(names) == 2 and names[0].startswith(".processed.old-") and names[1].startswith("processed.tmp-"), names
    old, tmp = iv / names[0], iv / names[1]
    assert not out.exists() and snapshot(old) == before and (tmp / C.MANIFEST).is_file()

    # the job's own recovery: the next run puts the previous output back first, even when it then fails
    other = tmp_path / "other" / INTERVAL
    shutil.copytree(iv, other, copy_function=shutil.copy2)
    bad = tmp_path / "commas.tsv"
    bad.write_text("SessionId,ItemId,Time\n" + "".join(f"{i},{i},1396310400\n" for i in range(1, 101)))
    with pytest.raises(QuarantineThresholdExceeded):
        run(PreprocessConfig(input=[str(bad)], format="gru4rec", out=str(other / "processed"), recent_fractions=[]),
            spark)
    assert snapshot(other / "processed") == before
    assert f"restored the previous output {other / 'processed'} from {other / names[0]}" in caplog.text

    # the sweep renames the old output back (the only complete copy) and removes the temp
    swept = sweep_cli(root)
    assert swept["restored"] == {str(out): str(old)} and swept["swept"] == [str(tmp)], swept
    assert sorted(p.name for p in iv.iterdir()) == ["processed"] and snapshot(out) == before


# --------------------------------------------------------------------------- 3. disk full
def _try_tmpfs(d: Path, size: str) -> bool:
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
    return r.returncode == 0


def _rlimit_works(tmp: Path, limit: int) -> bool:
    """RLIMIT_FSIZE with SIGXFSZ ignored: a write beyond the limit fails with EFBIG."""
    probe = tmp / "rlimit-probe"
    code = (f"import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            f"import errno\ntry:\n    open({str(probe)!r}, 'wb').write(b'x' * {2 * limit})\n"
            f"except OSError as e:\n    raise SystemExit(0 if e.errno == errno.EFBIG else 1)\nraise SystemExit(1)\n")
    return subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """(mode, folder): a folder on a small tmpfs, or a plain folder plus an RLIMIT_FSIZE preexec."""
    want = os.environ.get("RNNREC_FAULT_DISK_FULL", "")
    fs = tmp_path / "fs"
    mounted = want != "rlimit" and _try_tmpfs(fs, "8m")
    try:
        if mounted:
            yield "tmpfs", fs
        elif want == "tmpfs":
            pytest.skip("RNNREC_FAULT_DISK_FULL=tmpfs, but mount -t tmpfs is not allowed here")
        elif _rlimit_works(tmp_path, 100 << 10):
            fs.mkdir(exist_ok=True)
            yield "rlimit", fs
        else:
            pytest.skip("neither a tmpfs mount nor RLIMIT_FSIZE (EFBIG) works here: cannot fill a disk")
    finally:
        if mounted:
            if subprocess.run(["umount", str(fs)]).returncode != 0:
                subprocess.run(["umount", "-l", str(fs)])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_disk_full_on_the_output_fails_clearly_and_touches_nothing(clicks, first_run, small_disk, tmp_path):
    mode, fs = small_disk
    root = fs / "rsc15"
    prev = root / PREV_INTERVAL / "processed"  # the previous interval's output
    out = root / INTERVAL / "processed"        # this interval's previous output
    shutil.copytree(first_run, prev, copy_function=shutil.copy2)
    shutil.copytree(first_run, out, copy_function=shutil.copy2)
    limit = 100 << 10
    preexec, env = None, None
    if mode == "tmpfs":
        # leave 400 KB: less than one output (~0.9 MB on tmpfs), so the job fails in the middle of its writes
        st = os.statvfs(fs)
        with open(fs / "ballast", "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - (400 << 10)))
    else:
        def preexec():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed JVM
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        env = {"RNNREC_SPARK_LOG_LEVEL": "OFF"}  # the job's log file is under the limit too
    inputs = {clicks: _sha(clicks)}
    before = snapshot(fs)
    free = os.statvfs(fs).f_bavail

    rc, text = run_job(clicks, out, tmp_path / "job.log", env=env, preexec_fn=preexec)
    msg = text.strip().splitlines()[-1]
    print(f"\n[{mode}] exit {rc}: {msg}")
    assert rc == 2, text[-3000:]
    if mode == "tmpfs":
        assert msg.startswith(f"preprocess failed: cannot write the output {out}: No space left on device "
                              f"(while writing {out}.tmp-"), msg
        assert f"{out} was left as it was" in msg
        # nothing left behind, not even a hidden temp (the kernel frees a dead JVM's last blocks a moment late)
        deadline = time.monotonic() + 10
        while os.statvfs(fs).f_bavail != free and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.statvfs(fs).f_bavail == free
    else:  # the limit applies to every file the job writes: Spark's shuffle files hit it first (measured)
        assert (msg.startswith(f"preprocess failed: the output {out} was not written: File too large outside the "
                               f"output, in Spark's scratch space")
                or msg.startswith(f"preprocess failed: cannot write the output {out}: File too large")), msg
        assert f"{out} was left as it was" in msg
    assert {p: _sha(p) for p in inputs} == inputs          # inputs untouched
    assert snapshot(fs) == before                          # previous interval, previous output: unchanged
    assert not list(root.rglob("*.tmp-*")) and not list(root.rglob(".*.old-*"))  # no partial output anywhere


# --------------------------------------------------------------------------- 4. quarantine of failed runs
HEADER = "SessionId\tItemId\tTime"
T0 = 1_396_310_400


def test_two_failed_runs_keep_their_own_quarantine(spark, tmp_path):
    """Each failed run of an interval keeps its rejected rows in its own folder (was: overwritten)."""
    out = tmp_path / INTERVAL / "processed"
    raw = tmp_path / "clicks.tsv"
    good = [f"{1 + i // 4}\t{100 + i % 13}\t{T0 + i * 3600}" for i in range(200)]
    runs = [["900\t7\t2014-04-01 10:00"] * 5,     # run 1: 5 unparseable timestamps
            ["-61\t7\t1396310400"] * 7]           # run 2 (the input re-delivered): 7 negative ids
    reasons = ["unparseable timestamp", "session id is negative: -61"]
    kept = []
    for bad in runs:
        raw.write_text("\n".join([HEADER, *good[:100], *bad, *good[100:]]) + "\n")
        with pytest.raises(QuarantineThresholdExceeded) as e:
            run(PreprocessConfig(input=[str(raw)], format="gru4rec", out=str(out), recent_fractions=[]), spark)
        m = re.search(r"Rejected rows are in (\S+)$", str(e.value))
        assert m, str(e.value)
        kept.append(Path(m.group(1)))
    assert not out.exists()
    q = out.parent / "processed.quarantine"
    # two folders, named <UTC time>-<id>, in the order of the runs, each named by its run's error
    assert sorted(q.iterdir()) == kept and kept[0] != kept[1]
    assert all(re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}", p.name) for p in kept)
    for folder, bad, reason in zip(kept, runs, reasons):
        t = pads.dataset(str(folder), format="parquet").to_table().to_pandas()
        assert sorted(zip(t.file, t.line.astype(int), t.reason, t.raw)) == \
            [(str(raw), 102 + j, reason, b) for j, b in enumerate(bad)]
    # housekeeping keeps them: they are not leftovers of a killed run
    from spark_jobs.retention import sweep_leftovers

    assert sweep_leftovers(tmp_path, min_age_s=0).removed == [] and all(p.is_dir() for p in kept)
