"""Tune gradient-boosted classifiers with Optuna.

One study searches over the model family (LightGBM or XGBoost) and each family's hyperparameters with a seeded
TPE sampler. Every trial trains with early stopping on the validation split; optuna-integration's pruning
callbacks report the validation AUC each round, so a median pruner stops hopeless trials early. Studies live in
Optuna's RDB storage: SQLite by default, or any SQLAlchemy URL (PostgreSQL), so several ``personalize tune``
processes can join one study by name. The budget is a number of trials, a wall time, or both.

Class imbalance is searched as ``scale_pos_weight`` (1 up to the negative/positive ratio); it skews the raw
probabilities, which calibration on held-out data is meant to correct before any threshold is chosen.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import lightgbm as lgb
import numpy as np
import optuna
import pandas as pd
import xgboost as xgb
from optuna_integration import LightGBMPruningCallback, XGBoostPruningCallback
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)
Family = Literal["lightgbm", "xgboost"]


class TuneConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    families: tuple[Family, ...] = ("lightgbm", "xgboost")
    trials: int | None = Field(default=30, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    seed: int = 42
    max_rounds: int = Field(default=1000, ge=1)
    early_stopping_rounds: int = Field(default=50, ge=1)

    @model_validator(mode="after")
    def _some_budget(self) -> TuneConfig:
        if self.trials is None and self.timeout_s is None:
            raise ValueError("give a budget: trials, timeout_s, or both")
        if not self.families:
            raise ValueError("at least one model family")
        return self


@dataclass(frozen=True)
class Split:
    x_train: pd.DataFrame
    y_train: np.ndarray
    x_valid: pd.DataFrame
    y_valid: np.ndarray

    @property
    def negative_per_positive(self) -> float:
        positives = float(self.y_train.sum())
        return max(1.0, (len(self.y_train) - positives) / positives)


def model_matrix(frame: pd.DataFrame, numeric: list[str], categorical: list[str], boolean: list[str],
                 categories: dict[str, list[str]] | None = None) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """The boosters' input: numeric as float, booleans as 0/1, categoricals as pandas categories with a fixed
    vocabulary (learned on the training rows and reused as is, so a value unseen in training becomes missing)."""
    categories = categories if categories is not None else {
        c: sorted(frame[c].dropna().astype(str).unique()) for c in categorical}
    out = pd.DataFrame(index=frame.index)
    for c in numeric:
        out[c] = frame[c].astype(float)
    for c in boolean:
        out[c] = frame[c].astype(float)
    for c in categorical:
        out[c] = pd.Categorical(frame[c].astype("string"), categories=categories[c])
    return out, categories


def stratified_split(x: pd.DataFrame, y: np.ndarray, valid_fraction: float, seed: int) -> Split:
    """For labeled tables without time; time-stamped frames split out of time instead."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        raise PersonalizeError(f"the label has one class only ({y[0]}): there is nothing to learn")
    if min(np.bincount(y.astype(int))) < 2 or len(y) < 20:
        raise PersonalizeError(f"too few rows to tune on ({len(y)} rows, {int(y.sum())} positives)")
    x_train, x_valid, y_train, y_valid = train_test_split(x, y, test_size=valid_fraction, stratify=y,
                                                          random_state=seed)
    return Split(x_train, np.asarray(y_train), x_valid, np.asarray(y_valid))


def split_labeled_table(dataset_dir: Path, valid_fraction: float, seed: int) -> Split:
    """The stratified split of an ingested labeled table (``table.parquet``), typed by what ingestion inferred and
    reported in ``ingest_report.json``."""
    if not (dataset_dir / "table.parquet").exists():
        raise PersonalizeError(f"{dataset_dir.name}: no labeled table; ingest one first (`personalize ingest`), "
                               "transaction data sets train from their training frame")
    report = json.loads((dataset_dir / "ingest_report.json").read_text())
    frame = pd.read_parquet(dataset_dir / "table.parquet")
    x, _ = model_matrix(frame, report["numeric"], report["categorical"], report["boolean"])
    return stratified_split(x, frame["label"].to_numpy(), valid_fraction, seed)


def suggest(trial: optuna.Trial, family: Family, split: Split, seed: int) -> dict[str, Any]:
    pos_weight = trial.suggest_float("scale_pos_weight", 1.0, split.negative_per_positive, log=True) \
        if split.negative_per_positive > 1.0 else 1.0
    if family == "lightgbm":
        return {
            "objective": "binary", "metric": "auc", "verbosity": -1, "seed": seed, "deterministic": True,
            "force_row_wise": True, "num_threads": 2, "scale_pos_weight": pos_weight,
            "learning_rate": trial.suggest_float("lgb_learning_rate", 0.01, 0.2, log=True),
            "num_leaves": trial.suggest_int("lgb_num_leaves", 4, 128, log=True),
            "min_child_samples": trial.suggest_int("lgb_min_child_samples", 5, 200, log=True),
            "feature_fraction": trial.suggest_float("lgb_feature_fraction", 0.4, 1.0),
            "bagging_fraction": trial.suggest_float("lgb_bagging_fraction", 0.5, 1.0),
            "bagging_freq": 1,
            "lambda_l2": trial.suggest_float("lgb_lambda_l2", 1e-3, 30.0, log=True),
            "cat_smooth": trial.suggest_float("lgb_cat_smooth", 1.0, 50.0, log=True),
        }
    return {
        "objective": "binary:logistic", "eval_metric": "auc", "tree_method": "hist", "seed": seed, "nthread": 2,
        "scale_pos_weight": pos_weight,
        "eta": trial.suggest_float("xgb_eta", 0.01, 0.2, log=True),
        "max_depth": trial.suggest_int("xgb_max_depth", 2, 8),
        "min_child_weight": trial.suggest_float("xgb_min_child_weight", 0.5, 50.0, log=True),
        "subsample": trial.suggest_float("xgb_subsample", 0.5, 1.0),
        "colsample_bytree": trial.suggest_float("xgb_colsample_bytree", 0.4, 1.0),
        "lambda": trial.suggest_float("xgb_lambda", 1e-3, 30.0, log=True),
    }


def fit(family: Family, params: dict[str, Any], split: Split, config: TuneConfig,
        trial: optuna.Trial | None = None) -> tuple[lgb.Booster | xgb.Booster, int]:
    """Train with early stopping on the validation split; report to ``trial`` for pruning when given."""
    if family == "lightgbm":
        train = lgb.Dataset(split.x_train, split.y_train, free_raw_data=False)
        valid = lgb.Dataset(split.x_valid, split.y_valid, reference=train)
        callbacks = [lgb.early_stopping(config.early_stopping_rounds, verbose=False)]
        if trial is not None:
            callbacks.append(LightGBMPruningCallback(trial, "auc", valid_name="valid"))
        booster = lgb.train(params, train, config.max_rounds, valid_sets=[valid], valid_names=["valid"],
                            callbacks=callbacks)
        return booster, int(booster.best_iteration)
    train = xgb.DMatrix(split.x_train, split.y_train, enable_categorical=True)
    valid = xgb.DMatrix(split.x_valid, split.y_valid, enable_categorical=True)
    callbacks = [XGBoostPruningCallback(trial, "valid-auc")] if trial is not None else []
    booster = xgb.train(params, train, config.max_rounds, evals=[(valid, "valid")],
                        early_stopping_rounds=config.early_stopping_rounds, callbacks=callbacks, verbose_eval=False)
    return booster, int(booster.best_iteration) + 1


def predict(booster: lgb.Booster | xgb.Booster, x: pd.DataFrame, rounds: int) -> np.ndarray:
    if isinstance(booster, lgb.Booster):
        return booster.predict(x, num_iteration=rounds)
    return booster.predict(xgb.DMatrix(x, enable_categorical=True), iteration_range=(0, rounds))


@dataclass(frozen=True)
class TuneResult:
    study: optuna.Study
    family: Family
    params: dict[str, Any]
    rounds: int
    valid_auc: float
    baseline_auc: float  # a constant score (the prior rate): the floor every trial must beat


def tune(split: Split, config: TuneConfig, storage: str, study_name: str,
         on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None) -> TuneResult:
    """Run (or join, by name) a study maximising validation ROC-AUC, and return its best trial."""
    study = optuna.create_study(
        storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=20))

    def objective(trial: optuna.Trial) -> float:
        family = trial.suggest_categorical("family", list(config.families))
        params = suggest(trial, family, split, config.seed)
        booster, rounds = fit(family, params, split, config, trial)
        trial.set_user_attr("rounds", rounds)
        trial.set_user_attr("params", params)
        return float(roc_auc_score(split.y_valid, predict(booster, split.x_valid, rounds)))

    callbacks = [on_trial] if on_trial else []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=config.trials, timeout=config.timeout_s, callbacks=callbacks)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise PersonalizeError(f"study {study_name!r}: no trial completed within the budget")
    best = study.best_trial
    baseline = float(roc_auc_score(split.y_valid, np.full(len(split.y_valid), split.y_train.mean())))
    return TuneResult(study, best.params["family"], best.user_attrs["params"], best.user_attrs["rounds"],
                      float(best.value), baseline)
