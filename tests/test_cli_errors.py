"""Error paths of the `personalize` command: one line, exit code 2, and nothing good overwritten by something bad."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from personalize.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def one_line(output: str) -> str:
    """The output with Rich's wrapping undone, to match a message however wide the terminal."""
    return " ".join(output.split())


def write_shop(tmp_path: Path, timestamp_format: str | None = None, ids: tuple[str, ...] = ("1", "2", "3"),
               order_id: bool = True, extra: str = "") -> Path:
    """A small CSV export (ids as given) and its mapping; ``order_id=False`` maps no order id."""
    a, b, c = ids
    (tmp_path / "orders.csv").write_text(
        "cust,invoice,when,qty,price\n"
        f"{a},A1,2024-01-02 10:00:00,2,3.50\n{a},A2,2024-03-05 11:00:00,1,10.00\n{a},A2,2024-03-05 11:00:00,1,10.00\n"
        f"{b},A3,2024-02-06 11:00:00,1,10.00\n{c},A6,2024-04-01 09:00:00,4,1.25\n")
    columns = "customer_id: cust, " + ("order_id: invoice, " if order_id else "") + \
        "timestamp: when, quantity: qty, unit_price: price"
    config = tmp_path / "shop.yaml"
    config.write_text(f"""
dataset: shop
tables:
  - table: transactions
    path: orders.csv
    columns: {{{columns}}}
""" + (f'    timestamp_format: "{timestamp_format}"\n' if timestamp_format else "") + extra)
    return config


@pytest.fixture
def small_synthetic(isolated_home: Path) -> str:
    """150 synthetic customers over 120 days (2024-01-01 on), ingested as `tiny`."""
    result = run("synth", "--customers", "150", "--days", "120", "--no-events", "--name", "tiny")
    assert result.exit_code == 0, result.output
    return "tiny"


# 1. features build: cutoffs before the data are an error, and the frame built before is kept
def test_cutoffs_before_the_data_are_one_line_and_keep_the_frame(small_synthetic: str, isolated_home: Path) -> None:
    # given a good frame
    assert run("features", "build", small_synthetic, "--horizon", "30", "--cutoffs", "1").exit_code == 0
    frame = isolated_home / "features" / small_synthetic / "training_frame.parquet"
    before = frame.read_bytes()
    # when a horizon longer than the history puts every cutoff before the first transaction
    result = run("features", "build", small_synthetic, "--horizon", "400")
    # then one line names the cutoffs and the data's range, and the frame is untouched
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert "fall before the data starts (transactions 2024-01-01 … " in text and "--horizon" in text, text
    assert "Traceback" not in result.output and "KeyError" not in result.output
    assert frame.read_bytes() == before
    # and an explicit cutoff before the data says which one
    result = run("features", "build", small_synthetic, "--horizon", "30", "--as-of", "2023-12-01")
    assert result.exit_code == 2 and "the cutoff(s) 2023-12-01 fall before the data starts" in one_line(result.output)
    assert frame.read_bytes() == before


# 2. ingest: every row quarantined is an error, and the copy ingested before is kept
def test_ingest_with_every_row_quarantined_fails_and_keeps_the_good_copy(tmp_path: Path, isolated_home: Path) -> None:
    # given a good ingest (some rows quarantined as duplicates: still exit code 0)
    good = run("ingest", str(write_shop(tmp_path)))
    assert good.exit_code == 0, good.output
    data = isolated_home / "data" / "shop"
    stored = {p.name: p.read_bytes() for p in data.iterdir()}
    assert json.loads((data / "ingest_report.json").read_text())["quarantined"] == 1
    # when the mapping's timestamp format is wrong, so no row parses
    result = run("ingest", str(write_shop(tmp_path, timestamp_format="%d/%m/%Y %H:%M")))
    # then one line with the reasons and the quarantine file, and the data set as it was
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    quarantine = isolated_home / "quarantine" / "shop" / "transactions.parquet"
    assert "every row of transactions was quarantined (5 rows: unparseable_timestamp 5)" in text, text
    assert f"-> {quarantine};" in text
    assert "timestamp_format" in text and "Traceback" not in result.output
    assert len(pd.read_parquet(quarantine)) == 5
    assert {p.name: p.read_bytes() for p in data.iterdir()} == stored


def test_ingest_says_what_to_check_beside_reasons_that_mean_a_mapping_to_fix(tmp_path: Path,
                                                                             isolated_home: Path) -> None:
    config = write_shop(tmp_path, extra="""  - table: customers
    path: customers.csv
    columns: {customer_id: cust, signup_at: since, consent: ok}
""")
    (tmp_path / "customers.csv").write_text("cust,since,ok\n1,2024-01-01,ja\n2,2024-01-01,yes\n3,2024-01-01,y\n")
    (tmp_path / "orders.csv").write_text((tmp_path / "orders.csv").read_text() + "2,A7,2024-04-02 09:00:00,1,\"4,5\"\n"
                                         "2,A8,2024-04-03 09:00:00,-1,10.00\n")  # a return no mapping marks
    result = run("ingest", str(config))
    assert result.exit_code == 0, result.output
    text = one_line(result.output)
    assert "shop.customers: 1 row unparseable_consent: accepted, in any case: 1, t, true, y, yes (true)" in text, text
    assert "shop.transactions: 1 row unparseable_amount: numbers are read as the mapping's csv.decimal says" in text
    assert "shop.transactions: 3 rows unknown_customer: check that the customers table" in text  # 1's rows
    assert "shop.transactions: 1 row negative_amount_not_return: a negative quantity or amount is a return: set " \
           "the mapping's return_prefix" in text


def test_ingest_with_every_row_quarantined_stores_nothing_new(tmp_path: Path, isolated_home: Path) -> None:
    result = run("ingest", str(write_shop(tmp_path, timestamp_format="%d/%m/%Y %H:%M")))
    assert result.exit_code == 2 and "nothing was stored" in one_line(result.output)
    assert not (isolated_home / "data" / "shop").exists()


# 3. a DATASET that is a file path, missing: "no such file", before any progress bar
@pytest.mark.parametrize("dataset", ["/tmp/nonexist.csv", "nonexist.parquet", "nowhere/shop.yaml", "x/y"])
def test_a_missing_table_file_is_no_such_file(dataset: str) -> None:
    result = run("train", "churn", dataset, "--label", "x", "--positive", "y")
    assert result.exit_code == 2, result.output
    assert one_line(result.output) == f"error: no such file: {Path(dataset)}"


# 4. rollback needs a reason
@pytest.mark.parametrize("reason", [None, "", "   "])
def test_rollback_needs_a_reason(reason: str | None) -> None:
    result = run("rollback", "churn", *(["--reason", reason] if reason is not None else []))
    assert result.exit_code == 2, result.output
    assert one_line(result.output) == ("error: rollback needs --reason TEXT: why the champion goes back, for the "
                                       "audit trail")


# 5. score: the data set the model was trained on by default, and the data set named when scoring fails
def test_score_defaults_to_the_training_data_set_and_names_the_one_it_scores(tmp_path: Path,
                                                                              isolated_home: Path) -> None:
    from features.pipeline import ingest_synthetic
    from features.synthetic import SyntheticConfig, generate
    from personalize.settings import Settings
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    # given a churn challenger trained on `shop` (categories) and a data set without categories, `plain`
    settings = Settings.from_env()
    ingest_synthetic(settings, "shop", generate(SyntheticConfig(customers=300, days=400, events=False)))
    fast = TuneConfig(trials=1, families=("lightgbm",), max_rounds=40, early_stopping_rounds=10, cv_folds=None)
    train_and_register(settings, "churn", "shop", TrainConfig(tune=fast, horizon_days=60), model_name="churn")
    config = write_shop(tmp_path).read_text().replace("dataset: shop", "dataset: plain")
    (tmp_path / "plain.yaml").write_text(config)
    assert run("ingest", str(tmp_path / "plain.yaml")).exit_code == 0
    # when scored without --dataset: the training data set, said so
    result = run("score", "churn", "--alias", "challenger", "--no-log")
    assert result.exit_code == 0, result.output
    assert "scoring shop, the data set churn@challenger was trained on" in one_line(result.output)
    assert len(pd.read_parquet(isolated_home / "scores" / "churn" / "v1" / "scores.parquet")) == 300
    # when scored on a data set that lacks its features: the data set named, the right one suggested
    result = run("score", "churn", "--alias", "challenger", "--no-log", "--dataset", "plain")
    assert result.exit_code == 2, result.output
    text = one_line(result.output)
    assert text.startswith("error: scoring data set 'plain' with churn@challenger: the frame lacks the model's")
    assert text.endswith("churn@challenger was trained on shop: try --dataset shop"), text


# 6. ids written as floats ("17850.0") are read as the integers they are, unless a mapping says otherwise
@pytest.mark.parametrize(("ids", "extra", "expected"), [
    (("17850.0", "13047.0", "12346.0"), "", ["12346", "13047", "17850"]),
    (("17850.0", "13047.0", "A1"), "", ["13047.0", "17850.0", "A1"]),  # not an id column exported through floats
    (("17850.0", "13047.0", "12346.0"), "    strip_float_ids: false\n", ["12346.0", "13047.0", "17850.0"]),
    (("17850.0", "13047.0", "A1"), "    strip_float_ids: true\n", ["13047", "17850", "A1"]),
])
def test_float_written_ids_are_read_as_integers(tmp_path: Path, isolated_home: Path, ids: tuple[str, ...],
                                                extra: str, expected: list[str]) -> None:
    result = run("ingest", str(write_shop(tmp_path, ids=ids, extra=extra)))
    assert result.exit_code == 0, result.output
    data = isolated_home / "data" / "shop"
    assert sorted(pd.read_parquet(data / "customers.parquet")["customer_id"]) == expected
    assert sorted(set(pd.read_parquet(data / "transactions.parquet")["customer_id"])) == expected


# 7. transactions without order ids: each line its own order, as the built-in CDNOW adapter makes them
def test_a_mapping_without_order_id_makes_one_order_per_line(tmp_path: Path, isolated_home: Path) -> None:
    result = run("ingest", str(write_shop(tmp_path, order_id=False)))
    assert result.exit_code == 0, result.output
    tx = pd.read_parquet(isolated_home / "data" / "shop" / "transactions.parquet")
    assert len(tx) == 5  # the repeated line is a second purchase, not a duplicate: nothing tells them apart
    assert sorted(tx.loc[tx["customer_id"] == "1", "order_id"]) == [
        "1-2024-01-02 10:00:00-0", "1-2024-03-05 11:00:00-0", "1-2024-03-05 11:00:00-1"]


def test_mapping_defaults_fill_absent_columns_and_a_typo_is_refused(tmp_path: Path, isolated_home: Path) -> None:
    # given a file with one row per order: no quantity, no category
    config = write_shop(tmp_path, extra="    defaults: {quantity: 1, category: misc}\n")
    config.write_text(config.read_text().replace(", quantity: qty", ""))
    # when ingested, the defaults fill both columns
    result = run("ingest", str(config))
    assert result.exit_code == 0, result.output
    tx = pd.read_parquet(isolated_home / "data" / "shop" / "transactions.parquet")
    assert set(tx["quantity"]) == {1} and set(tx["category"]) == {"misc"}
    # and a default for a column the contract does not have is an error, not silently ignored
    config.write_text(config.read_text().replace("quantity: 1", "qty: 1"))
    result = run("ingest", str(config))
    assert result.exit_code == 2 and "defaults for unknown contract column(s) ['qty']" in one_line(result.output)


@pytest.mark.parametrize("command", [["mlflow-ui"], ["serve"]])
def test_a_taken_port_is_one_line_before_any_server_starts(command: list[str], isolated_home: Path) -> None:
    import socket

    # Given another server listening on the port
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        # When the platform is asked to serve there, Then it says so in one line and exits 2 (mlflow ui says 0)
        result = runner.invoke(app, [*command, "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "Traceback" not in result.output


def test_a_time_column_in_another_format_says_how_to_read_it(tmp_path: Path, isolated_home: Path) -> None:
    rows = "\n".join(f"c{i},{1 + i % 12:02d}/15/2024,{i % 7},{'yes' if i % 2 == 0 else 'no'}" for i in range(240))
    (tmp_path / "us.csv").write_text("id,when,x,churned\n" + rows + "\n")
    args = ["train", "churn", str(tmp_path / "us.csv"), "--label", "churned", "--positive", "yes", "--id", "id",
            "--time", "when", "--trials", "1"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "unparseable_time 240" in refused.output and "--time-format" in refused.output
    read = runner.invoke(app, [*args, "--time-format", "%m/%d/%Y"])
    assert read.exit_code == 0 and "unparseable_time" not in read.output, read.output
    assert "registered churn version 1" in read.output and "out of time" in read.output, read.output


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg2://me:s3cret@db:5432/mlflow", "postgresql+psycopg2://…@db:5432/mlflow"),
    ("postgresql://me:s3/cr@t@db/x", "postgresql://…@db/x"),  # an unescaped / and @ in the password
    ("postgresql://db/x?user=me&password=s3cret", "postgresql://db/x?user=me&password=…"),
    ("redis://:s3cret@cache:6379/0", "redis://…@cache:6379/0"),
    ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),  # a path, no credentials
    ("http://mlflow:5000", "http://mlflow:5000"),
])
def test_urls_are_printed_without_their_credentials(url: str, shown: str, isolated_home: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from personalize.settings import redact

    assert redact(url) == shown
    monkeypatch.setenv("PERSONALIZE_OPTUNA_STORAGE", url)
    assert "s3cret" not in runner.invoke(app, ["info"]).output


def test_schedule_stops_on_ctrl_c_after_the_pass_under_way_and_says_what_it_did(isolated_home: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    # Given nothing promoted, the schedule refuses to watch nothing
    assert run("schedule", "--iterations", "1").exit_code == 2
    # And watching a model without a champion, each pass fails and the loop goes on, sleeping between rounds
    cli = Path(sys.executable).parent / "personalize"
    proc = subprocess.Popen([str(cli), "schedule", "churn", "--every", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 120
        seen = ""
        while "watching churn" not in seen and time.monotonic() < deadline:
            seen += proc.stdout.readline()
        time.sleep(3)  # into the first round or its sleep
        # When Ctrl-C comes, Then it stops within seconds, not at the end of the 60 s sleep, and sums up
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=45)
    finally:
        proc.kill()
    assert proc.returncode == 0 and time.monotonic() - began < 40, out
    assert "stopping (after the pass under way, if one is" in out, out
    assert "stopped after 1 round(s): 1 pass(es), 1 failed" in out, out


def test_a_json_command_that_fails_prints_a_json_error_and_refuses_a_window_that_is_no_length(
        isolated_home: Path) -> None:
    result = run("monitor", "churn", "--json")
    assert result.exit_code == 2
    assert "error" in json.loads(result.stdout.strip().splitlines()[-1]), result.stdout
    result = run("monitor", "churn", "--window", "0")
    assert result.exit_code == 2 and "--window 0: a window is a positive number of days" in one_line(result.output)


@pytest.mark.parametrize(("args", "message"), [
    (("train", "purchase-cycle", "shop", "--candidates", "bgnbd,foo"),
     "error: --candidates 'foo': input should be 'bgnbd', 'pareto_nbd', 'aft' or 'hybrid'"),
    (("train", "forecast", "shop", "--measure", "revenue"),
     "error: --measure 'revenue': input should be 'orders', 'spend' or 'units'"),
    (("train", "churn", "shop", "--family", "catboost"), "error: --family 'catboost': input should be 'lightgbm'"),
    (("train", "churn", "shop", "--calibration", "iso"), "error: --calibration 'iso': input should be 'sigmoid'"),
])
def test_a_value_an_option_cannot_take_names_the_option_and_the_value(isolated_home: Path, args: tuple[str, ...],
                                                                      message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2 and one_line(result.output).startswith(message), result.output
    assert "pydantic" not in result.output


def test_a_purchase_cycle_horizon_the_data_cannot_hold_says_how_long_the_data_runs(tmp_path: Path,
                                                                                   isolated_home: Path) -> None:
    assert run("ingest", str(write_shop(tmp_path))).exit_code == 0  # 2024-01-02 to 2024-04-01
    for args, message in ((["--horizon", "400"], "a 400-day horizon needs history before"),
                          (["--calibration-end", "2030-01-01"], "the calibration end 2030-01-01 leaves nothing to hold "
                                                                "out")):
        result = run("train", "purchase-cycle", "shop", *args)
        text = one_line(result.output)
        assert result.exit_code == 2 and message in text and "shop runs 91 days (2024-01-02 to 2024-04-01)" in text, \
            text


def test_a_horizon_of_centuries_is_one_line_not_a_calendar_overflow(small_synthetic: str) -> None:
    result = run("train", "churn", small_synthetic, "--horizon", "3000", "--trials", "1")
    text = one_line(result.output)
    assert result.exit_code == 2 and "too few for an out-of-time split with a 3000-day horizon" in text, text
    for task in ("churn", "purchase-cycle"):
        result = run("train", task, small_synthetic, "--horizon", "100000")
        text = one_line(result.output)
        assert result.exit_code == 2 and "--horizon 100000: input should be less than or equal to 3650" in text, text
        assert "Traceback" not in result.output
