"""SparkSession creation: never hard-codes a master.

The master comes from, in order: ``spark-submit --master`` (already in the
launched JVM's conf), ``$SPARK_MASTER``, and only when neither is set,
``local[*]`` so that ``python -m spark_jobs.preprocess`` works out of the box.

Under ``spark-submit`` (or ``bin/pyspark``) the driver JVM is already running
when Python starts, so the driver's JVM settings (:data:`DRIVER_LAUNCH_CONF`:
memory, JVM flags) cannot come from the session builder any more: pass them
on spark-submit's command line (:func:`submit_args` gives them for an input
size); :func:`get_spark` then drops them from the builder and logs a warning
naming the ones the running JVM lacks.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys

log = logging.getLogger("spark_jobs.session")

#: Settings every job relies on (see STACK.md, "Spark 4").
BASE_CONF = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.sources.partitionOverwriteMode": "dynamic",
    "spark.sql.adaptive.enabled": "true",
    # Let a join on (user_id, x) reuse a partitioning on user_id from the sessionizing window
    # instead of shuffling all events again.
    "spark.sql.requireAllClusterKeysForCoPartition": "false",
    # Enough partitions that a 30M-event sort never holds one huge task (about 1M events each).
    # AQE merges them for small data, except in the checkpointed event layouts (see
    # sessionize.checkpoint), which keep exactly this many.
    "spark.sql.shuffle.partitions": str(max(32, 4 * (os.cpu_count() or 2))),
    # Batch work: the throughput collector costs far less CPU than G1 on 2 cores.
    "spark.driver.extraJavaOptions": "-XX:+UseParallelGC",
    # Superseded checkpoints (gigabytes each at 30M events) are only dropped when the JVM
    # collects their handles: collect every 2 minutes instead of every 30.
    "spark.cleaner.periodicGC.interval": "2min",
    "spark.ui.showConsoleProgress": "true" if sys.stderr.isatty() else "false",
}


#: Inputs below this size run with a JVM tuned for short jobs (see :func:`sizing_conf`).
SMALL_INPUT_BYTES = 16 << 20
#: Input bytes per shuffle partition when sizing the partition count from the input.
BYTES_PER_PARTITION = 8 << 20


def sizing_conf(input_bytes: int | None, cores: int | None = None) -> dict[str, str]:
    """Spark settings sized from the input (local mode); ``{}`` when the size is unknown.

    A job over a small input is all fixed cost: with the default partition count
    every shuffle of a 20k-event demo runs 32 near-empty tasks, and the JVM's
    optimising compiler burns a core compiling code that runs for seconds.
    Measured on the 2-core machine, 20k events: 75 s -> 53 s with 2 partitions,
    -> 42 s with the JVM limited to its quick compiler (``TieredStopAtLevel=1``).
    Large inputs keep the full compiler and ``BASE_CONF``'s partition ceiling.
    """
    if input_bytes is None:
        return {}
    cores = cores or os.cpu_count() or 2
    ceiling = int(BASE_CONF["spark.sql.shuffle.partitions"])
    parts = min(ceiling, max(cores, -(-input_bytes // BYTES_PER_PARTITION)))
    conf = {"spark.sql.shuffle.partitions": str(parts)}
    if input_bytes < SMALL_INPUT_BYTES:
        conf["spark.driver.extraJavaOptions"] = BASE_CONF["spark.driver.extraJavaOptions"] + " -XX:TieredStopAtLevel=1"
    return conf


#: Settings of the driver JVM itself: only honoured when they are known before that JVM starts
#: (``python -m`` launches it from the builder's settings; ``spark-submit`` has launched it already).
DRIVER_LAUNCH_CONF = ("spark.driver.memory", "spark.driver.extraJavaOptions",
                      "spark.driver.extraClassPath", "spark.driver.extraLibraryPath")


def driver_memory() -> str:
    """Driver heap: ``$RNNREC_SPARK_DRIVER_MEMORY`` or 4g (in local mode the driver does all the work)."""
    return os.environ.get("RNNREC_SPARK_DRIVER_MEMORY", "4g")


def driver_launch_conf(input_bytes: int | None) -> dict[str, str]:
    """The driver JVM settings a job over ``input_bytes`` wants (same sizing as :func:`sizing_conf`)."""
    conf = {**BASE_CONF, "spark.driver.memory": driver_memory(), **sizing_conf(input_bytes)}
    return {k: conf[k] for k in DRIVER_LAUNCH_CONF if k in conf}


def submit_args(input_bytes: int | None) -> list[str]:
    """``spark-submit`` options that give the driver the JVM :func:`get_spark` would give it locally.

    Under ``spark-submit`` the driver JVM runs before the job's code, so
    ``spark.driver.memory`` and ``spark.driver.extraJavaOptions`` set in the
    session builder are silently ignored there; these options set them at launch::

        spark-submit --master spark://host:7077 <submit_args(...)> spark_jobs/preprocess.py ...

    On a cluster the executors do the work, so they get the same JVM flags
    (garbage collector; for a small input the quick compiler only).
    """
    conf = driver_launch_conf(input_bytes)
    java = conf["spark.driver.extraJavaOptions"]
    return ["--driver-memory", conf["spark.driver.memory"], "--driver-java-options", java,
            "--conf", f"spark.executor.extraJavaOptions={java}"]


def launched_by_spark_submit() -> bool:
    """True when this Python process is a driver that ``spark-submit`` (or ``bin/pyspark``) started.

    Such a process is handed the port of the JVM that is already running
    (``PYSPARK_GATEWAY_PORT``) instead of launching its own.
    """
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _launched_conf() -> dict[str, str]:
    """The Spark settings the already running driver JVM was launched with (its system properties)."""
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to the running JVM; launches nothing
    return dict(SparkConf().getAll())


def _missing_launch_settings(wanted: dict[str, str], launched: dict[str, str]) -> dict[str, str]:
    """Of ``wanted`` driver JVM settings, those the running JVM was not launched with."""
    missing = {}
    for k, v in wanted.items():
        have = launched.get(k)
        if k == "spark.driver.extraJavaOptions":
            if not set(v.split()) <= set((have or "").split()):
                missing[k] = v
        elif have is None:
            missing[k] = v
        elif have != v:
            log.info("the driver runs with %s=%s (the job's default is %s)", k, have, v)
    return missing


def driver_settings(spark) -> dict:
    """What the driver really runs with, for the manifest.

    ``spark.driver.*`` in the conf only says what was asked for (under
    ``spark-submit`` a builder setting shows up there without any effect);
    ``jvm_args`` and ``jvm_max_heap_bytes`` come from the driver JVM itself.
    """
    sc = spark.sparkContext
    conf = sc.getConf()
    out: dict = {"master": sc.master, "deploy_mode": conf.get("spark.submit.deployMode", "client"),
                 "app_id": sc.applicationId, "launched_by_spark_submit": launched_by_spark_submit(),
                 **{k: conf.get(k, None) for k in ("spark.driver.memory", "spark.driver.extraJavaOptions")}}
    try:
        jvm = sc._jvm
        out["jvm_max_heap_bytes"] = int(jvm.java.lang.Runtime.getRuntime().maxMemory())
        out["jvm_args"] = [str(a) for a in jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments()]
    except Exception as e:  # Spark Connect or a JVM without the management bean: the conf is all there is
        log.debug("cannot read the driver JVM's settings: %s", e)
    return out


def check_java() -> None:
    """Fail early, with instructions, when no Java 17+ is on the PATH."""
    java = shutil.which("java", path=os.path.join(os.environ["JAVA_HOME"], "bin")) if os.environ.get("JAVA_HOME") else shutil.which("java")
    if not java:
        raise SystemExit(
            "Spark needs Java 17 or newer and none was found on PATH (or in $JAVA_HOME).\n"
            "Install it, e.g. on Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless"
        )


def get_spark(app_name: str = "rnnrec", extra_conf: dict[str, str] | None = None):
    """Return a SparkSession, respecting any master configured by the caller."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    check_java()
    builder = SparkSession.builder.appName(app_name)
    conf = dict(BASE_CONF)
    # Driver memory only matters in local mode, where the driver does all the work.
    conf.setdefault("spark.driver.memory", driver_memory())
    conf.update(extra_conf or {})
    if launched_by_spark_submit():
        # spark-submit always sets the master (its --master, default local[*]): a builder master
        # would override it. Driver JVM settings in the builder would only be recorded, not applied.
        launched = _launched_conf()
        wanted = {k: conf.pop(k) for k in DRIVER_LAUNCH_CONF if k in conf}
        missing = _missing_launch_settings(wanted, launched)
        if missing:
            flags = {"spark.driver.memory": "--driver-memory", "spark.driver.extraJavaOptions": "--driver-java-options"}
            args = shlex.join(a for k, v in missing.items()
                              for a in ((flags[k], v) if k in flags else ("--conf", f"{k}={v}")))
            log.warning("running under spark-submit, whose driver JVM was started without the job's %s; "
                        "the job cannot change them any more. Pass them to spark-submit: %s "
                        "(spark_jobs.session.submit_args(input_bytes) gives them)", ", ".join(missing), args)
        if os.environ.get("SPARK_MASTER") and os.environ["SPARK_MASTER"] != launched.get("spark.master"):
            log.warning("$SPARK_MASTER=%s is ignored: spark-submit's master is %s",
                        os.environ["SPARK_MASTER"], launched.get("spark.master"))
    elif os.environ.get("SPARK_MASTER"):
        builder = builder.master(os.environ["SPARK_MASTER"])
    elif not SparkConf().contains("spark.master") and "--master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
        builder = builder.master("local[*]")
    for k, v in conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("RNNREC_SPARK_LOG_LEVEL", "WARN"))
    return spark
