"""Purchase-cycle forecasts: Prophet models of daily purchase volume per category (or segment) and in total.

Three stages, each a plain function:

- :func:`daily_series`: validated transactions -> one daily series per group value plus ``total``; the value
  is the day's purchase volume (distinct orders by default, or spend, or units), returns excluded, days without
  a purchase filled with 0 within the observed span;
- :func:`forecast_purchases`: the business calendar (weekdays the shop is closed, long shutdowns such as a
  Christmas break), an out-of-time evaluation on the last ``holdout_days`` (Prophet beside a seasonal-naive
  baseline, "the same weekday of the last observed week"), then a refit on all data and a forecast of the next
  ``horizon_days``. Pure: no MLflow, no clock, no files of ours (cmdstan writes its own temporary files);
- :func:`log_forecast`: logs a :class:`ForecastResult` into the active MLflow run: metrics (baseline first),
  each series' Prophet model (``mlflow.prophet``), a holdout plot, the held-out frame for a promotion gate, and
  one pyfunc bundling every series (:class:`PurchaseForecastModel`), whose :class:`~mlflow.models.ModelInfo`
  the caller registers as ``purchase_forecast``.

The calendar: a weekday with no purchase on any day of the fitting window is *closed* (Online Retail never
sells on Saturday); a run of at least ``shutdown_min_days`` days without a purchase is a *shutdown* and recurs
every year on the same calendar days (Online Retail's Christmas break). Closed and shutdown days are left out of
the fit (they are not a low-demand day, they are no day at all) and forecast as exactly 0; shorter gaps such as
bank holidays are Prophet country holidays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import threading
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Iterator, Literal

import mlflow
import mlflow.prophet
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from prophet import Prophet
from prophet.serialize import model_from_json, model_to_json
from pydantic import BaseModel, ConfigDict, Field, model_validator

from features.definitions import ascii_letters
from personalize.errors import PersonalizeError
from training.evaluate import forecast_metrics

log = logging.getLogger(__name__)

TOTAL = "total"
REGISTERED_MODEL_NAME = "purchase_forecast"
_QUIET_LOGGERS = ("cmdstanpy", "prophet", "prophet.plot")
_SERIES_NAME = re.compile(r"[^0-9A-Za-z_.-]+")
PYFUNC_INPUT = ("series", "ds")
PYFUNC_OUTPUT = ("yhat", "yhat_lower", "yhat_upper")
GRID_DAYS = 366  # the served model predicts every day up to this far past the history at once (the API's longest)


class ForecastError(PersonalizeError):
    """The purchases cannot be forecast as asked: no purchases, too short a history, an unknown series."""


class ForecastConfig(BaseModel):
    """How the daily series are built, evaluated and forecast."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    measure: Literal["orders", "spend", "units"] = "orders"  # distinct orders, sum of amount, sum of quantity
    group_by: tuple[str, ...] = ("category",)  # transaction columns, one set of series per column; () = total only
    max_series: int = Field(default=10, ge=0)  # per column, the values with the most volume in the fit window
    holdout_days: int = Field(default=28, ge=7)
    horizon_days: int = Field(default=28, ge=1)
    min_history_days: int = Field(default=56, ge=14)  # calendar days before the holdout
    weekly_seasonality: bool = True
    yearly_seasonality: Literal["auto", "on", "off"] = "auto"  # auto: on when the fit spans >= yearly_min_days
    yearly_min_days: int = Field(default=365, ge=1)
    seasonality_mode: Literal["additive", "multiplicative"] = "additive"
    holidays_country: str | None = "GB"  # Prophet's add_country_holidays; None for none
    # Trend flexibility; with several candidates, each series takes the one with the lowest MAE on the
    # ``holdout_days`` just before the holdout (fit on the days before those), so the holdout stays unseen.
    changepoint_prior_scales: tuple[float, ...] = (0.05, 0.5)
    changepoint_range: float = Field(default=0.9, gt=0, le=1)  # share of the history where the trend may bend
    closed_weekdays: Literal["auto"] | tuple[int, ...] = "auto"  # 0 = Monday; auto: never a purchase that weekday
    shutdown_min_days: int | None = Field(default=7, ge=2)  # a zero run this long recurs yearly; None: no shutdowns
    interval_width: float = Field(default=0.8, gt=0, lt=1)
    uncertainty_samples: int = Field(default=200, ge=0)  # 0: no sampling, the interval collapses onto yhat
    interval_seed: int = Field(default=0, ge=0)  # Prophet samples intervals from numpy's global generator
    clip_negative: bool = True  # volumes are never negative

    @model_validator(mode="after")
    def _check(self) -> ForecastConfig:
        if self.closed_weekdays != "auto":
            if any(d not in range(7) for d in self.closed_weekdays) or len(set(self.closed_weekdays)) == 7:
                raise ValueError("closed_weekdays are 0 (Monday) to 6 (Sunday), and at least one day must be open")
        if not self.changepoint_prior_scales or any(c <= 0 for c in self.changepoint_prior_scales):
            raise ValueError("changepoint_prior_scales needs at least one candidate, each > 0")
        if len(set(self.group_by)) != len(self.group_by) or "total" in self.group_by:
            raise ValueError("group_by columns must be unique and not 'total'")
        return self


@dataclass(frozen=True)
class BusinessCalendar:
    """Days with no trade: weekdays (0 = Monday) and yearly shutdown days as (month, day)."""

    closed_weekdays: tuple[int, ...] = ()
    shutdown_days: tuple[tuple[int, int], ...] = ()

    def closed(self, ds: pd.Series | pd.DatetimeIndex) -> np.ndarray:
        ds = pd.DatetimeIndex(ds)
        shut = np.zeros(len(ds), dtype=bool)
        if self.shutdown_days:
            shut = np.isin(ds.month * 100 + ds.day, [m * 100 + d for m, d in self.shutdown_days])
        return np.isin(ds.dayofweek, list(self.closed_weekdays)) | shut

    def to_dict(self) -> dict[str, Any]:
        return {"closed_weekdays": list(self.closed_weekdays), "shutdown_days": [list(d) for d in self.shutdown_days]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BusinessCalendar:
        return cls(tuple(int(d) for d in data["closed_weekdays"]),
                   tuple((int(m), int(d)) for m, d in data["shutdown_days"]))


@dataclass(frozen=True)
class ForecastResult:
    """Everything :func:`forecast_purchases` learned; the models are refit on all data."""

    config: ForecastConfig
    series: pd.DataFrame  # series, ds, y: the daily volumes
    calendar: BusinessCalendar
    yearly: bool  # whether the models have a yearly seasonality
    notes: tuple[str, ...]  # decisions taken on the data (yearly seasonality off, shutdowns found), for the log
    holdout: pd.DataFrame  # series, ds, actual, yhat, yhat_lower, yhat_upper, baseline
    metrics: dict[str, dict[str, float]]  # series -> mae, mape, baseline_mae, baseline_mape
    changepoint_prior_scale: dict[str, float]  # series -> the candidate chosen before the holdout
    overall: dict[str, float]  # the same over every (series, day) of the holdout
    models: dict[str, Prophet]  # series -> fitted Prophet (all data)
    forecast: pd.DataFrame  # series, ds, yhat, yhat_lower, yhat_upper for the next horizon_days


# --- the daily series -------------------------------------------------------------------------------------------
def series_name(text: str) -> str:
    """A series name as models are named: accents dropped, then characters outside ``[0-9A-Za-z_.-]`` made ``_``
    (``category.Küche & Bad`` -> ``category.Kuche_Bad``)."""
    return _SERIES_NAME.sub("_", ascii_letters(text))


def _series_name(column: str, value: object) -> str:
    return series_name(f"{column}.{value}")


def daily_series(transactions: pd.DataFrame, config: ForecastConfig) -> pd.DataFrame:
    """Long frame ``series, ds, y``: the daily volume of ``total`` and of every value of each ``group_by``
    column, returns excluded, days without a purchase filled with 0 between the first and the last purchase
    day. Series named ``<column>.<value>`` (characters outside ``[0-9A-Za-z_.-]`` become ``_``)."""
    missing = sorted({"order_id", "timestamp", "amount", "quantity", *config.group_by} - set(transactions.columns))
    if missing:
        raise ForecastError(f"the transactions lack the column(s) {', '.join(missing)}")
    bought = transactions
    if "is_return" in transactions.columns:
        bought = transactions.loc[~transactions["is_return"].astype(bool)]
    if bought.empty:
        raise ForecastError("no purchases to forecast: every transaction is a return, or there are none")
    day = pd.to_datetime(bought["timestamp"]).dt.normalize().rename("ds")
    days = pd.date_range(day.min(), day.max(), freq="D", name="ds")

    def volume(keys: list[pd.Series]) -> pd.Series:
        grouped = bought.groupby(keys, sort=False, observed=True)
        if config.measure == "orders":
            return grouped["order_id"].nunique()
        return grouped["amount" if config.measure == "spend" else "quantity"].sum()

    frames = [pd.DataFrame({"series": TOTAL, "ds": days,
                            "y": volume([day]).reindex(days, fill_value=0).to_numpy(dtype=float)})]
    for column in config.group_by:
        values = bought[column].astype("string").fillna("unknown").rename("value")
        wide = volume([values, day]).unstack("value", fill_value=0).reindex(days, fill_value=0)
        names = {v: _series_name(column, v) for v in wide.columns}
        if len(set(names.values())) < len(names):
            raise ForecastError(f"values of {column!r} collide once made series names: {sorted(names.values())}")
        for value in sorted(wide.columns, key=str):
            frames.append(pd.DataFrame({"series": names[value], "ds": days,
                                        "y": wide[value].to_numpy(dtype=float)}))
    return pd.concat(frames, ignore_index=True)


def _top_series(series: pd.DataFrame, before: pd.Timestamp, config: ForecastConfig) -> list[str]:
    """``total`` and, per ``group_by`` column, the ``max_series`` values with the most volume before ``before``."""
    volume = series.loc[series["ds"] < before].groupby("series", sort=False)["y"].sum()
    keep = [TOTAL]
    for column in config.group_by:
        of_column = volume[volume.index.str.startswith(f"{_SERIES_NAME.sub('_', column)}.")]
        of_column = of_column[of_column > 0].sort_values(ascending=False, kind="stable")
        if len(of_column) > config.max_series:
            log.info("%s: forecasting the top %d of %d series by volume", column, config.max_series, len(of_column))
        keep += list(of_column.index[: config.max_series])
    return keep


# --- the business calendar --------------------------------------------------------------------------------------
def business_calendar(total: pd.Series, config: ForecastConfig) -> tuple[BusinessCalendar, list[str]]:
    """Closed weekdays and yearly shutdown days from the ``total`` daily volume (indexed by day)."""
    notes: list[str] = []
    zero = total.to_numpy() == 0
    shutdown: set[tuple[int, int]] = set()
    if config.shutdown_min_days is not None:
        run_id = np.cumsum(~zero)  # zero days share the id of the last day with purchases
        runs = pd.Series(zero).groupby(run_id).transform("sum").to_numpy()
        long = zero & (runs >= config.shutdown_min_days)
        if long.any():
            shut_days = total.index[long]
            shutdown = {(d.month, d.day) for d in shut_days}
            notes.append(f"shutdown of {int(long.sum())} days without purchases "
                         f"({shut_days.min().date()} to {shut_days.max().date()}): left out of the fit, "
                         "forecast as 0 on the same calendar days every year")
    if config.closed_weekdays == "auto":
        open_day = ~np.isin(total.index.month * 100 + total.index.day, [m * 100 + d for m, d in shutdown])
        weekday = total.index.dayofweek[open_day]
        sold = pd.Series(~zero[open_day]).groupby(weekday).any()
        closed = tuple(int(d) for d, any_sale in sold.items() if not any_sale)
        if closed:
            notes.append(f"closed weekdays {list(closed)} (0 = Monday): never a purchase, forecast as 0")
    else:
        closed = tuple(sorted(config.closed_weekdays))
    return BusinessCalendar(closed, tuple(sorted(shutdown))), notes


# --- Prophet ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_prophet() -> Iterator[None]:
    """cmdstanpy and prophet log every fit at INFO: keep them at WARNING while we fit, then restore."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Prophet draws its intervals from numpy's global generator: seed it for the call, then restore it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _fit(history: pd.DataFrame, calendar: BusinessCalendar, yearly: bool, config: ForecastConfig,
         changepoint_prior_scale: float, intervals: bool = True) -> Prophet:
    """A Prophet model fit on the open days of ``history`` (columns ds, y)."""
    model = Prophet(weekly_seasonality=config.weekly_seasonality, yearly_seasonality=yearly,
                    daily_seasonality=False, seasonality_mode=config.seasonality_mode,
                    changepoint_prior_scale=changepoint_prior_scale, changepoint_range=config.changepoint_range,
                    interval_width=config.interval_width,
                    uncertainty_samples=config.uncertainty_samples if intervals else 0)
    if config.holidays_country:
        model.add_country_holidays(country_name=config.holidays_country)
    open_days = history.loc[~calendar.closed(history["ds"]), ["ds", "y"]]
    model.fit(open_days)
    return model


def predict_series(model: Prophet, ds: pd.Series | pd.DatetimeIndex, calendar: BusinessCalendar, clip: bool,
                   seed: int) -> pd.DataFrame:
    """``ds, yhat, yhat_lower, yhat_upper`` for the given days, 0 on closed days, clipped at 0 if asked."""
    days = pd.DatetimeIndex(pd.to_datetime(ds))
    unique = days.unique().sort_values()
    with _seeded(seed):  # Prophet sorts by ds: predict each day once, in order, then map back to the input's rows
        out = model.predict(pd.DataFrame({"ds": unique})).set_index("ds").reindex(days)
    frame = pd.DataFrame({"ds": days})
    for column in PYFUNC_OUTPUT:
        values = out[column].to_numpy(dtype=float) if column in out else out["yhat"].to_numpy(dtype=float)
        values = np.where(calendar.closed(days), 0.0, values)
        frame[column] = np.maximum(values, 0.0) if clip else values
    return frame


def predict_days(model: Prophet, days: pd.DatetimeIndex, calendar: BusinessCalendar, clip: bool, seed: int,
                 cache: dict[str, pd.DataFrame] | None = None, key: str = "") -> pd.DataFrame:
    """:func:`predict_series` for ``days``, predicted on a fixed grid: every day from the history's first to
    ``GRID_DAYS`` past its last (kept in ``cache[key]`` when given), widened to asked days outside it. Prophet draws
    the interval's samples for the whole frame it is given, so a day's interval would otherwise move with the other
    days asked beside it: the served forecast and the one logged at training agree day by day."""
    history = model.history["ds"]
    grid = pd.date_range(history.min().normalize(), history.max().normalize() + pd.Timedelta(days=GRID_DAYS))
    wanted = days.unique()
    inside = wanted.isin(grid)
    parts = []
    if inside.any():  # always from the grid, whatever else is asked
        table = None if cache is None else cache.get(key)
        if table is None:
            table = predict_series(model, grid, calendar, clip, seed)
            if cache is not None:
                cache[key] = table
        parts.append(table)
    if not inside.all():  # days past the grid (or at a time of day): from a frame widened to reach them
        outside = wanted[~inside]
        span = pd.date_range(min(grid[0], outside.min().normalize()), max(grid[-1], outside.max().normalize()))
        extra = predict_series(model, span.union(outside), calendar, clip, seed)
        parts.append(extra[extra["ds"].isin(outside)])
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
    return table.set_index("ds").reindex(days).rename_axis("ds").reset_index()


def seasonal_naive(history: pd.Series, horizon: int, season: int = 7) -> np.ndarray:
    """The last observed season repeated: day h of the horizon gets the value of the same weekday in the last
    week of ``history`` (a forecast made at the end of ``history``, never peeking into the horizon)."""
    if len(history) < season:
        raise ForecastError(f"the seasonal-naive baseline needs at least {season} days of history")
    last = history.to_numpy(dtype=float)[-season:]
    return last[np.arange(horizon) % season]


def _choose_scale(train: pd.DataFrame, calendar: BusinessCalendar, yearly: bool, config: ForecastConfig) -> float:
    """The changepoint prior scale with the lowest MAE on the last ``holdout_days`` of ``train`` (ds, y), fit on
    the days before them; the first candidate when there is one only or too little history to split."""
    candidates = config.changepoint_prior_scales
    inner = train["ds"].max() - pd.Timedelta(days=config.holdout_days - 1)
    fit, valid = train.loc[train["ds"] < inner], train.loc[train["ds"] >= inner]
    if len(candidates) == 1 or len(fit) < config.min_history_days:
        return candidates[0]
    mae = [forecast_metrics(valid["y"], predict_series(_fit(fit, calendar, yearly, config, c, intervals=False),
                                                       valid["ds"], calendar, config.clip_negative, 0)["yhat"])["mae"]
           for c in candidates]
    return candidates[int(np.argmin(mae))]


# --- the whole stage --------------------------------------------------------------------------------------------
def forecast_purchases(transactions: pd.DataFrame, config: ForecastConfig) -> ForecastResult:
    """Daily series, out-of-time evaluation against the seasonal-naive baseline, refit on all data, forecast."""
    series = daily_series(transactions, config)
    days = pd.DatetimeIndex(series.loc[series["series"] == TOTAL, "ds"])
    cutoff = days.max() - pd.Timedelta(days=config.holdout_days - 1)  # first held-out day
    fit_days = int((days < cutoff).sum())
    if fit_days < config.min_history_days:
        raise ForecastError(f"{len(days)} days of purchases ({days.min().date()} to {days.max().date()}) leave "
                            f"{max(fit_days, 0)} days before a {config.holdout_days}-day holdout; at least "
                            f"{config.min_history_days} are needed")
    total = series.loc[series["series"] == TOTAL].set_index("ds")["y"]
    calendar, notes = business_calendar(total[total.index < cutoff], config)
    if config.yearly_seasonality == "auto":
        yearly = fit_days >= config.yearly_min_days
        if not yearly:
            notes.append(f"yearly seasonality off: {fit_days} days before the holdout, "
                         f"fewer than {config.yearly_min_days}")
    else:
        yearly = config.yearly_seasonality == "on"
    for note in notes:
        log.info("%s", note)
    names = _top_series(series, cutoff, config)
    series = series.loc[series["series"].isin(names)].reset_index(drop=True)

    holdout, metrics, models, forecasts, scales = [], {}, {}, [], {}
    future = pd.date_range(days.max() + pd.Timedelta(days=1), periods=config.horizon_days, freq="D", name="ds")
    with quiet_prophet():
        for name in names:
            one = series.loc[series["series"] == name, ["ds", "y"]]
            train, test = one.loc[one["ds"] < cutoff], one.loc[one["ds"] >= cutoff]
            scales[name] = scale = _choose_scale(train, calendar, yearly, config)
            predicted = predict_series(_fit(train, calendar, yearly, config, scale), test["ds"], calendar,
                                       config.clip_negative, config.interval_seed)
            baseline = seasonal_naive(train["y"], len(test))
            frame = predicted.assign(series=name, actual=test["y"].to_numpy(), baseline=baseline)
            holdout.append(frame)
            prophet_scores = forecast_metrics(frame["actual"], frame["yhat"])
            naive_scores = forecast_metrics(frame["actual"], frame["baseline"])
            metrics[name] = {**prophet_scores, **{f"baseline_{k}": v for k, v in naive_scores.items()}}
            log.info("%s: holdout MAE %.2f (baseline %.2f), MAPE %.3f (baseline %.3f), changepoint prior %g",
                     name, prophet_scores["mae"], naive_scores["mae"], prophet_scores["mape"],
                     naive_scores["mape"], scale)
            models[name] = _fit(one, calendar, yearly, config, scale)
            forecasts.append(predict_days(models[name], pd.DatetimeIndex(future), calendar, config.clip_negative,
                                          config.interval_seed).assign(series=name))
    held = pd.concat(holdout, ignore_index=True)[
        ["series", "ds", "actual", "yhat", "yhat_lower", "yhat_upper", "baseline"]]
    overall = {**forecast_metrics(held["actual"], held["yhat"]),
               **{f"baseline_{k}": v for k, v in forecast_metrics(held["actual"], held["baseline"]).items()}}
    return ForecastResult(config=config, series=series, calendar=calendar, yearly=yearly, notes=tuple(notes),
                          holdout=held, metrics=metrics, changepoint_prior_scale=scales, overall=overall, models=models,
                          forecast=pd.concat(forecasts, ignore_index=True)[["series", "ds", *PYFUNC_OUTPUT]])


# --- the registered model ---------------------------------------------------------------------------------------
class PurchaseForecastModel(mlflow.pyfunc.PythonModel):
    """Every series' Prophet model behind one pyfunc: ``predict`` takes ``series, ds`` rows and returns
    ``yhat, yhat_lower, yhat_upper`` per row, in the input's order. Artifact ``bundle``: a JSON file with the
    serialized models, the business calendar, the clipping and the interval seed."""

    def load_context(self, context: Any) -> None:
        bundle = json.loads(Path(context.artifacts["bundle"]).read_text())
        self.models = {name: model_from_json(text) for name, text in bundle["models"].items()}
        self.calendar = BusinessCalendar.from_dict(bundle["calendar"])
        self.clip = bool(bundle["clip_negative"])
        self.seed = int(bundle["interval_seed"])
        self.measure: str | None = bundle.get("measure")  # absent from bundles logged before it was recorded
        self.grids: dict[str, pd.DataFrame] = {}
        self.lock = threading.Lock()  # predictions seed numpy's global generator: one at a time (server threads)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        missing = [c for c in PYFUNC_INPUT if c not in model_input.columns]
        if missing:
            raise ForecastError(f"the input lacks the column(s) {', '.join(missing)}; expected series and ds")
        series = model_input["series"].astype(str).to_numpy()
        unknown = sorted(set(series) - set(self.models))
        if unknown:
            raise ForecastError(f"unknown series {', '.join(map(repr, unknown[:5]))}; known: "
                                f"{', '.join(sorted(self.models))}")
        try:
            ds = pd.to_datetime(model_input["ds"]).to_numpy()
        except (ValueError, TypeError) as error:
            raise ForecastError(f"ds must hold dates: {error}") from None
        if pd.isna(ds).any():
            raise ForecastError("ds must hold dates: some are missing")
        out = pd.DataFrame(index=range(len(model_input)), columns=list(PYFUNC_OUTPUT), dtype=float)
        with quiet_prophet(), self.lock:
            for name in pd.unique(series):
                rows = np.flatnonzero(series == name)
                predicted = predict_days(self.models[name], pd.DatetimeIndex(ds[rows]), self.calendar, self.clip,
                                         self.seed, cache=self.grids, key=name)
                out.iloc[rows, :] = predicted[list(PYFUNC_OUTPUT)].to_numpy()
        return out


def _requirements() -> list[str]:
    return [f"{p}=={version(p)}" for p in ("mlflow", "prophet", "pandas", "numpy", "pydantic")]


def _holdout_figure(holdout: pd.DataFrame, name: str) -> Any:
    from matplotlib.figure import Figure

    one = holdout.loc[holdout["series"] == name]
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots()
    axes.plot(one["ds"], one["actual"], "k.-", label="actual")
    axes.plot(one["ds"], one["yhat"], "C0-", label="Prophet")
    axes.fill_between(one["ds"], one["yhat_lower"], one["yhat_upper"], color="C0", alpha=0.2, label="interval")
    axes.plot(one["ds"], one["baseline"], "C1--", label="same weekday last week")
    axes.set_title(f"{name}: holdout forecast vs actual")
    axes.legend()
    figure.autofmt_xdate()
    return figure


def log_forecast(result: ForecastResult, name: str = "purchase_forecast") -> ModelInfo:
    """Log ``result`` into the active MLflow run; return the bundled pyfunc's ``ModelInfo`` (to register as
    :data:`REGISTERED_MODEL_NAME`). Baseline metrics go first so every Prophet score has its floor."""
    if mlflow.active_run() is None:
        raise ForecastError("log_forecast logs into the active MLflow run: start one first")
    config = result.config
    mlflow.log_params({"measure": config.measure, "group_by": ",".join(config.group_by) or "-",
                       "holdout_days": config.holdout_days, "horizon_days": config.horizon_days,
                       "weekly_seasonality": config.weekly_seasonality, "yearly_seasonality": result.yearly,
                       "seasonality_mode": config.seasonality_mode,
                       "holidays_country": config.holidays_country or "-",
                       "changepoint_prior_scales": ",".join(map(str, config.changepoint_prior_scales)),
                       "changepoint_range": config.changepoint_range,
                       "closed_weekdays": ",".join(map(str, result.calendar.closed_weekdays)) or "-",
                       "shutdown_days": len(result.calendar.shutdown_days), "series": len(result.models)})
    baseline = {f"baseline_{k.removeprefix('baseline_')}_{s}": v
                for s, m in result.metrics.items() for k, v in m.items() if k.startswith("baseline_")}
    baseline |= {k: v for k, v in result.overall.items() if k.startswith("baseline_")}
    mlflow.log_metrics({k: v for k, v in baseline.items() if np.isfinite(v)})
    scores = {f"{k}_{s}": v for s, m in result.metrics.items() for k, v in m.items() if not k.startswith("baseline_")}
    scores |= {k: v for k, v in result.overall.items() if not k.startswith("baseline_")}
    mlflow.log_metrics({k: v for k, v in scores.items() if np.isfinite(v)})
    if result.notes:
        mlflow.log_text("\n".join(result.notes) + "\n", "notes.txt")
    mlflow.log_figure(_holdout_figure(result.holdout, TOTAL), "plots/holdout_total.png")

    mlflow.log_params({f"changepoint_prior_scale_{s}": v for s, v in result.changepoint_prior_scale.items()})
    for series_name, model in result.models.items():  # logged-model names allow no "." ":" "/"
        mlflow.prophet.log_model(model, name="prophet-" + re.sub(r"[^0-9A-Za-z_-]", "-", series_name),
                                 pip_requirements=_requirements()[1:], tags={"series": series_name})

    held = result.holdout.rename(columns={"yhat": "prophet_yhat"})[["series", "ds", "actual", "prophet_yhat",
                                                                      "baseline"]]
    example = result.forecast[["series", "ds"]].groupby("series", sort=False).head(2).reset_index(drop=True)
    from training.registry import HELDOUT_ARTIFACT, log_heldout

    log_heldout(held)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle.json"
        bundle.write_text(json.dumps({"models": {s: model_to_json(m) for s, m in result.models.items()},
                                      "calendar": result.calendar.to_dict(),
                                      "clip_negative": config.clip_negative,
                                      "interval_seed": config.interval_seed, "measure": config.measure}))
        output = result.forecast.merge(example, on=["series", "ds"])[list(PYFUNC_OUTPUT)]
        info = mlflow.pyfunc.log_model(name=name, python_model=PurchaseForecastModel(),
                                       artifacts={"bundle": str(bundle)},
                                       signature=infer_signature(example, output), input_example=example,
                                       pip_requirements=_requirements())
    mlflow.set_tags({"heldout_target": "actual", "heldout_prediction": "yhat", "gate_metric": "mae",
                     "heldout_artifact": HELDOUT_ARTIFACT, "kind": "forecast", "gate_same_params": "measure"})
    return info


def train_and_register(settings: Any, dataset: str, config: ForecastConfig) -> tuple[ForecastResult, str, str]:
    """Forecast an ingested data set's purchases, log it in one MLflow run and register the bundle as the
    ``challenger`` of ``purchase_forecast``; returns (result, run id, version). The gate scores this challenger
    by its out-of-time predictions (the registered bundle is refitted on the held-out days too)."""
    from training.registry import connect, register
    from training.tracking import use_experiment

    from features.store import data_fingerprint

    client = connect(settings.tracking_uri)
    path = settings.dataset_dir(dataset) / "transactions.parquet"
    if not path.exists():
        raise ForecastError(f"no transactions for {dataset!r}; ingest the data set first (`personalize ingest`)")
    result = forecast_purchases(pd.read_parquet(path), config)
    provenance = {"feature_version": "daily_series_v1", "data_fingerprint": data_fingerprint([path])}
    settings.home.mkdir(parents=True, exist_ok=True)
    use_experiment(settings.tracking_uri, "train-purchase_forecast", settings.artifact_root)
    with mlflow.start_run(run_name=f"forecast-{dataset}") as run:
        mlflow.set_tags({"dataset": dataset, "heldout_challenger_prediction": "prophet_yhat", **provenance})
        info = log_forecast(result, REGISTERED_MODEL_NAME)
    overall = result.overall
    version = register(client, REGISTERED_MODEL_NAME, info.model_uri, run.info.run_id,
                       tags={"dataset": dataset, **provenance, "mae": f"{overall['mae']:.4f}",
                             "baseline_mae": f"{overall['baseline_mae']:.4f}"},
                       description=f"daily {config.measure} of {dataset}, {len(result.models)} series: holdout MAE "
                                   f"{overall['mae']:.3f} vs seasonal-naive {overall['baseline_mae']:.3f}",
                       kind="regressor")
    return result, run.info.run_id, version
