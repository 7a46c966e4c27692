"""The engines the feature definitions run on: DuckDB in process (the default) or Spark, through Ibis.

    personalize features build shop --engine spark       # the same definitions, executed by Spark
    personalize score churn --dataset shop --engine spark # features on Spark, the champion in mlflow.pyfunc.spark_udf

The feature and label definitions (:mod:`features.definitions`, :mod:`features.labels`) are Ibis expressions; an
engine is only the Ibis backend they are compiled for and the way the offline store's Parquet files become tables
of that backend (:func:`read_table`). Nothing else changes between engines, which the parity test checks value by
value.

Spark: :func:`spark_session` joins the active session, or builds one for ``PERSONALIZE_SPARK_MASTER`` (default
``local[*]``; a cluster's ``spark://``/``yarn``/``k8s://`` master, or a ``sc://`` Spark Connect address), with any
settings of ``PERSONALIZE_SPARK_CONF`` (:func:`spark_conf`). Two session
settings are the platform's, never the cluster's: timestamps are read and computed in UTC (the store's timestamps
are naive UTC), and Parquet ``TIMESTAMP(NANOS)`` columns, which Spark refuses to read as timestamps, are read as
integers and converted to microsecond timestamps (the raw tables hold whole seconds; nothing is lost). Results
reach pandas through Arrow; Parquet that Spark writes has microsecond timestamps.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

import ibis
import ibis.expr.types as ir

from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)
Engine = Literal["duckdb", "spark"]
ENGINES: tuple[Engine, ...] = ("duckdb", "spark")
TIME_COLUMNS = ("timestamp", "signup_at")  # the raw contract's timestamp columns (features.store.ARROW_SCHEMAS)


def spark_session(master: str | None = None, app_name: str = "personalize") -> Any:
    """The active Spark session, or a new one for ``master`` (default ``PERSONALIZE_SPARK_MASTER``, else
    ``local[*]``), with the platform's two session settings applied."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise PersonalizeError("the Spark engine needs pyspark: pip install 'personalize[spark]' (and a Java 17+ "
                               "runtime)") from None
    session = SparkSession.getActiveSession()
    if session is None:
        master = master or os.environ.get("PERSONALIZE_SPARK_MASTER") or "local[*]"
        builder = SparkSession.builder.appName(app_name)
        if master.startswith("sc://"):
            builder = builder.remote(master)
        else:
            builder = builder.master(master)
            if master.startswith("local"):
                # Python workers (the scoring UDF) run this interpreter, with its packages, unless told otherwise;
                # pyspark reads the variable when the context starts.
                os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                builder = (builder.config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
                           # one machine: a few shuffle partitions per core, not Spark's cluster default of 200
                           .config("spark.sql.shuffle.partitions", str(4 * (os.cpu_count() or 1))))
        for key, value in spark_conf().items():
            builder = builder.config(key, value)
        try:
            session = builder.getOrCreate()
        except Exception as exc:  # no Java, an unreachable master
            raise PersonalizeError(f"cannot start Spark ({master}): {str(exc).splitlines()[0][:300]}") from None
        if not master.startswith("sc://"):
            session.sparkContext.setLogLevel("ERROR")
        log.info("Spark %s session on %s", session.version, master)
    session.conf.set("spark.sql.session.timeZone", "UTC")
    session.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
    session.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")  # results reach pandas through Arrow
    # Parquet written by Spark (batch scores) with standard microsecond timestamps, not the legacy INT96 that
    # other readers widen to nanoseconds and so rewrite in a type Spark then refuses (an erasure rewrites parts)
    session.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    return session


def spark_conf(text: str | None = None) -> dict[str, str]:
    """Spark settings for a new session from ``PERSONALIZE_SPARK_CONF`` ("key=value,key=value", e.g.
    ``spark.driver.memory=8g,spark.sql.shuffle.partitions=64``); they override the local defaults above."""
    text = os.environ.get("PERSONALIZE_SPARK_CONF", "") if text is None else text
    conf = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().startswith("spark."):
            raise PersonalizeError(f"PERSONALIZE_SPARK_CONF: {item!r} is not spark.key=value")
        conf[key.strip()] = value.strip()
    return conf


def connect(engine: Engine = "duckdb", spark_master: str | None = None) -> ibis.BaseBackend:
    """An Ibis backend for ``engine``: an in-memory DuckDB, or PySpark on :func:`spark_session`."""
    if engine == "duckdb":
        return ibis.duckdb.connect()
    if engine == "spark":
        return ibis.pyspark.connect(spark_session(spark_master))
    raise PersonalizeError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")


def engine_of(con: ibis.BaseBackend) -> Engine:
    return "spark" if con.name == "pyspark" else "duckdb"


def read_table(con: ibis.BaseBackend, path: Path, name: str) -> ir.Table:
    """One of the offline store's Parquet files as a table of ``con`` (on Spark, a temporary view named after
    ``name`` and the file, so several data sets can share a session)."""
    if con.name != "pyspark":
        return con.read_parquet(path)
    import pyspark.sql.functions as F
    from pyspark.sql.types import LongType

    frame = con._session.read.parquet(str(Path(path).resolve()))
    for field in frame.schema.fields:
        if field.name in TIME_COLUMNS and isinstance(field.dataType, LongType):  # nanoseconds since the epoch
            frame = frame.withColumn(field.name, F.timestamp_micros(F.floor(F.col(field.name) / 1000)))
    view = f"personalize_{name}_{abs(hash(str(Path(path).resolve()))):x}"
    frame.createOrReplaceTempView(view)
    return con.table(view)


def to_spark(con: ibis.BaseBackend, expr: ir.Table) -> Any:
    """The Spark DataFrame of an expression compiled for a PySpark backend (nothing is collected). The
    pre-execute hooks register the expression's in-memory tables (the cutoffs) with the session, as
    ``execute`` would."""
    con._run_pre_execute_hooks(expr)
    return con._session.sql(con.compile(expr))
