"""The Spark engine: the same Ibis definitions and the same registered model give the same values as DuckDB.

Spark runs in local mode (``local[2]``) inside the test process; without pyspark or a Java runtime the module is
skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from personalize.settings import Settings

pytestmark = pytest.mark.slow
pyspark = pytest.importorskip("pyspark", reason="the spark extra is not installed")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("no Java runtime (java on PATH or JAVA_HOME): Spark cannot start", allow_module_level=True)


@pytest.fixture(scope="module")
def spark():
    from features.engines import spark_session

    session = spark_session("local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, spark) -> Path:
    """Small synthetic data, its training frame and a churn champion (one quick LightGBM trial)."""
    from features.pipeline import build_training_frame, ingest_synthetic
    from features.synthetic import SyntheticConfig, generate
    from training.registry import GateConfig, connect, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    home = tmp_path_factory.mktemp("spark") / "home"
    settings = Settings(home=home)
    ingest_synthetic(settings, "shop", generate(SyntheticConfig(customers=300, days=400, seed=7)))
    build_training_frame(settings, "shop", horizon_days=60, cutoffs=2)
    fast = TuneConfig(trials=1, families=("lightgbm",), max_rounds=60, early_stopping_rounds=10, cv_folds=None)
    train_and_register(settings, "churn", "shop", TrainConfig(tune=fast, horizon_days=60), model_name="churn")
    promote(connect(settings.tracking_uri), "churn", GateConfig(bootstrap_rounds=100), reason="spark tests", force=True)
    return home


def test_features_and_labels_are_identical_on_spark_and_duckdb(home: Path, spark) -> None:
    from features.definitions import FeatureSpec
    from features.engines import connect
    from features.store import FeatureStore, default_cutoffs

    dataset = home / "data" / "shop"
    duck = FeatureStore(dataset)
    cuts = default_cutoffs(duck.observed_until(), 60, 3, 30)
    spec = FeatureSpec(categories=duck.top_categories(cuts[0], 5))

    on_duckdb = duck.training_frame(cuts, 60, spec)
    on_spark = FeatureStore(dataset, connect("spark")).training_frame(cuts, 60, spec)

    assert len(on_duckdb) > 500 and on_duckdb["churn"].nunique() == 2
    pd.testing.assert_frame_equal(on_spark, on_duckdb, check_exact=False, rtol=1e-12)
    assert on_spark.attrs == on_duckdb.attrs  # the same provenance: definition and data fingerprints
    one = on_duckdb["customer_id"].iloc[0]
    assert FeatureStore(dataset, connect("spark")).features_for(one, cuts[-1], spec) == duck.features_for(
        one, cuts[-1], spec)


def test_spark_batch_scores_through_spark_udf_equal_the_duckdb_path(home: Path, spark) -> None:
    from serving.batch import score_dataset
    from serving.predlog import load_salt, pseudonymize, read_log
    from training.registry import connect

    settings = Settings(home=home)
    client, salt = connect(settings.tracking_uri), load_salt(home)
    local = score_dataset(client, "churn", home / "data" / "shop", home / "scores", log_root=home / "local-log",
                          salt=salt)
    local_scores = pd.read_parquet(local.path).set_index("customer_id").sort_index()

    distributed = score_dataset(client, "churn", home / "data" / "shop", home / "scores", engine="spark",
                                log_root=settings.log_root, salt=salt)

    assert distributed.path == local.path and distributed.path.is_dir()  # Spark's parts replaced the file
    spark_scores = pd.read_parquet(distributed.path).set_index("customer_id").sort_index()
    assert distributed.rows == local.rows == len(spark_scores) == len(local_scores) >= 250
    assert list(spark_scores.index) == list(local_scores.index)
    np.testing.assert_allclose(spark_scores["probability"], local_scores["probability"], rtol=0, atol=1e-9)
    assert (spark_scores["decision"] == local_scores["decision"]).all()
    assert (spark_scores["version"] == "1").all() and (spark_scores["model"] == "churn").all()
    assert (spark_scores["as_of"] == local_scores["as_of"]).all()
    assert not list(distributed.path.glob(".*.crc"))

    # Spark wrote the prediction-log rows as the DuckDB path does: same keys, features (JSON) and outputs
    def logged(root: Path) -> pd.DataFrame:
        rows = read_log(root)
        assert set(rows["endpoint"]) == {"batch"} and rows["request_id"].nunique() == 1
        return rows.set_index("customer_key").sort_index()

    assert distributed.logged == local.logged == distributed.rows and distributed.request_id
    assert not list(settings.log_root.glob(".spark-*"))  # the staging folder is gone
    ours, theirs = logged(settings.log_root), logged(home / "local-log")
    assert list(ours.index) == list(theirs.index) == sorted(pseudonymize(c, salt) for c in local_scores.index)
    assert [json.loads(o) for o in ours["outputs"]] == [json.loads(o) for o in theirs["outputs"]]
    spark_features = pd.DataFrame([json.loads(f) for f in ours["features"]])
    duck_features = pd.DataFrame([json.loads(f) for f in theirs["features"]])
    assert list(spark_features.columns) == list(duck_features.columns)
    pd.testing.assert_frame_equal(spark_features, duck_features, check_dtype=False, rtol=1e-12)

    # an erasure reaches Spark's part files, and Spark still reads the rewritten directory
    from personalize.erasure import forget

    gone = spark_scores.index[0]
    report = forget(Settings(home=home), gone, environ={})
    assert not report.remaining, report.remaining
    again = spark.read.parquet(str(distributed.path)).toPandas()
    assert len(again) == len(spark_scores) - 1 and gone not in set(again["customer_id"])


def test_materialize_on_spark_fills_the_online_store_like_duckdb(home: Path, spark) -> None:
    import sqlite3

    from serving.online import materialize

    dataset = home / "data" / "shop"
    tracking = Settings(home=home).tracking_uri
    duck = materialize(dataset, f"sqlite:///{home / 'duck.sqlite'}", tracking_uri=tracking)
    on_spark = materialize(dataset, f"sqlite:///{home / 'spark.sqlite'}", tracking_uri=tracking, engine="spark")

    assert on_spark.customers == duck.customers > 250

    def rows(name: str) -> list[tuple]:
        with sqlite3.connect(home / name) as con:
            return con.execute("SELECT * FROM customers ORDER BY customer_id").fetchall()

    assert rows("spark.sqlite") == rows("duck.sqlite")


def test_the_cli_builds_features_on_spark(home: Path, spark) -> None:
    from typer.testing import CliRunner

    from personalize.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["--home", str(home), "features", "build", "shop", "--horizon", "60", "--cutoffs", "1",
                               "--engine", "spark"])  # in process: the module's Spark session is reused
    assert done.exit_code == 0, done.output
    assert "Training frames" in done.output and (home / "features" / "shop" / "training_frame.parquet").exists()
    bad = runner.invoke(app, ["--home", str(home), "features", "build", "shop", "--engine", "hadoop"])
    assert bad.exit_code == 2 and "is not an engine" in bad.output
