"""Purchase forecasts: daily series built right, a planted weekly pattern recovered better than the seasonal-naive
baseline, one pyfunc serving every series through MLflow, and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from training.forecast import (TOTAL, BusinessCalendar, ForecastConfig, ForecastError, ForecastResult,
                               business_calendar, daily_series, forecast_purchases, log_forecast, seasonal_naive,
                               series_name)
from training.tracking import use_experiment

START = pd.Timestamp("2024-01-01")  # a Monday
# Planted mean orders per weekday (Monday first); Sunday closed.
WEEKLY = np.array([40.0, 30.0, 30.0, 35.0, 55.0, 70.0, 0.0])
FAST = dict(holidays_country=None, changepoint_prior_scales=(0.05,), uncertainty_samples=50, holdout_days=14,
            horizon_days=7, min_history_days=42)


def rows(day: str, category: str, order: str, amount: float = 10.0, is_return: bool = False) -> dict:
    return {"customer_id": "c1", "order_id": order, "timestamp": pd.Timestamp(day) + pd.Timedelta(hours=10),
            "amount": -amount if is_return else amount, "quantity": -1 if is_return else 1,
            "is_return": is_return, "category": category}


def planted(days: int = 84, seed: int = 3) -> pd.DataFrame:
    """One order line per order, Poisson counts around the weekly pattern, "a" twice as busy as "b"."""
    rng = np.random.default_rng(seed)
    lines = []
    for d in range(days):
        day = START + pd.Timedelta(days=d)
        n = rng.poisson(WEEKLY[day.dayofweek])
        hours = rng.integers(8, 20, n)
        categories = np.where(rng.random(n) < 2 / 3, "a", "b")
        for i in range(n):
            lines.append({"customer_id": f"c{i}", "order_id": f"o{d}-{i}",
                          "timestamp": day + pd.Timedelta(hours=int(hours[i])), "amount": 20.0, "quantity": 1,
                          "is_return": False, "category": categories[i]})
    return pd.DataFrame(lines)


@pytest.fixture(scope="module")
def result() -> ForecastResult:
    return forecast_purchases(planted(), ForecastConfig(**FAST))


# --- the daily series -------------------------------------------------------------------------------------------
def test_daily_series_count_orders_per_category_and_in_total_fill_gaps_and_skip_returns() -> None:
    frame = pd.DataFrame([rows("2024-03-01", "toys", "o1"), rows("2024-03-01", "toys", "o1"),  # 2 lines, 1 order
                          rows("2024-03-01", "books", "o2"), rows("2024-03-01", "books", "o1"),
                          rows("2024-03-02", "toys", "r9", is_return=True),  # a return is no purchase
                          rows("2024-03-04", "books", "o3", amount=5.0)])
    series = daily_series(frame, ForecastConfig())
    wide = series.pivot(index="ds", columns="series", values="y")
    assert list(wide.index) == list(pd.date_range("2024-03-01", "2024-03-04"))  # days without a purchase are 0
    assert wide[TOTAL].tolist() == [2.0, 0.0, 0.0, 1.0]  # o1 and o2 on the first day
    assert wide["category.toys"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert wide["category.books"].tolist() == [2.0, 0.0, 0.0, 1.0]
    kitchen = daily_series(frame.assign(category=frame["category"].replace({"toys": "Küche & Bad"})), ForecastConfig())
    assert "category.Kuche_Bad" in set(kitchen["series"])
    assert series_name("category.Küche & Bad") == "category.Kuche_Bad"


@pytest.mark.parametrize(("measure", "first_day"), [("orders", 2.0), ("spend", 40.0), ("units", 4.0)])
def test_the_measure_is_configurable(measure: str, first_day: float) -> None:
    frame = pd.DataFrame([rows("2024-03-01", "toys", "o1"), rows("2024-03-01", "toys", "o1"),
                          rows("2024-03-01", "books", "o2"), rows("2024-03-01", "books", "o2"),
                          rows("2024-03-02", "toys", "o3")])
    series = daily_series(frame, ForecastConfig(measure=measure, group_by=()))
    assert series["series"].unique().tolist() == [TOTAL]
    assert series["y"].iloc[0] == first_day


def test_a_long_gap_is_a_yearly_shutdown_and_an_empty_weekday_is_closed() -> None:
    days = pd.date_range("2023-11-01", "2024-02-29")
    total = pd.Series(np.where(days.dayofweek == 6, 0.0, 10.0), index=days)
    total[(days >= "2023-12-23") & (days <= "2024-01-02")] = 0.0
    total["2024-02-12"] = 0.0  # a single quiet Monday is neither
    calendar, notes = business_calendar(total, ForecastConfig(shutdown_min_days=7))
    assert calendar.closed_weekdays == (6,)
    assert (12, 25) in calendar.shutdown_days and (1, 2) in calendar.shutdown_days
    assert (12, 22) not in calendar.shutdown_days and (2, 12) not in calendar.shutdown_days
    assert len(notes) == 2
    assert calendar.closed(pd.DatetimeIndex(["2024-12-25", "2024-12-20", "2024-12-22"])).tolist() == [True, False, True]


def test_the_seasonal_naive_baseline_repeats_the_last_week() -> None:
    history = pd.Series(np.arange(10.0))
    assert seasonal_naive(history, 9).tolist() == [3, 4, 5, 6, 7, 8, 9, 3, 4]


# --- the forecast -----------------------------------------------------------------------------------------------
def test_a_planted_weekly_pattern_is_recovered_and_beats_the_naive_baseline(result: ForecastResult) -> None:
    assert set(result.metrics) == {TOTAL, "category.a", "category.b"}
    assert result.calendar.closed_weekdays == (6,) and not result.yearly
    total = result.metrics[TOTAL]
    assert total["mae"] < total["baseline_mae"]
    assert result.overall["mae"] < result.overall["baseline_mae"]
    ahead = result.forecast.loc[result.forecast["series"] == TOTAL]
    by_weekday = ahead.set_index(ahead["ds"].dt.dayofweek)["yhat"].sort_index()
    assert by_weekday[6] == 0.0  # the closed day
    assert np.abs(by_weekday.to_numpy()[:6] - WEEKLY[:6]).max() < 0.2 * WEEKLY[:6].mean()
    assert (ahead["yhat_lower"] <= ahead["yhat"]).all() and (ahead["yhat"] <= ahead["yhat_upper"]).all()
    assert ahead["ds"].min() == result.series["ds"].max() + pd.Timedelta(days=1) and len(ahead) == 7


def test_the_forecast_is_deterministic(result: ForecastResult) -> None:
    again = forecast_purchases(planted(), ForecastConfig(**{**FAST, "group_by": ()}))
    first = result.forecast.loc[result.forecast["series"] == TOTAL].reset_index(drop=True)
    pd.testing.assert_frame_equal(again.forecast, first)


def test_max_series_keeps_the_busiest_values() -> None:
    small = forecast_purchases(planted(), ForecastConfig(**{**FAST, "max_series": 1, "horizon_days": 1}))
    assert set(small.models) == {TOTAL, "category.a"}


# --- MLflow -----------------------------------------------------------------------------------------------------
def test_the_pyfunc_serves_every_series_and_the_run_carries_the_gate_inputs(result: ForecastResult,
                                                                            tmp_path: Path) -> None:
    use_experiment(os.environ["MLFLOW_TRACKING_URI"], "test", artifact_root=str(tmp_path))
    with mlflow.start_run() as run:
        info = log_forecast(result)
    model = mlflow.pyfunc.load_model(info.model_uri)
    ask = result.forecast.sample(frac=1.0, random_state=0)[["series", "ds"]].reset_index(drop=True)
    answer = model.predict(ask)
    expected = ask.merge(result.forecast, on=["series", "ds"], how="left")
    np.testing.assert_allclose(answer[["yhat", "yhat_lower", "yhat_upper"]].to_numpy(),
                               expected[["yhat", "yhat_lower", "yhat_upper"]].to_numpy(), rtol=1e-6)
    with pytest.raises(ForecastError, match="unknown series 'category.zzz'"):
        model.predict(pd.DataFrame({"series": ["category.zzz"], "ds": [pd.Timestamp("2024-04-01")]}))
    assert model.predict(pd.DataFrame({"series": [TOTAL], "ds": ["2024-04-01"]}))["yhat"].notna().all()  # text dates
    # a day's interval is the same whichever other days are asked beside it (Prophet samples the whole frame)
    day = result.forecast["ds"].max()
    alone, within = (model.predict(pd.DataFrame({"series": TOTAL, "ds": days})).iloc[-1]
                     for days in ([day], pd.date_range(day - pd.Timedelta(days=9), day)))
    assert alone.to_dict() == within.to_dict()
    beyond = model.predict(pd.DataFrame({"series": TOTAL, "ds": [day, day + pd.Timedelta(days=400)]}))  # past the grid
    assert beyond.notna().all(axis=None) and beyond.iloc[0].to_dict() == alone.to_dict()  # the grid's day unmoved

    logged = mlflow.get_run(run.info.run_id)
    assert {"mae", "mape", "baseline_mae", "mae_total", "baseline_mae_category.a"} <= set(logged.data.metrics)
    assert logged.data.tags["heldout_target"] == "actual" and logged.data.tags["heldout_prediction"] == "yhat"
    assert logged.data.tags["gate_metric"] == "mae"
    heldout = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                  artifact_path="heldout/heldout.parquet"))
    assert {"series", "ds", "actual"} <= set(heldout.columns) and len(heldout) == 3 * 14
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/holdout_total.png"}


def test_the_gate_refuses_to_compare_forecasts_of_different_measures(result: ForecastResult,
                                                                       tmp_path: Path) -> None:
    """Daily spend against daily orders is no comparison: the gate says so (promote --force --reason still can),
    and the served model says which measure it forecasts."""
    from training.registry import GateConfig, connect, evaluate_gate, promote, register

    client = connect(os.environ["MLFLOW_TRACKING_URI"])
    use_experiment(os.environ["MLFLOW_TRACKING_URI"], "test", artifact_root=str(tmp_path))
    spend = forecast_purchases(planted(), ForecastConfig(**{**FAST, "measure": "spend"}))
    for fitted in (result, spend):
        with mlflow.start_run() as run:
            info = log_forecast(fitted)
        register(client, "forecast_gate_test", info.model_uri, run.info.run_id, kind="regressor")
        if fitted is result:
            promote(client, "forecast_gate_test", GateConfig(bootstrap_rounds=100), reason="the first", force=True)
    assert mlflow.pyfunc.load_model(info.model_uri).unwrap_python_model().measure == "spend"

    report = evaluate_gate(client, "forecast_gate_test", GateConfig(bootstrap_rounds=100))
    [check] = [c for c in report.checks if c.name == "not_worse_than_champion"]
    assert not report.passed and not check.passed
    assert "trained with measure 'orders' and the challenger with 'spend'" in check.detail


def test_logging_needs_an_active_run(result: ForecastResult) -> None:
    with pytest.raises(ForecastError, match="active MLflow run"):
        log_forecast(result)


# --- errors -----------------------------------------------------------------------------------------------------
def test_too_short_a_history_is_a_clear_error() -> None:
    with pytest.raises(ForecastError, match="at least 42 are needed"):
        forecast_purchases(planted(days=50), ForecastConfig(**FAST))


def test_no_purchases_is_a_clear_error() -> None:
    returns = pd.DataFrame([rows("2024-03-01", "toys", "r1", is_return=True)])
    with pytest.raises(ForecastError, match="no purchases"):
        daily_series(returns, ForecastConfig())


def test_a_missing_group_column_is_a_clear_error() -> None:
    with pytest.raises(ForecastError, match="segment"):
        daily_series(planted(days=7), ForecastConfig(group_by=("segment",)))


@pytest.mark.parametrize("bad", [{"holdout_days": 3}, {"closed_weekdays": (7,)}, {"changepoint_prior_scales": ()},
                                 {"group_by": ("total",)}, {"unknown": 1}])
def test_a_bad_config_is_rejected_at_the_entry(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ForecastConfig(**bad)


def test_the_calendar_round_trips() -> None:
    calendar = BusinessCalendar((5,), ((12, 25),))
    assert BusinessCalendar.from_dict(calendar.to_dict()) == calendar
