"""SparkSession creation: never hard-codes a master.

The master comes from, in order: ``spark-submit --master`` (already in the
launched JVM's conf), ``$SPARK_MASTER``, and only when neither is set,
``local[*]`` so that ``python -m spark_jobs.preprocess`` works out of the box.
"""
from __future__ import annotations

import os
import shutil
import sys

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
    master = os.environ.get("SPARK_MASTER")
    if master:
        builder = builder.master(master)
    elif not SparkConf().contains("spark.master") and "--master" not in os.environ.get("PYSPARK_SUBMIT_ARGS", ""):
        builder = builder.master("local[*]")
    conf = dict(BASE_CONF)
    # Driver memory only matters in local mode, where the driver does all the work.
    conf.setdefault("spark.driver.memory", os.environ.get("RNNREC_SPARK_DRIVER_MEMORY", "4g"))
    conf.update(extra_conf or {})
    for k, v in conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("RNNREC_SPARK_LOG_LEVEL", "WARN"))
    return spark
