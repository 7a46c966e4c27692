"""Train a churn or propensity classifier end to end: split, tune, calibrate, choose a threshold, explain, log.

The data decides the split:

- a **training frame** built from transactions is split **out of time**: the test cutoff is the latest one whose
  horizon the data covers, the validation cutoff one horizon earlier (so validation labels end where the test
  begins), and the training cutoffs step back from there. Training labels may overlap the validation window, never
  the test window, so the held-out numbers are what a model trained today would have scored on the next horizon;
- a **labeled table** with a time column is split by time the same way (oldest rows train, newest test);
- a **labeled table** without time is split at random, stratified on the label (train / validation / test).

Tuning (:mod:`training.tune`) searches on train/validation. Out of time, the chosen booster trains on the training
cutoffs, stops early on the validation cutoff and is calibrated on it. A table split at random had its trials
cross-validated on the training rows; the chosen booster is refitted on training and validation rows together
(:func:`training.tune.final_booster`) and calibrated on out-of-fold predictions over them. Either way, Platt scaling
by default (isotonic on request), and the decision threshold chosen on the same calibrated scores by the configured
policy. The test rows are touched once, at the end, for the held-out report, and kept as the model's held-out
frame: the promotion gate scores champion and challenger on it.

:class:`ClassifierModel` is the MLflow pyfunc that serves the result: raw feature columns in, calibrated
probability and decision out. Everything is logged into one MLflow run (the study's trials nested under it) and
nothing is registered here: :mod:`training.registry` does that once the run is complete.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from personalize.errors import PersonalizeError
from training.evaluate import (
    FBetaThreshold,
    ThresholdPolicy,
    choose_threshold,
    classification_metrics,
    decision_metrics,
    expected_calibration_error,
    fairness_gaps,
)
from training.tune import (Family, Split, TuneConfig, TuneResult, final_booster, model_matrix, out_of_fold,
                           predict)

log = logging.getLogger(__name__)

Task = Literal["churn", "propensity", "category_propensity"]
# task -> label column of a frame; category propensity takes one buys_<category> column per category
TASK_LABELS: dict[str, str] = {"churn": "churn", "propensity": "propensity", "category_propensity": "buys_*"}
MIN_ROWS = 50  # below this a split leaves too little to tune, calibrate and test on
MIN_CLASS_ROWS = 5  # of each class in every part: a test ROC-AUC over one or two positives says nothing


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tune: TuneConfig = TuneConfig()
    threshold: ThresholdPolicy = FBetaThreshold()
    calibration: Literal["sigmoid", "isotonic"] = "sigmoid"
    valid_fraction: float = Field(default=0.2, gt=0.0, lt=0.5)  # labeled tables
    test_fraction: float = Field(default=0.2, gt=0.0, lt=0.5)
    horizon_days: int = Field(default=90, ge=1, le=3650)  # training frames from transactions; ten years at most
    train_cutoffs: int = Field(default=2, ge=1)
    step_days: int = Field(default=30, ge=1)
    top_categories: int = Field(default=8, ge=0)
    fairness_attribute: str | None = None  # a column kept beside the features (not one of them)


@dataclass(frozen=True)
class Columns:
    numeric: list[str]
    categorical: list[str]
    boolean: list[str]
    # columns of a labeled table the model does not read (its id, time and label, the columns set aside or dropped
    # at ingest): a request may send them with the features, the way the table has them; they are ignored
    unused: tuple[str, ...] = ()
    id_column: str | None = None  # a labeled table's id column: batch scores of a table file carry it

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical, *self.boolean]


@dataclass(frozen=True)
class Prepared:
    """Raw rows of each part (features, label, id and the attributes kept for fairness) and how they were cut."""

    task: str
    dataset: str
    columns: Columns
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    split: str  # a sentence saying how the parts were cut
    provenance: dict[str, Any] = field(default_factory=dict)
    attributes: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)  # row identity (customer id, cutoff): kept, never a feature
    time_ordered: bool = False  # the parts follow each other in time

    def check(self) -> None:
        for name, part in (("training", self.train), ("validation", self.valid), ("test", self.test)):
            y = part["label"]
            if len(part) < MIN_ROWS // 5 or min(int(y.sum()), int(len(y) - y.sum())) < MIN_CLASS_ROWS:
                raise PersonalizeError(
                    f"{self.dataset}: the {name} part has {len(part)} rows and {int(y.sum())} positives; too few "
                    f"to train a {self.task} model on (every part needs at least {MIN_CLASS_ROWS} rows of each "
                    "class, so that its scores mean something)")


# --- preparing the parts ---------------------------------------------------------------------------------------
def _check_table(frame: pd.DataFrame, dataset: str, task: str) -> None:
    if len(frame) < MIN_ROWS:
        raise PersonalizeError(f"{dataset}: {len(frame)} labeled rows; at least {MIN_ROWS} are needed to train")
    counts = frame["label"].value_counts()
    if len(counts) < 2:
        raise PersonalizeError(f"{dataset}: the {task} label has one class only ({counts.index[0]} on every row): "
                               "there is nothing to learn")


def prepare_labeled(dataset_dir: Path, task: str, config: TrainConfig) -> Prepared:
    """The three parts of an ingested labeled table: by time when it has a time column, else stratified."""
    from features.store import data_fingerprint

    if not (dataset_dir / "table.parquet").exists():
        raise PersonalizeError(f"{dataset_dir.name}: not an ingested labeled table")
    report = json.loads((dataset_dir / "ingest_report.json").read_text())
    frame = pd.read_parquet(dataset_dir / "table.parquet")
    _check_table(frame, dataset_dir.name, task)
    time_column = report.get("time_column")
    unused = [report.get("id_column"), time_column, report.get("label"), *report.get("ignored", {}),
              *report.get("dropped", [])]
    columns = Columns(report["numeric"], report["categorical"], report["boolean"],
                      tuple(dict.fromkeys(c for c in unused if c)), report.get("id_column"))
    if time_column:
        frame = frame.sort_values(time_column, kind="stable")
        n = len(frame)
        times = frame[time_column].to_numpy()
        a, b = (_time_cut(times, int(n * f)) for f in (1 - config.valid_fraction - config.test_fraction,
                                                        1 - config.test_fraction))
        if not 0 < a < b < n:
            raise PersonalizeError(f"{dataset_dir.name}: {time_column} has {frame[time_column].nunique():,} distinct "
                                   "time(s), too few, or too many rows on one of them, to split train, validation "
                                   "and test out of time without splitting a moment between them; train without "
                                   "--time (a stratified split)")
        train, valid, test = frame.iloc[:a], frame.iloc[a:b], frame.iloc[b:]
        split = (f"out of time on {time_column}: train before {valid[time_column].min()}, validation from it, "
                 f"test from {test[time_column].min()}")
    else:
        part = stable_parts(frame, report.get("id_column"), config.valid_fraction, config.test_fraction)
        train, valid, test = (frame[part == k] for k in ("train", "valid", "test"))
        split = (f"stratified by a hash of {report.get('id_column') or 'each row'}: "
                 f"{1 - config.valid_fraction - config.test_fraction:.0%} train, {config.valid_fraction:.0%} "
                 f"validation, {config.test_fraction:.0%} test; a row keeps its part in every version")
    kept = [c for c in (config.fairness_attribute,) if c and c in frame.columns]
    if config.fairness_attribute and not kept:
        raise PersonalizeError(f"{dataset_dir.name}: no column {config.fairness_attribute!r} for the fairness check "
                               f"(columns: {', '.join(map(str, frame.columns))})")
    provenance = {"dataset": dataset_dir.name, "feature_version": f"labeled:{dataset_dir.name}",
                  "data_fingerprint": data_fingerprint([dataset_dir / "table.parquet"]),
                  "label_definition": f"{report.get('label')} (positive value given at ingestion)"}
    ids = [report["id_column"]] if report.get("id_column") else []
    prepared = Prepared(task, dataset_dir.name, columns, train, valid, test, split, provenance, kept, ids,
                        time_ordered=bool(time_column))
    prepared.check()
    return prepared


def _time_cut(times: np.ndarray, position: int) -> int:
    """The row boundary nearest ``position`` in ascending ``times`` that splits no moment: rows with equal times
    land in one part (a cut by position alone split them by file order)."""
    position = min(max(position, 0), len(times) - 1)
    candidates = [c for c in (int(np.searchsorted(times, times[position], side=side)) for side in ("left", "right"))
                  if 0 < c < len(times)]
    return min(candidates, key=lambda c: abs(c - position)) if candidates else 0


def stable_parts(frame: pd.DataFrame, id_column: str | None, valid_fraction: float,
                 test_fraction: float) -> pd.Series:
    """Assign each row to train/valid/test by a hash of its id (or of its values when there is no id), stratified
    on the label: within each class, rows ordered by hash, the first ``test_fraction`` tested, the next
    ``valid_fraction`` validated. Unlike a seeded random split, a row lands in the same part for every version
    trained on the table, so a challenger's test rows were never the champion's training rows."""
    key = frame[id_column].astype(str) if id_column else frame.drop(columns="label").astype(str).agg("|".join, axis=1)
    hashed = pd.util.hash_pandas_object(key, index=False).to_numpy()
    part = pd.Series("train", index=frame.index)
    for _, rows in frame.groupby("label").groups.items():
        order = np.asarray(rows)[np.argsort(hashed[frame.index.get_indexer(rows)], kind="stable")]
        n_test, n_valid = int(round(len(order) * test_fraction)), int(round(len(order) * valid_fraction))
        part[order[:n_test]] = "test"
        part[order[n_test:n_test + n_valid]] = "valid"
    return part


def oot_cutoffs(observed_until: pd.Timestamp, horizon_days: int, train_cutoffs: int,
                step_days: int) -> tuple[list[pd.Timestamp], pd.Timestamp, pd.Timestamp]:
    """(train cutoffs, validation cutoff, test cutoff): validation labels end where the test cutoff begins."""
    test = (observed_until - pd.Timedelta(days=horizon_days)).floor("D")
    valid = test - pd.Timedelta(days=horizon_days)
    train = sorted(valid - pd.Timedelta(days=step_days * k) for k in range(1, train_cutoffs + 1))
    return train, valid, test


def prepare_frame(dataset_dir: Path, task: str, config: TrainConfig) -> Prepared:
    """Out-of-time parts from a transaction data set's point-in-time features and labels."""
    from features.definitions import FeatureSpec
    from features.store import FeatureStore

    store = FeatureStore(dataset_dir)
    observed_until = store.observed_until()
    first = store.transactions.timestamp.min().execute()
    span = (observed_until - pd.Timestamp(first)).days
    # in days first: a horizon of centuries would run past pandas' calendar before any date compares
    needed = 2 * config.horizon_days + config.step_days * config.train_cutoffs
    train_cuts, valid_cut, test_cut = oot_cutoffs(observed_until, config.horizon_days, config.train_cutoffs,
                                                  config.step_days) if needed < span else ([first], first, first)
    if train_cuts[0] <= pd.Timestamp(first):
        raise PersonalizeError(
            f"{dataset_dir.name}: {span} days of transactions are too few for an out-of-time split with a "
            f"{config.horizon_days}-day horizon (it needs more than {needed:,}: two horizons and the training "
            f"cutoffs' steps); use a shorter --horizon or fewer training cutoffs")
    spec = FeatureSpec(categories=store.top_categories(train_cuts[0], config.top_categories))
    frame = store.training_frame([*train_cuts, valid_cut, test_cut], config.horizon_days, spec, observed_until)
    numeric = [c for c in spec.columns if c in frame.columns]
    categorical: list[str] = []
    if task == "category_propensity":
        frame, numeric, categorical = by_category(frame, spec, numeric)
    else:
        label = TASK_LABELS[task]
        frame = frame[frame[label].notna()].copy()  # churn is undefined for a customer who never bought
        frame["label"] = frame[label].astype(int)
    _check_table(frame, dataset_dir.name, task)
    customers = store.customers.to_pandas()
    attributes = [c for c in customers.columns if c not in ("customer_id", "signup_at", "consent")]
    if config.fairness_attribute and config.fairness_attribute not in attributes:
        raise PersonalizeError(f"{dataset_dir.name}: no customer attribute {config.fairness_attribute!r} for the "
                               f"fairness check (attributes: {', '.join(attributes) or 'none'})")
    frame = frame.merge(customers[["customer_id", *attributes]], on="customer_id", how="left")
    parts = {name: frame[frame["cutoff"].isin(cuts)].reset_index(drop=True)
             for name, cuts in (("train", train_cuts), ("valid", [valid_cut]), ("test", [test_cut]))}
    split = (f"out of time: train cutoffs {', '.join(str(c.date()) for c in train_cuts)}, validation "
             f"{valid_cut.date()}, test {test_cut.date()} ({config.horizon_days}-day horizon)")
    provenance = {"dataset": dataset_dir.name, "feature_version": spec.version,
                  "data_fingerprint": frame.attrs.get("data_fingerprint") or store.fingerprint(),
                  "definition_fingerprint": frame.attrs.get("definition_fingerprint", ""),
                  "label_definition": _LABEL_TEXT[task].format(h=config.horizon_days),
                  "cutoffs": [str(c) for c in [*train_cuts, valid_cut, test_cut]]}
    ids = ["customer_id", "cutoff", *(["category"] if task == "category_propensity" else [])]
    prepared = Prepared(task, dataset_dir.name, Columns(numeric, categorical, []), parts["train"], parts["valid"],
                        parts["test"], split, provenance, attributes, ids, time_ordered=True)
    prepared.check()
    return prepared


def by_category(frame: pd.DataFrame, spec: Any, numeric: list[str]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """One row per (customer, cutoff, category): the customer's features, the category, the customer's share of
    spend in it, and whether they buy in it within the horizon.

    One model with the category as a feature rather than one per category: one study, one calibration, one
    registered model and one gate instead of k of each; small categories borrow the shared effects (recency,
    frequency, engagement) from the big ones, and ``category_share`` carries the customer's own affinity. The
    test ROC-AUC is reported per category too, so a category the shared model serves badly shows."""
    from features.labels import category_label_columns

    if not spec.categories:
        raise PersonalizeError("no categories in the data set: category propensity needs transactions with a "
                               "category")
    labels, shares = category_label_columns(spec), spec.category_columns
    long = pd.concat([frame.assign(category=c, category_share=frame[shares[c]], label=frame[labels[c]].astype(int))
                      for c in spec.categories], ignore_index=True)
    return long, [*numeric, "category_share"], ["category"]


_LABEL_TEXT = {
    "churn": "1 if a customer who had bought before the cutoff buys nothing in the {h} days after it",
    "propensity": "1 if the customer buys anything in the {h} days after the cutoff",
    "category_propensity": "1 if the customer buys in the row's category in the {h} days after the cutoff",
}


def prepare(dataset_dir: Path, task: str, config: TrainConfig) -> Prepared:
    if task not in TASK_LABELS:
        raise PersonalizeError(f"unknown task {task!r}; choose one of {', '.join(TASK_LABELS)}")
    if not dataset_dir.exists():
        raise PersonalizeError(f"no data set {dataset_dir.name!r} under {dataset_dir.parent}; ingest it first "
                               "(`personalize ingest`)")
    if (dataset_dir / "table.parquet").exists():
        return prepare_labeled(dataset_dir, task, config)
    return prepare_frame(dataset_dir, task, config)


# --- calibration -----------------------------------------------------------------------------------------------
class Calibrator:
    """Maps raw booster scores to calibrated probabilities; fitted on scores of rows the scoring model was not
    trained on (the validation cutoff, or out-of-fold predictions).

    ``sigmoid`` is Platt scaling on the log-odds (two parameters: robust on few rows, and it undoes
    the shift a class weight puts on the raw scores without changing their order); ``isotonic`` is a monotone
    step function (more flexible, needs more rows, can tie scores)."""

    def __init__(self, method: Literal["sigmoid", "isotonic"] = "sigmoid") -> None:
        self.method = method

    def fit(self, raw: np.ndarray, y: np.ndarray) -> Calibrator:
        if self.method == "sigmoid":
            from sklearn.linear_model import LogisticRegression

            lr = LogisticRegression(C=1e6, max_iter=1000).fit(_logit(raw)[:, None], y)
            self.coef_, self.intercept_ = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        else:
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(raw, y)
            self.x_, self.y_ = iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist()
        return self

    def transform(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=float)
        if self.method == "sigmoid":
            if raw.size == 1:  # one served row: the same arithmetic in floats, a fifth of numpy's per-call cost
                p = min(max(float(raw.flat[0]), 1e-7), 1 - 1e-7)
                z = -(self.coef_ * math.log(p / (1 - p)) + self.intercept_)
                return np.full(raw.shape, 0.0 if z > 709.0 else 1.0 / (1.0 + math.exp(z)))
            return 1.0 / (1.0 + np.exp(-(self.coef_ * _logit(raw) + self.intercept_)))
        return np.interp(raw, self.x_, self.y_)

    def to_dict(self) -> dict[str, Any]:
        if self.method == "sigmoid":
            return {"method": self.method, "coef": self.coef_, "intercept": self.intercept_}
        return {"method": self.method, "x": self.x_, "y": self.y_}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        c = cls(d["method"])
        if c.method == "sigmoid":
            c.coef_, c.intercept_ = d["coef"], d["intercept"]
        else:
            c.x_, c.y_ = d["x"], d["y"]
        return c


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


# --- the served model ------------------------------------------------------------------------------------------
try:
    import mlflow.pyfunc

    _PythonModel = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    _PythonModel = object


class ClassifierModel(_PythonModel):
    """Raw feature columns in; ``probability`` (calibrated) and ``decision`` (probability >= threshold) out.

    The booster is stored in its own native format beside this object (``artifacts["booster"]``), so it can also
    be loaded without MLflow; unknown categorical values become missing, exactly as in training."""

    def __init__(self, family: Family, rounds: int, columns: Columns, categories: dict[str, list[str]],
                 calibrator: dict[str, Any], threshold: float) -> None:
        self.family, self.rounds, self.columns, self.categories = family, rounds, columns, categories
        self.calibrator, self.threshold = calibrator, threshold
        self._booster = None

    def load_context(self, context: Any) -> None:
        self._booster = load_booster(self.family, context.artifacts["booster"])

    def scores(self, frame: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.columns.features if c not in frame.columns]
        if missing:
            raise PersonalizeError(f"the model needs the column(s) {', '.join(missing)}")
        x, _ = model_matrix(frame, self.columns.numeric, self.columns.categorical, self.columns.boolean,
                            self.categories)
        return Calibrator.from_dict(self.calibrator).transform(predict(self._booster, x, self.rounds))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        p = self.scores(model_input)
        return pd.DataFrame({"probability": p, "decision": p >= self.threshold})


def load_booster(family: Family, path: str):
    if family == "lightgbm":
        import lightgbm as lgb

        return lgb.Booster(model_file=path)
    import xgboost as xgb

    booster = xgb.Booster()
    booster.load_model(path)
    return booster


def _save_booster(booster: Any, family: Family, folder: Path) -> Path:
    path = folder / ("booster.txt" if family == "lightgbm" else "booster.ubj")
    booster.save_model(str(path))
    return path


# --- explanation -----------------------------------------------------------------------------------------------
def shap_importance(booster: Any, x: pd.DataFrame, rounds: int, max_rows: int = 2000) -> pd.DataFrame:
    """Mean |TreeSHAP contribution| per feature, from the booster's own ``pred_contrib`` (no SHAP package)."""
    import lightgbm as lgb

    x = x.iloc[:max_rows]
    if isinstance(booster, lgb.Booster):
        contrib = booster.predict(x, num_iteration=rounds, pred_contrib=True)
    else:
        import xgboost as xgb

        contrib = booster.predict(xgb.DMatrix(x, enable_categorical=True), iteration_range=(0, rounds),
                                  pred_contribs=True)
    contrib = np.asarray(contrib)[:, : x.shape[1]]  # the last column is the bias
    out = pd.DataFrame({"feature": x.columns, "mean_abs_shap": np.abs(contrib).mean(axis=0)})
    return out.sort_values("mean_abs_shap", ascending=False, ignore_index=True)


# --- training --------------------------------------------------------------------------------------------------
@dataclass
class Trained:
    """Everything a training run produced, before logging."""

    prepared: Prepared
    tuned: TuneResult
    model: ClassifierModel
    booster: Any
    test_metrics: dict[str, float]
    test_raw_metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    # on the predictions the calibrator and threshold were fitted on (logged as valid_*; the run's calibrated_on
    # param says which: the validation cutoff, or out-of-fold predictions over training and validation rows)
    valid_metrics: dict[str, float]
    threshold: dict[str, Any]
    test_decision: dict[str, float]
    importance: pd.DataFrame
    fairness: dict[str, Any] | None
    test_scores: np.ndarray
    test_raw_scores: np.ndarray
    by_category_auc: dict[str, float] = field(default_factory=dict)
    calibrated_on: str = "the validation part"  # where the calibrator and threshold were fitted
    trained_on: str = "the training part"
    calibration_rows: int = 0


def search_config(prepared: Prepared, config: TrainConfig) -> TuneConfig:
    """How the study scores a trial. Parts cut by time: on the later validation cutoff, since choosing what
    generalises forward in time is the point. Parts cut at random: by cross-validation on the training rows, which
    leaves the validation rows to the study's holdout score (the shipped booster is then refitted on both)."""
    return config.tune.model_copy(update={"cv_folds": None}) if prepared.time_ordered else config.tune


def fit_classifier(prepared: Prepared, config: TrainConfig, tune_fn) -> Trained:
    """Tune (``tune_fn(split, tune_config) -> TuneResult``), refit, calibrate, choose the threshold, score the
    test part."""
    cols = prepared.columns
    x_train, categories = model_matrix(prepared.train, cols.numeric, cols.categorical, cols.boolean)
    x_valid, _ = model_matrix(prepared.valid, cols.numeric, cols.categorical, cols.boolean, categories)
    x_test, _ = model_matrix(prepared.test, cols.numeric, cols.categorical, cols.boolean, categories)
    y_train, y_valid, y_test = (p["label"].to_numpy().astype(int)
                                for p in (prepared.train, prepared.valid, prepared.test))
    split = Split(x_train, y_train, x_valid, y_valid)
    search = search_config(prepared, config)
    tuned = tune_fn(split, search)
    booster, rounds = final_booster(tuned, split, search)
    if search.cv_folds:
        # The model has seen the validation rows too, so it is calibrated and thresholded on out-of-fold
        # predictions over them and the training rows, each by a model that did not see that row: scikit-learn's
        # CalibratedClassifierCV(ensemble=False) recipe. Only the test part stays out of everything.
        y_cal = np.concatenate([y_train, y_valid])
        raw_cal = out_of_fold(tuned.family, tuned.params, rounds, pd.concat([x_train, x_valid]), y_cal,
                              search.cv_folds, search.seed)
        calibrated_on = f"out-of-fold predictions ({search.cv_folds} folds) over the training and validation parts"
        trained_on = f"the training and validation parts ({len(y_cal):,} rows)"
    else:  # early stopping on the validation cutoff, as in the search; the model is not trained on it
        y_cal, raw_cal = y_valid, predict(booster, x_valid, rounds)
        calibrated_on = "the validation part"
        capped = rounds + search.early_stopping_rounds > search.max_rounds  # still improving at the round cap
        trained_on = f"the training part ({len(y_train):,} rows), " + (
            f"boosted to the {search.max_rounds}-round cap (validation still improving)" if capped
            else "stopped early on the validation part")
    raw_test = predict(booster, x_test, rounds)
    calibrator = Calibrator(config.calibration).fit(raw_cal, y_cal)
    p_cal, p_test = calibrator.transform(raw_cal), calibrator.transform(raw_test)
    threshold = choose_threshold(y_cal, p_cal, config.threshold)
    model = ClassifierModel(tuned.family, rounds, cols, categories, calibrator.to_dict(), threshold["threshold"])
    fairness = None
    if config.fairness_attribute:
        fairness = fairness_gaps(y_test, p_test >= threshold["threshold"],
                                 prepared.test[config.fairness_attribute].to_numpy())
    by_group = {}
    if "category" in prepared.test.columns:
        for cat, rows in prepared.test.groupby("category").groups.items():
            idx = prepared.test.index.get_indexer(rows)
            if 0 < y_test[idx].sum() < len(idx):
                by_group[str(cat)] = classification_metrics(y_test[idx], p_test[idx])["roc_auc"]
    return Trained(
        prepared, tuned, model, booster, by_category_auc=by_group, calibrated_on=calibrated_on,
        trained_on=trained_on, calibration_rows=len(y_cal),
        test_metrics=classification_metrics(y_test, p_test),
        test_raw_metrics={"ece": expected_calibration_error(y_test, raw_test), "roc_auc":
                          classification_metrics(y_test, raw_test)["roc_auc"]},
        baseline_metrics=classification_metrics(y_test, np.full(len(y_test), y_train.mean())),
        valid_metrics=classification_metrics(y_cal, p_cal),
        threshold=threshold,
        test_decision=decision_metrics(y_test, p_test, threshold["threshold"],
                                       getattr(config.threshold, "beta", 1.0)),
        importance=shap_importance(booster, x_test, rounds),
        fairness=fairness, test_scores=p_test, test_raw_scores=raw_test)


# --- logging ---------------------------------------------------------------------------------------------------
def pip_requirements() -> list[str]:
    """Pinned to what trained the model (listing them also spares MLflow from inferring them in a subprocess)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "lightgbm", "xgboost", "pandas", "numpy", "scikit-learn")]


def log_classifier(trained: Trained, config: TrainConfig) -> Any:
    """Log the model (pyfunc with signature and input example), its artifacts and held-out numbers into the active
    run; returns MLflow's ``ModelInfo``."""
    import mlflow
    from mlflow.models import infer_signature

    from training.registry import log_heldout

    prepared = trained.prepared
    features = prepared.columns.features
    mlflow.log_params({"task": prepared.task, "dataset": prepared.dataset, "split": prepared.split[:500],
                       "calibration": config.calibration, "threshold_policy": config.threshold.kind,
                       "best_family": trained.tuned.family, "rounds": trained.model.rounds,
                       "trained_on": trained.trained_on, "calibrated_on": trained.calibrated_on,
                       "calibration_rows": trained.calibration_rows,
                       "features": len(features), "test_rows": len(prepared.test),
                       # the monitor joins delayed labels by this horizon (transaction data sets only)
                       **({"horizon_days": config.horizon_days, "train_cutoffs": config.train_cutoffs,
                           "step_days": config.step_days, "top_categories": config.top_categories}
                          if "cutoffs" in prepared.provenance else {})})
    mlflow.set_tags({"kind": "training", "task": prepared.task, "dataset": prepared.dataset,
                     "feature_version": prepared.provenance.get("feature_version", ""),
                     "data_fingerprint": prepared.provenance.get("data_fingerprint", ""),
                     "heldout_target": "label", "heldout_prediction": "probability", "gate_metric": "roc_auc"})
    mlflow.log_metrics({**{f"test_{k}": v for k, v in trained.test_metrics.items()},
                        **{f"test_raw_{k}": v for k, v in trained.test_raw_metrics.items()},
                        **{f"baseline_test_{k}": v for k, v in trained.baseline_metrics.items()},
                        **{f"valid_{k}": v for k, v in trained.valid_metrics.items()},
                        **{f"test_decision_{k}": v for k, v in trained.test_decision.items()},
                        "threshold": trained.threshold["threshold"]})
    if trained.by_category_auc:
        from features.definitions import slug

        mlflow.log_metrics({f"test_roc_auc_{slug(c)}": v for c, v in trained.by_category_auc.items()})
    if trained.fairness:
        mlflow.log_metrics({"test_fairness_tpr_gap": trained.fairness["tpr_gap"],
                            "test_fairness_positive_rate_gap": trained.fairness["positive_rate_gap"]})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        booster_path = _save_booster(trained.booster, trained.tuned.family, folder)
        keep = dict.fromkeys([*prepared.ids, *features, *prepared.attributes, "label"])
        heldout = prepared.test[list(keep)].copy()
        heldout[prepared.columns.numeric] = heldout[prepared.columns.numeric].astype(float)  # as the signature says
        log_heldout(heldout)
        trained.importance.to_csv(folder / "feature_importance.csv", index=False)
        mlflow.log_artifact(str(folder / "feature_importance.csv"))
        _plot_importance(trained.importance, folder / "feature_importance.png")
        _plot_calibration(prepared.test["label"].to_numpy(), trained.test_raw_scores, trained.test_scores,
                          folder / "calibration_curve.png")
        mlflow.log_artifact(str(folder / "feature_importance.png"))
        mlflow.log_artifact(str(folder / "calibration_curve.png"))
        mlflow.log_dict({"threshold": trained.threshold, "policy": config.threshold.model_dump(),
                         "fairness": trained.fairness, "calibrator": trained.model.calibrator}, "decision.json")
        mlflow.log_text(model_card(trained, config), "model_card.md")
        example = _input_example(prepared.test[features])
        signature = infer_signature(example, _output_example(example))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=trained.model, artifacts={"booster": str(booster_path)},
            signature=signature, input_example=example, pip_requirements=pip_requirements(),
            metadata={"task": prepared.task, "feature_version": prepared.provenance.get("feature_version", ""),
                      "data_fingerprint": prepared.provenance.get("data_fingerprint", ""),
                      "threshold": trained.threshold["threshold"]})
    return info


def _output_example(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"probability": np.full(len(frame), 0.5), "decision": np.zeros(len(frame), dtype=bool)})


def _input_example(frame: pd.DataFrame, rows: int = 3) -> pd.DataFrame:
    """A few complete rows (a missing categorical would make MLflow type the column as an object)."""
    complete = frame.dropna()
    example = (complete if len(complete) >= rows else frame).head(rows).copy()
    for c in example.columns:
        if pd.api.types.is_integer_dtype(example[c]):
            example[c] = example[c].astype(float)  # numbers are served as floats: an integer column may be missing
    return example.reset_index(drop=True)


def _plot_importance(importance: pd.DataFrame, path: Path, top: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = importance.head(top)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(head) + 1.2))
    ax.barh(head["feature"], head["mean_abs_shap"])
    ax.set_xlabel("mean |TreeSHAP contribution| (log-odds), test rows")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_calibration(y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
    for name, scores in (("raw booster", raw), ("calibrated", calibrated)):
        observed, predicted = calibration_curve(y, scores, n_bins=10, strategy="quantile")
        ax.plot(predicted, observed, "o-", label=f"{name} (ECE {expected_calibration_error(y, scores):.3f})")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title("calibration on the held-out test rows")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def model_card(trained: Trained, config: TrainConfig) -> str:
    p, m, b = trained.prepared, trained.test_metrics, trained.baseline_metrics
    d = trained.test_decision
    top = ", ".join(f"{r.feature} ({r.mean_abs_shap:.3f})" for r in trained.importance.head(8).itertuples())
    lines = [
        f"# Model card: {p.task} on {p.dataset}",
        "",
        "## Data",
        f"- label: {p.provenance.get('label_definition', 'label')}",
        f"- split: {p.split}",
        f"- rows: train {len(p.train):,}, validation {len(p.valid):,}, test {len(p.test):,}; positive rate "
        f"train {p.train['label'].mean():.3f}, test {p.test['label'].mean():.3f}",
        f"- feature version: {p.provenance.get('feature_version')}; data fingerprint: "
        f"{p.provenance.get('data_fingerprint')}",
        f"- features ({len(p.columns.features)}): {', '.join(p.columns.features)}",
        "",
        "## Model",
        f"- {trained.tuned.family}, {trained.model.rounds} boosting rounds, chosen by an Optuna study "
        f"({len(trained.tuned.study.trials)} trials, best validation ROC-AUC {trained.tuned.valid_auc:.4f})",
        f"- trained on: {trained.trained_on}",
        f"- calibration: {config.calibration} on {trained.calibrated_on}; test ECE "
        f"{trained.test_raw_metrics['ece']:.4f} raw -> {m['ece']:.4f} calibrated",
        f"- decision: act when probability >= {trained.threshold['threshold']:.4f} "
        f"({config.threshold.kind} policy: {config.threshold.model_dump_json()}), chosen on the same predictions",
        "",
        "## Held-out test",
        "| metric | model | constant baseline |",
        "|---|---|---|",
        *[f"| {k} | {m[k]:.4f} | {b[k]:.4f} |" for k in ("roc_auc", "pr_auc", "log_loss", "brier", "ece",
                                                          "lift_top_decile", "precision_at_k", "recall_at_k")],
        "",
        f"At the threshold: precision {d['precision']:.3f}, recall {d['recall']:.3f}, action rate "
        f"{d['action_rate']:.3f}.",
        "",
        "## What drives it",
        f"Mean |TreeSHAP| on test rows: {top}.",
    ]
    if trained.by_category_auc:
        lines += ["", "## Per category (test ROC-AUC)",
                  ", ".join(f"{c} {v:.3f}" for c, v in trained.by_category_auc.items())]
    if trained.fairness:
        f = trained.fairness
        lines += ["", f"## Fairness by {config.fairness_attribute}",
                  f"true-positive-rate gap {f['tpr_gap']:.3f}, positive-rate gap {f['positive_rate_gap']:.3f} "
                  f"over {int(f['groups_compared'])} groups of at least 30 rows",
                  "", "| group | rows | positive rate | TPR |", "|---|---|---|---|",
                  *[f"| {g} | {int(s['rows'])} | {s['positive_rate']:.3f} | {s['tpr']:.3f} |"
                    for g, s in f["groups"].items()]]
    lines += ["", "## Caveats",
              f"- Scores are calibrated on {trained.calibrated_on}; recalibrate if the population drifts.",
              "- The held-out numbers come from one test part; the promotion gate adds bootstrap intervals."]
    return "\n".join(lines) + "\n"


# --- the whole job -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    task: str
    dataset: str
    model_name: str
    run_id: str
    version: str
    model_uri: str
    trained: Trained


def train_and_register(settings: Any, task: str, dataset: str, config: TrainConfig, study_name: str | None = None,
                       on_trial: Any = None, model_name: str | None = None) -> Outcome:
    """Prepare, tune, fit, calibrate and log one classifier in one MLflow run, then register it as the
    ``challenger`` of the registered model named after the task. The tracking store is checked before any work,
    and nothing is registered unless every step before succeeded."""
    import mlflow

    from training.registry import check_name, connect, register
    from training.tracking import tracked_tune, use_experiment

    client = connect(settings.tracking_uri)
    model_name = check_name(model_name or task)
    prepared = prepare(settings.dataset_dir(dataset), task, config)
    # A study belongs to one data snapshot and one search space: rerunning the same job continues it (a larger
    # budget), anything else starts a new one.
    import hashlib

    fingerprint = str(prepared.provenance.get("data_fingerprint", ""))[:8]
    space = hashlib.sha256(config.model_dump_json(exclude={"tune": {"trials", "timeout_s", "warm_start"}, "threshold": True,
                                                           "fairness_attribute": True}).encode()).hexdigest()[:6]
    study = study_name or f"{task}-{dataset}-{fingerprint}-{space}-seed{config.tune.seed}"
    settings.home.mkdir(parents=True, exist_ok=True)
    use_experiment(settings.tracking_uri, f"train-{task}", settings.artifact_root)
    with mlflow.start_run(run_name=f"{task}-{dataset}") as run:
        mlflow.set_tags({"kind": "training", "study": study,
                         **({"fairness_attribute": config.fairness_attribute} if config.fairness_attribute else {})})

        def tune_fn(split: Split, search: TuneConfig) -> TuneResult:
            result, _ = tracked_tune(split, search, settings.optuna_storage_url, study, settings.tracking_uri,
                                     f"train-{task}", settings.artifact_root, on_trial)
            return result

        trained = fit_classifier(prepared, config, tune_fn)
        info = log_classifier(trained, config)
    m = trained.test_metrics
    version = register(client, model_name, info.model_uri, run.info.run_id, tags={
        "dataset": dataset, "feature_version": str(prepared.provenance.get("feature_version", "")),
        "data_fingerprint": str(prepared.provenance.get("data_fingerprint", "")),
        "test_roc_auc": f"{m['roc_auc']:.4f}", "test_ece": f"{m['ece']:.4f}",
        "threshold": f"{trained.threshold['threshold']:.4f}"},
        description=f"{task} on {dataset}: test ROC-AUC {m['roc_auc']:.4f}, ECE {m['ece']:.4f}; {prepared.split}",
        kind="classifier")
    return Outcome(task, dataset, model_name, run.info.run_id, version, info.model_uri, trained)
