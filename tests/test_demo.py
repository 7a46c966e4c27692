"""The front door: `personalize demo` runs end to end on the shared data and ends with one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from personalize.cli import app


def test_the_demo_runs_end_to_end_and_twice(isolated_home: Path, data_root: Path) -> None:
    runner = CliRunner()
    outputs = []
    for spark in ("--spark", "--no-spark"):  # rerunnable without cleaning by hand; Spark's JVM once is enough
        result = runner.invoke(app, ["demo", "--customers", "300", "--trials", "2", "--data-root", str(data_root),
                                     spark], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.output.strip().splitlines()[-1]))
    first, last = outputs
    if "skipped" not in first["spark"]:  # pyspark and Java are there: the two engines agree
        assert first["spark"]["same_customers"] and first["spark"]["max_abs_diff"] < 1e-9
        assert first["spark"]["rows"] > 250
    assert last["spark"] == {"skipped": "--no-spark"}
    assert last["demo"] == "ok"
    assert last["datasets"]["online_retail"] == {"rows_in": 541_909, "quarantined": 140_307}
    assert set(last["frames"]) == {"online_retail", "cdnow", "synthetic"}
    models = last["models"]
    assert models["churn_telco"]["value"] > 0.8 and models["churn_telco"]["baseline"] == 0.5
    assert models["churn"]["value"] > 0.6 and models["propensity"]["value"] > 0.6
    assert models["purchase_forecast"]["value"] < models["purchase_forecast"]["baseline"]
    assert all(m["version"] == "2" for m in models.values())  # the rerun registered new challengers
    # every challenger went through the gate; on the shared data the first run's gate crowned version 1
    assert all(m["gate"] == "pass" or m["gate"].startswith("fail: ") for m in models.values()), models
    assert all(models[m]["champion"] in ("1", "2") for m in ("churn_telco", "purchase_forecast", "purchase_cycle"))
    assert (isolated_home / "features" / "cdnow" / "training_frame.parquet").exists()
    # the API answered from the champions and logged every scored item
    assert last["served_versions"]["forecast"] in ("1", "2") and last["requests_served"] >= 1
    assert last["served_items"] == last["logged_rows"] > 0
    # replayed windows were monitored: Evidently reports persisted for each, with the stream's rows
    if models["churn"]["champion"]:
        assert [w["stream"] for w in last["monitoring"]] == ["stationary", "stationary", "activity -60%"]
        assert all(w["rows"] > 0 for w in last["monitoring"])
        assert list((isolated_home / "monitoring" / "reports" / "churn").glob("*-drift.html"))
