"""Training, registration and promotion: from a labeled table or transactions to a gated champion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from personalize.cli import app
from personalize.errors import PersonalizeError
from personalize.settings import Settings
from training.evaluate import FixedThreshold, expected_calibration_error
from training.registry import (
    CHALLENGER,
    CHAMPION,
    GateConfig,
    RegistryError,
    aliases,
    champion_stack,
    conform,
    connect,
    history,
    promote,
    rollback,
)
from training.train import Calibrator, TrainConfig, oot_cutoffs, stable_parts, train_and_register
from training.tune import TuneConfig

runner = CliRunner()
FAST = TuneConfig(trials=2, families=("lightgbm",), max_rounds=200, early_stopping_rounds=20)


def churn_table(n: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """A churn table no adapter knows, with a planted logistic truth; returns it and the true probabilities."""
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, n)
    calls = rng.poisson(2, n)
    plan = rng.choice(["basic", "plus", "pro"], n, p=[0.5, 0.3, 0.2])
    region = rng.choice(["north", "south"], n)
    logit = -1.0 - 0.05 * (tenure - 36) + 0.6 * (calls - 2) + np.select([plan == "basic", plan == "pro"], [0.8, -0.8], 0)
    p = 1 / (1 + np.exp(-logit))
    left = np.where(rng.random(n) < p, "Y", "N")
    frame = pd.DataFrame({"acct": [f"A{i:05d}" for i in range(n)], "tenure_m": tenure, "support_calls": calls,
                          "plan": plan, "region": region, "monthly_fee": np.round(rng.normal(50, 10, n), 2),
                          "left": left})
    return frame, p


def settings() -> Settings:
    return Settings.from_env()


def ingest_table(tmp_path: Path, frame: pd.DataFrame, name: str = "mychurn") -> str:
    from features.labeled import LabeledTableSpec, load_labeled
    from features.pipeline import ingest_labeled

    path = tmp_path / f"{name}.csv"
    frame.to_csv(path, index=False)
    spec = LabeledTableSpec(path=path, label_column="left", positive="Y", id_column="acct")
    ingest_labeled(settings(), name, load_labeled(spec))
    return name


# --- pure parts ------------------------------------------------------------------------------------------------
def test_platt_calibration_fixes_shifted_scores_without_reordering() -> None:
    rng = np.random.default_rng(1)
    truth = rng.uniform(0.02, 0.6, 20_000)
    y = (rng.random(truth.size) < truth).astype(int)
    odds = truth / (1 - truth) * 3.0  # what scale_pos_weight=3 does: every odds three times too high
    raw = odds / (1 + odds)
    calibrated = Calibrator("sigmoid").fit(raw, y).transform(raw)
    assert expected_calibration_error(y, calibrated) < 0.02 < expected_calibration_error(y, raw)
    assert np.array_equal(np.argsort(calibrated, kind="stable"), np.argsort(raw, kind="stable"))
    iso = Calibrator("isotonic").fit(raw, y)
    again = Calibrator.from_dict(json.loads(json.dumps(iso.to_dict())))
    assert np.allclose(again.transform(raw), iso.transform(raw))


def test_hash_split_is_stratified_and_keeps_each_row_in_its_part() -> None:
    frame, _ = churn_table(3000)
    frame["label"] = (frame["left"] == "Y").astype(int)
    parts = stable_parts(frame, "acct", 0.2, 0.2)
    for name, share in (("test", 0.2), ("valid", 0.2), ("train", 0.6)):
        assert abs((parts == name).mean() - share) < 0.01
        assert abs(frame.loc[parts == name, "label"].mean() - frame["label"].mean()) < 0.01
    # Given more rows and a shuffled order, when split again, then every old row keeps its part
    more, _ = churn_table(4000, seed=5)
    more["acct"] = [f"B{i:05d}" for i in range(len(more))]
    more["label"] = (more["left"] == "Y").astype(int)
    bigger = pd.concat([frame, more]).sample(frac=1, random_state=3).reset_index(drop=True)
    again = stable_parts(bigger, "acct", 0.2, 0.2)
    old = dict(zip(frame["acct"], parts))
    moved = sum(old[a] != p for a, p in zip(bigger["acct"], again) if a in old)
    assert moved / len(frame) < 0.02  # only rows at a class's quantile boundary can move


def test_out_of_time_cutoffs_keep_validation_labels_before_the_test() -> None:
    train, valid, test = oot_cutoffs(pd.Timestamp("2011-12-09 12:50"), 90, 2, 30)
    assert test == pd.Timestamp("2011-09-10") and valid + pd.Timedelta(days=90) == test
    assert train == [valid - pd.Timedelta(days=60), valid - pd.Timedelta(days=30)]


# --- the whole job -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_new_churn_table_trains_registers_and_is_promoted_by_the_gate(tmp_path: Path) -> None:
    frame, truth = churn_table()
    name = ingest_table(tmp_path, frame)
    config = TrainConfig(tune=FAST, fairness_attribute="region")
    first = train_and_register(settings(), "churn", name, config, model_name="mychurn")
    client = connect(settings().tracking_uri)

    # The version: the challenger, with its provenance and a model that loads from the registry
    assert first.version == "1" and aliases(client, "mychurn") == {CHAMPION: None, CHALLENGER: "1"}
    tags = client.get_model_version("mychurn", "1").tags
    assert tags["dataset"] == name and tags["data_fingerprint"] and tags["feature_version"] == f"labeled:{name}"
    model = mlflow.pyfunc.load_model("models:/mychurn@challenger")
    test = first.trained.prepared.test
    out = model.predict(conform(test, model.metadata.get_input_schema()))
    assert np.allclose(out["probability"], first.trained.test_scores)
    assert (out["decision"] == (out["probability"] >= first.trained.threshold["threshold"])).all()
    assert model.metadata.get_input_schema().input_names() == first.trained.prepared.columns.features
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"model_card.md", "calibration_curve.png", "feature_importance.csv", "feature_importance.png",
            "decision.json", "heldout"} <= artifacts

    # Close to what the truth itself scores on the same held-out rows
    oracle = roc_auc_score(test["label"], truth[test.index])
    assert first.trained.test_metrics["roc_auc"] > oracle - 0.03

    # The first version becomes champion by beating a constant; the verdict lands on the version and its card
    report = promote(client, "mychurn", GateConfig())
    assert report.passed and report.champion is None
    assert aliases(client, "mychurn")[CHAMPION] == "1"
    assert client.get_model_version("mychurn", "1").tags["gate.verdict"] == "pass"
    card = mlflow.artifacts.load_text(f"runs:/{first.run_id}/model_card.md")
    assert "Promotion gate" in card and "beats_baseline" in card
    # Trials were cross-validated, so the shipped booster also learned from the validation rows and was calibrated
    # on out-of-fold predictions
    p = first.trained.prepared
    assert f"trained on: the training and validation parts ({len(p.train) + len(p.valid):,} rows)" in card
    assert "calibration: sigmoid on out-of-fold predictions" in card
    assert first.trained.calibration_rows == len(p.train) + len(p.valid)

    # A much weaker challenger is refused and the champion stays
    weak = TuneConfig(trials=1, families=("xgboost",), max_rounds=1, early_stopping_rounds=1)
    second = train_and_register(settings(), "churn", name, TrainConfig(tune=weak), model_name="mychurn")
    before = history(client, "mychurn")
    dry = CliRunner().invoke(app, ["evaluate", "mychurn", "--json"])  # the gate's verdict, nothing moved or written
    assert dry.exit_code == 0, dry.output
    assert "not_worse_than_champion" in json.loads(dry.output)["verdict"]
    assert aliases(client, "mychurn") == {CHAMPION: "1", CHALLENGER: second.version}
    assert history(client, "mychurn") == before
    report = promote(client, "mychurn", GateConfig(bootstrap_rounds=300))
    assert not report.passed and "not_worse_than_champion" in report.verdict
    assert aliases(client, "mychurn") == {CHAMPION: "1", CHALLENGER: second.version}

    # A comparable one passes; a rollback returns to version 1; the audit trail tells the story
    third = train_and_register(settings(), "churn", name, TrainConfig(tune=FAST.model_copy(update={"seed": 7}),
                                                                      threshold=FixedThreshold(value=0.7)),
                               model_name="mychurn")
    report = promote(client, "mychurn", GateConfig(bootstrap_rounds=300, tolerance=0.05, fairness_attribute="region",
                                                   max_tpr_gap=0.25))  # 400 test rows: wide intervals
    assert report.passed, report.checks
    assert aliases(client, "mychurn")[CHAMPION] == third.version == "3"
    assert rollback(client, "mychurn", "bad week") == ("3", "1")
    assert aliases(client, "mychurn")[CHAMPION] == "1"
    trail = history(client, "mychurn")
    assert [e["action"] for e in trail] == ["register", "promote", "register", "refuse", "register", "promote",
                                            "rollback"]
    assert trail[-1]["reason"] == "bad week" and trail[-1]["who"]
    assert champion_stack(trail) == ["1"]
    with pytest.raises(RegistryError, match="needs a reason"):
        rollback(client, "mychurn", "  ")
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(client, "mychurn", "again")


def test_the_fairness_bound_can_refuse_a_challenger(tmp_path: Path) -> None:
    frame, _ = churn_table(1200)
    frame["region"] = np.where(frame["support_calls"] > 2, "north", "south")  # a proxy of the label's driver
    name = ingest_table(tmp_path, frame)
    train_and_register(settings(), "churn", name, TrainConfig(tune=FAST, fairness_attribute="region"))
    client = connect(settings().tracking_uri)
    report = promote(client, "churn", GateConfig(max_positive_rate_gap=0.05))
    assert not report.passed and "fairness_positive_rate_gap" in report.verdict
    assert aliases(client, "churn")[CHAMPION] is None
    assert history(client, "churn")[-1]["action"] == "refuse"


@pytest.mark.parametrize("task", ["propensity", "category_propensity"])
def test_transaction_data_trains_out_of_time(task: str) -> None:
    from features.pipeline import ingest_synthetic
    from features.synthetic import SyntheticConfig, generate

    ingest_synthetic(settings(), "synth", generate(SyntheticConfig(customers=600, days=400, seed=3, events=False)))
    outcome = train_and_register(settings(), task, "synth", TrainConfig(tune=FAST, horizon_days=60))
    p = outcome.trained.prepared
    assert p.train["cutoff"].max() < p.valid["cutoff"].min() < p.test["cutoff"].min()
    assert p.valid["cutoff"].min() + pd.Timedelta(days=60) <= p.test["cutoff"].min()
    assert outcome.trained.test_metrics["roc_auc"] > 0.6
    assert outcome.trained.calibrated_on == "the validation part"  # not trained on the later cutoff
    assert outcome.trained.calibration_rows == len(p.valid)
    heldout = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=outcome.run_id,
                                                                  artifact_path="heldout/heldout.parquet"))
    assert set(heldout["cutoff"]) == set(p.test["cutoff"]) and len(heldout) == len(p.test)
    if task == "category_propensity":  # one row per customer and category, the category a feature
        assert "category" in p.columns.categorical and "category_share" in p.columns.numeric
        assert len(p.test) == p.test["customer_id"].nunique() * p.test["category"].nunique()
        assert set(outcome.trained.by_category_auc) <= set(p.test["category"])
        assert len(outcome.trained.by_category_auc) >= 2
        from serving.batch import score_dataset

        with pytest.raises(PersonalizeError, match="per-category propensity model"):  # not a frame-lacks error
            score_dataset(connect(settings().tracking_uri), outcome.model_name, settings().dataset_dir("synth"),
                          settings().home / "scores", alias="challenger")


# --- bad input ---------------------------------------------------------------------------------------------------
def test_one_class_and_too_few_rows_are_clear_errors_and_register_nothing(tmp_path: Path) -> None:
    frame, _ = churn_table(300)
    one_class = ingest_table(tmp_path, frame.assign(left="Y"), "oneclass")
    with pytest.raises(PersonalizeError, match="one class only"):
        train_and_register(settings(), "churn", one_class, TrainConfig(tune=FAST))
    tiny = ingest_table(tmp_path, frame.head(30), "tiny")
    with pytest.raises(PersonalizeError, match="at least 50"):
        train_and_register(settings(), "churn", tiny, TrainConfig(tune=FAST))
    rare = ingest_table(tmp_path, frame.assign(left=["Y" if i < 8 else "N" for i in range(len(frame))]), "rare")
    with pytest.raises(PersonalizeError, match="at least 5 rows of each class"):  # 8 positives: one or two a part
        train_and_register(settings(), "churn", rare, TrainConfig(tune=FAST))
    client = connect(settings().tracking_uri)
    assert client.search_registered_models() == []


def test_a_version_the_registry_refuses_leaves_no_registered_model_behind() -> None:
    from training.registry import register

    client = connect(settings().tracking_uri)
    with pytest.raises(Exception, match="m-0123456789abcdef"):  # no such logged model
        register(client, "churn_nowhere", "models:/m-0123456789abcdef", "no-run")
    assert "churn_nowhere" not in [m.name for m in client.search_registered_models()]


def test_an_unreachable_tracking_server_fails_fast_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    frame, _ = churn_table(300)
    name = ingest_table(tmp_path, frame)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(RegistryError, match="unreachable"):
        train_and_register(Settings.from_env(), "churn", name, TrainConfig(tune=FAST))
    assert not any(Path(os.environ["PERSONALIZE_OPTUNA_STORAGE"].removeprefix("sqlite:///")).parent.glob("optuna.db"))


def test_an_unreachable_database_store_is_one_line_in_seconds_without_its_password() -> None:
    import time

    started = time.monotonic()
    with pytest.raises(RegistryError, match="unreachable") as caught:
        connect("postgresql+psycopg2://me:s3cret@127.0.0.1:9/mlflow")  # MLflow's own engine retries for minutes
    assert time.monotonic() - started < 15
    assert "s3cret" not in str(caught.value) and "…@127.0.0.1:9/mlflow" in str(caught.value)


def test_cli_trains_a_csv_by_configuration_alone_and_reports_errors_in_one_line(tmp_path: Path) -> None:
    frame, _ = churn_table(1500)
    frame["email"] = frame["acct"].str.lower() + "@example.com"  # an identifier that is not the id column
    frame["leak"] = frame["left"]  # known only after the fact: dropped as asked
    path = tmp_path / "Customer Churn.csv"
    frame.to_csv(path, index=False, sep=";")
    result = runner.invoke(app, ["train", "churn", str(path), "--label", "left", "--positive", "Y", "--id", "acct",
                                 "--trials", "2", "--family", "lightgbm", "--threshold", "fixed:0.7"])
    assert result.exit_code == 2 and "';'-separated" in result.output and "--sep ';'" in result.output
    result = runner.invoke(app, ["train", "churn", str(path), "--label", "left", "--positive", "Y", "--id", "acct",
                                 "--sep", ";", "--drop", "leak", "--trials", "2", "--family", "lightgbm",
                                 "--threshold", "fixed:0.7"])
    assert result.exit_code == 0, result.output
    assert "registered churn version 1 as challenger" in result.output
    assert "categorical plan, region" in result.output and "roc_auc" in result.output
    assert "not a feature: email, text with a distinct value on 100% of its rows" in result.output
    assert "dropped as asked: leak" in result.output
    test_auc = float(next(line for line in result.output.splitlines() if "roc_auc" in line).split("│")[2])
    assert 0.6 < test_auc < 0.95  # the leak would give 1.0
    result = runner.invoke(app, ["promote", "churn"])
    assert result.exit_code == 0, result.output
    assert "churn@champion -> version 1" in result.output
    result = runner.invoke(app, ["history", "churn"])
    assert result.exit_code == 0 and "promote" in result.output and "champion = v1" in result.output

    # the API takes a row as the table has it: the id, label, set-aside and dropped columns are accepted and
    # ignored (neither scored nor logged); a column the table never had is still a 400 naming it
    from serving.api import Runtime
    from serving.config import ServeConfig
    from serving.predlog import read_log
    from serving.scoring import InputError

    config = ServeConfig(home=settings().home, tracking_uri=settings().tracking_uri, prediction_log=tmp_path / "log")
    runtime = Runtime(config, connect(settings().tracking_uri), start_reloader=False, freeze_heap=False)
    row = json.loads(frame.head(1).to_json(orient="records"))[0]
    try:
        answer = runtime.classify("churn", features=row)
        assert 0 < answer["results"][0]["probability"] < 1
        without = runtime.classify("churn", features={k: row[k] for k in ("tenure_m", "support_calls", "plan",
                                                                          "region", "monthly_fee")})
        assert answer["results"][0]["probability"] == without["results"][0]["probability"]
        blank, null = (runtime.classify("churn", features={**row, "support_calls": v})["results"][0]["probability"]
                       for v in (" ", None))  # a blank cell, as a table file has it, is missing (as in batch)
        assert blank == null
        new_plan = runtime.classify("churn", features={**row, "plan": "platinum"})["results"][0]
        assert new_plan["unseen_categories"] == {"plan": "platinum"}  # scored as missing, and said so
        assert "unseen_categories" not in answer["results"][0]
        with pytest.raises(InputError) as error:
            runtime.classify("churn", features={**row, "tenure_mo": 3})
        assert error.value.field == "features.tenure_mo"
    finally:
        runtime.close()
    logged = read_log(tmp_path / "log")
    assert len(logged) == 5 and not any(c in f for f in logged["features"] for c in ("acct", "email", "leak"))

    # batch: a table of new customers (no label), one of them with a value the model cannot read
    fresh = frame.drop(columns=["left"]).head(40).astype({"tenure_m": str})
    fresh.loc[7, "tenure_m"] = "seven"
    fresh.loc[8, "support_calls"] = None  # missing is allowed, as in training
    fresh.loc[9, "plan"] = "platinum"  # a category the model never saw: scored as missing, counted
    fresh.to_csv(tmp_path / "new customers.CSV", index=False)
    result = runner.invoke(app, ["score", "churn", "--table", str(tmp_path / "new customers.CSV")])  # id: acct
    assert result.exit_code == 0, result.output
    assert "scored 39 of 40 rows" in result.output and "invalid_tenure_m 1" in result.output
    assert "categories the model never saw (scored as missing): plan 1 row(s)" in " ".join(result.output.split())
    scores = pd.read_parquet(settings().home / "scores" / "churn" / "v1" / "new customers-scores.parquet")
    quarantined = pd.read_parquet(settings().home / "scores" / "churn" / "v1" / "new customers-quarantine.parquet")
    assert len(scores) + len(quarantined) == 40 and quarantined["tenure_m"].tolist() == ["seven"]
    assert scores["acct"].iloc[0] == row["acct"] and scores["_source_row"].iloc[0] == 1
    assert round(scores["probability"].iloc[0], 6) == answer["results"][0]["probability"]  # the API rounds to 6
    result = runner.invoke(app, ["score", "churn", "--table", str(tmp_path / "new customers.CSV"), "--id", "nosuch"])
    assert result.exit_code == 2 and "nosuch" in result.output and "Traceback" not in result.output
    fresh.assign(tenure_m="40 months").to_csv(tmp_path / "unreadable.csv", index=False)  # every row quarantined
    result = runner.invoke(app, ["score", "churn", "--table", str(tmp_path / "unreadable.csv"), "--no-log"])
    assert result.exit_code == 2 and "all 40 quarantined (invalid_tenure_m 40)" in " ".join(result.output.split())
    result = runner.invoke(app, ["score", "churn", "--table", str(tmp_path / "new customers.CSV"), "--id", "plan",
                                 "--no-log"])  # not an id: its values repeat
    assert result.exit_code == 0
    assert "id column 'plan': 0 row(s) without an id, 38 sharing" in " ".join(result.output.split())

    # the batch went to the prediction log as the API logs (keyed by the pseudonymized id, only the model's
    # features), so the monitor watches it; --no-log leaves the log alone
    from serving.predlog import load_salt, pseudonymize

    batch = read_log(settings().log_root)
    assert len(batch) == 39 and set(batch["endpoint"]) == {"batch"} and batch["request_id"].nunique() == 1
    salt = load_salt(settings().home)
    assert batch["customer_key"].iloc[0] == pseudonymize(row["acct"], salt) != row["acct"]
    first = json.loads(batch["features"].iloc[0])
    assert set(first) == {"tenure_m", "support_calls", "plan", "region", "monthly_fee"} and first["plan"] == row["plan"]
    assert json.loads(batch["outputs"].iloc[0])["probability"] == answer["results"][0]["probability"]
    assert runner.invoke(app, ["score", "churn", "--table", str(tmp_path / "new customers.CSV"),
                               "--no-log"]).exit_code == 0
    assert len(read_log(settings().log_root)) == 39
    result = runner.invoke(app, ["score", "churn"])  # no --table: the stored rows it was trained on, not logged
    assert result.exit_code == 0 and "is a labeled table: scoring its stored rows" in result.output, result.output
    assert "not logged" in result.output and len(read_log(settings().log_root)) == 39
    stored = pd.read_parquet(settings().home / "scores" / "churn" / "v1" / "table-scores.parquet")
    assert len(stored) == 1500 and stored["acct"].is_unique
    result = runner.invoke(app, ["monitor", "churn", "--window", "1", "--json"])
    assert result.exit_code == 0, result.output
    watched = json.loads(result.output[result.output.index("{"):])["pass"]
    assert watched["window"]["rows"] == 39 and watched["metrics"]["labeled_rows"] == 0

    # outcomes arrive as a file: the table's id and label columns label the window's predictions by customer
    outcomes = frame.head(40)[["acct", "left"]].copy()
    outcomes.loc[3, "left"] = None  # not known yet: skipped, counted
    outcomes = pd.concat([outcomes, pd.DataFrame({"acct": ["a-stranger"], "left": ["Y"]})])  # never scored
    outcomes.to_csv(tmp_path / "outcomes.csv", index=False)
    (tmp_path / "policy.yaml").write_text("alerts:\n  min_labeled: 20\n")
    # the same customers scored once more: two predictions each, one outcome each, judged once (the latest)
    assert runner.invoke(app, ["score", "churn", "--table", str(tmp_path / "new customers.CSV")]).exit_code == 0
    result = runner.invoke(app, ["monitor", "churn", "--window", "1", "--labels", str(tmp_path / "outcomes.csv"),
                                 "--config", str(tmp_path / "policy.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    watched = json.loads(result.output[result.output.index("{"):])["pass"]["metrics"]
    assert watched["outcomes"]["rows_in"] == 41 and watched["outcomes"]["skipped"] == {"missing_label": 1}
    assert watched["labeled_rows"] == watched["outcomes"]["evaluated_customers"] == 38  # 40 - quarantined - unknown
    assert watched["outcomes"]["matched_predictions"] == 2 * 38
    known = scores.set_index("acct").join(frame.set_index("acct")["left"], how="inner").drop(index=frame["acct"][3])
    assert watched["realized_roc_auc"] == pytest.approx(
        roc_auc_score(known["left"] == "Y", known["probability"].round(6)), abs=1e-9)
    result = runner.invoke(app, ["monitor", "churn", "--window", "1", "--labels", str(tmp_path / "outcomes.csv"),
                                 "--positive", "yes"])
    assert result.exit_code == 2 and "'yes'" in result.output and "Traceback" not in result.output

    for args, message in [
        (["promote", "nosuchmodel"], "unknown model 'nosuchmodel'"),
        (["rollback", "churn", "--reason", "test"], "no previous champion"),
        (["train", "churn", str(path), "--label", "nosuch", "--positive", "Y"], "nosuch"),
        (["train", "churn", "customer_churn", "--threshold", "fixed:2"], "fixed"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_a_champion_that_cannot_score_the_new_frame_refuses_until_forced_with_a_reason(tmp_path: Path) -> None:
    frame, _ = churn_table(800)
    old = ingest_table(tmp_path, frame.drop(columns=["monthly_fee"]).rename(columns={"plan": "tier"}), "old")
    new = ingest_table(tmp_path, frame, "new")
    client = connect(settings().tracking_uri)
    train_and_register(settings(), "churn", old, TrainConfig(tune=FAST))
    assert promote(client, "churn", GateConfig(bootstrap_rounds=200)).passed
    train_and_register(settings(), "churn", new, TrainConfig(tune=FAST))
    report = promote(client, "churn", GateConfig(bootstrap_rounds=200))
    assert not report.passed and "cannot score" in report.checks[0].detail
    assert "Failed to enforce" not in report.checks[0].detail and "tier" in report.checks[0].detail  # names it
    assert aliases(client, "churn")[CHAMPION] == "1"
    with pytest.raises(RegistryError, match="--reason"):
        promote(client, "churn", GateConfig(bootstrap_rounds=200), force=True)
    promote(client, "churn", GateConfig(bootstrap_rounds=200), reason="new feature set, checked by hand", force=True)
    assert aliases(client, "churn")[CHAMPION] == "2"
    last = history(client, "churn")[-1]
    assert last["action"] == "force-promote" and last["reason"] == "new feature set, checked by hand"


def test_a_table_file_that_fails_to_train_leaves_the_data_set_of_its_name_alone(tmp_path: Path) -> None:
    """`train churn a/cust.csv` stores the table as data set `cust`, which `score` reads. A later `train` of another
    cust.csv that fails (too few rows) puts that data set back as it was; one that trains warns that it replaces a
    table from another file, and --dataset-name keeps both."""
    from features.pipeline import stored_source

    frame, _ = churn_table(600)
    first, second = tmp_path / "a" / "cust.csv", tmp_path / "b" / "cust.csv"
    for path, rows in ((first, frame), (second, frame.head(30))):
        path.parent.mkdir()
        rows.to_csv(path, index=False)
    args = ["--label", "left", "--positive", "Y", "--id", "acct", "--trials", "1", "--family", "lightgbm"]
    assert runner.invoke(app, ["train", "churn", str(first), *args]).exit_code == 0
    stored = settings().dataset_dir("cust") / "table.parquet"
    before = stored.read_bytes()

    failed = runner.invoke(app, ["train", "churn", str(second), *args])
    assert failed.exit_code == 2 and "at least 50" in failed.output, failed.output
    assert "data set 'cust' held" in " ".join(failed.output.split())  # it said what it was replacing
    assert stored.read_bytes() == before and stored_source(settings(), "cust") == str(first.resolve())
    assert not (settings().home / ".previous").exists() or not any((settings().home / ".previous").iterdir())

    kept = runner.invoke(app, ["train", "churn", str(first), *args, "--dataset-name", "cust_a", "--name", "churn_a"])
    assert kept.exit_code == 0 and "data set 'cust' held" not in kept.output, kept.output
    assert len(pd.read_parquet(settings().dataset_dir("cust_a") / "table.parquet")) == len(pd.read_parquet(stored))
    bad = runner.invoke(app, ["train", "churn", str(first), *args, "--dataset-name", "Cust A"])
    assert bad.exit_code == 2 and "--dataset-name 'Cust A'" in bad.output
    fresh = runner.invoke(app, ["train", "churn", str(second), *args, "--dataset-name", "fresh"])
    assert fresh.exit_code == 2 and not settings().dataset_dir("fresh").exists()  # a failed train stores nothing
    named = runner.invoke(app, ["train", "churn", "cust", *args, "--dataset-name", "other"])
    assert named.exit_code == 2 and "is not a table file" in " ".join(named.output.split())


def test_an_out_of_time_split_never_splits_a_moment_and_refuses_too_few_moments(tmp_path: Path) -> None:
    """Rows of one time land in one part (a cut by position split them by file order and called it out of time);
    a time column with too few distinct times is refused, not passed off as an out-of-time split."""
    from features.labeled import LabeledTableSpec, load_labeled
    from features.pipeline import ingest_labeled
    from training.train import prepare_labeled

    frame, _ = churn_table(1000)
    frame["month"] = pd.to_datetime("2024-01-01") + pd.to_timedelta((np.arange(1000) // 90) * 31, unit="D")
    path = tmp_path / "monthly.csv"
    frame.sample(frac=1.0, random_state=0).to_csv(path, index=False)  # file order is not time order
    spec = LabeledTableSpec(path=path, label_column="left", positive="Y", id_column="acct", time_column="month")
    ingest_labeled(settings(), "monthly", load_labeled(spec))
    prepared = prepare_labeled(settings().dataset_dir("monthly"), "churn", TrainConfig(tune=FAST))
    parts = [set(p["month"]) for p in (prepared.train, prepared.valid, prepared.test)]
    assert not (parts[0] & parts[1] or parts[1] & parts[2] or parts[0] & parts[2])  # each month in one part
    assert max(parts[0]) < min(parts[1]) and max(parts[1]) < min(parts[2])
    assert sum(len(p) for p in (prepared.train, prepared.valid, prepared.test)) == 1000

    (tmp_path / "one.csv").write_text(frame.assign(month="2024-05-01").to_csv(index=False))
    ingest_labeled(settings(), "snapshot", load_labeled(spec.model_copy(update={"path": tmp_path / "one.csv"})))
    with pytest.raises(PersonalizeError, match="1 distinct time"):
        prepare_labeled(settings().dataset_dir("snapshot"), "churn", TrainConfig(tune=FAST))
