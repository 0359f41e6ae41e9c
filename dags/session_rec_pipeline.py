"""
# session_rec_pipeline

Daily pipeline for RNN session-based recommendation. A run with data interval
`[start, end)` processes the raw clickstream up to `end`; the last day before
`end` is the test period, everything earlier is training (global time cut,
`split=time_strict`). Outputs live under
`<data_dir>/pipeline/<dataset>/<start>_<end>/`, so re-running or clearing a
date replaces exactly that date's outputs.

```
resolve -> housekeeping (retention, sweep)
resolve -> wait_for_input (deferred until the arrival marker) -> ingest -> preprocess (Spark)
  -> interval_has_data (skip the rest when the test period is empty)
  -> quality_gates (GX) -> start_tracking (MLflow parent run)
  -> train[family]            (pool "gpu", mapped over the families: a selection copy on train
                               and the final model on train_full)
  -> train_recent[family, k]  (pool "gpu", fine-tuned from train[family]: the selection copy on
                               the recent 1/k of train, the final model on train_recent_<k>)
  -> train_dependent[family]  (after train: families that need one of its runs, e.g. tan_distill's
                               teacher_run from tan_teacher, tan_emb's item_embeddings_from from tan;
                               then train_recent_dependent, evaluate_dependent, evaluate_recent_dependent)
  -> evaluate[...] (selection copies on valid, final models on test)
  -> evaluate_registered     (stages=evaluate_registered only: the champions on this interval)
  -> compare_and_register (choose on valid; register; move "champion" only on a paired test
                           against the champion on a table neither trained on)
  -> finish_tracking (always: the parent MLflow run never stays RUNNING; fails the DAG run
                      when a candidate failed)
```

**Faults** (docs/reliability.md, "Faults"): one candidate failing (a NaN loss, a crash) does not
stop the others. The tasks after the mapped `train` / `evaluate` run with trigger rules that
tolerate failed upstream instances (`all_done`): plan_finetune / plan_dependent plan only from
the candidates that trained, evaluate* score the ones that trained, and compare_and_register
compares and registers the ones that were evaluated and names the failed ones (its result,
`comparison.json`, the parent run's tag `rnnrec_failed_candidates`). The parent MLflow run then
ends FAILED and `finish_tracking` fails the DAG run. Every task failure calls the notifier
(`RNNREC_NOTIFIER`: `log` (default), `smtp`, or a dotted path to a BaseNotifier subclass), and
so does the DAG run's failure. A retried `train` resumes from its last epoch checkpoint
(`<root>/checkpoints/<candidate>/<select|final>/`); one whose models were trained but not logged
(MLflow down) only logs. `dagrun_timeout` = 24 h, `max_active_runs` = 1.

**Scheduled runs on your data** (docs/reliability.md): write `conf/datasets/<name>.yaml` (input
glob, format, arrival marker, retention, any Param) and select it for scheduled runs with
`airflow variables set rnnrec_dataset_config <name>` (or Param `dataset_config` in a trigger;
values a trigger passes still win). `wait_for_input` waits, deferred, for the interval's arrival
marker; an interval without test events is skipped (`interval_has_data`), not failed;
`housekeeping` applies the config's retention and sweeps what killed runs left. Schedule:
`RNNREC_SCHEDULE` (cron, default daily), `RNNREC_START_DATE`, `RNNREC_CATCHUP` (parse time).

**Partial runs**: Param `stages` = `train` (reuse this interval's processed data), `evaluate`
(reuse its trained models too), `evaluate_registered` (score each family's champion on this
interval; nothing trained or registered).

**Manual trigger** (Params are validated; a bad value fails `resolve` with the reason):

    airflow dags trigger session_rec_pipeline -l 2014-04-08T00:00:00+00:00 \
        -c '{"families": ["gru4rec", "pop"], "epochs": 1, "fractions": [4], "device": "cpu",
              "overrides": {"gru4rec": {"layers": [100], "learning_rate": 0.1}}}'

Families: `python -m training.train --list` (names and every config key, from
`training/registry.py`); `overrides` values are typed and checked by `resolve`.

**Backfill** (the scheduler runs it; unpause the DAG first). On one GPU keep one run
at a time: the `gpu` pool already serialises training, and `--max-active-runs 1`
also keeps the Spark steps of different dates from competing for the cores:

    airflow dags unpause session_rec_pipeline
    airflow backfill create --dag-id session_rec_pipeline \
        --from-date 2014-04-06 --to-date 2014-04-08 --max-active-runs 1 --reprocess-behavior completed

**Pools**: `airflow pools set gpu 1 "one GPU"` (training and evaluation tasks use it; CPU fallback when no CUDA).

**Cluster mode** (off by default; nothing here needs a cluster):
`RNNREC_SPARK_CONN_ID=<conn>` runs preprocessing with `SparkSubmitOperator`
(provider `apache-airflow-providers-apache-spark`); `RNNREC_K8S_TRAIN_IMAGE=<image>`
runs training in a pod via `@task.kubernetes` (provider `cncf.kubernetes`; the
image is `docker/trainer.Dockerfile`; the pod gets `nvidia.com/gpu`, the shared data
volume at `RNNREC_DATA_DIR`, `MLFLOW_TRACKING_URI` and the interval's paths:
`dags/k8s_pod.py` lists the settings). README "Running on a cluster".
"""
from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta

from airflow.sdk import BaseNotifier, BaseOperator, Param, dag, task
from airflow.timetables.interval import CronDataIntervalTimetable

# The project root holds spark_jobs/, training/, ... (tasks import them lazily).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

DAG_ID = "session_rec_pipeline"
_SPARK_CONN = os.environ.get("RNNREC_SPARK_CONN_ID", "")
_K8S_IMAGE = os.environ.get("RNNREC_K8S_TRAIN_IMAGE", "")
# The schedule (deployment settings, read at parse time): one run per day by default, from the
# first day of the user's data; catch-up off (a new deployment starts with the latest interval).
_SCHEDULE = os.environ.get("RNNREC_SCHEDULE", "0 0 * * *")
_START = datetime.fromisoformat(os.environ.get("RNNREC_START_DATE") or "2014-04-01")
_CATCHUP = os.environ.get("RNNREC_CATCHUP", "false").strip().lower() in ("1", "true", "yes")
#: the Airflow Variable that names the dataset config of scheduled runs (Param dataset_config wins)
CONFIG_VARIABLE = "rnnrec_dataset_config"
#: how long a run waits for its interval's arrival marker (deferred: no worker slot is held)
_ARRIVAL_TIMEOUT = timedelta(hours=float(os.environ.get("RNNREC_ARRIVAL_TIMEOUT_HOURS", "20")))
_ARRIVAL_POKE_S = float(os.environ.get("RNNREC_ARRIVAL_POKE_SECONDS", "60"))

def _params() -> dict:
    """The Params from ``dags.pipeline_steps.PARAM_SPECS`` (stdlib-only import: the defaults
    and schemas exist once, beside the code that validates them)."""
    from dags.pipeline_steps import PARAM_SPECS

    return {k: Param(spec["default"], **{a: v for a, v in spec.items() if a != "default"})
            for k, spec in PARAM_SPECS.items()}


def _steps():
    from dags import pipeline_steps

    return pipeline_steps


class LogNotifier(BaseNotifier):
    """The default failure notifier: one ERROR log line naming the DAG run, the task (with its map
    index) and the error."""

    def notify(self, context) -> None:
        import logging

        logging.getLogger("rnnrec.notify").error("%s", failure_message(context))


def failure_message(context) -> str:
    """``<dag_id> <run_id>: task <task_id>[<map_index>] failed (try n): <error>`` from a task's or a
    DAG run's failure-callback context (the keys that exist: a DAG callback has no exception)."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    run_id = context.get("run_id") or getattr(dag_run, "run_id", "?")
    dag_id = getattr(context.get("dag"), "dag_id", None) or getattr(dag_run, "dag_id", DAG_ID)
    if ti is not None:
        idx = getattr(ti, "map_index", -1)
        what = f"task {ti.task_id}{'' if idx is None or idx < 0 else f'[{idx}]'} failed (try {getattr(ti, 'try_number', '?')})"
    else:
        what = "DAG run failed"
    err = context.get("exception") or context.get("reason") or ""
    return f"{dag_id} {run_id}: {what}: {err}"


def _notifier():
    """``$RNNREC_NOTIFIER``: ``log`` (default), ``smtp`` (apache-airflow-providers-smtp's
    SmtpNotifier to ``$RNNREC_NOTIFY_EMAIL``) or ``package.module.Class`` (a BaseNotifier
    subclass, built without arguments)."""
    spec = os.environ.get("RNNREC_NOTIFIER", "log").strip() or "log"
    if spec == "log":
        return LogNotifier()
    if spec == "smtp":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        return SmtpNotifier(to=os.environ["RNNREC_NOTIFY_EMAIL"], subject="[rnnrec] {{ dag.dag_id }} failed")
    import importlib

    mod, _, name = spec.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(mod), name)()


_NOTIFY = _notifier()


class WaitForInput(BaseOperator):
    """Wait, deferred (the triggerer polls; no worker slot is held), until the interval's input
    has arrived: the ``arrival`` marker of the run's dataset config, formatted with the data
    interval (``resolve`` puts the path in its result). No marker configured, or a stage that
    reuses the processed data: no wait. Times out after ``$RNNREC_ARRIVAL_TIMEOUT_HOURS`` (20)."""

    ui_color = "#e8f0fe"

    def __init__(self, *, poke_interval: float = 60.0, **kwargs):
        super().__init__(**kwargs)
        self.poke_interval = poke_interval

    def execute(self, context):
        cfg = context["ti"].xcom_pull(task_ids="resolve") or {}
        path = cfg.get("arrival")
        if not path or cfg.get("stages") in ("train", "evaluate"):
            self.log.info("no arrival marker to wait for (dataset config: %s)", cfg.get("dataset_config"))
            return None
        if os.path.exists(path):
            self.log.info("input of %s .. %s has arrived: %s", cfg["interval_start"], cfg["interval_end"], path)
            return path
        from airflow.providers.standard.triggers.file import FileTrigger

        self.log.info("waiting (deferred, up to %s) for %s: the input of %s .. %s is not complete yet",
                      _ARRIVAL_TIMEOUT, path, cfg["interval_start"], cfg["interval_end"])
        self.defer(trigger=FileTrigger(filepath=path, poke_interval=self.poke_interval), method_name="arrived",
                   kwargs={"path": path}, timeout=_ARRIVAL_TIMEOUT)

    def arrived(self, context, path: str, event=None):
        self.log.info("input arrived: %s", path)
        return path


@dag(
    dag_id=DAG_ID,
    schedule=CronDataIntervalTimetable(_SCHEDULE, timezone="UTC"),
    start_date=_START,
    catchup=_CATCHUP,
    doc_md=__doc__,
    params=_params(),
    tags=["rnnrec", "training"],
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1), "on_failure_callback": [_NOTIFY]},
    on_failure_callback=[_NOTIFY],
    # one run at a time (one GPU; Spark steps of different dates would compete for the cores);
    # a daily run still going after a day is failed, so the next day's can start
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=24),
)
def session_rec_pipeline():
    @task
    def resolve(**context) -> dict:
        """Validate the Params; fix this interval's output paths."""
        from airflow.sdk import Variable

        s = _steps()
        dag_run = context.get("dag_run")
        with s.clear_errors():
            return s.resolve(dict(context["params"]), dag_id=context["dag"].dag_id,
                             dag_run_id=context["run_id"], interval_start=context.get("data_interval_start"),
                             interval_end=context.get("data_interval_end"),
                             explicit=dict(getattr(dag_run, "conf", None) or {}),
                             variable_config=Variable.get(CONFIG_VARIABLE, default=None))

    @task(retries=0)
    def housekeeping(cfg: dict) -> dict:
        """Retention of the dataset config: sweep killed runs' leftovers, prune old intervals."""
        return _steps().housekeeping(cfg)

    @task.short_circuit
    def interval_has_data(cfg: dict, prep: dict) -> bool:
        """An interval without test events skips the rest of the run (a skip, not a failure)."""
        return _steps().interval_has_data(cfg, prep)

    @task
    def evaluate_registered(cfg: dict, prep: dict, parent_run_id: str):
        """stages=evaluate_registered: each family's champion on this interval's test table."""
        return _steps().evaluate_registered(cfg, prep, parent_run_id)

    @task
    def ingest(cfg: dict) -> dict:
        """The raw input: given files, or a generated clickstream (made once, shared by runs)."""
        s = _steps()
        with s.clear_errors():
            return s.ingest(cfg)

    @task(retries=1)
    def preprocess(cfg: dict, raw: dict) -> dict:
        """Spark in-process (local[*] unless SPARK_MASTER is set): sessionize, filter, split."""
        s = _steps()
        with s.clear_errors():
            return s.preprocess(cfg, raw)

    @task(retries=0)
    def quality_gates(cfg: dict, prep: dict) -> dict:
        """Great Expectations on every hand-over; a failed gate fails with its report."""
        s = _steps()
        with s.clear_errors():
            return s.gates(cfg, prep)

    @task
    def start_tracking(cfg: dict, prep: dict, quality: dict) -> str:
        """MLflow parent run for this DAG run (replaces this interval's earlier runs)."""
        return _steps().start_tracking(cfg, prep, quality)

    @task
    def plan_pretrain(cfg: dict, prep: dict) -> list[dict]:
        return _steps().plan_pretrain(cfg, prep)

    # all_done: plan from the candidates that trained (a failed instance has no XCom)
    @task(trigger_rule="all_done")
    def plan_dependent(cfg: dict, pretrained, parent_run_id: str) -> list[dict]:
        return _steps().plan_dependent(cfg, list(pretrained[:]), parent_run_id)

    @task(trigger_rule="all_done")
    def plan_finetune(cfg: dict, pretrained) -> list[dict]:
        # one slice request: iterating the lazy XCom sequence probes past its end, which
        # Airflow logs as an "XCom not found" error line
        return _steps().plan_finetune(cfg, list(pretrained[:]))

    if _K8S_IMAGE:  # GPU training in a pod (GPU limit, data volume, MLflow env: dags/k8s_pod.py)
        from dags.k8s_pod import train_pod_kwargs

        train_deco = task.kubernetes(**train_pod_kwargs(), pool="gpu", retries=2, retry_delay=timedelta(minutes=2),
                                     execution_timeout=timedelta(hours=12))
    else:
        train_deco = task(pool="gpu", retries=2, retry_delay=timedelta(minutes=2),
                          execution_timeout=timedelta(hours=12))

    @train_deco
    def train(cfg: dict, spec: dict, parent_run_id: str) -> dict:
        """Train one candidate (CUDA when present, else CPU); NaN loss fails with epoch + step."""
        from dags import pipeline_steps as s

        with s.clear_errors():
            return s.train_one(cfg, spec, parent_run_id)

    # all_done: scores every candidate that trained (mapped over the XComs that exist) even when
    # another one failed; CUDA when present (Param device), like training
    @task(retries=1, pool="gpu", trigger_rule="all_done")
    def evaluate(cfg: dict, trained: dict) -> dict:
        """Full-ranking next-item evaluation on valid and test; logged to the candidate's run."""
        s = _steps()
        with s.clear_errors():
            return s.evaluate_one(cfg, trained)

    @task(trigger_rule="all_done")  # what was evaluated, whatever failed (named in the result)
    def compare_and_register(cfg: dict, parent_run_id: str) -> dict:
        """Comparison chart/table; register each family; move 'champion' only when beaten."""
        s = _steps()
        if parent_run_id is None:  # start_tracking never ran: a step before it failed (that task says why)
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException("nothing to compare: start_tracking did not run (an earlier step failed)")
        if cfg["stages"] == "evaluate_registered":
            return s.summarize_registered(cfg, parent_run_id)
        evaluated, failed = s.collect_outcomes(cfg, parent_run_id)
        return s.compare_and_register(cfg, evaluated, parent_run_id, failed=failed)

    @task(trigger_rule="all_done", retries=0)
    def finish_tracking(cfg: dict, parent_run_id: str, **context) -> dict:
        """Always last: end the parent MLflow run (FAILED if compare_and_register did not) and fail
        the DAG run, naming the candidates, when any failed."""
        s = _steps()
        if parent_run_id is None:  # no parent MLflow run to end; the failed earlier step fails the DAG run
            from airflow.sdk.exceptions import AirflowSkipException

            raise AirflowSkipException("no MLflow parent run: start_tracking did not run (an earlier step failed)")
        summary = context["ti"].xcom_pull(task_ids="compare_and_register")
        try:
            return s.finish_tracking(cfg, parent_run_id, summary)
        except s.CandidatesFailed as e:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(str(e)) from None

    cfg = resolve()
    housekeeping(cfg)
    arrived = WaitForInput(task_id="wait_for_input", poke_interval=_ARRIVAL_POKE_S, retries=0)
    raw = ingest(cfg)
    cfg >> arrived >> raw
    if _SPARK_CONN:
        prep = _spark_submit_preprocess(cfg, raw)
    else:
        prep = preprocess(cfg, raw)
    quality = quality_gates(cfg, prep)
    interval_has_data(cfg, prep) >> quality
    parent = start_tracking(cfg, prep, quality)
    def train_stage(suffix: str, specs):
        """train{suffix} mapped over ``specs``, then train_recent{suffix} (fine-tuned from it) and
        both evaluations. A stage whose plan is empty is skipped, and so is all that follows it."""
        trained = train.override(task_id=f"train{suffix}").partial(cfg=cfg, parent_run_id=parent).expand(spec=specs)
        # a failed train[i] leaves the others' fine-tuning and evaluations running (trigger rules above)
        finetuned = train.override(task_id=f"train_recent{suffix}").partial(cfg=cfg, parent_run_id=parent).expand(
            spec=plan_finetune.override(task_id=f"plan_finetune{suffix}")(cfg, trained))
        return trained, [evaluate.override(task_id=f"evaluate{suffix}").partial(cfg=cfg).expand(trained=trained),
                         evaluate.override(task_id=f"evaluate_recent{suffix}").partial(cfg=cfg).expand(
                             trained=finetuned)]

    pretrained, ev_pre = train_stage("", plan_pretrain(cfg, prep))
    # families that need a run of `train` (a distillation student's teacher, M4's M1) train after it
    _, ev_dep = train_stage("_dependent", plan_dependent(cfg, pretrained, parent))
    compared = compare_and_register(cfg, parent)
    ev_pre + ev_dep + [evaluate_registered(cfg, prep, parent)] >> compared
    compared >> finish_tracking(cfg, parent)


def _spark_submit_preprocess(cfg, raw):
    """Preprocessing on a Spark cluster (only when RNNREC_SPARK_CONN_ID is set)."""
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    @task
    def spark_submit_config(cfg: dict, raw: dict) -> dict:
        """The job's options as one YAML file (a list of inputs cannot be templated into args) and
        the driver's JVM settings for this input (honoured only on the spark-submit command line)."""
        return _steps().write_submit_config(cfg, raw)

    submit = SparkSubmitOperator(task_id="preprocess_spark_submit", conn_id=_SPARK_CONN, retries=1,
                                 **_steps().spark_submit_kwargs("spark_submit_config"))

    @task
    def preprocess_result(cfg: dict) -> dict:
        """Read back what spark-submit wrote (the same dict the in-process step returns)."""
        s = _steps()
        with s.clear_errors():
            return s.preprocess_result(cfg)

    spark_submit_config(cfg, raw) >> submit
    res = preprocess_result(cfg)
    submit >> res
    return res


session_rec_pipeline()
