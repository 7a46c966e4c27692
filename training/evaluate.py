"""How every model is scored, and how a score becomes a decision.

Pure functions over arrays; metrics come back as plain dicts so they can be logged to MLflow as they are.

- :func:`classification_metrics`: ROC-AUC, PR-AUC, log-loss, Brier, expected calibration error, lift in the top
  decile, precision and recall at K;
- :func:`time_to_event_metrics`: MAE on the observed events and the concordance index with censoring;
- :func:`forecast_metrics`: MAE and MAPE;
- :func:`choose_threshold`: the decision threshold under a :data:`ThresholdPolicy`: a fixed value ("churn
  probability >= 0.7 triggers a retention campaign"), the best F-beta on the calibration rows, or the best
  expected value of acting, given what a true positive is worth and what a false alarm costs.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from lifelines.utils import concordance_index
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from personalize.errors import PersonalizeError


class MetricError(PersonalizeError):
    """The inputs cannot be scored (one class only, probabilities outside [0, 1], mismatched lengths, ...)."""


def _binary(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=float).ravel()
    p = np.asarray(p, dtype=float).ravel()
    if len(y) != len(p):
        raise MetricError(f"{len(y)} labels but {len(p)} scores")
    if len(y) == 0:
        raise MetricError("nothing to score: no rows")
    if not np.isin(y, (0.0, 1.0)).all():
        raise MetricError("labels must be 0 or 1")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise MetricError("scores must be probabilities in [0, 1] (no NaN or inf)")
    if y.min() == y.max():
        raise MetricError(f"the labels have one class only ({int(y[0])}): ranking metrics are undefined")
    return y, p


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Mean |observed rate - mean score| over equal-width score bins, weighted by the bins' sizes."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(which, minlength=bins)
    gaps = np.abs(np.bincount(which, weights=y, minlength=bins) - np.bincount(which, weights=p, minlength=bins))
    return float(gaps.sum() / len(p)) if counts.sum() else float("nan")


def calibration_noise(p: np.ndarray, quantile: float = 0.95, rounds: int = 200, seed: int = 42) -> float:
    """The ECE a *perfectly* calibrated model with these scores would still show on this many rows (labels drawn
    from the scores themselves), at ``quantile``: on a few hundred rows that is several points, so an ECE bound
    below it would refuse a good model for the sample's noise."""
    p = np.asarray(p, dtype=float)
    rng = np.random.default_rng(seed)
    draws = [expected_calibration_error((rng.random(p.size) < p).astype(float), p) for _ in range(rounds)]
    return float(np.quantile(draws, quantile))


def _top_hits(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Positives among the k highest scores. Rows tied at the cut share its remaining places: their expected count
    under a random order, not the first rows' (a constant score finds the base rate, whatever the row order)."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, len(p))
    cut = np.partition(p, len(p) - k)[len(p) - k]  # the k-th highest score
    above, tied = p > cut, p == cut
    return float(y[above].sum() + (k - above.sum()) * y[tied].mean())


def lift(y: np.ndarray, p: np.ndarray, fraction: float = 0.1) -> float:
    """How many times the base rate the positive rate is among the top ``fraction`` of scores."""
    k = max(1, int(round(len(p) * fraction)))
    return float(_top_hits(y, p, k) / k / np.mean(y))


def precision_recall_at_k(y: np.ndarray, p: np.ndarray, k: int) -> tuple[float, float]:
    hits = _top_hits(y, p, k)
    return float(hits / k), float(hits / np.asarray(y, dtype=float).sum())


def classification_metrics(y: np.ndarray, p: np.ndarray, top_fraction: float = 0.1) -> dict[str, float]:
    """Every classifier metric the platform logs; K for precision/recall@K is the top ``top_fraction``."""
    y, p = _binary(y, p)
    k = max(1, int(round(len(p) * top_fraction)))
    precision_k, recall_k = precision_recall_at_k(y, p, k)
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "log_loss": float(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1])),
        "brier": float(brier_score_loss(y, p)),
        "ece": expected_calibration_error(y, p),
        "lift_top_decile": lift(y, p, 0.1),
        "precision_at_k": precision_k,
        "recall_at_k": recall_k,
        "k": float(k),
        "positive_rate": float(y.mean()),
    }


def time_to_event_metrics(days_true: np.ndarray, event: np.ndarray, days_pred: np.ndarray) -> dict[str, float]:
    """MAE over the observed events (a censored time is only a lower bound) and Harrell's concordance index,
    where predicting an earlier purchase for the customer who bought earlier counts as concordant."""
    days_true, days_pred = np.asarray(days_true, dtype=float), np.asarray(days_pred, dtype=float)
    event = np.asarray(event).astype(bool)
    if not (len(days_true) == len(event) == len(days_pred)):
        raise MetricError("days_true, event and days_pred must have the same length")
    if not event.any():
        raise MetricError("no observed events: every time is censored")
    return {
        "mae": float(np.mean(np.abs(days_true[event] - days_pred[event]))),
        "concordance": float(concordance_index(days_true, days_pred, event)),
        "event_rate": float(event.mean()),
    }


def forecast_metrics(actual: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """MAE, and MAPE over the periods whose actual value is not zero (a zero has no percentage error)."""
    actual, predicted = np.asarray(actual, dtype=float), np.asarray(predicted, dtype=float)
    if len(actual) != len(predicted) or len(actual) == 0:
        raise MetricError("actual and predicted must be non-empty and of the same length")
    nonzero = actual != 0
    mape = float(np.mean(np.abs((actual[nonzero] - predicted[nonzero]) / actual[nonzero]))) if nonzero.any() else float("nan")
    return {"mae": float(np.mean(np.abs(actual - predicted))), "mape": mape}


# --- decision thresholds ---------------------------------------------------------------------------------------
class FixedThreshold(BaseModel):
    """Act when the score reaches ``value``: e.g. churn probability >= 0.7 triggers a retention campaign."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["fixed"] = "fixed"
    value: float = Field(gt=0.0, le=1.0)


class FBetaThreshold(BaseModel):
    """The threshold with the best F-beta on the calibration rows (beta > 1 favours recall, < 1 precision)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["f_beta"] = "f_beta"
    beta: float = Field(default=1.0, gt=0.0)


class ExpectedValueThreshold(BaseModel):
    """The threshold that maximises the value of acting on the calibration rows: each true positive acted on is worth
    ``value_tp`` (e.g. margin kept minus the offer), each false positive costs ``cost_fp`` (the offer wasted),
    each positive missed costs ``cost_fn``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["expected_value"] = "expected_value"
    value_tp: float = Field(gt=0.0)
    cost_fp: float = Field(ge=0.0)
    cost_fn: float = Field(default=0.0, ge=0.0)


ThresholdPolicy = Annotated[FixedThreshold | FBetaThreshold | ExpectedValueThreshold, Field(discriminator="kind")]


def _confusion_by_threshold(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each distinct score t (descending): the true and false positives when acting on ``p >= t``."""
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    tp, fp = np.cumsum(y_sorted), np.cumsum(1 - y_sorted)
    last_of_group = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    return p_sorted[last_of_group], tp[last_of_group], fp[last_of_group]


def decision_metrics(y: np.ndarray, p: np.ndarray, threshold: float, beta: float = 1.0) -> dict[str, float]:
    y, p = _binary(y, p)
    act = p >= threshold
    tp, fp = float((act & (y == 1)).sum()), float((act & (y == 0)).sum())
    fn = float(y.sum()) - tp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    b2 = beta * beta
    f_beta = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp) if tp else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f_beta": f_beta,
            "action_rate": float(act.mean()), "tp": tp, "fp": fp, "fn": fn}


def choose_threshold(y: np.ndarray, p: np.ndarray, policy: FixedThreshold | FBetaThreshold | ExpectedValueThreshold
                     ) -> dict[str, float]:
    """The threshold under ``policy``, with the decision metrics it gives on (y, p)."""
    y, p = _binary(y, p)
    if isinstance(policy, FixedThreshold):
        return {**decision_metrics(y, p, policy.value), "policy": policy.kind}
    thresholds, tp, fp = _confusion_by_threshold(y, p)
    fn = y.sum() - tp
    if isinstance(policy, FBetaThreshold):
        b2 = policy.beta ** 2
        score = (1 + b2) * tp / ((1 + b2) * tp + b2 * fn + fp)
        best = int(np.argmax(score))
        return {**decision_metrics(y, p, thresholds[best], policy.beta), "policy": policy.kind}
    value = policy.value_tp * tp - policy.cost_fp * fp - policy.cost_fn * fn
    best = int(np.argmax(value))
    never = -policy.cost_fn * y.sum()  # the value of acting on nobody
    if value[best] <= never:  # no threshold pays: a threshold no probability reaches
        return {**decision_metrics(y, p, float(np.nextafter(1.0, 2.0))), "policy": policy.kind,
                "expected_value": float(never)}
    return {**decision_metrics(y, p, thresholds[best]), "policy": policy.kind, "expected_value": float(value[best])}


# --- comparisons: bootstrap and fairness -----------------------------------------------------------------------
def bootstrap_delta(metric, y: np.ndarray, challenger: np.ndarray, champion: np.ndarray, *, rounds: int = 1000,
                    confidence: float = 0.95, seed: int = 42) -> dict[str, float]:
    """Paired bootstrap of ``metric(y, challenger) - metric(y, champion)``: both models are scored on the same
    resampled rows, so the interval reflects the difference, not each model's own noise. Resamples where the
    metric is undefined (one class only, for AUC) are skipped."""
    y, a, b = np.asarray(y), np.asarray(challenger, dtype=float), np.asarray(champion, dtype=float)
    if not (len(y) == len(a) == len(b)) or len(y) == 0:
        raise MetricError("labels and both models' scores must be non-empty and of the same length")
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(rounds):
        rows = rng.integers(0, len(y), len(y))
        try:
            deltas.append(metric(y[rows], a[rows]) - metric(y[rows], b[rows]))
        except ValueError:
            continue
    if len(deltas) < rounds // 2:
        raise MetricError("the held-out frame is too small to bootstrap the metric")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return {"delta": float(metric(y, a) - metric(y, b)), "ci_low": float(low), "ci_high": float(high),
            "confidence": confidence, "rounds": float(len(deltas))}


def fairness_noise(y: np.ndarray, act: np.ndarray, groups: np.ndarray, min_rows: int = 30, quantile: float = 0.95,
                   rounds: int = 200, seed: int = 42) -> tuple[float, float]:
    """(true-positive-rate gap, positive-rate gap) that :func:`fairness_gaps` reaches, at ``quantile``, when the rows
    are dealt into groups of the same sizes at random: what the sample's noise alone produces, with no group treated
    differently. On groups of a few dozen rows that is well above 0.10, so a bound below it would refuse a model
    for the sample's size (the same reasoning as :func:`calibration_noise`)."""
    import pandas as pd

    y, act = np.asarray(y).astype(bool), np.asarray(act).astype(bool)
    labels = pd.Series(np.asarray(groups, dtype=object))
    valid = labels.notna().to_numpy()
    codes, uniques = pd.factorize(labels[valid].astype(str))
    y, act, k = y[valid], act[valid], len(uniques)
    sizes = np.bincount(codes, minlength=k)
    big = sizes >= min_rows
    if big.sum() < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    tpr_gaps, rate_gaps = [], []
    for _ in range(rounds):
        dealt = rng.permutation(codes)
        positives = np.bincount(dealt, weights=y, minlength=k)
        hits = np.bincount(dealt, weights=y & act, minlength=k)
        rate = np.bincount(dealt, weights=act, minlength=k)[big] / sizes[big]
        rate_gaps.append(rate.max() - rate.min())
        enough = big & (positives >= max(5, min_rows // 6))
        if enough.sum() >= 2:
            tpr = hits[enough] / positives[enough]
            tpr_gaps.append(tpr.max() - tpr.min())
    tpr_noise = float(np.quantile(tpr_gaps, quantile)) if tpr_gaps else float("nan")
    return tpr_noise, float(np.quantile(rate_gaps, quantile))


def fairness_gaps(y: np.ndarray, act: np.ndarray, groups: np.ndarray, min_rows: int = 30) -> dict[str, object]:
    """True-positive rate and positive (action) rate per group, and the largest gap between groups.

    Groups with fewer than ``min_rows`` rows (or no positive, for the true-positive rate) are reported but left
    out of the gaps: a handful of rows says nothing about a model's treatment of a group."""
    y, act = np.asarray(y).astype(bool), np.asarray(act).astype(bool)
    groups = np.asarray(groups, dtype=object)
    per_group: dict[str, dict[str, float]] = {}
    for g in sorted({str(v) for v in groups if v is not None and v == v}):
        rows = np.array([str(v) == g for v in groups])
        positives = rows & y
        per_group[g] = {"rows": float(rows.sum()), "positives": float(positives.sum()),
                        "positive_rate": float(act[rows].mean()),
                        "tpr": float(act[positives].mean()) if positives.any() else float("nan")}
    big = [s for s in per_group.values() if s["rows"] >= min_rows]
    with_pos = [s["tpr"] for s in big if s["positives"] >= max(5, min_rows // 6)]
    rates = [s["positive_rate"] for s in big]
    return {
        "groups": per_group,
        "tpr_gap": float(max(with_pos) - min(with_pos)) if len(with_pos) >= 2 else float("nan"),
        "positive_rate_gap": float(max(rates) - min(rates)) if len(rates) >= 2 else float("nan"),
        "groups_compared": float(len(big)),
    }
