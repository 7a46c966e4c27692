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
    # the rerun registered new challengers (churn's after the first run's retrain)
    assert models["churn"]["version"] == ("3" if first["retrained"] else "2")
    assert all(m["version"] == "2" for name, m in models.items() if name != "churn")
    # every challenger went through the gate; on the shared data the first run's gate crowned version 1
    assert all(m["gate"] == "pass" or m["gate"].startswith("fail: ") for m in models.values()), models
    assert all(models[m]["champion"] in ("1", "2") for m in ("churn_telco", "purchase_forecast", "purchase_cycle"))
    # the Telco champion scored Telco's CSV file as a table of new customers: every row, the 11 blank TotalCharges
    # missing (as in training), none quarantined
    assert last["table_scoring"]["rows_in"] == last["table_scoring"]["scored"] == 7_043
    assert last["table_scoring"]["quarantined"] == 0 and 0 < last["table_scoring"]["action_rate"] < 1
    scores = __import__("pandas").read_parquet(last["table_scoring"]["scores"])
    assert scores["customerID"].is_unique and len(scores) == 7_043  # the training table's id column, by default
    # the batch went to the prediction log and was monitored: the same customers as the reference, no drift
    assert last["table_scoring"]["logged"] == last["table_scoring"]["monitored_rows"] == 7_043
    assert last["table_scoring"]["drift_share"] < 0.2 and not last["table_scoring"]["prediction_drift_detected"]
    assert (isolated_home / "features" / "cdnow" / "training_frame.parquet").exists()
    # every CDNOW customer (all first bought in Q1 1997) got next-purchase answers from the cycle champion
    cycle = last["cycle_scoring"]
    assert cycle["customers"] == 23_570 and cycle["horizon_days"] == 90 and cycle["as_of"] == "1998-07-01"
    assert 0 < cycle["likely_buyers"] < cycle["customers"] and cycle["expected_purchases"] > 0
    # the API answered from the champions and logged every scored item
    assert last["served_versions"]["forecast"] in ("1", "2") and last["requests_served"] >= 1
    assert last["served_items"] == last["logged_rows"] > 0
    # the loop: traffic before and after the change went through the server and was monitored (an Evidently report
    # for each window); the windows after the change alerted, the policy retrained, and the JSON says what the gate
    # and the server did
    for run in outputs:
        assert set(run) >= {"demo", "wall_s", "models", "requests_served", "alerts", "retrained",
                            "served_version_changed"}
        assert run["requests_served"] > 400  # the examples, the experiment's traffic, the replayed windows
        stages = run["stages_s"]  # where the time went: every stage timed, together about the whole run
        assert {"ingest online_retail", "features + labels cdnow", "promotion gates"} <= set(stages)
        assert 0.8 * run["wall_s"] <= sum(stages.values()) <= run["wall_s"] + 1, stages
        if run["models"]["churn"]["before"] is None:  # the gate refused every churn version: nothing to monitor
            assert not run["retrained"] and not run["monitoring"]
            continue
        windows = run["monitoring"]
        assert len(windows) == 3 and all(w["rows"] > 0 for w in windows)
        assert windows[1]["alerts"] and windows[2]["alerts"] and run["alerts"] >= 2
        assert run["retrained"] and run["retrain"]["champion_before"] == run["models"]["churn"]["before"]
        churn = run["models"]["churn"]
        assert (churn["after"] != churn["before"]) == run["retrain"]["promoted"] == run["served_version_changed"]
    assert list((isolated_home / "monitoring" / "reports" / "churn").glob("*-drift.html"))
