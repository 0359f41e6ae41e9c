"""Fault: the training task is killed (``kill -9``) mid-epoch; the retry resumes from the last epoch
checkpoint and ends with exactly the weights of an uninterrupted run (docs/reliability.md, "Faults").

    .venv/bin/python -m pytest tests/reliability/test_faults_resume.py -q

The step is ``dags.pipeline_steps.train_outputs`` (what the DAG's ``train`` task runs before it
logs to MLflow): it trains each model in ``<root>/checkpoints/<candidate>/<select|final>/`` and
moves it into place only when it has finished. The first try runs in a subprocess that is
killed with SIGKILL once the first epoch checkpoint exists; the second try (what Airflow's retry
runs) is called in this process, as is an uninterrupted run of the same seed in another root.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.training.toy import events_table, random_sessions, write_split

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4
OVERRIDES = {"layers": [48], "n_sample": 64, "batch_size": 16, "num_threads": 1}

CHILD = r"""
import json, sys
from dags.pipeline_steps import train_outputs
cfg, spec = json.loads(sys.argv[1]), json.loads(sys.argv[2])
train_outputs(cfg, spec, "parent-run-1")
"""


def _plan(tmp: Path, root_name: str):
    from dags import pipeline_steps as steps

    split = tmp / "split"
    if not split.exists():
        train = random_sessions(2500, 300, 0, start_id=1)
        valid = random_sessions(100, 300, 2, start_id=50_000)
        write_split(split, {"train_full": events_table(train + valid), "train": events_table(train),
                            "valid": events_table(valid, t0=1_650_000_000)})
    cfg = steps.resolve({"data_dir": str(tmp / root_name), "families": ["gru4rec"], "fractions": [], "epochs": EPOCHS,
                         "device": "cpu", "overrides": {"gru4rec": OVERRIDES}},
                        dag_id="session_rec_pipeline", dag_run_id="manual__resume",
                        interval_start="2014-04-07T00:00:00Z", interval_end="2014-04-08T00:00:00Z")
    (spec,) = steps.plan_pretrain(cfg, {"split_dir": str(split)})
    return cfg, spec


def _digest_and_losses(run_dir: Path):
    from training import checkpoint as ck

    hist = json.loads((run_dir / "history.json").read_text())
    return ck.weights_digest(ck.load_checkpoint(run_dir)), [h["loss"] for h in hist["epochs"]]


def test_kill_9_mid_epoch_then_retry_resumes_and_equals_an_uninterrupted_run(tmp_path):
    from dags import pipeline_steps as steps

    cfg, spec = _plan(tmp_path, "killed")
    work = Path(cfg["root"]) / "checkpoints" / "gru4rec" / "select"
    first_ckpt = work / "checkpoints" / "epoch_0001.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(cfg), json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not first_ckpt.exists():
            assert proc.poll() is None, f"training exited (rc {proc.returncode}) before its first checkpoint:\n" \
                                        + proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no epoch checkpoint after 240 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 2 (an epoch takes about a second here)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in (work / "checkpoints").glob("epoch_*.pt"))
    assert done and len(done) < EPOCHS, f"the kill came too late to test a resume: {done}"
    assert not (Path(cfg["root"]) / "select" / "gru4rec").exists(), "a half-trained model was moved into place"

    # the retry: the same step again
    res = steps.train_outputs(cfg, spec, "parent-run-1")
    n_done = len(done)
    assert res["training"]["select"] == {"trained": True, "resumed_from_epoch": n_done}
    assert res["training"]["final"] == {"trained": True, "resumed_from_epoch": None}
    sel = Path(res["select_run_dir"])
    assert json.loads((sel / "history.json").read_text())["run"]["resumed_from_epoch"] == n_done
    assert not work.exists(), "the work dir is moved into place after success"

    # an uninterrupted run of the same seed ends with the same weights and per-epoch losses
    cfg2, spec2 = _plan(tmp_path, "clean")
    res2 = steps.train_outputs(cfg2, spec2, "parent-run-1")
    assert res2["training"]["select"]["resumed_from_epoch"] is None
    for which in ("select_run_dir", "run_dir"):
        d1, l1 = _digest_and_losses(Path(res[which]))
        d2, l2 = _digest_and_losses(Path(res2[which]))
        assert len(l1) == EPOCHS and l1 == l2, which
        assert d1 == d2, which

    # a further retry of the same DAG run finds both models in place and trains nothing
    again = steps.train_outputs(cfg, spec, "parent-run-1")
    assert again["training"] == {"select": {"trained": False, "resumed_from_epoch": None},
                                 "final": {"trained": False, "resumed_from_epoch": None}}
