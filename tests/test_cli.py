"""The `personalize` command as a user meets it: help everywhere, one-line errors, a small run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from features.store import read_frame
from personalize.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize("command", [[], ["ingest"], ["synth"], ["features"], ["features", "build"],
                                     ["features", "get"], ["demo"], ["info"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_the_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "personalize"
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "ingest" in result.stdout


def write_config(tmp_path: Path, column: str = "qty") -> Path:
    (tmp_path / "orders.csv").write_text(
        "cust,invoice,when,qty,price\n"
        "1,A1,2024-01-02 10:00:00,2,3.50\n1,A2,2024-03-05 11:00:00,1,10.00\n"
        "2,A3,2024-02-06 11:00:00,1,10.00\n,A4,2024-02-07 09:00:00,1,3.50\n"
        "2,A5,not a date,1,3.50\n3,A6,2024-04-01 09:00:00,4,1.25\n")
    config = tmp_path / "shop.yaml"
    config.write_text(f"""
dataset: shop
tables:
  - table: transactions
    path: orders.csv
    columns: {{customer_id: cust, order_id: invoice, timestamp: when, quantity: {column}, unit_price: price}}
""")
    return config


def test_bring_your_own_transactions_by_config(tmp_path: Path, isolated_home: Path) -> None:
    # given a shop's CSV export and a mapping written next to it
    config = write_config(tmp_path)
    # when it is ingested and its features built
    result = run("ingest", str(config))
    assert result.exit_code == 0, result.output
    report = json.loads((isolated_home / "data" / "shop" / "ingest_report.json").read_text())
    assert report["rows_in"] == 6 and report["quarantined"] == 2
    assert report["tables"]["transactions"]["reasons"] == {"missing_customer_id": 1, "unparseable_timestamp": 1}
    quarantine = pd.read_parquet(isolated_home / "quarantine" / "shop" / "transactions.parquet")
    assert sorted(quarantine["_source_row"]) == [4, 5] and "when" in quarantine.columns
    result = run("features", "build", "shop", "--horizon", "30", "--cutoffs", "1", "--as-of", "2024-03-01")
    assert result.exit_code == 0, result.output
    # then the frame holds the customers known at the cutoff, with provenance
    frame = read_frame(isolated_home / "features" / "shop" / "training_frame.parquet")
    assert frame["customer_id"].tolist() == ["1", "2"]
    assert frame["propensity"].tolist() == [1, 0]
    assert frame.attrs["feature_version"] == "customer_features_v1"


def test_a_broken_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, column="quantity")
    result = runner.invoke(app, ["ingest", str(config)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "orders.csv, column 'quantity': mapped column is missing" in result.output.replace("\n", "")


@pytest.mark.parametrize(("args", "message"), [
    (["ingest", "nonsense"], "unknown data set 'nonsense'"),
    (["features", "build", "nowhere"], "no data set 'nowhere'"),
    (["features", "build", "../shared/data/telco.csv"], "a file, where a data set name goes"),
    (["materialize", "/tmp/orders.parquet"], "a file, where a data set name goes"),
    (["segments", "cluster", "data/x"], "a file, where a data set name goes"),
    (["serve", "--model", "churn"], "'churn': give ENDPOINT=MODEL"),  # before any server starts
    (["bento", "build", "--no-build", "--model", "nosuch=churn_telco"], "'nosuch=churn_telco': give ENDPOINT=MODEL"),
    (["bento", "build", "--no-build", "--models", ","], "--models ',': name at least one registered model"),
    (["bento", "build", "--no-build", "--models", "churn_telco"],  # carried, served by no endpoint: all 503s
     "no endpoint would serve churn_telco: give --model ENDPOINT=NAME (e.g. --model churn=churn_telco)"),
])
def test_user_mistakes_are_one_line_errors(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output.replace("\n", "") and "Traceback" not in result.output


def test_synth_then_features_then_lookup(isolated_home: Path) -> None:
    result = run("synth", "--customers", "200", "--days", "365", "--seed", "7", "--name", "tiny")
    assert result.exit_code == 0, result.output
    truth = pd.read_parquet(isolated_home / "data" / "tiny" / "truth.parquet")
    assert len(truth) == 200 and "segment" in truth
    result = run("features", "build", "tiny", "--horizon", "60", "--cutoffs", "2", "--step", "30")
    assert result.exit_code == 0, result.output
    frame = read_frame(isolated_home / "features" / "tiny" / "training_frame.parquet")
    assert frame["sessions_28d"].gt(0).any() and frame["cart_adds_28d"].gt(0).any()
    one = frame[frame["frequency"] > 2].iloc[0]
    result = run("features", "get", "tiny", one["customer_id"], "--as-of", str(one["cutoff"]))
    assert result.exit_code == 0, result.output
    values = json.loads(result.output)
    assert values["frequency"] == one["frequency"] and values["monetary_total"] == one["monetary_total"]
    # by default, the values the online store serves
    assert run("materialize", "tiny").exit_code == 0
    from serving.online import default_url, open_store

    stored = open_store(default_url(isolated_home, "tiny"), "tiny").get_many([one["customer_id"]])[one["customer_id"]]
    result = run("features", "get", "tiny", one["customer_id"])
    assert result.exit_code == 0, result.output
    values = json.loads(result.output)
    assert {k: values[k] for k in stored["features"]} == pytest.approx(stored["features"], nan_ok=True)


def test_synth_drift_dropout_is_parsed_and_a_bad_one_is_a_usage_error(isolated_home: Path) -> None:
    result = run("synth", "--customers", "100", "--days", "200", "--drift-start", "2024-04-01",
                 "--drift-dropout", "books=3", "--drift-dropout", "toys=0.5", "--name", "changed")
    assert result.exit_code == 0, result.output
    assert (isolated_home / "data" / "changed" / "truth.parquet").exists()
    for bad, says in (("books", "expected CATEGORY=FACTOR"), ("cars=2", "unknown categories ['cars']"),
                      ("books=-1", "positive number")):
        result = run("synth", "--customers", "10", "--drift-dropout", bad)
        assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
