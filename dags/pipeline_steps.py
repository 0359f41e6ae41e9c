"""The steps the session-rec DAG wires together: thin calls into spark_jobs / expectations /
training / evaluation, plus parameter validation and the interval-keyed output layout.

No Airflow objects here except :class:`AirflowFailException` in :func:`clear_errors`,
so every step can be called (and tested) without a scheduler. Imports of Spark,
torch, GX and MLflow happen inside the steps (the DAG file must parse in < 2 s).

Output layout of one data interval (re-running the interval replaces exactly it)::

    <data_dir>/pipeline/<dataset>/<interval_start>_<interval_end>/
        processed/                  preprocess OUT (spark_jobs/contract.py), quality/ inside
        models/<candidate>/         training run dir (model.pt, config.json, history.json)
        eval/<candidate>/{valid,test}/  evaluation outputs
        comparison/                 comparison.{json,csv,png}

A *candidate* is ``<family>`` (trained on train_full, or ``train`` with
``train_table=train``) or ``<family>-recent<k>`` (fine-tuned from it on the most
recent 1/k of the sessions, Tan et al. 2016).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import glob
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("dags.pipeline_steps")

ROOT = Path(__file__).resolve().parents[1]

#: The DAG's Params: the ONE place their defaults and schemas live (``session_rec_pipeline``
#: builds its ``Param``s from this; ``dags.run_demo`` / ``make demo`` pass smaller values).
#: Family names come from ``training.registry`` (validated in :func:`resolve`).
PARAM_SPECS: dict[str, dict[str, Any]] = {
    "dataset": {"default": "synthetic", "type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                "description": "Name for outputs, MLflow experiment (rnnrec-<dataset>) and registry models."},
    "input": {"default": [], "type": "array", "items": {"type": "string"},
              "description": "Raw files/folders/globs. Empty = generate a synthetic clickstream."},
    "format": {"default": "synthetic", "type": "string", "description": "Reader format (spark_jobs.readers.FORMATS)."},
    "data_dir": {"default": "", "type": "string",
                 "description": "Output root; empty = $RNNREC_DATA_DIR or <repo>/data."},
    "synthetic_events": {"default": 200_000, "type": "integer", "minimum": 1000, "maximum": 50_000_000},
    "synthetic_days": {"default": 8, "type": "integer", "minimum": 3, "maximum": 400},
    "synthetic_start": {"default": "2014-04-01", "type": "string", "format": "date"},
    "seed": {"default": 0, "type": "integer", "minimum": 0},
    "families": {"default": ["gru4rec", "pop"], "type": "array", "items": {"type": "string"}, "minItems": 1,
                 "description": "Model families to train (training.registry: python -m training.train --list)."},
    "epochs": {"default": 3, "type": ["integer", "null"], "minimum": 0,
               "description": "Epochs for trainable families; null = each family's default."},
    "fractions": {"default": [4], "type": "array", "items": {"type": "integer", "minimum": 1},
                  "description": "Recent fractions k: fine-tune on the most recent 1/k of the sessions."},
    "device": {"default": "auto", "type": "string", "enum": ["auto", "cpu", "cuda"]},
    "eval_mode": {"default": "auto", "type": "string", "enum": ["auto", "session", "user"],
                  "description": "Evaluation loop mode: auto = each family's own (user for HRNN, user GRUs and "
                                 "user-sequence RNNs: the user's earlier sessions fed first), or one for all."},
    "train_table": {"default": "train_full", "type": "string", "enum": ["train_full", "train"],
                    "description": "train_full (final models) or train (validation not seen in training)."},
    "overrides": {"default": {}, "type": "object",
                  "description": 'Per-family typed config overrides, e.g. {"gru4rec": {"layers": [100], '
                                 '"batch_size": 32}} (keys: python -m training.train --list).'},
    "min_item_support": {"default": 5, "type": "integer", "minimum": 0},
    "min_session_length": {"default": 2, "type": "integer", "minimum": 0},
    "test_days": {"default": 1.0, "type": "number", "exclusiveMinimum": 0},
    "register": {"default": True, "type": "boolean",
                 "description": "Register models and move the 'champion' alias."},
    "finetune": {"default": {}, "type": "object",
                 "description": 'Per-family, per-fraction typed overrides of the fine-tuning runs, e.g. '
                                '{"gru4rec": {"4": {"learning_rate": 0.05, "n_epochs": 2, "init_optimizer": "carry"}}}.'},
    "select_metric": {"default": "mrr_at_20", "type": "string", "pattern": r"^(recall|mrr|ndcg)_at_(1|5|10|20)$",
                      "description": "Metric on 'valid' (selection copies trained on 'train') that ranks candidates."},
    "promote_alpha": {"default": 0.05, "type": "number", "exclusiveMinimum": 0, "maximum": 1,
                      "description": "'champion' moves only with a better mean and paired Wilcoxon p below this."},
    "promote_margin": {"default": 0.0, "type": "number", "minimum": 0,
                       "description": "If > 0: move 'champion' when the mean is better by at least this instead."},
    "dataset_config": {"default": "", "type": "string",
                       "description": "A dataset config (conf/datasets/<name>.yaml, or a path) that sets the other "
                                      "Params; empty = the Airflow Variable rnnrec_dataset_config, if set. "
                                      "Values passed explicitly in the trigger's conf still win."},
    "stages": {"default": "all", "type": "string", "enum": ["all", "train", "evaluate", "evaluate_registered"],
               "description": "all; train = train + evaluate on this interval's existing processed data; "
                              "evaluate = evaluate this interval's existing trained models again; "
                              "evaluate_registered = process the interval, then score each family's registered "
                              "champion on it (no training, nothing registered)."},
}
DEFAULT_PARAMS: dict[str, Any] = {k: v["default"] for k, v in PARAM_SPECS.items()}
DEVICES = tuple(PARAM_SPECS["device"]["enum"])
TRAIN_TABLES = tuple(PARAM_SPECS["train_table"]["enum"])


class PipelineParamError(ValueError):
    """A DAG Param that cannot be used (names the param and the reason)."""


#: The expected failures, by module and class name: matching by name keeps a task that
#: cannot fail this way from importing torch / Great Expectations just to catch them.
EXPECTED_ERRORS = {
    ("expectations.derive", "ContractError"), ("expectations.runner", "GateFailed"),
    ("spark_jobs.preprocess", "QuarantineThresholdExceeded"), ("spark_jobs.readers", "InputError"),
    ("training.config", "ConfigError"), ("training.data", "DataError"), ("training.trainer", "NonFiniteLoss"),
    ("training.registry", "UnknownFamily"), ("training.trainer", "CheckpointMismatch"),
}


def _is_expected(e: BaseException) -> bool:
    return isinstance(e, PipelineParamError) or any(
        (k.__module__, k.__qualname__) in EXPECTED_ERRORS for k in type(e).__mro__)


@contextlib.contextmanager
def clear_errors():
    """Turn expected failures (bad params, failed gates, NaN loss, bad input) into a task
    failure whose log line is the readable message, without retries (retrying cannot help)
    and without a chained traceback. Anything else propagates and is retried."""
    try:
        yield
    except Exception as e:
        if not _is_expected(e):
            raise
        try:
            from airflow.sdk.exceptions import AirflowFailException
        except ImportError:  # used outside Airflow
            raise
        log.error("%s: %s", type(e).__name__, e)
        raise AirflowFailException(f"{type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- params

def _iso(t) -> str:
    if t is None:
        raise PipelineParamError("this run has no data interval (asset-triggered?); trigger it with a logical date")
    if isinstance(t, str):
        t = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def interval_key(start: str, end: str) -> str:
    f = lambda s: s[:19].replace(":", "").replace("-", "")  # noqa: E731  20140407T000000
    return f"{f(start)}Z_{f(end)}Z"


STAGES = tuple(PARAM_SPECS["stages"]["enum"])
#: stages that reuse the interval's processed data instead of reading the input again
REUSE_DATA_STAGES = ("train", "evaluate")


def apply_dataset_config(params: dict, explicit: dict | None, variable: str | None = None):
    """The run's Params with its dataset config applied: defaults < the config < ``explicit``
    (what the trigger passed; None = every value in ``params`` that differs from its default).
    The config is the Param ``dataset_config`` or, when that is empty, ``variable`` (the Airflow
    Variable ``rnnrec_dataset_config``). Returns ``(params, config or None)``."""
    from dags import dataset_config as dc

    params = dict(params or {})
    if explicit is None:
        explicit = {k: v for k, v in params.items() if k not in DEFAULT_PARAMS or v != DEFAULT_PARAMS[k]}
    name = params.get("dataset_config") or (variable or "").strip()
    if not name:
        return params, None
    try:
        conf = dc.load(name)
    except dc.DatasetConfigError as e:
        src = "param 'dataset_config'" if params.get("dataset_config") else "Airflow Variable rnnrec_dataset_config"
        raise PipelineParamError(f"{src} = {name!r}: {e}") from None
    merged = dc.merge({**DEFAULT_PARAMS, **{k: v for k, v in params.items() if k not in explicit}}, conf, explicit)
    merged["dataset_config"] = conf.path
    return merged, conf


def resolve(params: dict, *, dag_id: str, dag_run_id: str, interval_start, interval_end,
            explicit: dict | None = None, variable_config: str | None = None) -> dict:
    """Validate the run's Params and fix every path of this data interval. Returns the run config.

    ``explicit``: the values the trigger passed (``dag_run.conf``), which win over a dataset
    config; ``variable_config``: the Airflow Variable naming the dataset config of scheduled runs
    (:func:`apply_dataset_config`)."""
    from spark_jobs.readers import FORMATS
    from training import registry
    from training.config import resolve_config

    unknown = sorted(set(params or {}) - set(DEFAULT_PARAMS))
    if unknown:
        raise PipelineParamError(f"unknown param(s) {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    params, dconf = apply_dataset_config(params, explicit, variable_config)
    p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items()}}
    if p["stages"] not in STAGES:
        raise PipelineParamError(f"param 'stages' = {p['stages']!r}: one of {STAGES}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", str(p["dataset"])):
        raise PipelineParamError(f"param 'dataset' = {p['dataset']!r}: use letters, digits, '_', '.', '-' (max 64)")
    inputs = p["input"] or []
    if isinstance(inputs, str):
        inputs = [inputs]
    if inputs:
        if p["format"] not in FORMATS:
            raise PipelineParamError(f"param 'format' = {p['format']!r}: choose one of {', '.join(FORMATS)}")
        missing = [i for i in inputs if "://" not in i and not glob.glob(i)]
        if missing and p["stages"] not in REUSE_DATA_STAGES:
            raise PipelineParamError(f"param 'input': path(s) not found: {missing}")
    fams = list(p["families"] or [])
    if not fams:
        raise PipelineParamError("param 'families' is empty: name at least one of " + ", ".join(registry.names()))
    bad = [f for f in fams if f not in registry.names()]
    if bad:
        raise PipelineParamError(f"param 'families': unknown {bad}; registered families: {registry.names()}")
    if len(set(fams)) != len(fams):
        raise PipelineParamError(f"param 'families' lists a family twice: {fams}")
    fr = p["fractions"] or []
    if any((not isinstance(k, int)) or isinstance(k, bool) or k < 1 for k in fr) or len(set(fr)) != len(fr):
        raise PipelineParamError(f"param 'fractions' = {fr}: distinct integers k >= 1 (train on the last 1/k)")
    if p["epochs"] is not None and (not isinstance(p["epochs"], int) or p["epochs"] < 0):
        raise PipelineParamError(f"param 'epochs' = {p['epochs']!r}: an integer >= 0 (or null for the family default)")
    if p["device"] not in DEVICES:
        raise PipelineParamError(f"param 'device' = {p['device']!r}: one of {DEVICES}")
    if p["eval_mode"] not in PARAM_SPECS["eval_mode"]["enum"]:
        raise PipelineParamError(f"param 'eval_mode' = {p['eval_mode']!r}: one of {PARAM_SPECS['eval_mode']['enum']}")
    if not re.fullmatch(PARAM_SPECS["select_metric"]["pattern"], str(p["select_metric"])):
        raise PipelineParamError(f"param 'select_metric' = {p['select_metric']!r}: recall|mrr|ndcg _at_ 1|5|10|20 "
                                 "(the cut-offs the evaluator computes), e.g. mrr_at_20")
    if p["train_table"] not in TRAIN_TABLES:
        raise PipelineParamError(f"param 'train_table' = {p['train_table']!r}: one of {TRAIN_TABLES}")
    ov = p["overrides"] or {}
    if not isinstance(ov, dict) or any(not isinstance(v, dict) for v in ov.values()):
        raise PipelineParamError('param \'overrides\' must map family -> {key: value}, e.g. {"gru4rec": {"layers": [100]}}')
    extra = sorted(set(ov) - set(fams))
    if extra:
        raise PipelineParamError(f"param 'overrides' names family {extra} that is not in 'families' {fams}")
    overrides: dict[str, dict[str, Any]] = {}
    sources = dependent_sources(fams, ov)
    for f in fams:
        o = dict(ov.get(f, {}))
        if p["epochs"] is not None and registry.get(f).trainable and "n_epochs" not in o:
            o["n_epochs"] = p["epochs"]  # parameter-free families (POP) keep 0 epochs
        o.update(device=p["device"], train_table=p["train_table"])
        try:  # typed: the same dataclass the training step fills, so errors surface here
            resolve_config(f, overrides=o)
        except Exception as e:  # ConfigError names the key
            raise PipelineParamError(f"param 'overrides' for {f!r}: {e}") from None
        overrides[f] = o
    ft = p["finetune"] or {}
    if not isinstance(ft, dict) or any(not isinstance(v, dict) for v in ft.values()):
        raise PipelineParamError('param \'finetune\' must map family -> {fraction: {key: value}}, '
                                 'e.g. {"gru4rec": {"4": {"learning_rate": 0.05}}}')
    finetune: dict[str, dict[int, dict]] = {}
    for f, per in ft.items():
        if f not in fams:
            raise PipelineParamError(f"param 'finetune' names family {f!r} that is not in 'families' {fams}")
        for k, o in per.items():
            if not str(k).isdigit() or int(k) not in fr or not isinstance(o, dict):
                raise PipelineParamError(f"param 'finetune' for {f!r}: {k!r} is not one of the fractions {fr} "
                                         "mapped to {key: value}")
            try:
                resolve_config(f, overrides={**overrides[f], **o})
            except Exception as e:
                raise PipelineParamError(f"param 'finetune' for {f!r} fraction {k}: {e}") from None
            finetune.setdefault(f, {})[int(k)] = dict(o)
    data_dir = Path(p["data_dir"] or os.environ.get("RNNREC_DATA_DIR") or ROOT / "data").resolve()
    start, end = _iso(interval_start), _iso(interval_end)
    root = data_dir / "pipeline" / p["dataset"] / interval_key(start, end)
    arrival = retention = None
    if dconf is not None:
        as_dt = lambda s: dt.datetime.fromisoformat(s)  # noqa: E731
        arrival = dconf.arrival_path(as_dt(start), as_dt(end))
        retention = dict(dconf.retention) or None
    return {"params": p, "inputs": inputs, "arrival": arrival, "retention": retention,
            "dataset_config": p["dataset_config"] or None, "stages": p["stages"], "overrides": overrides, "finetune": finetune, "families": fams,
            "sources": sources, "fractions": fr,
            "data_dir": str(data_dir), "root": str(root), "dag_id": dag_id, "dag_run_id": dag_run_id,
            "interval_start": start, "interval_end": end}


def dependent_sources(fams: list[str], overrides: dict) -> dict[str, dict[str, str]]:
    """Which families need another run of this DAG run, and whose: ``{family: {config key:
    source family}}`` for every ``Family.source_runs`` key the overrides leave empty (a
    distillation student's ``teacher_run``, M4's ``item_embeddings_from``). The source is the
    first family the key accepts that is in ``families`` and needs no source itself; the DAG
    trains it in ``train`` and the dependent family after it (:func:`plan_dependent`)."""
    from training import registry

    need = {f: [k for k in registry.get(f).source_runs if not (overrides.get(f) or {}).get(k)] for f in fams}
    need = {f: ks for f, ks in need.items() if ks}
    out: dict[str, dict[str, str]] = {}
    for f, keys in need.items():
        for k in keys:
            allowed = registry.get(f).source_runs[k]
            have = [a for a in allowed if a in fams and a not in need]
            if not have:
                chained = [a for a in allowed if a in need]
                raise PipelineParamError(
                    f"family {f!r} needs {k}, a trained {' | '.join(allowed)} run: add {allowed[0]!r} to param "
                    "'families' (the DAG trains it first and hands its run over)"
                    + (f" ({chained} cannot serve: it needs a source run itself)" if chained else "")
                    + f", or name a run in param 'overrides', e.g. {{\"{f}\": {{\"{k}\": \"/path/to/run\"}}}}")
            out.setdefault(f, {})[k] = have[0]
    return out


# --------------------------------------------------------------------------- data steps

def ingest(cfg: dict) -> dict:
    """The raw input of this run: the given files, or a generated clickstream (made once, shared)."""
    p = cfg["params"]
    if cfg.get("stages") in REUSE_DATA_STAGES:  # the interval's processed data is reused, not re-read
        return {"input": cfg["inputs"], "format": p["format"], "n_files": None, "reused": True}
    if cfg["inputs"]:
        from spark_jobs.readers import input_files

        files = input_files(cfg["inputs"])
        return {"input": cfg["inputs"], "format": p["format"], "n_files": len(files)}
    from spark_jobs import generate

    name = f"synthetic-e{p['synthetic_events']}-d{p['synthetic_days']}-s{p['seed']}-{p['synthetic_start']}"
    raw = Path(cfg["data_dir"]) / "raw" / name
    raw.parent.mkdir(parents=True, exist_ok=True)
    # parallel backfill runs share one generated dataset: one writer, the others wait
    with open(raw.parent / f".{name}.lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if not (raw / "_generator.json").exists():
            generate.write(raw, p["synthetic_events"], n_days=p["synthetic_days"], seed=p["seed"],
                           start_date=p["synthetic_start"], progress=False)
    meta = json.loads((raw / "_generator.json").read_text())
    return {"input": [str(raw)], "format": "synthetic", "n_files": len(meta.get("per_day", {}))}


def preprocess_config(cfg: dict, raw: dict):
    """The preprocessing of this interval: ``time_strict`` split with the cut at the interval end."""
    from spark_jobs.preprocess import PreprocessConfig

    p = cfg["params"]
    out = Path(cfg["root"]) / "processed"
    return PreprocessConfig(input=list(raw["input"]), format=raw["format"], out=str(out), split="time_strict",
                            end_ts=cfg["interval_end"], test_days=float(p["test_days"]),
                            min_item_support=int(p["min_item_support"]),
                            min_session_length=int(p["min_session_length"]),
                            recent_fractions=list(cfg["fractions"]),
                            # no Spark UI for a batch task (it only hunts for a free port)
                            spark_conf={"spark.ui.enabled": os.environ.get("RNNREC_SPARK_UI", "false"),
                                        **spark_conf_from_env()})


def preprocess(cfg: dict, raw: dict) -> dict:
    """Sessionize, filter, split with a global time cut at the interval end (1 test day)."""
    from spark_jobs.preprocess import run

    if cfg.get("stages") in REUSE_DATA_STAGES:
        from spark_jobs.contract import recover_dir

        recover_dir(Path(cfg["root"]) / "processed")  # a run killed inside the output swap
        if not (Path(cfg["root"]) / "processed" / "manifest.json").is_file():
            raise PipelineParamError(
                f"param 'stages' = {cfg['stages']!r} reuses this interval's processed data, but there is none: "
                f"{Path(cfg['root']) / 'processed'} has no manifest.json (run the interval with stages=all first)")
        log.info("stages=%s: reusing the processed data of this interval in %s", cfg["stages"],
                 Path(cfg["root"]) / "processed")
        return preprocess_result(cfg)
    pc = preprocess_config(cfg, raw)
    from pyspark.sql import SparkSession

    had_session = SparkSession.getActiveSession() is not None
    try:
        run(pc)
    finally:
        # `airflow dags test` runs every task in one process: a session left running keeps a JVM
        # (GBs of heap, GC threads) competing with training for the cores. Stop only our own.
        if not had_session and SparkSession.getActiveSession() is not None:
            SparkSession.getActiveSession().stop()
    return preprocess_result(cfg)


def write_submit_config(cfg: dict, raw: dict) -> dict:
    """The same preprocessing as a YAML file for ``spark-submit spark_jobs/preprocess.py --config``
    (cluster mode): every option, including a list of inputs, travels as one path (``config``).
    The in-process Spark settings are left out; the cluster's come from the Spark connection.
    ``conf``: the driver / executor JVM settings for this input's size
    (``spark_jobs.session.driver_launch_conf``), which only take effect on the ``spark-submit``
    command line (the driver JVM runs before the job's code)."""
    import dataclasses

    import yaml

    from spark_jobs.contract import write_text
    from spark_jobs.preprocess import input_bytes
    from spark_jobs.session import driver_launch_conf

    pc = preprocess_config(cfg, raw)
    conf = dataclasses.asdict(pc)
    conf.pop("spark_conf")
    path = Path(cfg["root"]) / "spark_submit_preprocess.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, yaml.safe_dump(conf, sort_keys=True))
    launch = driver_launch_conf(input_bytes(pc.input))
    launch["spark.executor.extraJavaOptions"] = launch["spark.driver.extraJavaOptions"]
    return {"config": str(path), "conf": launch}


def spark_submit_kwargs(config_task_id: str) -> dict:
    """``SparkSubmitOperator`` arguments that submit ``spark_jobs/preprocess.py`` with the output of
    :func:`write_submit_config` (pulled from ``config_task_id`` and rendered when the task runs):
    the config file as the job's argument, the driver / executor JVM settings as ``--conf``
    (spark-submit applies them before the driver JVM starts). Executors need no project code:
    the job uses the DataFrame API only (no Python UDFs), so ``RNNREC_SPARK_PY_FILES`` (a zip of
    ``spark_jobs/``) is needed only if UDFs are added."""
    pulled = f"ti.xcom_pull(task_ids={config_task_id!r})"
    return {
        "application": str(ROOT / "spark_jobs" / "preprocess.py"),
        "py_files": os.environ.get("RNNREC_SPARK_PY_FILES"),
        "application_args": ["--config", "{{ " + pulled + "['config'] }}"],
        "conf": {k: "{{ " + pulled + f"['conf'][{k!r}] }}}}" for k in (
            "spark.driver.memory", "spark.driver.extraJavaOptions", "spark.executor.extraJavaOptions")},
    }


def preprocess_result(cfg: dict) -> dict:
    """What the preprocess step hands on, read from the manifest it wrote; an empty training or
    test table for this interval fails with the reason."""
    out = Path(cfg["root"]) / "processed"
    manifest = json.loads((out / "manifest.json").read_text())
    tables = manifest["splits"]["time_strict"]["tables"]
    if tables["test"]["events"] == 0:  # an empty interval: a skip (interval_has_data), not a failure
        return {"processed": str(out), "split_dir": str(out / "splits" / "time_strict"),
                "counts": {t: tables[t]["events"] for t in tables}, "empty": True}
    if tables["train_full"]["events"] == 0:
        raise PipelineParamError(
            f"the train_full table of interval {cfg['interval_start']} .. {cfg['interval_end']} is empty: "
            f"the input has no events before the test period (check the date / 'input' / 'test_days')")
    return {"processed": str(out), "split_dir": str(out / "splits" / "time_strict"),
            "counts": {t: tables[t]["events"] for t in tables}, "empty": False}


def interval_has_data(cfg: dict, prep: dict) -> bool:
    """False (the rest of the run is skipped, not failed) when the interval's test period has no
    events: nothing arrived for it (a holiday, an outage upstream), or the input does not reach it."""
    if prep.get("empty"):
        log.warning("interval %s .. %s has no events in its test period (%s): skipping the rest of this run "
                    "(training, evaluation, registry); this is not a failure. Input: %s",
                    cfg["interval_start"], cfg["interval_end"], prep["counts"], cfg["inputs"] or "synthetic")
        return False
    return True


def housekeeping(cfg: dict, min_age_s: float | None = None) -> dict:
    """Retention for this run's dataset (its dataset config's ``retention``; none = keep all):
    sweep what killed runs left (temp / old outputs untouched for ``sweep_after_hours``, default
    24; an output a killed swap left aside is restored) and remove interval folders beyond the
    ``keep_intervals`` newest. The running interval is never removed. Returns what was removed
    and the bytes freed (``spark_jobs.retention.housekeep``)."""
    from spark_jobs import retention as R

    ret = cfg.get("retention") or {}
    root = Path(cfg["root"]).parent
    age = float(ret.get("sweep_after_hours", 24)) * 3600 if min_age_s is None else min_age_s
    keep = int(ret["keep_intervals"]) if ret.get("keep_intervals") else None
    out = R.housekeep(root, keep, age, protect=(Path(cfg["root"]).name,))
    log.info("housekeeping of %s: swept %d leftover(s), restored %d output(s) a killed swap left aside, "
             "pruned %d interval(s), freed %.1f MB", root, len(out["swept"]), len(out["restored"]),
             len(out["pruned"]), out["freed_bytes"] / 1e6)
    return out


def spark_conf_from_env(var: str = "RNNREC_SPARK_CONF") -> dict[str, str]:
    """Extra Spark settings for the preprocess task: ``$RNNREC_SPARK_CONF`` = ``key=value,key=value``
    (they override the sizing from the input, ``spark_jobs.session.sizing_conf``)."""
    from spark_jobs.contract import parse_key_values

    try:
        return parse_key_values(os.environ.get(var, ""), f"${var} (e.g. spark.sql.shuffle.partitions=4)")
    except ValueError as e:
        raise PipelineParamError(str(e)) from None


def gates(cfg: dict, prep: dict) -> dict:
    """Every Great Expectations gate over the preprocess output (raises GateFailed)."""
    from expectations.runner import run_all_gates

    res = run_all_gates(prep["processed"])
    return {"quality_dir": str(res.quality_dir), "data_docs": str(res.data_docs_index)}


def start_tracking(cfg: dict, prep: dict, quality: dict) -> str:
    from evaluation import mlflow_logging as ml

    return ml.start_parent_run(
        dataset=cfg["params"]["dataset"], data_dir=cfg["data_dir"], dag_id=cfg["dag_id"],
        dag_run_id=cfg["dag_run_id"], interval_start=cfg["interval_start"], interval_end=cfg["interval_end"],
        params=cfg["params"], processed_dir=prep["processed"], quality_dir=quality["quality_dir"])


# --------------------------------------------------------------------------- training
# Every candidate is trained twice (evaluation/selection.py): a selection copy that never sees
# ``valid`` (on ``train``; fine-tuned ones on the most recent 1/k of ``train``) and the final model
# (``train_full`` / ``train_recent_<k>``). With ``train_table=train`` the selection copy IS the
# final model (nothing is refit).

def _final_and_select(overrides: dict, refit: bool) -> tuple[dict | None, dict]:
    return ({**overrides, "train_table": "train_full"} if refit else None), {**overrides, "train_table": "train"}


def _fresh_spec(cfg: dict, f: str, split_dir: str, refit: bool) -> dict:
    final, select = _final_and_select(cfg["overrides"][f], refit)
    return {"candidate": f, "family": f, "fraction": None, "split_dir": split_dir,
            "final": None if final is None else {"overrides": final, "init_from": None},
            "select": {"overrides": select, "init_from": None}, "parent_candidate": None, "sources": {}}


def plan_pretrain(cfg: dict, prep: dict) -> list[dict]:
    """The families trained from scratch first: every one that needs no other run of this DAG run."""
    if cfg.get("stages") == "evaluate_registered":  # nothing is trained (evaluate_registered scores)
        return []
    refit = cfg["params"]["train_table"] == "train_full"
    return [_fresh_spec(cfg, f, prep["split_dir"], refit) for f in cfg["families"] if f not in cfg.get("sources", {})]


def plan_dependent(cfg: dict, pretrained: list[dict], tracking_run_id: str | None = None) -> list[dict]:
    """The families that need a run ``train`` made (``cfg["sources"]``: a distillation student and
    its teacher, M4 and its M1): the final model gets the source's final model, the selection
    copy the source's selection copy, so that nothing of ``valid`` reaches the selection copy
    through its source either. Each spec names its sources' candidate, run and digest (lineage)."""
    refit = cfg["params"]["train_table"] == "train_full"
    by = {p["candidate"]: p for p in pretrained}
    specs = []
    for f in cfg["families"]:
        need = cfg.get("sources", {}).get(f)
        if not need:
            continue
        spec = _fresh_spec(cfg, f, pretrained[0]["split_dir"] if pretrained else "", refit)
        for key, src in need.items():
            if src not in by:
                spec = None
                break
            s = by[src]
            spec["select"]["overrides"][key] = s["select_run_dir"]
            if spec["final"] is not None:
                spec["final"]["overrides"][key] = s["run_dir"]
            spec["sources"][key] = {"candidate": src, "run_id": s["child_run_id"], "digest": s["digest"]}
        if spec is None:  # its source failed in `train` (isolation: the others go on)
            missing = sorted(set(need.values()) - set(by))
            log.error("family %s is not trained: its source %s failed in this run", f, missing)
            for cand in [f] + [f"{f}-recent{k}" for k in cfg["fractions"]]:
                write_failure(cfg, cand, "plan_dependent", f"not trained: its source {missing} failed in this run",
                              tracking_run_id)
            continue
        specs.append(spec)
    return specs


def plan_finetune(cfg: dict, pretrained: list[dict]) -> list[dict]:
    """One fine-tuning run per (family, fraction) from that family's pre-trained weights: the
    final model from the final one on ``train_recent_<k>``, the selection copy from the
    selection copy on the most recent 1/k of ``train``; per-fraction overrides from ``finetune``."""
    specs = []
    for pre in pretrained:
        for k in cfg["fractions"]:
            ft = cfg["finetune"].get(pre["family"], {}).get(k, {})
            final = None
            if pre["final"] is not None:
                final = {"overrides": {**pre["final"]["overrides"], **ft, "train_table": f"train_recent_{k}"},
                         "init_from": pre["run_dir"]}
            select = {"overrides": {**pre["select"]["overrides"], **ft, "train_table": "train", "recent_fraction": k},
                      "init_from": pre["select_run_dir"]}
            specs.append({"candidate": f"{pre['family']}-recent{k}", "family": pre["family"], "fraction": k,
                          "split_dir": pre["split_dir"], "final": final, "select": select,
                          "parent_candidate": pre["candidate"], "parent_run_id": pre["child_run_id"],
                          "parent_digest": pre["digest"], "sources": pre.get("sources") or {}})
    return specs


class MlflowNotLogged(RuntimeError):
    """Training finished and its output is kept, but logging it to MLflow failed (the message names
    the candidate, the run dirs and the tracking URI). Not an expected error: the task is retried,
    and the retry finds the trained output of this DAG run and only logs it."""


def _work_dir(cfg: dict, candidate: str, which: str) -> Path:
    """Where one model of a candidate trains: a stable folder per (interval, candidate, select |
    final), so that a retried task resumes from its last epoch checkpoint."""
    return Path(cfg["root"]) / "checkpoints" / candidate / which


def _train_spec(family: str, split_dir: str, run: dict, tracking_run_id: str | None) -> dict:
    """What a trained run dir was made from (``train_spec.json`` in it): a work dir is resumed, and a
    finished model is reused, only when this matches (same DAG run's parent MLflow run, same data,
    same overrides); a new DAG run of the interval trains afresh."""
    return {"family": family, "split_dir": str(split_dir), "overrides": run["overrides"],
            "init_from": run["init_from"], "tracking_run_id": tracking_run_id}


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _train_into(family: str, split_dir: str, dest: Path, run: dict, work: Path | None = None,
                tracking_run_id: str | None = None) -> dict:
    """Train one model into ``work`` (epoch checkpoints there), then move it into place as ``dest``
    (one rename: readers see the old model or the new one). A ``work`` dir left by a killed or
    failed earlier try with the same spec is resumed from its last epoch checkpoint (``train(...,
    resume=True)``: the same weights as an uninterrupted run); one with another spec is discarded.
    Returns ``{"resumed_from_epoch": n | None}``."""
    from spark_jobs.contract import replace_dir, write_json
    from training import checkpoint as ck
    from training.train import train

    spec = _train_spec(family, split_dir, run, tracking_run_id)
    if work is None:
        work = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    work = Path(work)
    resume_from = None
    if work.exists():
        last = ck.latest_epoch_checkpoint(work)
        if _read_json(work / "train_spec.json") == spec and last is not None:
            resume_from = int(last.stem.split("_")[1])
        else:
            shutil.rmtree(work)
    if resume_from is not None:
        log.info("resuming %s in %s from its epoch %d checkpoint (an earlier try stopped)", family, work, resume_from)
    else:
        work.mkdir(parents=True)
        write_json(work / "train_spec.json", spec)
    train(family, split_dir, work, overrides=run["overrides"], init_from=run["init_from"], show_progress=False,
          resume=resume_from is not None)
    hist = work / "history.json"
    if hist.is_file():  # history.json says whether (and from where) this model was resumed
        h = json.loads(hist.read_text())
        h["run"]["resumed_from_epoch"] = resume_from
        write_json(hist, h)
    dest.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(work, dest)
    with contextlib.suppress(OSError):
        work.parent.rmdir()  # checkpoints/<candidate>/ once both its models are in place
    return {"resumed_from_epoch": resume_from}


def _train_end_us(run_dir: Path) -> int:
    return int(json.loads((run_dir / "history.json").read_text())["run"]["train_end_ts"])


def train_outputs(cfg: dict, spec: dict, parent_run_id: str | None) -> dict:
    """Train one candidate's selection copy (``select/<candidate>``) and final model
    (``models/<candidate>``) for this DAG run (its parent MLflow run ``parent_run_id``), without
    MLflow. Each trains in ``checkpoints/<candidate>/<select|final>/`` (resumed by a retry) and is
    then moved into place. A model already in place from an earlier try of this DAG run (same
    spec) is kept, not retrained. Returns the run dirs and, per model, ``trained`` /
    ``resumed_from_epoch``."""
    root = Path(cfg["root"])
    sdest = root / "select" / spec["candidate"]
    dest = root / "models" / spec["candidate"] if spec["final"] is not None else sdest
    todo = [("select", sdest, spec["select"])] + ([("final", dest, spec["final"])] if spec["final"] is not None else [])
    info = {}
    for which, d, run in todo:
        want = _train_spec(spec["family"], spec["split_dir"], run, parent_run_id)
        if cfg.get("stages") == "evaluate":  # evaluation only: this interval's trained model, any run's
            have = _read_json(d / "train_spec.json") if (d / "model.pt").is_file() else None
            if have is None or {**have, "tracking_run_id": None} != {**want, "tracking_run_id": None}:
                raise PipelineParamError(
                    f"param 'stages' = 'evaluate': candidate {spec['candidate']!r} has no trained {which} model "
                    f"with these settings in {d} ("
                    + ("none there" if have is None else "it was trained with other settings: "
                       + json.dumps({k: have.get(k) for k in ("overrides", "init_from")})[:300])
                    + "); train it first (stages=all or train)")
            info[which] = {"trained": False, "resumed_from_epoch": None}
            continue
        if parent_run_id and (d / "model.pt").is_file() and _read_json(d / "train_spec.json") == want:
            log.info("training of %s (%s) skipped: %s was already trained by an earlier try of this DAG run",
                     spec["candidate"], which, d)
            info[which] = {"trained": False, "resumed_from_epoch": None}
            continue
        r = _train_into(spec["family"], spec["split_dir"], d, run, _work_dir(cfg, spec["candidate"], which),
                        parent_run_id)
        info[which] = {"trained": True, **r}
    return {"run_dir": str(dest), "select_run_dir": str(sdest), "training": info}


def train_one(cfg: dict, spec: dict, parent_run_id: str) -> dict:
    """Train one candidate (:func:`train_outputs`: resumable, reused by a retry of this DAG run)
    and log both models to its child run. Training and logging fail apart: when MLflow cannot be
    reached the trained output stays on disk and the task fails with :class:`MlflowNotLogged`,
    naming what was not logged; a retry then only logs. A failure is also recorded
    (``status/failed/<candidate>.json``) for ``compare_and_register`` to name."""
    from evaluation import mlflow_logging as ml

    with record_failure(cfg, spec["candidate"], "train", parent_run_id):
        outputs = train_outputs(cfg, spec, parent_run_id)
        dest, sdest = Path(outputs["run_dir"]), Path(outputs["select_run_dir"])
        uri = ml.configure(cfg["data_dir"])
        try:
            logged, sel_uri, tables, rid = _log_trained(cfg, spec, parent_run_id, dest, sdest)
        except Exception as e:
            raise MlflowNotLogged(
                f"candidate {spec['candidate']!r}: trained, but not logged to MLflow ({uri}): "
                f"{type(e).__name__}: {str(e)[:500]}. The trained model(s) are kept in {dest}"
                + ("" if dest == sdest else f" and {sdest}")
                + "; a retry of this task logs them without training again") from e
    return {**spec, "run_dir": str(dest), "select_run_dir": str(sdest), "child_run_id": rid, **logged,
            "select_model_uri": sel_uri, "final_train_end_us": _train_end_us(dest),
            "select_train_end_us": _train_end_us(sdest), "tracking_run_id": parent_run_id,
            "training": outputs["training"], **tables}


def _log_trained(cfg: dict, spec: dict, parent_run_id: str, dest: Path, sdest: Path):
    from evaluation import mlflow_logging as ml

    with ml.child_run(parent_run_id, spec["candidate"], family=spec["family"], fraction=spec["fraction"]) as rid:
        logged = ml.log_training(rid, dest)
        sel_uri = ml.log_model_only(rid, sdest, name="select_model")["model_uri"] if dest != sdest else \
            logged["model_uri"]
        tables = {
            "train_table": (spec["final"] or spec["select"])["overrides"]["train_table"],
            "selection": "valid, scored by the selection copy trained on train"
                         + (f" (fine-tuned on its most recent 1/{spec['fraction']})" if spec["fraction"] else ""),
            "report_table": "test",
        }
        lineage = {}
        if spec.get("parent_run_id"):  # fine-tuning: where it started from
            lineage = {"parent_run_id": spec["parent_run_id"], "parent_candidate": spec["parent_candidate"],
                       "parent_digest": spec["parent_digest"],
                       "init_optimizer": (spec["final"] or spec["select"])["overrides"].get("init_optimizer", "reset")}
        for key, src in (spec.get("sources") or {}).items():  # the teacher / M1 it was given
            lineage.update({f"source.{key}.candidate": src["candidate"], f"source.{key}.run_id": src["run_id"],
                            f"source.{key}.digest": src["digest"]})
        ml.set_tags(rid, {**tables, **lineage, "select_model_uri": sel_uri})
    return logged, sel_uri, tables, rid


# --------------------------------------------------------------------------- failures, per candidate
# A candidate that fails (train or evaluate) must not stop the others: the DAG's downstream tasks
# run with trigger rules that tolerate failed upstream instances, and what failed is recorded
# here, keyed by the DAG run's parent MLflow run so that an earlier run's records are ignored.

def _status_path(cfg: dict, kind: str, candidate: str) -> Path:
    return Path(cfg["root"]) / "status" / kind / f"{candidate}.json"


def write_failure(cfg: dict, candidate: str, step: str, error: str, tracking_run_id: str | None) -> None:
    from spark_jobs.contract import write_json

    write_json(_status_path(cfg, "failed", candidate),
               {"candidate": candidate, "step": step, "error": error[:2000], "tracking_run_id": tracking_run_id})


@contextlib.contextmanager
def record_failure(cfg: dict, candidate: str, step: str, tracking_run_id: str | None):
    """Record an exception of ``step`` for ``candidate`` (then re-raise it); clear an earlier
    record of this DAG run when the step succeeds (a retry that worked)."""
    try:
        yield
    except BaseException as e:
        write_failure(cfg, candidate, step, f"{type(e).__name__}: {e}", tracking_run_id)
        raise
    p = _status_path(cfg, "failed", candidate)
    rec = _read_json(p)
    if rec is not None and rec.get("tracking_run_id") == tracking_run_id and rec.get("step") == step:
        p.unlink(missing_ok=True)


def eval_mode_of(cfg: dict, model_dir) -> str:
    """The loop mode a trained model is scored in: the Param ``eval_mode``, or with ``auto``
    its family's own (``Family.eval_mode`` of the run's config)."""
    mode = cfg["params"].get("eval_mode", "auto")
    if mode != "auto":
        return mode
    from training import checkpoint as ck
    from training import registry
    from training.config import config_from_dict

    conf = Path(model_dir) / "config.json"
    d = json.loads(conf.read_text()) if conf.is_file() else ck.load_checkpoint(model_dir)["config"]
    return registry.get(d["model"]).eval_mode(config_from_dict(d, str(conf)))


def evaluate_one(cfg: dict, trained: dict) -> dict:
    """Selection: the selection copy on ``valid``; report: the final model on ``test``. Both are
    logged to the candidate's run (valid_* metrics come from the selection copy). A failure is
    recorded (``status/failed/<candidate>.json``) for ``compare_and_register`` to name."""
    with record_failure(cfg, trained["candidate"], "evaluate", trained.get("tracking_run_id")):
        return _evaluate_one(cfg, trained)


def _evaluate_one(cfg: dict, trained: dict) -> dict:
    from evaluation import mlflow_logging as ml
    from evaluation.evaluate import evaluate
    from spark_jobs.contract import replace_dir, write_json

    ml.configure(cfg["data_dir"])
    dest = Path(cfg["root"]) / "eval" / trained["candidate"]
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    out = dict(trained)
    try:
        for table, model in (("valid", trained["select_run_dir"]), ("test", trained["run_dir"])):
            out[f"{table}_mode"] = mode = eval_mode_of(cfg, model)
            m = evaluate(model, trained["split_dir"], tmp / table, table=table, device=cfg["params"]["device"],
                         mode=mode)
            for k in ("recall_at_5", "mrr_at_5", "recall_at_20", "mrr_at_20", "precision_at_20", "ndcg_at_20",
                      cfg["params"]["select_metric"]):
                out[k if table == "test" else f"valid_{k}"] = m[k]
            out[f"{table}_digest"] = m.get("test_digest")
        out["eval_dir"] = str(dest)
        write_json(tmp / "result.json", out)
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for table in ("valid", "test"):
        ml.log_evaluation(trained["child_run_id"], dest / table, table, split_dir=trained["split_dir"])
    return out


def planned_candidates(cfg: dict) -> list[str]:
    return [f for f in cfg["families"]] + [f"{f}-recent{k}" for f in cfg["families"] for k in cfg["fractions"]]


def collect_evaluations(cfg: dict) -> list[dict]:
    """This run's evaluation results, read from ``eval/<candidate>/result.json``; every planned
    candidate must have one (see :func:`collect_outcomes` for a run where some failed)."""
    evaluated, failed = collect_outcomes(cfg, None)
    if failed:
        raise FileNotFoundError(f"candidate(s) planned but without an evaluation result: {failed}")
    return evaluated


def collect_outcomes(cfg: dict, tracking_run_id: str | None) -> tuple[list[dict], list[dict]]:
    """``(evaluated, failed)`` of this DAG run: the results read from ``eval/<candidate>/result.json``
    and, for each planned candidate without one, ``{"candidate", "step", "error"}``.

    Read from disk rather than XCom because a mapped task over an empty list (no fractions) is
    skipped and its XCom is then not reliably an empty list, and because a failed candidate has
    no XCom at all. Only the candidates this run planned are read, and with ``tracking_run_id``
    (the DAG run's parent MLflow run) only results and failures of this DAG run: a folder left by
    an earlier run of the interval is not taken for this run's result."""
    evaluated, failed = [], []
    for cand in planned_candidates(cfg):
        res = _read_json(Path(cfg["root"]) / "eval" / cand / "result.json")
        if res is not None and (tracking_run_id is None or res.get("tracking_run_id") == tracking_run_id):
            evaluated.append(res)
            continue
        rec = _read_json(_status_path(cfg, "failed", cand))
        if rec is not None and (tracking_run_id is None or rec.get("tracking_run_id") == tracking_run_id):
            failed.append({k: rec.get(k) for k in ("candidate", "step", "error")})
            continue
        base = cand.split("-recent")[0]
        if cand != base and any(f["candidate"] == base for f in failed):
            failed.append({"candidate": cand, "step": "train_recent",
                           "error": f"not trained: its base candidate {base!r} failed"})
        else:
            failed.append({"candidate": cand, "step": "unknown",
                           "error": "no evaluation result (its train / evaluate task did not finish)"})
    return evaluated, failed


# --------------------------------------------------------------------------- compare + registry

def _table_start_us(split_dir: str, table: str) -> int:
    """First event time (us) of a split table: a model whose training ended before it has not
    seen that period (``valid`` for selection, ``test`` for re-evaluating a champion)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    ts = pads.dataset(str(Path(split_dir) / table), format="parquet").to_table(columns=["ts"]).column("ts")
    return int(pc.min(ts).cast("int64").as_py())


def _item_ids(model):
    from training import checkpoint as ck

    return ck.load_checkpoint(model)["item_index"]["item_id"].numpy()


def _decide(cfg: dict, name: str, row: dict, version: str, valid_start: int) -> dict:
    """Move ``champion`` of registry model ``name`` to ``version`` (row = the chosen candidate)
    only when it beats the current champion on this run's ``valid`` (evaluation/selection.py)."""
    import tempfile

    import numpy as np

    from evaluation import mlflow_logging as ml
    from evaluation import selection as S
    from evaluation.evaluate import evaluate

    p = cfg["params"]
    metric = p["select_metric"]
    cur = ml.champion(name)
    d = {"model": name, "candidate": row["candidate"], "candidate_version": version,
         "candidate_score": row[f"valid_{metric}"], "metric": metric, "selection_table": "valid",
         "candidate_model": "selection copy (trained on train)", "champion_version": cur.version if cur else None,
         "champion_model": None, "champion_score": None, "comparison": None}
    if cur is None:
        d.update(action="promoted", reason="no champion yet")
    elif cur.version == version:
        d.update(action="unchanged (already champion)", reason="the chosen candidate is the champion")
    else:
        which = S.unseen_model(cur.tags, valid_start, ml.TAG)
        comp = None
        if which is None:
            reason = ("the champion has no model that ended training before this validation period "
                      f"(valid starts at {valid_start} us): it cannot be compared honestly")
        else:
            d["champion_model"] = which[0]
            with tempfile.TemporaryDirectory() as td:
                td = Path(td)
                ckpt = ml.download_checkpoint(which[1], td / "model")
                # both models on the same events: items known to both (the champion's item index
                # is an older interval's)
                common = np.intersect1d(_item_ids(ckpt), _item_ids(row["select_run_dir"]))
                for who, model in (("candidate", row["select_run_dir"]), ("champion", ckpt)):
                    evaluate(model, row["split_dir"], td / who, table="valid", device=p["device"],
                             only_items=common, mode=eval_mode_of(cfg, model))
                comp = S.compare_on_table(td / "candidate", td / "champion", metric)
            d["champion_score"], d["comparison"] = comp.champion_mean, S.as_dict(comp)
            d["comparison"]["n_common_items"] = int(len(common))
            reason = ""
        ok, why = S.promotion_decision(comp, alpha=p["promote_alpha"], margin=p["promote_margin"],
                                       reason_if_none=reason)
        d.update(action="promoted" if ok else "kept current champion", reason=why)
    ml.record_decision(name, version, d, move=d["action"] == "promoted")
    return d


def compare_and_register(cfg: dict, evaluated: list[dict], parent_run_id: str,
                         failed: list[dict] | None = None) -> dict:
    """Comparison table + chart; register every candidate's final model per family; choose per
    family (and overall) by the selection copies' ``valid`` score; move ``champion`` only when
    the chosen one beats it on this ``valid`` (evaluation/selection.py).

    ``failed`` (:func:`collect_outcomes`): candidates that failed; the others are still compared
    and registered, and the failed ones are named in the result, in ``comparison.json`` and as
    the parent run's tag ``rnnrec_failed_candidates``. The parent run ends FINISHED when none
    failed, else FAILED (the design: a run that lost a candidate is not reported as a success)."""
    from evaluation import mlflow_logging as ml
    from evaluation import selection as S

    ml.configure(cfg["data_dir"])
    failed = list(failed or [])
    if not evaluated:
        ml.finish_parent_run(parent_run_id, "FAILED", failed=failed)
        raise RuntimeError("no candidate was evaluated, nothing to compare or register; failed: "
                           + "; ".join(f"{f['candidate']} ({f['step']}: {f['error']})" for f in failed))
    ds, p = cfg["params"]["dataset"], cfg["params"]
    key = f"valid_{p['select_metric']}"
    rows = sorted((dict(e, label=e["candidate"]) for e in evaluated), key=lambda r: r["candidate"])
    decisions: list[dict] = []
    if p["register"] and rows:
        valid_start = _table_start_us(rows[0]["split_dir"], "valid")
        tags = {f"{ml.TAG}interval": f"{cfg['interval_start']}/{cfg['interval_end']}"}

        def version_tags(r):
            return {**tags, f"{ml.TAG}candidate": r["candidate"], key: f"{r[key]:.6f}",
                    f"{ml.TAG}select_metric": key, f"{ml.TAG}train_table": r["train_table"],
                    f"{ml.TAG}selection": r["selection"], f"{ml.TAG}report_table": r["report_table"],
                    f"{ml.TAG}final_model_uri": r["model_uri"], f"{ml.TAG}final_train_end_us": str(r["final_train_end_us"]),
                    f"{ml.TAG}selection_model_uri": r["select_model_uri"],
                    f"{ml.TAG}selection_train_end_us": str(r["select_train_end_us"])}

        for r in rows:
            v, created = ml.register(f"{ds}-{r['family']}", r["model_uri"], r["digest"], version_tags(r))
            r["registered_version"], r["registered_new"] = v, created
        targets = []
        for fam in sorted({r["family"] for r in rows}):
            b = S.best_candidate([r for r in rows if r["family"] == fam], key)
            targets.append((f"{ds}-{fam}", b, b["registered_version"]))
        best = S.best_candidate(rows, key)
        v, _ = ml.register(f"{ds}-best", best["model_uri"], best["digest"], version_tags(best))
        targets.append((f"{ds}-best", best, v))
        for name, r, ver in targets:
            decisions.append(_decide(cfg, name, r, ver, valid_start))
    slim = [{k: r.get(k) for k in ("label", "candidate", "family", "fraction", ml.SELECT_METRIC, key,
                                   "valid_recall_at_20", "recall_at_5", "mrr_at_5", "recall_at_20", "mrr_at_20",
                                   "precision_at_20", "train_table", "selection", "report_table",
                                   "registered_version", "registered_new", "digest", "child_run_id")} for r in rows]
    ml.log_comparison(parent_run_id, slim, decisions, Path(cfg["root"]) / "comparison", select_key=key,
                      failed=failed)
    ml.finish_parent_run(parent_run_id, "FAILED" if failed else "FINISHED", failed=failed)
    return {"candidates": slim, "registry": decisions, "parent_run_id": parent_run_id, "select_key": key,
            "comparison": str(Path(cfg["root"]) / "comparison"), "failed": failed}


def evaluate_registered(cfg: dict, prep: dict, parent_run_id: str) -> list[dict] | None:
    """``stages=evaluate_registered``: score each family's registered ``champion``
    (``<dataset>-<family>@champion``) on this interval's ``test`` table, each in a child run
    ``registered-<family>`` of the DAG run's parent run (result in
    ``eval/registered-<family>/result.json``). Nothing is trained or registered. A family without
    a champion is recorded as failed (named by compare_and_register). A champion whose final model
    trained on events of this test period is scored but flagged (``saw_test``). Other stages: None."""
    if cfg.get("stages") != "evaluate_registered":
        return None
    from evaluation import mlflow_logging as ml

    ml.configure(cfg["data_dir"])
    test_start = _table_start_us(prep["split_dir"], "test")
    out = []
    for fam in cfg["families"]:
        try:
            out.append(_evaluate_champion(cfg, prep, parent_run_id, fam, test_start))
        except Exception as e:  # recorded; the other families go on
            log.error("re-evaluation of %s's champion failed: %s: %s", fam, type(e).__name__, e)
    return out


def _evaluate_champion(cfg: dict, prep: dict, parent_run_id: str, fam: str, test_start: int) -> dict:
    from evaluation import mlflow_logging as ml
    from evaluation.evaluate import evaluate
    from spark_jobs.contract import replace_dir, write_json

    ds, p = cfg["params"]["dataset"], cfg["params"]
    cand, name = f"registered-{fam}", f"{ds}-{fam}"
    with record_failure(cfg, cand, "evaluate_registered", parent_run_id):
        mv = ml.champion(name)
        if mv is None:
            raise LookupError(f"registry model {name!r} has no 'champion' version to re-evaluate")
        dest = Path(cfg["root"]) / "eval" / cand
        tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            ckpt = ml.download_checkpoint(f"models:/{name}@champion", tmp / "model")
            mode = eval_mode_of(cfg, ckpt)
            m = evaluate(ckpt, prep["split_dir"], tmp / "test", table="test", device=p["device"], mode=mode)
            end_us = int(mv.tags.get(f"{ml.TAG}final_train_end_us") or 0)
            res = {"candidate": cand, "label": f"{cand}@v{mv.version}", "family": fam, "fraction": None,
                   "registered_model": name, "registered_version": mv.version, "test_mode": mode,
                   "trained_through_us": end_us or None, "saw_test": bool(end_us and end_us >= test_start),
                   "split_dir": prep["split_dir"], "tracking_run_id": parent_run_id,
                   **{k: m[k] for k in ("recall_at_5", "mrr_at_5", "recall_at_20", "mrr_at_20",
                                        "precision_at_20", "ndcg_at_20", p["select_metric"])}}
            if res["saw_test"]:
                log.warning("champion %s v%s trained on events of this test period (through %d us >= %d us): "
                            "its score here is not an honest estimate", name, mv.version, end_us, test_start)
            shutil.rmtree(tmp / "model")
            write_json(tmp / "result.json", res)
            replace_dir(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with ml.child_run(parent_run_id, cand, family=fam, fraction=None) as rid:
            ml.log_evaluation(rid, dest / "test", "test", split_dir=prep["split_dir"])
            ml.set_tags(rid, {"registered_model": name, "registered_version": str(mv.version),
                              "saw_test": str(res["saw_test"])})
    return res


def summarize_registered(cfg: dict, parent_run_id: str) -> dict:
    """compare_and_register of a ``stages=evaluate_registered`` run: the champions' scores on this
    interval's test table side by side (comparison.json / .csv / .png on the parent run); the
    registry is not touched. The parent run ends FAILED when a family could not be scored."""
    from evaluation import mlflow_logging as ml

    ml.configure(cfg["data_dir"])
    rows, failed = [], []
    for fam in cfg["families"]:
        cand = f"registered-{fam}"
        res = _read_json(Path(cfg["root"]) / "eval" / cand / "result.json")
        if res is not None and res.get("tracking_run_id") == parent_run_id:
            rows.append(res)
            continue
        rec = _read_json(_status_path(cfg, "failed", cand)) or {}
        failed.append({"candidate": cand, "step": rec.get("step", "evaluate_registered"),
                       "error": rec.get("error", "no result")})
    key = cfg["params"]["select_metric"]
    slim = [{k: r.get(k) for k in ("label", "candidate", "family", "fraction", key, "recall_at_5", "mrr_at_5",
                                   "recall_at_20", "mrr_at_20", "precision_at_20", "registered_model",
                                   "registered_version", "saw_test")} for r in rows]
    ml.log_comparison(parent_run_id, slim, [], Path(cfg["root"]) / "comparison", select_key=key, failed=failed)
    ml.finish_parent_run(parent_run_id, "FAILED" if failed or not rows else "FINISHED", failed=failed)
    return {"candidates": slim, "registry": [], "parent_run_id": parent_run_id, "select_key": key,
            "comparison": str(Path(cfg["root"]) / "comparison"), "failed": failed}


class CandidatesFailed(RuntimeError):
    """Some candidates of the DAG run failed (the others were compared and registered)."""


def finish_tracking(cfg: dict, parent_run_id: str, summary: dict | None) -> dict:
    """The DAG run's last task (runs whatever happened upstream): make sure the parent MLflow run
    does not stay RUNNING. With ``summary`` (compare_and_register finished) the parent run was
    already ended; without it (compare_and_register failed or never ran) it is ended FAILED.
    Raises :class:`CandidatesFailed` naming what failed, so that the DAG run fails (and its
    failure callback notifies) even though the other candidates were registered."""
    from evaluation import mlflow_logging as ml

    ml.configure(cfg["data_dir"])
    if summary is None:
        failed = [{"candidate": "*", "step": "compare_and_register", "error": "did not finish"}]
        ml.finish_parent_run(parent_run_id, "FAILED", failed=failed)
    else:
        failed = summary.get("failed") or []
    if failed:
        raise CandidatesFailed("failed in this DAG run: " + "; ".join(
            f"{f['candidate']} ({f['step']}: {f['error']})" for f in failed))
    return {"parent_run_id": parent_run_id, "status": "FINISHED"}


def format_table(summary: dict) -> str:
    """Plain-text comparison table (used by the demo); says which tables chose and which report."""
    key = summary.get("select_key", "valid_mrr_at_20")
    lines = ["selection: each candidate's selection copy (trained on 'train'; fine-tuned ones on its most "
             "recent 1/k), scored on 'valid', which it never saw",
             "report:    the final models (trained on 'train_full' / 'train_recent_<k>'), scored on 'test' "
             "(never used to choose)"]
    head = (f"{'candidate':<20}{'train table':>17}{'select ' + key[6:]:>22}{'test R@20':>11}{'MRR@20':>9}"
            f"{'R@5':>8}{'version':>9}")
    lines += [head, "-" * len(head)]
    for r in summary["candidates"]:
        lines.append(f"{r['candidate']:<20}{r.get('train_table') or '':>17}{r[key]:>22.4f}{r['recall_at_20']:>11.4f}"
                     f"{r['mrr_at_20']:>9.4f}{r['recall_at_5']:>8.4f}{str(r.get('registered_version') or '-'):>9}")
    for f in summary.get("failed") or []:
        lines.append(f"FAILED {f['candidate']} in {f['step']}: {f['error']}")
    for d in summary["registry"]:
        lines.append(f"registry {d['model']}: {d['action']} (candidate {d['candidate']} v{d['candidate_version']}"
                     f"{'' if d['champion_version'] is None else ', champion v' + str(d['champion_version'])}): "
                     f"{d['reason']}")
    return "\n".join(lines)
