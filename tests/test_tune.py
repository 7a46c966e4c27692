"""Tuning: reproducible, pruned, resumable by name, better than the prior, clear about bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from typer.testing import CliRunner

from personalize.cli import app
from personalize.errors import PersonalizeError
from training.tune import (TuneConfig, auc_standard_error, final_booster, model_matrix, out_of_fold, predict,
                           predict_mean, ranked_trials, refit, refit_best, refit_rounds, stratified_split, tune)


def labeled(n: int = 800, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "plus", "pro"], n)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    logit = 1.5 * x1 - 0.5 * x2 + np.select([plan == "pro", plan == "plus"], [1.0, 0.3], -0.8) - 1.0
    return pd.DataFrame({"x1": x1, "x2": x2, "plan": plan, "active": rng.random(n) < 0.5,
                         "label": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)})


def split_of(frame: pd.DataFrame, seed: int = 42):
    x, _ = model_matrix(frame, ["x1", "x2"], ["plan"], ["active"])
    return stratified_split(x, frame["label"].to_numpy(), 0.25, seed)


FAST = dict(trials=6, max_rounds=200, early_stopping_rounds=20, cv_folds=None)  # scored on the split
FAST_CV = {**FAST, "cv_folds": 3}


def test_the_same_seed_gives_the_same_study(tmp_path: Path) -> None:
    split, storage = split_of(labeled()), f"sqlite:///{tmp_path / 'optuna.db'}"
    first = tune(split, TuneConfig(**FAST), storage, "a")
    second = tune(split, TuneConfig(**FAST), storage, "b")
    assert first.params == second.params and first.valid_auc == second.valid_auc
    assert [t.params for t in first.study.trials] == [t.params for t in second.study.trials]


@pytest.mark.parametrize("fast", [FAST, FAST_CV], ids=["valid-split", "cross-validated"])
@pytest.mark.parametrize("family", ["lightgbm", "xgboost"])
def test_each_family_reports_to_the_pruner_and_beats_the_prior(tmp_path: Path, family: str, fast: dict) -> None:
    result = tune(split_of(labeled()), TuneConfig(families=(family,), **fast), f"sqlite:///{tmp_path / 'o.db'}",
                  "s")
    assert result.family == family
    assert all(len(t.intermediate_values) > 0 for t in result.study.trials)
    assert result.baseline_auc == 0.5 and result.valid_auc > 0.75 and result.holdout_auc > 0.75


def test_reports_to_the_pruner_come_every_few_rounds(tmp_path: Path) -> None:
    config = TuneConfig(families=("lightgbm",), **{**FAST, "report_every": 5, "trials": 2})
    result = tune(split_of(labeled()), config, f"sqlite:///{tmp_path / 'o.db'}", "s")
    steps = [s for t in result.study.trials for s in t.intermediate_values]
    assert steps and all((s + 1) % 5 == 0 for s in steps)


def test_a_cross_validated_study_leaves_the_validation_rows_to_the_holdout_score(tmp_path: Path) -> None:
    split = split_of(labeled())
    result = tune(split, TuneConfig(**FAST_CV), f"sqlite:///{tmp_path / 'o.db'}", "cv")
    scrambled = type(split)(split.x_train, split.y_train, split.x_valid, split.y_valid[::-1].copy())
    again = tune(scrambled, TuneConfig(**FAST_CV), f"sqlite:///{tmp_path / 'o.db'}", "cv-scrambled")
    assert [t.value for t in again.study.trials] == [t.value for t in result.study.trials]  # valid rows unseen
    assert again.holdout_auc != result.holdout_auc and result.holdout_auc > 0.75


def test_refitting_on_all_rows_scales_the_rounds_and_the_top_trials_average(tmp_path: Path) -> None:
    split = split_of(labeled())
    result = tune(split, TuneConfig(**FAST_CV), f"sqlite:///{tmp_path / 'o.db'}", "refit")
    booster = refit(result.family, result.params, result.rounds, split)
    rows = len(split.y_train) + len(split.y_valid)
    assert refit_rounds(booster) == max(1, round(result.rounds * rows / len(split.y_train)))
    boosters = refit_best(result, split, top=3)
    scores = predict_mean(boosters, split.x_valid)
    assert len(boosters) == 3 and scores.shape == (len(split.y_valid),) and ((scores > 0) & (scores < 1)).all()


def test_the_shipped_booster_is_refitted_on_all_rows_only_after_cross_validation(tmp_path: Path) -> None:
    split = split_of(labeled())
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    cv = tune(split, TuneConfig(**FAST_CV), storage, "cv")
    booster, rounds = final_booster(cv, split, TuneConfig(**FAST_CV))
    refitted = refit(cv.family, cv.params, cv.rounds, split)
    assert rounds == refit_rounds(refitted) >= cv.rounds
    assert np.array_equal(predict(booster, split.x_valid, rounds), predict(refitted, split.x_valid, rounds))
    on_split = tune(split, TuneConfig(**FAST), storage, "split")  # out of time: the validation rows stop it early
    _, stopped = final_booster(on_split, split, TuneConfig(**FAST))
    assert stopped == on_split.rounds


def test_out_of_fold_predictions_come_from_models_that_did_not_see_the_row() -> None:
    """On labels that are pure noise a deep booster learns its training rows by heart: in-sample its AUC is high,
    out of fold it is a coin flip. Calibrating on in-sample scores would trust them."""
    rng = np.random.default_rng(3)
    x = pd.DataFrame(rng.normal(size=(600, 5)), columns=[f"x{i}" for i in range(5)])
    y = (rng.random(600) < 0.3).astype(int)
    params = {"objective": "binary", "num_leaves": 31, "min_data_in_leaf": 2, "learning_rate": 0.3, "verbose": -1,
              "num_threads": 1, "seed": 0}
    from sklearn.metrics import roc_auc_score

    from training.tune import train

    in_sample = roc_auc_score(y, predict(train("lightgbm", params, x, y, 60), x, 60))
    oof = out_of_fold("lightgbm", params, 60, x, y, 5, seed=0)
    assert in_sample > 0.95 and abs(roc_auc_score(y, oof) - 0.5) < 0.08
    assert np.array_equal(oof, out_of_fold("lightgbm", params, 60, x, y, 5, seed=0))  # seeded


def finished_trial(score: float, se: float, depth: int) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        params={"family": "xgboost"}, distributions={"family": optuna.distributions.CategoricalDistribution(
            ["lightgbm", "xgboost"])}, value=score,
        user_attrs={"params": {"max_depth": depth}, "rounds": 10, "se": se})


@pytest.mark.parametrize(("stump_score", "ranked"), [(0.845, [1, 4, 6, 1]), (0.835, [4, 6, 1, 1])])
def test_the_simplest_trial_within_one_standard_error_wins(stump_score: float, ranked: list[int]) -> None:
    # Given: a deep model with the best cross-validated score (standard error 0.01) and stumps a little below it
    study = optuna.create_study(direction="maximize")
    for score, depth in [(0.850, 6), (0.848, 4), (stump_score, 1), (0.80, 1)]:
        study.add_trial(finished_trial(score, 0.01, depth))
    # When: trials are ranked by each rule
    one_se = [t.user_attrs["params"]["max_depth"] for t in ranked_trials(study, "one_se")]
    best = [t.user_attrs["params"]["max_depth"] for t in ranked_trials(study, "best")]
    # Then: within 0.01 of the best, the simplest first (the stumps when they are), the others by score after them;
    # "best" orders by score alone
    assert one_se == ranked
    assert best == [6, 4, 1, 1]


def test_the_standard_error_of_a_validation_auc_shrinks_with_the_sample() -> None:
    small, large = np.repeat([0, 1], [80, 20]), np.repeat([0, 1], [8000, 2000])
    assert auc_standard_error(0.8, small) == pytest.approx(0.0627, abs=1e-4)  # Hanley & McNeil's formula (3)
    assert auc_standard_error(0.8, large) == pytest.approx(auc_standard_error(0.8, small) / 10, rel=0.05)


def test_a_study_is_joined_by_name_across_runs(tmp_path: Path) -> None:
    split, storage = split_of(labeled()), f"sqlite:///{tmp_path / 'optuna.db'}"
    tune(split, TuneConfig(**FAST), storage, "shared")
    tune(split, TuneConfig(**{**FAST, "seed": 7}), storage, "shared")  # another worker, its own seed
    assert len(optuna.load_study(study_name="shared", storage=storage).trials) == 12


def test_a_study_refuses_trials_scored_on_other_rows(tmp_path: Path) -> None:
    # Given a study tuned on one split (as `personalize tune` does, 80/20)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tune(split_of(labeled()), TuneConfig(**{**FAST, "trials": 2}), storage, "prod")
    # When another split (train's own parts, or changed data) or another scoring joins it by name, Then it is refused
    for split, config in ((split_of(labeled(), seed=7), FAST), (split_of(labeled()), FAST_CV)):
        with pytest.raises(PersonalizeError, match="'prod' holds trials scored on other rows"):
            tune(split, TuneConfig(**{**config, "trials": 2}), storage, "prod")
    # and the study keeps its own trials only, while the same split still joins it
    tune(split_of(labeled()), TuneConfig(**{**FAST, "trials": 2, "seed": 7}), storage, "prod")
    assert len(optuna.load_study(study_name="prod", storage=storage).trials) == 4


def test_a_study_refuses_other_families_before_any_trial(tmp_path: Path) -> None:
    """The family is every trial's categorical choice, which Optuna cannot change within a study: another --family
    was a traceback and a FAIL trial in the study; it is refused first, and a study made before the families were
    recorded is read from its trials."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    both = {**FAST, "trials": 2, "families": ("lightgbm", "xgboost")}
    tune(split_of(labeled()), TuneConfig(**both), storage, "both")
    with pytest.raises(PersonalizeError, match="'both' searches the families lightgbm,xgboost, not lightgbm: give "
                                               "--family as it did"):
        tune(split_of(labeled()), TuneConfig(**{**both, "families": ("lightgbm",)}), storage, "both")
    study = optuna.load_study(study_name="both", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    reordered = TuneConfig(**{**both, "trials": 1, "families": ("xgboost", "lightgbm")})  # the same families
    tune(split_of(labeled()), reordered, storage, "both")
    study = optuna.load_study(study_name="both", storage=storage)
    study.set_user_attr("families", None)  # as before the attribute was written: the trials tell
    with pytest.raises(PersonalizeError, match="searches the families lightgbm,xgboost"):
        tune(split_of(labeled()), TuneConfig(**{**both, "families": ("xgboost",)}), storage, "both")


def test_an_unreachable_study_storage_is_one_line() -> None:
    for url in ("postgresql+psycopg2://me:s3cret@127.0.0.1:9/optuna", "sqlite:////no/such/dir/optuna.db"):
        with pytest.raises(PersonalizeError, match="Optuna storage .* is unreachable") as caught:
            tune(split_of(labeled()), TuneConfig(**FAST), url, "x")
        assert "s3cret" not in str(caught.value) and "\n" not in str(caught.value)


def test_a_category_unseen_in_training_becomes_missing() -> None:
    train, vocabulary = model_matrix(pd.DataFrame({"plan": ["a", "b"]}), [], ["plan"], [])
    later, _ = model_matrix(pd.DataFrame({"plan": ["b", "zzz"]}), [], ["plan"], [], vocabulary)
    assert list(later["plan"].cat.categories) == ["a", "b"] and later["plan"].isna().tolist() == [False, True]


def test_bad_input_is_a_clear_error() -> None:
    frame = labeled(200)
    x, _ = model_matrix(frame, ["x1"], [], [])
    with pytest.raises(PersonalizeError, match="one class"):
        stratified_split(x, np.zeros(len(x), dtype=int), 0.2, 0)
    with pytest.raises(PersonalizeError, match="too few rows"):
        stratified_split(x.head(10), frame["label"].head(10).to_numpy(), 0.2, 0)
    with pytest.raises(ValueError, match="budget"):
        TuneConfig(trials=None, timeout_s=None)


def test_tune_from_the_command_line(tmp_path: Path) -> None:
    labeled(400).to_csv(tmp_path / "churn.csv", index=False)
    (tmp_path / "churn.yaml").write_text(
        "dataset: mine\nlabeled: {path: churn.csv, label_column: label, positive: '1'}\n")
    runner = CliRunner()
    assert runner.invoke(app, ["ingest", str(tmp_path / "churn.yaml")]).exit_code == 0
    result = runner.invoke(app, ["tune", "mine", "--trials", "3", "--family", "lightgbm"])
    assert result.exit_code == 0, result.output
    assert "lightgbm" in result.output and "CV ROC-AUC" in result.output and "holdout ROC-AUC" in result.output
    wrong = runner.invoke(app, ["tune", "nothing-here"])
    assert wrong.exit_code == 2 and "no labeled table" in wrong.output


def test_a_study_is_one_parent_run_with_the_baseline_first_and_a_run_per_trial(tmp_path: Path) -> None:
    import mlflow

    from training.tracking import tracked_tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result, parent_id = tracked_tune(split_of(labeled()), TuneConfig(**FAST), f"sqlite:///{tmp_path / 'o.db'}",
                                     "tracked", uri, "tune-test", (tmp_path / "artifacts").as_uri())
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                  order_by=["attributes.start_time ASC"])
    kinds = [c.data.tags["kind"] for c in children]
    assert kinds == ["baseline"] + ["trial"] * len(result.study.trials)
    assert children[0].data.metrics["valid_roc_auc"] == 0.5
    assert parent.data.tags["best_trial"] == str(result.trial) and parent.data.tags["selection"] == "one_se"
    assert parent.data.metrics["best_valid_roc_auc"] == result.valid_auc
    assert parent.data.metrics["top_roc_auc"] == result.study.best_value >= result.valid_auc
    best_run = next(c for c in children if c.info.run_name == f"trial-{result.trial}")
    assert best_run.data.metrics["valid_roc_auc"] == result.valid_auc
    assert parent.info.artifact_uri.startswith((tmp_path / "artifacts").as_uri())
