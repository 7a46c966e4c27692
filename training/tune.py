"""Tune gradient-boosted classifiers with Optuna.

One study searches over the model family (LightGBM or XGBoost) and each family's hyperparameters with a seeded
TPE sampler, starting from a few enqueued sensible configurations. By default every trial is scored by 5-fold
cross-validation on the training rows (all folds boosted in step, one early stop on the mean AUC), which leaves the
validation split to an honest holdout score; with ``cv_folds=None`` a trial trains with early stopping on the
validation split instead. Either way optuna-integration's pruning callbacks report the AUC every
``report_every`` rounds, so a median pruner stops hopeless trials (each report is a storage round trip, which
reporting every round made the dominant cost).

Which trial wins is a rule (``selection``), by default the one-standard-error rule (Breiman et al., 1984;
glmnet's ``lambda.1se``): of the trials scoring within one standard error of the best score, the simplest (fewest
leaves per tree), since on small tables the top scores differ by less than their own noise and the highest of them
is the most likely to be an overfit (:func:`ranked_trials`). After a cross-validated study the chosen trial is
refitted on all rows (:func:`final_booster`), as can the first few be (:func:`refit_best`). Studies live in
Optuna's RDB storage: SQLite by default, or any SQLAlchemy URL (PostgreSQL), so several ``personalize tune``
processes can join one study by name (:func:`open_study`; each trial records the ``worker``, host:pid, that ran
it). The budget is a number of trials, a wall time, or both.

Class imbalance is searched as ``scale_pos_weight`` (1 up to the negative/positive ratio); it skews the raw
probabilities, which calibration on held-out data is meant to correct before any threshold is chosen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import lightgbm as lgb
import numpy as np
import optuna
import pandas as pd
import sqlalchemy.exc
import xgboost as xgb
from optuna_integration import LightGBMPruningCallback, XGBoostPruningCallback
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, train_test_split

from personalize.errors import PersonalizeError, first_line
from personalize.settings import connect_timeout, redact

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
    report_every: int = Field(default=10, ge=1)  # boosting rounds between two reports to the pruner
    # Score each trial by k-fold cross-validation on the training rows (None: on the validation split).
    cv_folds: int | None = Field(default=5, ge=2)
    # Trials to run first, as Optuna parameters (e.g. the champion's best trial when retraining): a warm start.
    warm_start: tuple[dict[str, Any], ...] = ()
    # Which trial wins: "one_se", the simplest within one standard error of the best score (:func:`ranked_trials`);
    # "best", the highest score.
    selection: Literal["one_se", "best"] = "one_se"

    @field_validator("families")
    @classmethod
    def _one_order(cls, families: tuple[Family, ...]) -> tuple[Family, ...]:
        """Each family once, in one order: a study's family choice is fixed, so `--family xgboost --family lightgbm`
        must join the study `--family lightgbm --family xgboost` started."""
        return tuple(sorted(set(families)))

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


def threads_for(rows: int) -> int:
    """Booster threads: one below 50,000 training rows. On small tables the per-round synchronisation of two
    threads costs more than it saves (measured on Telco, 5,600 rows: ~1.3 ms a round on one thread, 25-60 ms on
    two while another process uses the second core)."""
    return 1 if rows < 50_000 else 2


def suggest(trial: optuna.Trial, family: Family, split: Split, seed: int) -> dict[str, Any]:
    """One trial's booster parameters. The space reaches down to stumps (``max_depth`` 1: an additive model, which
    is what nearly linear tables such as Telco want) and up to deep trees, with strong regularisation available
    (large leaves, L1/L2, minimum hessian, LightGBM's extremely randomised splits)."""
    pos_weight = trial.suggest_float("scale_pos_weight", 1.0, split.negative_per_positive, log=True) \
        if split.negative_per_positive > 1.0 else 1.0
    threads = threads_for(len(split.y_train))
    if family == "lightgbm":
        depth = trial.suggest_int("lgb_max_depth", 1, 8)
        return {
            "objective": "binary", "metric": "auc", "verbosity": -1, "seed": seed, "deterministic": True,
            "force_row_wise": True, "num_threads": threads, "scale_pos_weight": pos_weight,
            "learning_rate": trial.suggest_float("lgb_learning_rate", 0.01, 0.2, log=True),
            "max_depth": depth,
            "num_leaves": min(2 ** depth, trial.suggest_int("lgb_num_leaves", 2, 128, log=True)),
            "min_child_samples": trial.suggest_int("lgb_min_child_samples", 5, 300, log=True),
            "min_sum_hessian_in_leaf": trial.suggest_float("lgb_min_sum_hessian", 1e-3, 10.0, log=True),
            "feature_fraction": trial.suggest_float("lgb_feature_fraction", 0.3, 1.0),
            "bagging_fraction": trial.suggest_float("lgb_bagging_fraction", 0.5, 1.0),
            "bagging_freq": 1,
            "lambda_l1": trial.suggest_float("lgb_lambda_l1", 1e-3, 10.0, log=True),
            "lambda_l2": trial.suggest_float("lgb_lambda_l2", 1e-3, 100.0, log=True),
            "extra_trees": trial.suggest_categorical("lgb_extra_trees", [False, True]),
            "cat_smooth": trial.suggest_float("lgb_cat_smooth", 1.0, 50.0, log=True),
        }
    return {
        "objective": "binary:logistic", "eval_metric": "auc", "tree_method": "hist", "seed": seed,
        "nthread": threads, "scale_pos_weight": pos_weight,
        "eta": trial.suggest_float("xgb_eta", 0.01, 0.2, log=True),
        "max_depth": trial.suggest_int("xgb_max_depth", 1, 8),
        "min_child_weight": trial.suggest_float("xgb_min_child_weight", 0.5, 50.0, log=True),
        "subsample": trial.suggest_float("xgb_subsample", 0.5, 1.0),
        "colsample_bytree": trial.suggest_float("xgb_colsample_bytree", 0.3, 1.0),
        "lambda": trial.suggest_float("xgb_lambda", 1e-3, 100.0, log=True),
        "alpha": trial.suggest_float("xgb_alpha", 1e-3, 10.0, log=True),
        "gamma": trial.suggest_float("xgb_gamma", 1e-3, 5.0, log=True),
    }


class _XGBoostPruning(XGBoostPruningCallback):
    """optuna-integration's callback, reporting every ``every`` rounds like LightGBM's ``report_interval``: each
    report is a write to the study's storage and each pruning check a read of every trial, so reporting every
    round costs more than the boosting itself on small tables."""

    def __init__(self, trial: optuna.Trial, observation_key: str, every: int) -> None:
        super().__init__(trial, observation_key)
        self._every = every

    def after_iteration(self, model: Any, epoch: int, evals_log: dict) -> bool:
        return super().after_iteration(model, epoch, evals_log) if epoch % self._every == 0 else False


def fit(family: Family, params: dict[str, Any], split: Split, config: TuneConfig,
        trial: optuna.Trial | None = None) -> tuple[lgb.Booster | xgb.Booster, int]:
    """Train with early stopping on the validation split; report to ``trial`` for pruning when given."""
    if family == "lightgbm":
        train = lgb.Dataset(split.x_train, split.y_train, free_raw_data=False)
        valid = lgb.Dataset(split.x_valid, split.y_valid, reference=train)
        callbacks = [lgb.early_stopping(config.early_stopping_rounds, verbose=False)]
        if trial is not None:
            callbacks.append(LightGBMPruningCallback(trial, "auc", valid_name="valid",
                                                     report_interval=config.report_every))
        booster = lgb.train(params, train, config.max_rounds, valid_sets=[valid], valid_names=["valid"],
                            callbacks=callbacks)
        return booster, int(booster.best_iteration)
    train = xgb.DMatrix(split.x_train, split.y_train, enable_categorical=True)
    valid = xgb.DMatrix(split.x_valid, split.y_valid, enable_categorical=True)
    callbacks = [_XGBoostPruning(trial, "valid-auc", config.report_every)] if trial is not None else []
    booster = xgb.train(params, train, config.max_rounds, evals=[(valid, "valid")],
                        early_stopping_rounds=config.early_stopping_rounds, callbacks=callbacks, verbose_eval=False)
    return booster, int(booster.best_iteration) + 1


def cross_validate(family: Family, params: dict[str, Any], split: Split, config: TuneConfig,
                   trial: optuna.Trial | None = None) -> tuple[float, int, float]:
    """Stratified k-fold cross-validation on the training rows, all folds boosted in step with one early stop on
    the mean AUC (reported to ``trial`` for pruning when given). Returns the mean AUC at the best round, that
    round scaled to the whole training part (the folds train on (k-1)/k of it), and the standard error of the
    mean AUC (the folds' standard deviation at that round / sqrt(k))."""
    k = config.cv_folds or 5
    folds = list(StratifiedKFold(k, shuffle=True, random_state=config.seed).split(split.x_train, split.y_train))
    if family == "lightgbm":
        callbacks = [lgb.early_stopping(config.early_stopping_rounds, verbose=False)]
        if trial is not None:
            callbacks.append(LightGBMPruningCallback(trial, "auc", report_interval=config.report_every))
        history = lgb.cv(params, lgb.Dataset(split.x_train, split.y_train, free_raw_data=False), config.max_rounds,
                         folds=folds, callbacks=callbacks)
        curve, spread = np.asarray(history["valid auc-mean"]), np.asarray(history["valid auc-stdv"])
    else:
        callbacks = [_XGBoostPruning(trial, "test-auc", config.report_every)] if trial is not None else []
        history = xgb.cv(params, xgb.DMatrix(split.x_train, split.y_train, enable_categorical=True),
                         config.max_rounds, folds=folds, early_stopping_rounds=config.early_stopping_rounds,
                         callbacks=callbacks, verbose_eval=False)
        curve, spread = history["test-auc-mean"].to_numpy(), history["test-auc-std"].to_numpy()
    best = int(np.argmax(curve))
    return float(curve[best]), max(1, round((best + 1) * k / (k - 1))), float(spread[best]) / np.sqrt(k)


def auc_standard_error(auc: float, y: np.ndarray) -> float:
    """The standard error of a ROC-AUC measured on one sample (Hanley & McNeil, 1982)."""
    positives = int(np.sum(y))
    negatives = len(y) - positives
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) / (
        positives * negatives)
    return float(np.sqrt(max(variance, 0.0)))


def leaves_per_tree(params: dict[str, Any]) -> int:
    """How complex a trial's trees are: their most leaves (LightGBM's ``num_leaves`` is already capped by its
    depth in :func:`suggest`)."""
    return int(params["num_leaves"]) if "num_leaves" in params else 2 ** int(params["max_depth"])


def predict(booster: lgb.Booster | xgb.Booster, x: pd.DataFrame, rounds: int) -> np.ndarray:
    if isinstance(booster, lgb.Booster):
        return booster.predict(x, num_iteration=rounds)
    return booster.predict(xgb.DMatrix(x, enable_categorical=True), iteration_range=(0, rounds))


def train(family: Family, params: dict[str, Any], x: pd.DataFrame, y: np.ndarray,
          rounds: int) -> lgb.Booster | xgb.Booster:
    """A fixed number of rounds on the given rows, without early stopping."""
    if family == "lightgbm":
        return lgb.train(params, lgb.Dataset(x, y), rounds)
    return xgb.train(params, xgb.DMatrix(x, y, enable_categorical=True), rounds)


def refit(family: Family, params: dict[str, Any], rounds: int, split: Split) -> lgb.Booster | xgb.Booster:
    """The chosen configuration trained on the training and validation rows together, without early stopping:
    the rounds found for the training rows scaled by how many more rows there are now (more rows, more rounds at
    the same learning rate). The validation score no longer measures this model; held-out data does."""
    y = np.concatenate([split.y_train, split.y_valid])
    scaled = max(1, round(rounds * len(y) / len(split.y_train)))
    return train(family, params, pd.concat([split.x_train, split.x_valid]), y, scaled)


def final_booster(result: TuneResult, split: Split, config: TuneConfig) -> tuple[lgb.Booster | xgb.Booster, int]:
    """The booster ``personalize train`` ships from a study, and its rounds. Trials scored by cross-validation
    leave the validation rows unseen, so the chosen trial is refitted on training and validation rows together
    (:func:`refit`; calibration then comes from :func:`out_of_fold`). Trials scored on the validation split (the
    out-of-time case) keep their early stop on it, and the model trains on the training rows only."""
    if config.cv_folds:
        booster = refit(result.family, result.params, result.rounds, split)
        return booster, refit_rounds(booster)
    return fit(result.family, result.params, split, config)


def out_of_fold(family: Family, params: dict[str, Any], rounds: int, x: pd.DataFrame, y: np.ndarray, folds: int,
                seed: int) -> np.ndarray:
    """Every row's raw probability from a model trained without it: stratified ``folds``-fold, each fold's model
    boosted for ``rounds`` scaled to the rows it trains on (``rounds`` being those of a model on all of ``x``)."""
    out = np.zeros(len(y))
    for fit_on, score_on in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        scaled = max(1, round(rounds * len(fit_on) / len(y)))
        out[score_on] = predict(train(family, params, x.iloc[fit_on], y[fit_on], scaled), x.iloc[score_on], scaled)
    return out


def ranked_trials(study: optuna.Study, selection: str = "one_se") -> list[optuna.trial.FrozenTrial]:
    """The study's completed trials in the order the ``selection`` rule prefers them, the chosen one first.

    ``best``: by score. ``one_se``: the trials within one standard error of the best score (the best trial's own
    standard error, ``se`` in its user attributes) come first, simplest first (:func:`leaves_per_tree`, ties by
    score), then the others by score. A best trial without a recorded standard error leaves the order by score."""
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if "params" in t.user_attrs]
    ranked = sorted(done, key=lambda t: (-t.value, t.number))
    if selection == "best" or not ranked:
        return ranked
    floor = ranked[0].value - ranked[0].user_attrs.get("se", 0.0)
    near = [t for t in ranked if t.value >= floor]
    near.sort(key=lambda t: (leaves_per_tree(t.user_attrs["params"]), -t.value, t.number))
    return near + [t for t in ranked if t.value < floor]


def refit_best(result: TuneResult, split: Split, top: int = 3,
               selection: str = "one_se") -> list[lgb.Booster | xgb.Booster]:
    """The ``top`` first trials of the study by the ``selection`` rule (:func:`ranked_trials`), each refitted on
    training and validation rows (:func:`refit`). Averaging their predictions (:func:`predict_mean`) is steadier
    than one trial, whose lead over the next ones is mostly selection noise on a small table."""
    chosen = ranked_trials(result.study, selection)[:top]
    return [refit(t.params["family"], t.user_attrs["params"], t.user_attrs["rounds"], split) for t in chosen]


def predict_mean(boosters: list[lgb.Booster | xgb.Booster], x: pd.DataFrame) -> np.ndarray:
    """The mean predicted probability of refitted boosters (every round of each)."""
    return np.mean([predict(b, x, refit_rounds(b)) for b in boosters], axis=0)


def refit_rounds(booster: lgb.Booster | xgb.Booster) -> int:
    """Every round of a refitted booster (it has no early-stopping best iteration)."""
    return booster.current_iteration() if isinstance(booster, lgb.Booster) else booster.num_boosted_rounds()


# Trials start from these (Optuna's enqueued trials, scored like any other; unnamed parameters are sampled):
# boosted stumps with bagging, an additive model that suits nearly linear tables, and moderate trees.
STARTING_POINTS: tuple[dict[str, Any], ...] = (
    {"family": "lightgbm", "lgb_max_depth": 1, "lgb_num_leaves": 2, "lgb_learning_rate": 0.05,
     "lgb_min_child_samples": 50, "lgb_bagging_fraction": 0.7, "lgb_feature_fraction": 1.0,
     "lgb_extra_trees": False, "scale_pos_weight": 1.0},
    {"family": "xgboost", "xgb_max_depth": 4, "xgb_eta": 0.05, "xgb_min_child_weight": 5.0, "xgb_subsample": 0.8,
     "xgb_colsample_bytree": 0.8, "scale_pos_weight": 1.0},
)
# The pruner compares trials at the same round: early on, that favours fast learning rates over slow ones that
# end higher, so nothing is pruned before this many rounds.
PRUNE_AFTER_ROUNDS = 100
SPLIT_ATTR = "split"  # the study user attribute naming the split its trials are scored on (split_fingerprint)


@dataclass(frozen=True)
class TuneResult:
    study: optuna.Study
    family: Family
    params: dict[str, Any]
    rounds: int  # boosting rounds for a model trained on the training rows of the split
    valid_auc: float  # the chosen trial's score: cross-validated on the training rows, or on the validation split
    baseline_auc: float  # a constant score (the prior rate): the floor every trial must beat
    holdout_auc: float | None = None  # the chosen model (training rows, ``rounds``) on the validation split
    trial: int | None = None  # the chosen trial's number in the study
    top_auc: float | None = None  # the study's highest score (above ``valid_auc`` when a simpler trial was chosen)


def worker_id() -> str:
    """This process as a tuning worker: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def rdb_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at ``url``. The first use of an empty database creates the tables, which races when
    several workers start at once (PostgreSQL: "relation already exists", a duplicate key); a loser retries once
    the tables exist. A database that does not answer is one line, after at most 10 s to connect."""
    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=connect_timeout(url))
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts:
                raise
            time.sleep(0.5 * attempt)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.ArgumentError,
                ValueError, ImportError) as exc:
            reason = first_line(getattr(exc, "orig", None) or exc)
            # SQLite's side of the same race: another worker's CREATE TABLE, or its write lock
            if attempt < attempts and ("already exists" in reason or "database is locked" in reason):
                time.sleep(0.5 * attempt)
                continue
            raise PersonalizeError(f"the Optuna storage {redact(url)} is unreachable ({reason}); check "
                                   "PERSONALIZE_OPTUNA_STORAGE") from None
    raise AssertionError("unreachable")


def open_study(storage: str, study_name: str, sampler_seed: int | None) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; says whether this call created it. Creation is atomic in the
    storage (a unique name), so of several workers starting at once exactly one creates the study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per created study or already queued trial
    kwargs = dict(storage=rdb_storage(storage), study_name=study_name,
                  sampler=optuna.samplers.TPESampler(seed=sampler_seed),
                  pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=PRUNE_AFTER_ROUNDS))
    try:
        return optuna.create_study(direction="maximize", **kwargs), True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(**kwargs), False


FAMILIES_ATTR = "families"  # the study's user attribute: the model families its trials choose from


def split_fingerprint(split: Split, config: TuneConfig) -> str:
    """What a study's scores are comparable on: the split's rows and labels (hashed, in order) and how trials are
    scored (cross-validation folds, or the validation split)."""
    digest = hashlib.sha256(f"cv_folds={config.cv_folds}".encode())
    for x, y in ((split.x_train, split.y_train), (split.x_valid, split.y_valid)):
        digest.update(",".join(map(str, x.columns)).encode())
        digest.update(pd.util.hash_pandas_object(x, index=False).to_numpy().tobytes())
        digest.update(np.asarray(y, dtype=np.int8).tobytes())
    return digest.hexdigest()[:16]


def claim_study(study: optuna.Study, split: Split, config: TuneConfig) -> None:
    """Record on the study the split its trials are scored on, or refuse a split other than the one recorded:
    trials scored on other rows (`personalize tune`'s 80/20 split under `train --study` of the same name, a
    changed data set) would compete with this run's on scores that do not compare, and leak held-out rows."""
    key, seen = split_fingerprint(split, config), study.user_attrs.get(SPLIT_ATTR)
    if seen is not None and seen != key:
        raise PersonalizeError(
            f"study {study.study_name!r} holds trials scored on other rows or another way (another command's split, "
            "another version of the data, other CV folds): their scores do not compare with this run's; give "
            "another --study name, or none for the default one")
    # the families are one categorical choice of every trial: Optuna cannot change its values within a study
    families = ",".join(config.families)
    searched = study.user_attrs.get(FAMILIES_ATTR) or next(
        (",".join(t.distributions["family"].choices) for t in study.trials if "family" in t.distributions), None)
    if searched is not None and searched != families:
        raise PersonalizeError(f"study {study.study_name!r} searches the families {searched}, not {families}: give "
                               f"--family as it did ({' '.join(f'--family {f}' for f in searched.split(','))}), or "
                               "another --study name")
    if seen is None:
        study.set_user_attr(SPLIT_ATTR, key)
    if study.user_attrs.get(FAMILIES_ATTR) is None:
        study.set_user_attr(FAMILIES_ATTR, families)


def enqueue_starts(study: optuna.Study, config: TuneConfig) -> None:
    """Queue the warm starts and :data:`STARTING_POINTS` of the searched families, unless the study has them."""
    for start in (*config.warm_start, *STARTING_POINTS):
        if start.get("family") in config.families:
            study.enqueue_trial(start, skip_if_exists=True)


def tune(split: Split, config: TuneConfig, storage: str, study_name: str,
         on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
         study: optuna.Study | None = None) -> TuneResult:
    """Run (or join, by name) a study maximising ROC-AUC, and return the trial it chooses (:func:`best_of`). ``study``,
    when given, is the study already opened (:func:`open_study`, e.g. with a worker's own sampler seed).

    With ``config.cv_folds`` (the default), trials are scored by cross-validation on the training rows only, and
    the validation split stays untouched by the search: ``holdout_auc`` is then an honest estimate. Without it,
    trials are scored on the validation split, so ``holdout_auc`` equals ``valid_auc`` and is optimistic."""
    study = study if study is not None else open_study(storage, study_name, config.seed)[0]
    claim_study(study, split, config)
    enqueue_starts(study, config)
    worker = worker_id()

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        family = trial.suggest_categorical("family", list(config.families))
        params = suggest(trial, family, split, config.seed)
        trial.set_user_attr("params", params)
        if config.cv_folds:
            score, rounds, se = cross_validate(family, params, split, config, trial)
        else:
            booster, rounds = fit(family, params, split, config, trial)
            score = float(roc_auc_score(split.y_valid, predict(booster, split.x_valid, rounds)))
            se = auc_standard_error(score, split.y_valid)
        trial.set_user_attr("rounds", rounds)
        trial.set_user_attr("se", se)
        return score

    callbacks = [on_trial] if on_trial else []
    study.optimize(objective, n_trials=config.trials, timeout=config.timeout_s, callbacks=callbacks)
    return best_of(study, split, config)


def best_of(study: optuna.Study, split: Split, config: TuneConfig) -> TuneResult:
    """The trial the study chooses as it stands (every worker's trials; ``config.selection``), scored on
    ``split``."""
    ranked = ranked_trials(study, config.selection)
    if not ranked:
        raise PersonalizeError(f"study {study.study_name!r}: no trial completed within the budget")
    best = ranked[0]
    family, params, rounds = best.params["family"], best.user_attrs["params"], best.user_attrs["rounds"]
    if config.cv_folds:
        booster = train(family, params, split.x_train, split.y_train, rounds)
        holdout = float(roc_auc_score(split.y_valid, predict(booster, split.x_valid, rounds)))
    else:
        holdout = float(best.value)
    baseline = float(roc_auc_score(split.y_valid, np.full(len(split.y_valid), split.y_train.mean())))
    return TuneResult(study, family, params, rounds, float(best.value), baseline, holdout, best.number,
                      float(study.best_value))
