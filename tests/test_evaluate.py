"""Metrics and thresholds: checked against scikit-learn, hand computations and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from sklearn.metrics import fbeta_score, roc_auc_score

from training.evaluate import (ExpectedValueThreshold, FBetaThreshold, FixedThreshold, MetricError, ThresholdPolicy,
                               choose_threshold, classification_metrics, decision_metrics,
                               expected_calibration_error, forecast_metrics, lift, precision_recall_at_k,
                               time_to_event_metrics)

RNG = np.random.default_rng(7)


def test_calibrated_scores_have_a_small_ece_and_shifted_ones_a_large_one() -> None:
    p = RNG.uniform(0, 0.8, 200_000)
    y = (RNG.uniform(size=p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, p + 0.2) == pytest.approx(0.2, abs=0.01)


def test_a_perfect_ranking_lifts_the_top_decile_to_one_over_the_base_rate() -> None:
    y = np.r_[np.ones(100), np.zeros(900)]
    p = np.linspace(1, 0, 1000)
    assert lift(y, p, 0.1) == pytest.approx(10.0)
    assert precision_recall_at_k(y, p, 50) == (1.0, 0.5)
    assert precision_recall_at_k(y, p, 200) == (0.5, 1.0)


def test_tied_scores_share_the_cut_so_a_constant_score_finds_the_base_rate() -> None:
    # Given positives first in row order, and a constant score (the baseline) or a score with ties at the cut
    y = np.r_[np.ones(300), np.zeros(700)]
    constant = np.full(1000, 0.3)
    # Then the constant score lifts nothing and its precision@K is the base rate, whatever the order
    assert lift(y, constant, 0.1) == pytest.approx(1.0) == lift(y[::-1], constant, 0.1)
    assert precision_recall_at_k(y, constant, 100) == pytest.approx((0.3, 0.1))
    # and rows tied at the cut count by their share: 50 sure positives above it, 50 places among 100 tied rows
    # that hold 40 positives
    p = np.r_[np.full(50, 0.9), np.full(40, 0.5), np.full(60, 0.5), np.zeros(850)]
    y = np.r_[np.ones(50), np.ones(40), np.zeros(60), np.zeros(850)]
    assert precision_recall_at_k(y, p, 100) == pytest.approx(((50 + 50 * 0.4) / 100, (50 + 50 * 0.4) / 90))


def test_classification_metrics_agree_with_scikit_learn() -> None:
    y = RNG.integers(0, 2, 500)
    p = np.clip(0.3 * y + RNG.uniform(0, 0.7, 500), 0, 1)
    m = classification_metrics(y, p)
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert set(m) >= {"roc_auc", "pr_auc", "log_loss", "brier", "ece", "lift_top_decile", "precision_at_k",
                      "recall_at_k"}
    assert m["k"] == 50


@pytest.mark.parametrize(("y", "p", "message"), [
    ([1, 1, 1], [0.2, 0.3, 0.9], "one class"),
    ([0, 1], [0.2, 1.3], r"\[0, 1\]"),
    ([0, 1], [0.2, float("nan")], "NaN"),
    ([0, 1, 1], [0.2, 0.4], "3 labels but 2 scores"),
    ([0, 2], [0.2, 0.4], "0 or 1"),
])
def test_unscorable_inputs_are_a_clear_error(y, p, message) -> None:
    with pytest.raises(MetricError, match=message):
        classification_metrics(np.array(y), np.array(p))


def test_concordance_rewards_predicting_the_earlier_buyer_first() -> None:
    days = np.array([5.0, 10.0, 20.0, 30.0, 90.0])
    event = np.array([1, 1, 1, 1, 0])  # the last one is censored at the horizon
    assert time_to_event_metrics(days, event, days)["concordance"] == 1.0
    assert time_to_event_metrics(days, event, days[::-1])["concordance"] == 0.0
    m = time_to_event_metrics(days, event, days + np.array([1, -1, 2, 0, -50]))
    assert m["mae"] == 1.0  # over the four observed events only
    with pytest.raises(MetricError, match="no observed events"):
        time_to_event_metrics(days, np.zeros(5), days)


def test_mape_ignores_periods_with_nothing_sold() -> None:
    m = forecast_metrics(np.array([10.0, 0.0, 20.0]), np.array([12.0, 3.0, 15.0]))
    assert m["mae"] == pytest.approx(10 / 3) and m["mape"] == pytest.approx((0.2 + 0.25) / 2)


def test_the_seeds_retention_rule_is_a_fixed_threshold() -> None:
    policy = TypeAdapter(ThresholdPolicy).validate_python({"kind": "fixed", "value": 0.7})
    y, p = np.array([0, 1, 1, 0]), np.array([0.69, 0.7, 0.95, 0.8])
    choice = choose_threshold(y, p, policy)
    assert choice["threshold"] == 0.7 and choice["tp"] == 2 and choice["fp"] == 1 and choice["action_rate"] == 0.75
    with pytest.raises(ValidationError):
        TypeAdapter(ThresholdPolicy).validate_python({"kind": "fixed", "value": 1.5})


SCORES = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 20).map(lambda v: v / 20)), min_size=2, max_size=60)


@settings(max_examples=150, deadline=None)
@given(SCORES, st.sampled_from([0.5, 1.0, 2.0]))
def test_the_f_beta_threshold_is_the_best_candidate(rows, beta) -> None:
    y, p = (np.array(v) for v in zip(*rows))
    if y.min() == y.max():
        return
    choice = choose_threshold(y, p, FBetaThreshold(beta=beta))
    brute = max(fbeta_score(y, (p >= t).astype(int), beta=beta, zero_division=0) for t in np.unique(p))
    assert choice["f_beta"] == pytest.approx(brute)
    assert decision_metrics(y, p, choice["threshold"], beta)["f_beta"] == pytest.approx(brute)


@settings(max_examples=150, deadline=None)
@given(SCORES, st.floats(1, 100), st.floats(0, 50), st.floats(0, 20))
def test_the_expected_value_threshold_is_the_best_candidate(rows, value_tp, cost_fp, cost_fn) -> None:
    y, p = (np.array(v) for v in zip(*rows))
    if y.min() == y.max():
        return
    policy = ExpectedValueThreshold(value_tp=value_tp, cost_fp=cost_fp, cost_fn=cost_fn)

    def value(t: float) -> float:
        act = p >= t
        tp, fp = (act & (y == 1)).sum(), (act & (y == 0)).sum()
        return value_tp * tp - cost_fp * fp - cost_fn * (y.sum() - tp)

    choice = choose_threshold(y, p, policy)
    best = max([value(t) for t in np.unique(p)] + [value(2.0)])  # 2.0: act on nobody
    assert choice["expected_value"] == pytest.approx(best)
    assert value(choice["threshold"]) == pytest.approx(best)


def test_when_no_threshold_pays_nobody_is_acted_on() -> None:
    y, p = np.array([0, 0, 1, 0]), np.array([0.9, 0.8, 0.1, 0.7])
    choice = choose_threshold(y, p, ExpectedValueThreshold(value_tp=1.0, cost_fp=10.0))
    assert choice["action_rate"] == 0.0 and choice["expected_value"] == 0.0
    assert FixedThreshold(value=0.5).kind == "fixed"


def test_the_gate_can_compare_classifiers_by_a_proper_scoring_rule() -> None:
    """log_loss and brier (higher is better, so minus the loss) agree with scikit-learn, and a calibrated model
    beats one that ranks as well but is off by a factor: ROC-AUC cannot tell them apart, log-loss can."""
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    from training.evaluate import bootstrap_delta
    from training.registry import _neg_error

    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, 4000)
    y = (rng.random(4000) < p).astype(int)
    stale = p * 0.6  # same ranking, probabilities too low: a world that moved under a calibrated model
    assert _neg_error("log_loss")(y, p) == pytest.approx(-log_loss(y, p))
    assert _neg_error("brier")(y, p) == pytest.approx(-brier_score_loss(y, p))
    assert roc_auc_score(y, p) == pytest.approx(roc_auc_score(y, stale))
    d = bootstrap_delta(_neg_error("log_loss"), y, p, stale, rounds=200)
    assert d["ci_low"] > 0.01


def test_fairness_noise_is_what_random_groups_reach_and_a_real_gap_stands_out() -> None:
    """Groups drawn at random: small ones show gaps above 0.10 by chance alone, which the noise bound covers, and it
    shrinks with the groups' size; a model that acts twice as often on one group is beyond it."""
    from training.evaluate import fairness_gaps, fairness_noise

    rng = np.random.default_rng(3)

    def shop(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = rng.random(n) < 0.4
        act = np.where(y, rng.random(n) < 0.7, rng.random(n) < 0.2)
        return y, act, rng.choice(["18-24", "25-34", "35-44", "45-54", "55-64", "65+"], n)

    y, act, groups = shop(300)
    tpr_small, rate_small = fairness_noise(y, act, groups)
    gaps = fairness_gaps(y, act, groups)
    assert tpr_small > 0.10 and rate_small > 0.10  # chance alone on groups of ~50 rows
    assert gaps["tpr_gap"] <= tpr_small * 1.5 and gaps["positive_rate_gap"] <= rate_small * 1.5
    y, act, groups = shop(20_000)
    tpr_big, rate_big = fairness_noise(y, act, groups, rounds=50)
    assert tpr_big < tpr_small / 3 and rate_big < 0.05
    biased = act | ((groups == "65+") & (rng.random(len(act)) < 0.3))
    assert fairness_gaps(y, biased, groups)["positive_rate_gap"] > 3 * rate_big
    # groups too small to compare: no noise to speak of
    assert np.isnan(fairness_noise(y[:40], act[:40], groups[:40])[1])
