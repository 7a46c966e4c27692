"""Purchase-cycle models: the per-customer summary, the candidates, honest selection and the MLflow pyfunc."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from features.synthetic import SyntheticConfig, generate
from training.cycle import (
    INPUT_COLUMNS,
    OUTPUT_COLUMNS,
    BTYDModel,
    CycleConfig,
    CycleError,
    CycleSelection,
    HybridModel,
    SurvivalModel,
    customer_summary,
    cycle_metrics,
    log_cycle_model,
    select_cycle_model,
    time_grid,
)
from training.tracking import use_experiment

HORIZON = 60
SYNTH = SyntheticConfig(customers=700, days=420, events=False, seed=7)
CALIBRATION_END = pd.Timestamp(SYNTH.start) + pd.Timedelta(days=SYNTH.days - HORIZON)  # holdout: the last 60 days
CONFIG = CycleConfig(horizon_days=HORIZON, candidates=("bgnbd", "aft", "hybrid"), grid_points=12)


def tx(rows: list[tuple[str, str, float, bool]]) -> pd.DataFrame:
    return pd.DataFrame({"customer_id": [r[0] for r in rows], "timestamp": pd.to_datetime([r[1] for r in rows]),
                         "amount": [r[2] for r in rows], "is_return": [r[3] for r in rows]})


TINY = tx([
    ("a", "2024-01-01 09:00", 10.0, False), ("a", "2024-01-01 17:00", 5.0, False),  # one purchase day
    ("a", "2024-01-05 10:00", 20.0, False), ("a", "2024-01-10 10:00", 30.0, False),
    ("a", "2024-01-12 10:00", -30.0, True),  # a return: not a purchase
    ("b", "2024-01-03 12:00", 7.0, False),
    ("a", "2024-01-18 08:00", 9.0, False), ("a", "2024-01-18 20:00", 1.0, False), ("a", "2024-01-20 08:00", 2.0, False),
    ("c", "2024-01-16 10:00", 4.0, False),  # first purchase after the cutoff: not in the summary
    ("b", "2024-01-30 10:00", 3.0, False),  # after the horizon
])


# --- the summary -----------------------------------------------------------------------------------------------
def test_summary_matches_a_hand_computed_example() -> None:
    # given purchases of a on Jan 1 (two lines), 5 and 10, a return on Jan 12, b on Jan 3; cutoff Jan 15
    s = customer_summary(TINY, "2024-01-15", horizon_days=10).set_index("customer_id")

    # then: BTYD convention in days, repeat days only in the monetary value, targets over [Jan 15, Jan 25)
    assert list(s.index) == ["a", "b"]
    a, b = s.loc["a"], s.loc["b"]
    assert (a["frequency"], a["recency"], a["T"], a["monetary"]) == (2.0, 9.0, 14.0, 25.0)
    assert (b["frequency"], b["recency"], b["T"], b["monetary"]) == (0.0, 0.0, 12.0, 0.0)
    assert (a["days_since_last"], a["purchases_30d"], a["spend_total"], a["gap_mean_days"]) == (5.0, 3.0, 65.0, 4.5)
    assert np.isnan(b["gap_mean_days"])
    assert (a["actual_purchases"], a["event"], a["days_to_next"]) == (2.0, True, 3.5)
    assert (b["actual_purchases"], b["event"], b["days_to_next"]) == (0.0, False, 10.0)


def test_summary_in_weeks_scales_recency_and_t_only() -> None:
    days = customer_summary(TINY, "2024-01-15")
    weeks = customer_summary(TINY, "2024-01-15", time_unit_days=7.0)
    assert np.allclose(weeks["T"] * 7, days["T"]) and np.allclose(weeks["recency"] * 7, days["recency"])
    assert weeks["frequency"].equals(days["frequency"]) and weeks["days_since_last"].equals(days["days_since_last"])


def test_transactions_after_the_cutoff_never_change_the_features() -> None:
    before = customer_summary(TINY, "2024-01-15")
    after = customer_summary(TINY[TINY["timestamp"] < "2024-01-15"], "2024-01-15")
    pd.testing.assert_frame_equal(before, after)


@pytest.mark.parametrize(("cutoff", "horizon", "message"), [
    ("2023-12-01", None, "no purchases before the cutoff"),
    ("2024-01-15", 30, "past the end of the data"),
    ("2024-01-15 12:00", None, "must be a whole day"),
])
def test_summary_errors_are_one_line(cutoff: str, horizon: int | None, message: str) -> None:
    with pytest.raises(CycleError, match=message) as info:
        customer_summary(TINY, cutoff, horizon)
    assert "\n" not in str(info.value)


def test_summary_needs_the_transaction_columns() -> None:
    with pytest.raises(CycleError, match="lack the column"):
        customer_summary(TINY.drop(columns="amount"), "2024-01-15")


# --- candidates on seeded synthetic data -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic() -> pd.DataFrame:
    return generate(SYNTH).transactions


@pytest.fixture(scope="module")
def selection(synthetic: pd.DataFrame) -> CycleSelection:
    return select_cycle_model(synthetic, CALIBRATION_END, CONFIG)


def assert_valid_outputs(out: pd.DataFrame, summary: pd.DataFrame, horizon: int, alive: bool = True) -> None:
    assert list(out.columns) == ["customer_id", *OUTPUT_COLUMNS]
    assert len(out) == len(summary) and out["customer_id"].tolist() == summary["customer_id"].tolist()
    assert (out["expected_purchases"] >= 0).all() and np.isfinite(out["expected_purchases"]).all()
    assert out["p_purchase"].between(0, 1).all()
    assert out["expected_days_to_next"].between(0, horizon + 1e-9).all()
    if alive:
        assert out["p_alive"].between(0, 1).all()


@pytest.mark.slow
def test_selection_scores_every_candidate_and_refits_the_winner(selection: CycleSelection,
                                                                 synthetic: pd.DataFrame) -> None:
    assert set(selection.scores) == {"bgnbd", "aft", "hybrid"} and not selection.failures
    assert selection.winner == min(selection.scores, key=lambda k: selection.scores[k]["rmse"])
    for metrics in selection.scores.values():
        assert {"rmse", "mae", "total_ratio", "concordance", "days_mae", "brier"} <= set(metrics)
    # the refitted winner beats predicting nothing on the real holdout
    holdout = customer_summary(synthetic, CALIBRATION_END, HORIZON)
    out = selection.model.predict(holdout, HORIZON)
    assert_valid_outputs(out, holdout, HORIZON, alive=selection.winner != "aft")
    zero = np.sqrt(np.mean(holdout["actual_purchases"] ** 2))
    assert cycle_metrics(holdout, out)["rmse"] < zero


@pytest.mark.slow
def test_candidates_outputs_have_valid_shapes_and_ranges(synthetic: pd.DataFrame) -> None:
    tx_ = synthetic[synthetic["timestamp"] < CALIBRATION_END]
    inner = CALIBRATION_END - pd.Timedelta(days=HORIZON)
    labeled = customer_summary(tx_, inner, HORIZON, data_end=CALIBRATION_END)
    current = customer_summary(tx_, CALIBRATION_END)
    base = BTYDModel(grid_points=12).fit(current)
    out = base.predict(current, HORIZON)
    assert_valid_outputs(out, current, HORIZON)
    assert (out["expected_purchases"] >= out["p_purchase"] - 1e-6).all()  # E[N] >= P(N >= 1)
    assert (out["expected_spend"].dropna() >= 0).all() and out["expected_spend"].notna().all()
    # a longer horizon means more purchases and a higher chance of one
    longer = base.predict(current, 2 * HORIZON)
    assert (longer["expected_purchases"] >= out["expected_purchases"] - 1e-9).all()
    assert (longer["p_purchase"] >= out["p_purchase"] - 1e-9).all()

    aft = SurvivalModel(HORIZON, grid_points=12).fit(current, labeled).predict(current, HORIZON)
    assert_valid_outputs(aft, current, HORIZON, alive=False)
    assert aft["p_alive"].isna().all()

    hybrid = HybridModel(HORIZON, grid_points=12).fit(current, labeled, base=base).predict(current, HORIZON)
    assert_valid_outputs(hybrid, current, HORIZON)
    assert np.allclose(hybrid["p_alive"], out["p_alive"])


@pytest.mark.slow
def test_expected_days_to_next_is_the_integral_whatever_the_horizon(synthetic: pd.DataFrame) -> None:
    """The restricted mean time to next purchase is the integral of the no-purchase curve up to H, at any H.
    Evenly spaced points made it grow with H (a floor of half a step, H/48: 15 days at H = 730 for a customer
    buying every 3 days)."""
    current = customer_summary(synthetic[synthetic["timestamp"] < CALIBRATION_END], CALIBRATION_END)
    base = BTYDModel().fit(current)
    for horizon in (30, 365, 730):
        fine = np.linspace(0.0, horizon, 20 * horizon + 1)
        exact = np.trapezoid(base.survival(current, fine), fine, axis=1)
        days = base.predict(current, horizon)["expected_days_to_next"].to_numpy()
        assert np.max(np.abs(days - exact) / exact) < 0.015, horizon


@pytest.mark.slow
def test_bgnbd_in_closed_form_answers_what_the_library_answers(synthetic: pd.DataFrame) -> None:
    """Expected purchases, P(alive), spend and (for repeat buyers) the no-purchase curve equal pymc-marketing's
    own predictions from the same fit; for one-time buyers the curve is the model's exact one."""
    from training.cycle import _point

    current = customer_summary(synthetic[synthetic["timestamp"] < CALIBRATION_END], CALIBRATION_END).head(300)
    base = BTYDModel(time_unit_days=7.0, grid_points=6).fit(current)
    assert base.spend_model_ is not None
    data, weeks = base._data(current), HORIZON / 7.0
    out = base.predict(current, HORIZON)
    assert np.allclose(out["expected_purchases"], _point(base.model_.expected_purchases(data=data, future_t=weeks)),
                       rtol=1e-12, atol=0)
    assert np.allclose(out["p_alive"], _point(base.model_.expected_probability_alive(data=data)), rtol=1e-12, atol=0)
    gg = pd.DataFrame({"customer_id": np.arange(len(current)), "frequency": current["frequency"].to_numpy(float),
                       "monetary_value": current["monetary"].clip(lower=0).to_numpy(float)})
    spend = _point(base.spend_model_.expected_customer_spend(data=gg))
    assert np.allclose(out["expected_spend"], out["expected_purchases"] * spend, rtol=1e-12, atol=0)

    grid = np.array([0.0, 3.0, 30.0, 90.0])
    curve = base.survival(current, grid)
    library = np.column_stack([np.ones(len(current))] + [
        np.clip(_point(base.model_.expected_probability_no_purchase(t=d / 7.0, data=data)), 0, 1) for d in grid[1:]])
    repeat = current["frequency"].to_numpy() > 0
    assert repeat.sum() > 50 and (~repeat).sum() > 20
    assert np.allclose(curve[repeat], np.minimum.accumulate(library, axis=1)[repeat], rtol=0, atol=1e-8)
    alpha, r = base.params_["alpha"], base.params_["r"]
    T = current["T"].to_numpy()[~repeat, None]
    assert np.allclose(curve[~repeat], ((alpha + T) / (alpha + T + grid / 7.0)) ** r, rtol=1e-12, atol=0)
    at_horizon = base.survival(current, time_grid(HORIZON, base.grid_points))[:, -1]
    assert np.array_equal(out["p_purchase"], 1 - at_horizon)


@pytest.mark.slow
def test_pareto_nbd_in_closed_form_answers_what_the_library_answers(synthetic: pd.DataFrame) -> None:
    """Expected purchases, P(alive) and the no-purchase curve equal pymc-marketing's, on both sides of its
    alpha >= beta branch (the fitted parameters, then alpha and beta swapped in the library's fit result)."""
    from training.cycle import _point

    current = customer_summary(synthetic[synthetic["timestamp"] < CALIBRATION_END], CALIBRATION_END).head(300)
    base = BTYDModel(kind="pareto_nbd", time_unit_days=7.0, spend=False, grid_points=6).fit(current)
    data, grid = base._data(current), np.array([0.0, 3.0, 30.0, 90.0])
    fitted = dict(base.params_)
    for alpha, beta in ((fitted["alpha"], fitted["beta"]), (fitted["beta"], fitted["alpha"])):
        base.params_ = {**fitted, "alpha": alpha, "beta": beta}
        base.model_.fit_result["alpha"].values[...] = alpha
        base.model_.fit_result["beta"].values[...] = beta
        out = base.predict(current, HORIZON)
        library = _point(base.model_.expected_purchases(data=data, future_t=HORIZON / 7.0))
        assert np.allclose(out["expected_purchases"], library, rtol=1e-10, atol=0)
        library = _point(base.model_.expected_probability_alive(data=data))
        assert np.allclose(out["p_alive"], library, rtol=1e-10, atol=0)
        library = np.column_stack([np.ones(len(current))] + [np.clip(_point(base.model_.expected_purchase_probability(
            data=data, n_purchases=0, future_t=d / 7.0)), 0, 1) for d in grid[1:]])
        curve = base.survival(current, grid)
        assert np.allclose(curve, np.minimum.accumulate(library, axis=1), rtol=0, atol=1e-10)
        assert np.array_equal(base.survival(current, grid, chunk_rows=10), curve)  # in chunks: the same


def test_bgnbd_no_purchase_of_one_time_buyers_matches_a_simulation_of_the_model() -> None:
    """The BG/NBD story simulated for customers without a repeat purchase: purchases arrive as a Poisson process at
    a gamma-distributed rate, and death only ever follows a purchase, so until the first repeat purchase nobody
    dies and only that purchase's time matters. Among customers with none in (0, T], the share with none in
    (T, T + t] is what ``_bgnbd_no_purchase`` says (pymc-marketing 0.19's formula answers 0.95 here)."""
    from training.cycle import _bgnbd_no_purchase

    params = {"a": 2.0, "b": 6.0, "alpha": 150.0, "r": 2.0}
    T, t, n = 300.0, 60.0, 400_000
    rng = np.random.default_rng(0)
    rate = rng.gamma(params["r"], 1 / params["alpha"], n)
    first_repeat = rng.exponential(1 / rate)  # nobody dies before a repeat purchase
    none_yet = first_repeat > T
    simulated = float(np.mean(first_repeat[none_yet] > T + t))
    zero = np.zeros(1)
    model = float(_bgnbd_no_purchase(params, zero, zero, np.array([T]), np.array([t]))[0, 0])
    assert none_yet.sum() > 20_000
    assert abs(model - simulated) < 0.01, (model, simulated)


@pytest.mark.slow
def test_selection_never_looks_at_the_holdout(synthetic: pd.DataFrame, selection: CycleSelection) -> None:
    # given the same calibration data but a holdout rewritten: half of it dropped, the rest tripled
    holdout = synthetic[synthetic["timestamp"] >= CALIBRATION_END]
    rewritten = pd.concat([synthetic[synthetic["timestamp"] < CALIBRATION_END],
                           *[holdout.iloc[::2].assign(timestamp=holdout["timestamp"].iloc[::2] + pd.Timedelta(hours=h))
                             for h in (0, 1, 2)]])
    again = select_cycle_model(rewritten, CALIBRATION_END, CONFIG)

    # then the same model is chosen on the same validation scores and predicts the same
    assert again.winner == selection.winner
    assert again.scores == selection.scores
    current = customer_summary(synthetic[synthetic["timestamp"] < CALIBRATION_END], CALIBRATION_END)
    pd.testing.assert_frame_equal(again.model.predict(current, HORIZON), selection.model.predict(current, HORIZON))


@pytest.mark.slow
def test_pyfunc_round_trip_gives_the_same_numbers(selection: CycleSelection, synthetic: pd.DataFrame,
                                                  tmp_path: Path) -> None:
    use_experiment(os.environ["MLFLOW_TRACKING_URI"], "test", artifact_root=str(tmp_path / "artifacts"))
    heldout = customer_summary(synthetic, CALIBRATION_END, HORIZON)
    with mlflow.start_run() as run:
        info = log_cycle_model(selection, heldout, name="cycle")

    loaded = mlflow.pyfunc.load_model(info.model_uri)
    frame = heldout[list(INPUT_COLUMNS)]
    served = loaded.predict(frame)
    pd.testing.assert_frame_equal(served.reset_index(drop=True),
                                  selection.model.predict(frame, HORIZON).reset_index(drop=True),
                                  check_dtype=False)
    shorter = loaded.predict(frame, params={"horizon_days": 7})
    assert (shorter["expected_purchases"] <= served["expected_purchases"] + 1e-9).all()

    logged = mlflow.get_run(run.info.run_id).data
    assert logged.tags["heldout_target"] == "actual_purchases"
    assert logged.tags["heldout_prediction"] == "expected_purchases" and logged.tags["gate_metric"] == "rmse"
    assert f"valid_rmse_{selection.winner}" in logged.metrics and "valid_rmse_bgnbd" in logged.metrics
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="heldout/heldout.parquet",
                                                dst_path=str(tmp_path / "dl"))
    gate = pd.read_parquet(local)
    assert list(gate.columns) == [*INPUT_COLUMNS, "actual_purchases"] and len(gate) == len(heldout)


@pytest.mark.slow
def test_the_gate_scores_a_champion_of_another_horizon_at_the_challengers(selection: CycleSelection,
                                                                          synthetic: pd.DataFrame,
                                                                          tmp_path: Path) -> None:
    """A challenger trained for 30 days is held out on 30-day counts: the champion, trained for 60, is scored at
    30 days too (here the same fitted model: no difference at all), not at its own 60 against 30-day counts."""
    import dataclasses

    from training.registry import GateConfig, connect, evaluate_gate, promote, register

    client = connect(os.environ["MLFLOW_TRACKING_URI"])
    use_experiment(os.environ["MLFLOW_TRACKING_URI"], "test", artifact_root=str(tmp_path / "artifacts"))
    for horizon in (HORIZON, 30):
        chosen = dataclasses.replace(selection, config=CONFIG.model_copy(update={"horizon_days": horizon}))
        with mlflow.start_run() as run:
            info = log_cycle_model(chosen, customer_summary(synthetic, CALIBRATION_END, horizon), name="cycle")
        register(client, "cycle_gate_test", info.model_uri, run.info.run_id, kind="regressor")
        if horizon == HORIZON:
            promote(client, "cycle_gate_test", GateConfig(bootstrap_rounds=100), reason="the first", force=True)

    report = evaluate_gate(client, "cycle_gate_test", GateConfig(bootstrap_rounds=100))
    assert report.numbers["horizon_days"] == 30
    assert report.numbers["delta"] == 0 and report.numbers["champion_rmse"] == report.numbers["challenger_rmse"]


# --- errors ----------------------------------------------------------------------------------------------------
def test_too_few_customers_is_an_error() -> None:
    summary = customer_summary(TINY, "2024-01-15")
    with pytest.raises(CycleError, match="only 2 customers"):
        BTYDModel().fit(summary)


def test_no_repeat_buyers_is_an_error() -> None:
    once = pd.DataFrame({"customer_id": [f"c{i}" for i in range(60)],
                         "timestamp": pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(60), unit="D"),
                         "amount": 1.0, "is_return": False})
    with pytest.raises(CycleError, match="no repeat buyers"):
        BTYDModel().fit(customer_summary(once, "2024-03-15"))


def test_selection_errors(synthetic: pd.DataFrame) -> None:
    with pytest.raises(CycleError, match="past the end of the data|no purchases before"):
        select_cycle_model(synthetic, pd.Timestamp(SYNTH.start) + pd.Timedelta(days=30), CONFIG)
    with pytest.raises(CycleError, match="labeled summary"):
        SurvivalModel(HORIZON).fit(customer_summary(TINY, "2024-01-15"))


@pytest.mark.slow
def test_logging_needs_an_active_run(selection: CycleSelection) -> None:
    with pytest.raises(CycleError, match="no active MLflow run"):
        log_cycle_model(selection)
