"""Per-customer purchase-cycle models: how many purchases in the next H days, when the next one comes, whether the
customer is still alive, chosen among candidates by an honest out-of-time validation.

The pure core:

- :func:`customer_summary`: the per-customer summary at a cutoff from a transactions frame, in the convention of
  the buy-till-you-die (BTYD) literature: ``frequency`` = repeat purchase days (distinct purchase days after the
  first), ``recency`` = time from the first to the last purchase day, ``T`` = time from the first purchase day to
  the cutoff, ``monetary`` = mean spend of the repeat purchase days; plus the richer features of the supervised
  candidates and, given a horizon, the targets over ``[cutoff, cutoff + H)``: ``actual_purchases`` (distinct
  purchase days), ``days_to_next`` and ``event`` (censored time to the next purchase).
- Candidates with one sklearn-style interface, ``fit(summary, labeled=None) -> self`` and ``predict(summary,
  horizon_days) -> DataFrame`` with :data:`OUTPUT_COLUMNS`. ``summary`` is the summary at the cutoff the model
  will predict from; ``labeled`` is a summary at an earlier cutoff *with targets* (the supervised candidates learn
  from it, the BTYD ones ignore it):

  * :class:`BTYDModel`: BG/NBD (or Pareto/NBD) from pymc-marketing fitted by maximum likelihood (MAP with flat
    priors, so the fit does not depend on the time unit), with Gamma-Gamma for the spend;
  * :class:`SurvivalModel`: XGBoost ``survival:aft`` on the censored time to the next purchase;
  * :class:`HybridModel`: the BG/NBD expectation times a boosted Poisson correction (XGBoost ``count:poisson`` with
    the log of the BG/NBD expectation as base margin) learned one horizon earlier. The BTYD base carries the
    cohort's decay, which trees alone cannot extrapolate; the trees correct what the base misses (recent activity,
    spend). Its time-to-event outputs are the base's no-purchase curve with the rate scaled by the same
    correction, ``S(t) = S_base(t) ** (E[N] / E_base[N])`` (measured on the inner validation of Online Retail:
    better Brier score and concordance than a separate AFT model over the same features).
- :func:`select_cycle_model`: out-of-time selection *inside* the calibration period (inner cutoff = calibration
  end - H; candidates fitted on data before it, scored on ``[inner cutoff, calibration end)`` by RMSE of
  purchases), then the winner refitted at the calibration end. Transactions at or after the calibration end are
  dropped first: the holdout cannot influence anything.
- :class:`CyclePyfunc` and :func:`log_cycle_model`: the fitted winner as an MLflow pyfunc, logged with its
  validation metrics and a held-out frame for a promotion gate.

Outputs (all per customer): ``expected_purchases`` in H, ``expected_days_to_next`` (restricted mean of the time to
the next purchase over the horizon: a customer unlikely to buy gets close to H), ``p_purchase`` (at least one
purchase within H), ``p_alive`` (NaN for the survival model, which has no notion of it) and ``expected_spend``
(expected purchases times the Gamma-Gamma mean spend per purchase day; NaN where no spend model exists).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterator, Literal, Protocol

import mlflow
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import betaln, expit, gammaln, hyp2f1, logsumexp, ndtr

from personalize.errors import PersonalizeError
from training.evaluate import MetricError, time_to_event_metrics

log = logging.getLogger(__name__)

CandidateName = Literal["bgnbd", "pareto_nbd", "aft", "hybrid"]

BTYD_COLUMNS = ("frequency", "recency", "T", "monetary")
FEATURE_COLUMNS = ("days_since_last", "purchases_30d", "purchases_90d", "purchases_180d", "purchases_365d",
                   "spend_total", "spend_90d", "gap_mean_days")
INPUT_COLUMNS = ("customer_id", *BTYD_COLUMNS, *FEATURE_COLUMNS)
TARGET_COLUMNS = ("actual_purchases", "days_to_next", "event")
OUTPUT_COLUMNS = ("expected_purchases", "expected_days_to_next", "p_purchase", "p_alive", "expected_spend")
_WINDOWS = (30, 90, 180, 365)
_DAY = pd.Timedelta(days=1)
_MAX_PURCHASES = 1e4  # a guard against exp() overflow in a boosted correction, far above any real count


class CycleError(PersonalizeError):
    """The purchase-cycle models cannot be built from these inputs (too few customers, no repeat buyers, ...)."""


# --- configuration ---------------------------------------------------------------------------------------------
class BoostConfig(BaseModel):
    """XGBoost settings shared by the supervised candidates (small, regularised trees: the training sets are one
    row per customer)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    rounds: int = Field(default=100, ge=1)
    max_depth: int = Field(default=3, ge=1, le=12)
    learning_rate: float = Field(default=0.05, gt=0.0, le=1.0)
    min_child_weight: float = Field(default=20.0, ge=0.0)
    subsample: float = Field(default=0.8, gt=0.0, le=1.0)
    colsample_bytree: float = Field(default=0.8, gt=0.0, le=1.0)
    reg_lambda: float = Field(default=5.0, ge=0.0)
    max_delta_step: float = Field(default=0.7, ge=0.0)  # steadies the Poisson objective
    aft_distribution: Literal["normal", "logistic", "extreme"] = "normal"
    aft_scale: float = Field(default=1.0, gt=0.0)


class CycleConfig(BaseModel):
    """What :func:`select_cycle_model` compares and how."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    horizon_days: int = Field(default=90, ge=1, le=3650)  # ten years: beyond, dates leave pandas' calendar
    time_unit_days: float = Field(default=1.0, gt=0.0)  # unit of recency and T: 1 = days, 7 = weeks
    candidates: tuple[CandidateName, ...] = ("bgnbd", "aft", "hybrid")
    min_customers: int = Field(default=50, ge=2)
    min_repeat_customers: int = Field(default=10, ge=1)
    min_events: int = Field(default=10, ge=1)  # purchases in a labeled window, for the supervised candidates
    grid_points: int = Field(default=32, ge=2)  # integration grid of the restricted mean time to next purchase
    seed: int = Field(default=0, ge=0)
    threads: int = Field(default=2, ge=1)
    boost: BoostConfig = BoostConfig()


# --- the per-customer summary ----------------------------------------------------------------------------------
def _whole_day(value: pd.Timestamp | str, what: str) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    if stamp.tz is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    if stamp != stamp.normalize():
        raise CycleError(f"the {what} {stamp} must be a whole day (midnight): purchases are counted per day")
    return stamp


def purchase_days(transactions: pd.DataFrame) -> pd.DataFrame:
    """One row per (customer, purchase day) with the day's spend; returns (``is_return``) are not purchases."""
    missing = {"customer_id", "timestamp", "amount"} - set(transactions.columns)
    if missing:
        raise CycleError(f"the transactions lack the column(s) {sorted(missing)}")
    if not pd.api.types.is_datetime64_any_dtype(transactions["timestamp"]):
        raise CycleError("the transactions' timestamp column must be a datetime64 column")
    tx = transactions
    if "is_return" in tx.columns:
        tx = tx[~tx["is_return"].fillna(False).astype(bool)]
    stamps = tx["timestamp"]
    if getattr(stamps.dt, "tz", None) is not None:
        stamps = stamps.dt.tz_convert("UTC").dt.tz_localize(None)
    daily = pd.DataFrame({"customer_id": tx["customer_id"].astype(str).to_numpy(),
                          "day": stamps.dt.floor("D").to_numpy(),
                          "amount": tx["amount"].astype(float).to_numpy()})
    return daily.groupby(["customer_id", "day"], sort=True, as_index=False)["amount"].sum()


def customer_summary(transactions: pd.DataFrame, cutoff: pd.Timestamp | str, horizon_days: int | None = None, *,
                     time_unit_days: float = 1.0, data_end: pd.Timestamp | str | None = None) -> pd.DataFrame:
    """The per-customer summary at ``cutoff`` (exclusive) of every customer with a purchase before it.

    Columns: ``customer_id``, the BTYD block (``frequency``, ``recency``, ``T``, ``monetary``; recency and T in
    units of ``time_unit_days``), the supervised features (:data:`FEATURE_COLUMNS`, in days and currency) and, when
    ``horizon_days`` is given, the targets over ``[cutoff, cutoff + horizon_days)``: ``actual_purchases`` (distinct
    purchase days), ``event`` (at least one) and ``days_to_next`` (days from the cutoff to the middle of the first
    purchase day, or ``horizon_days`` when censored). ``data_end`` (exclusive; default: the day after the last
    transaction) is where the data stops: a horizon reaching past it is an error, not a silent zero.
    """
    cutoff = _whole_day(cutoff, "cutoff")
    daily = purchase_days(transactions)
    cal = daily[daily["day"] < cutoff]
    if cal.empty:
        raise CycleError(f"no purchases before the cutoff {cutoff.date()}")
    g = cal.groupby("customer_id", sort=True)
    first, last = g["day"].min(), g["day"].max()
    days_count, total = g.size(), g["amount"].sum()
    first_amount = g["amount"].first()  # rows are sorted by day within a customer
    frequency = (days_count - 1).astype(float)
    span = (last - first).dt.days.astype(float)
    out = pd.DataFrame({
        "customer_id": first.index.astype(str),
        "frequency": frequency.to_numpy(),
        "recency": (span / time_unit_days).to_numpy(),
        "T": ((cutoff - first).dt.days.astype(float) / time_unit_days).to_numpy(),
        "monetary": np.where(frequency > 0, (total - first_amount) / frequency.clip(lower=1), 0.0),
        "days_since_last": (cutoff - last).dt.days.astype(float).to_numpy(),
    })
    for window in _WINDOWS:
        recent = cal[cal["day"] >= cutoff - pd.Timedelta(days=window)].groupby("customer_id").size()
        out[f"purchases_{window}d"] = recent.reindex(first.index, fill_value=0).astype(float).to_numpy()
    out["spend_total"] = total.to_numpy()
    recent_spend = cal[cal["day"] >= cutoff - pd.Timedelta(days=90)].groupby("customer_id")["amount"].sum()
    out["spend_90d"] = recent_spend.reindex(first.index, fill_value=0.0).to_numpy()
    out["gap_mean_days"] = np.where(frequency > 0, span / frequency.clip(lower=1), np.nan)
    if horizon_days is None:
        return out
    if horizon_days < 1:
        raise CycleError(f"the horizon must be at least one day, got {horizon_days}")
    end = (_whole_day(data_end, "data end") if data_end is not None
           else pd.Timestamp(transactions["timestamp"].max()).floor("D") + _DAY)
    stop = cutoff + pd.Timedelta(days=horizon_days)
    if stop > end:
        raise CycleError(f"the horizon of {horizon_days} days from {cutoff.date()} reaches {stop.date()}, past the "
                         f"end of the data ({end.date()})")
    window = daily[(daily["day"] >= cutoff) & (daily["day"] < stop)]
    hw = window.groupby("customer_id")
    counts = hw.size().reindex(first.index, fill_value=0)
    nxt = hw["day"].min().reindex(first.index)
    out["actual_purchases"] = counts.astype(float).to_numpy()
    out["event"] = nxt.notna().to_numpy()
    out["days_to_next"] = np.where(out["event"], (nxt - cutoff).dt.days.to_numpy(dtype=float, na_value=0.0) + 0.5,
                                   float(horizon_days))
    return out


# --- candidates ------------------------------------------------------------------------------------------------
class CycleModel(Protocol):
    def fit(self, summary: pd.DataFrame, labeled: pd.DataFrame | None = None) -> CycleModel: ...

    def predict(self, summary: pd.DataFrame, horizon_days: int) -> pd.DataFrame: ...


def _require(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CycleError(f"the {what} lacks the column(s) {missing}")


def _check_customers(summary: pd.DataFrame, min_customers: int, min_repeat: int) -> None:
    if len(summary) < min_customers:
        raise CycleError(f"only {len(summary)} customers: at least {min_customers} are needed to fit a purchase "
                         f"model")
    repeat = int((summary["frequency"] > 0).sum())
    if repeat == 0:
        raise CycleError("no repeat buyers: every customer bought on one day only, so no purchase rate can be "
                         "estimated")
    if repeat < min_repeat:
        raise CycleError(f"only {repeat} repeat buyers: at least {min_repeat} are needed")


def _output(summary: pd.DataFrame, **columns: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"customer_id": summary["customer_id"].astype(str).to_numpy(),
                         **{name: np.asarray(columns.get(name, np.full(len(summary), np.nan)), dtype=float)
                            for name in OUTPUT_COLUMNS}})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PyMC and PyTensor report every optimisation at INFO and warn freely: keep their noise out of our logs."""
    loggers = [logging.getLogger(name) for name in ("pymc", "pytensor", "pymc_marketing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _point(array: Any) -> np.ndarray:
    """A pymc-marketing prediction (chain, draw, customer) as one value per customer (the MAP fit has one draw)."""
    values = np.asarray(array.values if hasattr(array, "values") else array, dtype=float)
    return values.reshape(-1, values.shape[-1]).mean(axis=0) if values.ndim > 1 else values


# --- BG/NBD, Pareto/NBD and Gamma-Gamma predictions in closed form -------------------------------------------------
# pymc-marketing fits the models; these evaluate its fitted point estimates with the same formulas as its
# BetaGeoModel, ParetoNBDModel and GammaGammaModel (0.19), without the xarray round trips (and, for Pareto/NBD, the
# PyTensor graph it compiles per call): a one-customer BG/NBD predict() took ~58 ms through the library's four calls
# (most of a /next_purchase request) and 0.8 ms with these, pandas included. BG/NBD's no-purchase probability
# differs from the library's in one case, on purpose: see _bgnbd_no_purchase.
def _bgnbd_alive(params: dict[str, float], x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
    """P(alive) (Fader, Hardie & Lee 2008): 1 for a customer without repeat purchases (death follows a purchase)."""
    a, b, alpha, r = params["a"], params["b"], params["alpha"], params["r"]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_div = (r + x) * np.log((alpha + T) / (alpha + t_x)) + np.log(a / (b + np.maximum(x, 1) - 1))
    return np.where(x == 0, 1.0, expit(-log_div))


def _bgnbd_expected(params: dict[str, float], x: np.ndarray, t_x: np.ndarray, T: np.ndarray,
                    t: float) -> np.ndarray:
    """Expected purchases in ``(T, T + t]`` given the history (Fader, Hardie & Lee 2005, eq. 10)."""
    a, b, alpha, r = params["a"], params["b"], params["alpha"], params["r"]
    numerator = 1 - ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp2f1(r + x, b + x, a + b + x - 1,
                                                                        t / (alpha + T + t))
    numerator *= (a + b + x - 1) / (a - 1)
    denominator = 1 + (x > 0) * (a / (b + x - 1)) * ((alpha + T) / (alpha + t_x)) ** (r + x)
    return numerator / denominator


def _bgnbd_no_purchase(params: dict[str, float], x: np.ndarray, t_x: np.ndarray, T: np.ndarray,
                       t: np.ndarray) -> np.ndarray:
    """P(no purchase in ``(T, T + t]``) for customers (rows) and each ``t`` (columns): dead, or alive with no
    purchase, ``1 - P(alive) + P(alive) * ((alpha + T) / (alpha + T + t)) ** (r + x)`` (Fader & Hardie 2019,
    eq. 34 with y = 0). For ``x > 0`` this is pymc-marketing's ``expected_probability_no_purchase`` rearranged
    (equal to rounding). For ``x = 0`` the library keeps the "died after the last purchase" term, which the model
    rules out before a first repeat purchase, and overstates the probability (0.95 where a simulation of the model
    gives 0.78): here it is ``((alpha + T) / (alpha + T + t)) ** r``, the simulation's answer."""
    alpha, r = params["alpha"], params["r"]
    alive = _bgnbd_alive(params, x, t_x, T)[:, None]
    quiet = np.exp((r + x)[:, None] * (np.log(alpha + T)[:, None] - np.log(alpha + T[:, None] + t[None, :])))
    return 1.0 - alive + alive * quiet


def _pareto_logp(params: dict[str, float], x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
    """The Pareto/NBD log-likelihood of each history (pymc-marketing's ``ParetoNBD.logp``, in numpy: the library
    compiles a PyTensor graph for it on every prediction, ~0.7 s for one customer)."""
    r, alpha, s, beta = params["r"], params["alpha"], params["s"], params["beta"]
    rsx, rx = r + s + x, r + x
    larger, smaller = max(alpha, beta), min(alpha, beta)
    first, second = (s + 1, s) if alpha >= beta else (rx, rx + 1)
    refactored = rsx * np.log(larger + t_x)
    at_t_x = np.log(hyp2f1(rsx, first, rsx + 1, (larger - smaller) / (larger + t_x)))
    at_T = (np.log(hyp2f1(rsx, second, rsx + 1, (larger - smaller) / (larger + T))) - rsx * np.log(larger + T)
            + refactored)
    a1 = gammaln(rx) - gammaln(r) + r * np.log(alpha) + s * np.log(beta) - refactored
    return a1 + np.logaddexp(np.log(s) - np.log(rsx) + at_t_x, np.log(rx) - np.log(rsx) + at_T)


def _pareto_expected(params: dict[str, float], x: np.ndarray, t_x: np.ndarray, T: np.ndarray,
                     t: float) -> np.ndarray:
    """Expected purchases in ``(T, T + t]`` (Fader & Hardie 2005, note 009), as pymc-marketing computes them."""
    r, alpha, s, beta = params["r"], params["alpha"], params["s"], params["beta"]
    first = (gammaln(r + x) - gammaln(r) + r * np.log(alpha) + s * np.log(beta) - (r + x) * np.log(alpha + T)
             - s * np.log(beta + T))
    second = np.log(r + x) + np.log(beta + T) - np.log(alpha + T)
    third = np.log((1 - ((beta + T) / (beta + T + t)) ** (s - 1)) / (s - 1))
    return np.exp(first + second + third - _pareto_logp(params, x, t_x, T))


def _pareto_alive(params: dict[str, float], x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
    """P(alive) (Fader & Hardie 2014, note 015), as pymc-marketing computes it."""
    r, alpha, s, beta = params["r"], params["alpha"], params["s"], params["beta"]
    log_alive = (gammaln(r + x) - gammaln(r) + r * np.log(alpha / (alpha + T)) - x * np.log(alpha + T)
                 + s * np.log(beta / (beta + T)))
    return np.exp(log_alive - _pareto_logp(params, x, t_x, T))


def _pareto_no_purchase(params: dict[str, float], x: np.ndarray, t_x: np.ndarray, T: np.ndarray,
                        t: np.ndarray) -> np.ndarray:
    """P(no purchase in ``(T, T + t]``) for customers (rows) and each ``t`` (columns): pymc-marketing's
    ``expected_purchase_probability`` with ``n_purchases=0`` (Fader & Hardie 2014, note 028)."""
    r, alpha, s, beta = params["r"], params["alpha"], params["s"], params["beta"]
    x, t_x, T, t = x[:, None], t_x[:, None], T[:, None], np.asarray(t, dtype=float)[None, :]
    loglike = _pareto_logp(params, x, t_x, T)
    larger, smaller = max(alpha, beta), min(alpha, beta)
    p = r + x if alpha < beta else s + 1
    rsx = r + s + x
    prior = r * np.log(alpha) + s * np.log(beta)
    log_p_zero = gammaln(r + x) + prior - (gammaln(r) + (r + x) * np.log(alpha + T) + s * np.log(beta + T) + loglike)
    log_b_one = gammaln(r + x) + prior - (gammaln(r) + (r + x) * np.log(alpha + T + t) + s * np.log(beta + T + t))

    def log_b(at: np.ndarray) -> np.ndarray:
        return (prior + gammaln(rsx) + betaln(r + x, s + 1) + np.log(hyp2f1(rsx, p, rsx + 1, (larger - smaller) / (
            larger + at))) - (gammaln(r) + gammaln(s) + rsx * np.log(larger + at)))

    terms = np.broadcast_arrays(log_b_one - loglike, log_b(T) - loglike, log_b(T + t) - loglike)
    signs = np.array([1.0, 1.0, -1.0]).reshape(3, *([1] * terms[0].ndim))
    return (1 - np.exp(log_p_zero)) + np.exp(logsumexp(np.stack(terms), axis=0, b=signs))


def _gamma_gamma_spend(params: dict[str, float], frequency: np.ndarray, monetary: np.ndarray) -> np.ndarray:
    """Expected spend per purchase (Fader & Hardie 2013, eq. 5): the customer's mean shrunk toward the population's."""
    p, q, v = params["p"], params["q"], params["v"]
    weight = p * frequency / (p * frequency + q - 1)
    return (1 - weight) * (v * p / (q - 1)) + weight * monetary


class BTYDModel:
    """A buy-till-you-die model (BG/NBD or Pareto/NBD, pymc-marketing) with Gamma-Gamma for the spend.

    Fitted by MAP with flat priors, i.e. maximum likelihood: the same estimates as the classic ``lifetimes``
    fitters, and independent of the time unit (pymc-marketing's default priors are not). Predictions are computed
    in closed form from the fitted parameters (:func:`_bgnbd_expected`, :func:`_pareto_expected` and their
    neighbours).
    """

    def __init__(self, kind: Literal["bgnbd", "pareto_nbd"] = "bgnbd", time_unit_days: float = 1.0,
                 spend: bool = True, min_customers: int = 50, min_repeat_customers: int = 10,
                 grid_points: int = 32) -> None:
        self.kind = kind
        self.time_unit_days = time_unit_days
        self.spend = spend
        self.min_customers = min_customers
        self.min_repeat_customers = min_repeat_customers
        self.grid_points = grid_points

    def fit(self, summary: pd.DataFrame, labeled: pd.DataFrame | None = None) -> BTYDModel:
        from pymc_extras.prior import Prior
        from pymc_marketing.clv import BetaGeoModel, GammaGammaModel, ParetoNBDModel

        _require(summary, ("customer_id", *BTYD_COLUMNS), "summary")
        _check_customers(summary, self.min_customers, self.min_repeat_customers)
        data = self._data(summary)
        flat = Prior("HalfFlat")
        if self.kind == "bgnbd":
            model: Any = BetaGeoModel(model_config={"a": flat, "b": flat, "alpha": flat, "r": flat})
        else:
            model = ParetoNBDModel(model_config={"r": flat, "alpha": flat, "s": flat, "beta": flat})
        with _quiet():
            model.fit(data=data, method="map", progressbar=False)
        self.model_ = model
        names = ("a", "b", "alpha", "r") if self.kind == "bgnbd" else ("r", "alpha", "s", "beta")
        self.params_ = {k: float(_point(model.fit_result[k])[0]) for k in names}
        if not all(math.isfinite(v) for v in self.params_.values()):
            raise CycleError(f"the {self.kind} fit did not converge: parameters {self.params_}")
        self.spend_model_: Any = None
        buyers = summary[(summary["frequency"] > 0) & (summary["monetary"] > 0)]
        if self.spend and len(buyers) >= self.min_repeat_customers:
            gg = GammaGammaModel()
            gg_data = pd.DataFrame({"customer_id": np.arange(len(buyers)),
                                    "frequency": buyers["frequency"].to_numpy(float),
                                    "monetary_value": buyers["monetary"].to_numpy(float)})
            with _quiet():
                gg.fit(data=gg_data, method="map", progressbar=False)
            q = float(_point(gg.fit_result["q"])[0])
            self.spend_model_ = gg if q > 1 else None  # q <= 1: the population mean spend is undefined
        log.info("fitted %s on %d customers: %s", self.kind, len(summary),
                 ", ".join(f"{k}={v:.4g}" for k, v in self.params_.items()))
        return self

    def _spend_params(self) -> dict[str, float]:
        """The Gamma-Gamma point estimates, read once from the library's fit result (models pickled before this
        cache existed read them on first use)."""
        cached = getattr(self, "spend_params_", None)
        if cached is None:
            cached = self.spend_params_ = {k: float(_point(self.spend_model_.fit_result[k])[0]) for k in "pqv"}
        return cached

    @staticmethod
    def _history(summary: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``frequency``, ``recency`` and ``T`` as float arrays."""
        return tuple(summary[c].to_numpy(float) for c in ("frequency", "recency", "T"))  # type: ignore[return-value]

    @staticmethod
    def _data(summary: pd.DataFrame) -> pd.DataFrame:
        # positional ids: the library wants unique ids, the caller's ids stay in the output
        x, t_x, T = BTYDModel._history(summary)
        return pd.DataFrame({"customer_id": np.arange(len(summary)), "frequency": x, "recency": t_x, "T": T})

    def survival(self, summary: pd.DataFrame, grid_days: np.ndarray, chunk_rows: int = 500_000) -> np.ndarray:
        """P(no purchase within t days) per customer (rows) and t of ``grid_days`` (columns), in chunks of
        ``chunk_rows`` customer x t cells (:func:`_bgnbd_no_purchase`, :func:`_pareto_no_purchase`)."""
        grid = np.asarray(grid_days, dtype=float) / self.time_unit_days
        x, t_x, T = self._history(summary)
        curve = _bgnbd_no_purchase if self.kind == "bgnbd" else _pareto_no_purchase
        per_chunk = max(1, chunk_rows // max(1, len(grid)))
        parts = []
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i in range(0, len(x), per_chunk):
                part = slice(i, i + per_chunk)
                parts.append(np.clip(curve(self.params_, x[part], t_x[part], T[part], grid), 0.0, 1.0))
        survival = np.vstack(parts) if parts else np.ones((0, len(grid)))
        survival = np.where(grid[None, :] > 0, survival, 1.0)
        return np.minimum.accumulate(survival, axis=1)  # monotone despite rounding

    def predict(self, summary: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        _require(summary, ("customer_id", *BTYD_COLUMNS), "summary")
        if horizon_days <= 0:
            raise CycleError(f"the horizon must be positive, got {horizon_days}")
        t = horizon_days / self.time_unit_days
        x, t_x, T = self._history(summary)
        expect, alive_now = ((_bgnbd_expected, _bgnbd_alive) if self.kind == "bgnbd" else
                             (_pareto_expected, _pareto_alive))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            expected, alive = expect(self.params_, x, t_x, T, t), alive_now(self.params_, x, t_x, T)
        grid = time_grid(horizon_days, self.grid_points)
        survival = self.survival(summary, grid)
        spend = np.full(len(summary), np.nan)
        if self.spend_model_ is not None:
            spend = _gamma_gamma_spend(self._spend_params(), x, np.clip(summary["monetary"].to_numpy(float), 0, None))
        expected = np.clip(np.nan_to_num(expected, nan=0.0), 0.0, None)
        return _output(summary, expected_purchases=expected,
                       expected_days_to_next=np.trapezoid(survival, grid, axis=1),
                       p_purchase=1.0 - survival[:, -1], p_alive=np.clip(alive, 0.0, 1.0),
                       expected_spend=expected * spend)


def time_grid(horizon_days: float, points: int = 32) -> np.ndarray:
    """0, then ``points`` times spaced geometrically from a quarter day to ``horizon_days``: where the restricted
    mean of the time to next purchase is integrated. Evenly spaced points would set a floor of half a step under
    it (H/48 days with 24 points: a customer who buys every 3 days "waits" 15 days at H = 730); geometric ones keep
    the trapezoid within about 1 % of the integral at any horizon up to two years (a curve that is an exponential
    of any mean from a day up)."""
    horizon = float(horizon_days)
    return np.concatenate([[0.0], np.geomspace(min(0.25, horizon / points), horizon, points)])


def _features(summary: pd.DataFrame) -> pd.DataFrame:
    _require(summary, ("customer_id", *BTYD_COLUMNS, *FEATURE_COLUMNS), "summary")
    return summary[[*BTYD_COLUMNS, *FEATURE_COLUMNS]].astype(float).reset_index(drop=True)


def _check_labeled(labeled: pd.DataFrame | None, horizon_days: int, min_events: int) -> pd.DataFrame:
    if labeled is None:
        raise CycleError("a supervised candidate needs a labeled summary (targets over a window before the cutoff)")
    _require(labeled, TARGET_COLUMNS, "labeled summary")
    if float(labeled["days_to_next"].max()) > horizon_days:
        raise CycleError(f"the labeled summary has times to next purchase beyond the model's horizon of "
                         f"{horizon_days} days: it was built with another horizon")
    events = int(labeled["event"].sum())
    if events < min_events:
        raise CycleError(f"only {events} customers bought in the labeled window: at least {min_events} are needed")
    return labeled


def _aft_survival(mu: np.ndarray, days: np.ndarray, distribution: str, scale: float) -> np.ndarray:
    """S(t) = P(T > t) for log T = mu + scale * Z, per customer (rows) and time (columns)."""
    with np.errstate(divide="ignore"):
        z = (np.log(np.asarray(days, dtype=float))[None, :] - mu[:, None]) / scale
    if distribution == "normal":
        return 1.0 - ndtr(z)
    if distribution == "logistic":
        return 1.0 / (1.0 + np.exp(np.clip(z, -700, 700)))
    return np.exp(-np.exp(np.clip(z, -700, 700)))  # extreme value (Gumbel minimum)


class _AFT:
    """XGBoost ``survival:aft`` on the censored days to the next purchase."""

    def __init__(self, boost: BoostConfig, seed: int, threads: int) -> None:
        self.boost, self.seed, self.threads = boost, seed, threads

    def fit(self, x: pd.DataFrame, days: np.ndarray, event: np.ndarray) -> _AFT:
        import xgboost as xgb

        b = self.boost
        dtrain = xgb.DMatrix(x)
        dtrain.set_float_info("label_lower_bound", days)
        dtrain.set_float_info("label_upper_bound", np.where(event, days, np.inf))
        params = {"objective": "survival:aft", "eval_metric": "aft-nloglik",
                  "aft_loss_distribution": b.aft_distribution, "aft_loss_distribution_scale": b.aft_scale,
                  "max_depth": b.max_depth, "learning_rate": b.learning_rate, "min_child_weight": b.min_child_weight,
                  "subsample": b.subsample, "colsample_bytree": b.colsample_bytree, "reg_lambda": b.reg_lambda,
                  "nthread": self.threads, "seed": self.seed, "verbosity": 0}
        self.booster_ = xgb.train(params, dtrain, num_boost_round=b.rounds)
        return self

    def survival(self, x: pd.DataFrame, grid: np.ndarray) -> np.ndarray:
        # in place on the float matrix: no DMatrix to build (most of a one-customer request's time); the columns are
        # the training frame's, in its order (_features)
        mu = self.booster_.inplace_predict(x.to_numpy(dtype=np.float32), predict_type="margin").astype(float)
        return _aft_survival(mu, grid, self.boost.aft_distribution, self.boost.aft_scale)


class SurvivalModel:
    """Supervised time to next purchase: XGBoost AFT trained on a labeled summary (censored at the horizon).

    ``p_purchase`` and ``expected_days_to_next`` come from the fitted survival curve; ``expected_purchases`` is
    ``-log S(H)``, the Poisson count with that chance of at least one purchase. No ``p_alive`` nor spend.
    """

    def __init__(self, horizon_days: int, boost: BoostConfig = BoostConfig(), seed: int = 0, threads: int = 2,
                 min_events: int = 10, grid_points: int = 32) -> None:
        self.horizon_days = horizon_days
        self.boost = boost
        self.seed = seed
        self.threads = threads
        self.min_events = min_events
        self.grid_points = grid_points

    def fit(self, summary: pd.DataFrame, labeled: pd.DataFrame | None = None) -> SurvivalModel:
        labeled = _check_labeled(labeled, self.horizon_days, self.min_events)
        self.aft_ = _AFT(self.boost, self.seed, self.threads).fit(
            _features(labeled), labeled["days_to_next"].to_numpy(float), labeled["event"].to_numpy(bool))
        return self

    def predict(self, summary: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        grid = time_grid(horizon_days, self.grid_points)
        survival = self.aft_.survival(_features(summary), grid)
        return _output(summary, expected_purchases=-np.log(np.clip(survival[:, -1], 1e-12, 1.0)),
                       expected_days_to_next=np.trapezoid(survival, grid, axis=1), p_purchase=1.0 - survival[:, -1])


class HybridModel:
    """BG/NBD times a boosted correction: ``E[N] = base(x) * exp(f(x))`` with ``f`` an XGBoost Poisson model
    trained on a labeled summary one horizon earlier, the log of the base's expectation as its base margin and the
    base's outputs among its features. ``p_purchase`` and ``expected_days_to_next`` come from the base's
    no-purchase curve with its rate scaled by the correction; ``p_alive`` and the mean spend from the base.

    ``base`` (fitted on ``summary``) and ``labeled_base`` (fitted on ``labeled``) may be passed already fitted to
    save refits; otherwise :meth:`fit` fits them.
    """

    def __init__(self, horizon_days: int, boost: BoostConfig = BoostConfig(), seed: int = 0, threads: int = 2,
                 time_unit_days: float = 1.0, min_customers: int = 50, min_repeat_customers: int = 10,
                 min_events: int = 10, grid_points: int = 32) -> None:
        self.horizon_days = horizon_days
        self.boost = boost
        self.seed = seed
        self.threads = threads
        self.time_unit_days = time_unit_days
        self.min_customers = min_customers
        self.min_repeat_customers = min_repeat_customers
        self.min_events = min_events
        self.grid_points = grid_points

    def _base(self) -> BTYDModel:
        return BTYDModel("bgnbd", self.time_unit_days, True, self.min_customers, self.min_repeat_customers,
                         self.grid_points)

    @staticmethod
    def _with_base(summary: pd.DataFrame, base_out: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        x = _features(summary)
        x["base_rate"] = base_out["expected_purchases"].to_numpy() / horizon_days
        x["base_p_alive"] = base_out["p_alive"].to_numpy()
        x["base_p_purchase"] = base_out["p_purchase"].to_numpy()
        return x

    def fit(self, summary: pd.DataFrame, labeled: pd.DataFrame | None = None, *, base: BTYDModel | None = None,
            labeled_base: BTYDModel | None = None) -> HybridModel:
        import xgboost as xgb

        labeled = _check_labeled(labeled, self.horizon_days, self.min_events)
        self.labeled_base_ = labeled_base or self._base().fit(labeled)
        self.base_ = base or self._base().fit(summary)
        h = self.horizon_days
        base_out = self.labeled_base_.predict(labeled, h)
        x = self._with_base(labeled, base_out, h)
        b = self.boost
        dtrain = xgb.DMatrix(x, label=labeled["actual_purchases"].to_numpy(float),
                             base_margin=np.log(np.clip(base_out["expected_purchases"].to_numpy(), 1e-6, None)))
        params = {"objective": "count:poisson", "max_depth": b.max_depth, "learning_rate": b.learning_rate,
                  "min_child_weight": b.min_child_weight, "subsample": b.subsample,
                  "colsample_bytree": b.colsample_bytree, "reg_lambda": b.reg_lambda,
                  "max_delta_step": b.max_delta_step, "nthread": self.threads, "seed": self.seed, "verbosity": 0}
        self.booster_ = xgb.train(params, dtrain, num_boost_round=b.rounds)
        return self

    def predict(self, summary: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
        import xgboost as xgb

        base_out = self.base_.predict(summary, horizon_days)
        x = self._with_base(summary, base_out, horizon_days)
        margin = np.log(np.clip(base_out["expected_purchases"].to_numpy(), 1e-6, None))
        dx = xgb.DMatrix(x, base_margin=margin)
        expected = np.clip(self.booster_.predict(dx).astype(float), 0.0, _MAX_PURCHASES)
        grid = time_grid(horizon_days, self.grid_points)
        ratio = expected / np.clip(base_out["expected_purchases"].to_numpy(), 1e-12, None)
        survival = self.base_.survival(summary, grid) ** ratio[:, None]  # the base's rate scaled by the correction
        base_spend = base_out["expected_spend"].to_numpy() / np.clip(base_out["expected_purchases"].to_numpy(),
                                                                      1e-12, None)
        return _output(summary, expected_purchases=expected,
                       expected_days_to_next=np.trapezoid(survival, grid, axis=1),
                       p_purchase=1.0 - survival[:, -1], p_alive=base_out["p_alive"].to_numpy(),
                       expected_spend=expected * base_spend)


def make_candidate(name: CandidateName, config: CycleConfig) -> CycleModel:
    """An unfitted candidate configured from ``config``."""
    c = config
    if name in ("bgnbd", "pareto_nbd"):
        return BTYDModel(name, c.time_unit_days, True, c.min_customers, c.min_repeat_customers, c.grid_points)
    if name == "aft":
        return SurvivalModel(c.horizon_days, c.boost, c.seed, c.threads, c.min_events, c.grid_points)
    if name == "hybrid":
        return HybridModel(c.horizon_days, c.boost, c.seed, c.threads, c.time_unit_days, c.min_customers,
                           c.min_repeat_customers, c.min_events, c.grid_points)
    raise CycleError(f"unknown purchase-cycle candidate {name!r}")


# --- metrics and selection -------------------------------------------------------------------------------------
def cycle_metrics(labeled: pd.DataFrame, predicted: pd.DataFrame) -> dict[str, float]:
    """RMSE, MAE and total ratio (predicted / actual) of purchases; MAE and concordance of the days to next
    purchase (:func:`training.evaluate.time_to_event_metrics`); Brier score of ``p_purchase``."""
    actual = labeled["actual_purchases"].to_numpy(float)
    expected = predicted["expected_purchases"].to_numpy(float)
    error = expected - actual
    out = {"rmse": float(np.sqrt(np.mean(error**2))), "mae": float(np.mean(np.abs(error))),
           "total_ratio": float(expected.sum() / actual.sum()) if actual.sum() > 0 else float("nan"),
           "brier": float(np.mean((predicted["p_purchase"].to_numpy(float)
                                   - labeled["event"].to_numpy(float)) ** 2))}
    try:
        tte = time_to_event_metrics(labeled["days_to_next"].to_numpy(float), labeled["event"].to_numpy(bool),
                                    predicted["expected_days_to_next"].to_numpy(float))
        out["days_mae"], out["concordance"] = tte["mae"], tte["concordance"]
    except MetricError as exc:
        log.warning("no time-to-event metrics: %s", exc)
    return out


@dataclass
class CycleSelection:
    """What :func:`select_cycle_model` found: per-candidate validation metrics (failed candidates with the
    reason), the winner's name and the winner refitted at the calibration end."""

    winner: str
    model: CycleModel
    scores: dict[str, dict[str, float]]
    failures: dict[str, str]
    validation: pd.DataFrame  # summary at the inner cutoff with its targets over [inner cutoff, calibration end)
    calibration_end: pd.Timestamp
    inner_cutoff: pd.Timestamp
    config: CycleConfig
    validation_predictions: dict[str, pd.DataFrame] = field(default_factory=dict)


def select_cycle_model(transactions: pd.DataFrame, calibration_end: pd.Timestamp | str,
                       config: CycleConfig = CycleConfig()) -> CycleSelection:
    """Compare the candidates out of time inside the calibration period and refit the best at its end.

    With H the horizon, E the calibration end and I = E - H: each candidate is fitted on data before I (the
    supervised ones also learn from a labeled summary at I - H with targets over [I - H, I)), predicts
    [I, E) and is scored by RMSE of purchases; the best is refitted at E (learning from [I, E)). A candidate that
    cannot be fitted (e.g. too little history at I - H) is reported in ``failures`` and skipped. Transactions at
    or after E are dropped before anything else.
    """
    end = _whole_day(calibration_end, "calibration end")
    h = config.horizon_days
    inner, early = end - pd.Timedelta(days=h), end - pd.Timedelta(days=2 * h)
    if not config.candidates:
        raise CycleError("no candidates to compare")
    tx = transactions[transactions["timestamp"] < end] if "timestamp" in transactions.columns else transactions
    unit = config.time_unit_days
    valid = customer_summary(tx, inner, h, time_unit_days=unit, data_end=end)
    if len(valid) < config.min_customers:
        raise CycleError(f"only {len(valid)} customers before the inner validation cutoff {inner.date()}: at least "
                         f"{config.min_customers} are needed (a longer calibration period or a shorter horizon "
                         f"would help)")
    if valid["actual_purchases"].sum() == 0:
        raise CycleError(f"no purchases in the validation window [{inner.date()}, {end.date()})")
    current = customer_summary(tx, end, time_unit_days=unit)
    early_problem = ""
    try:
        early_labeled: pd.DataFrame | None = customer_summary(tx, early, h, time_unit_days=unit, data_end=inner)
    except CycleError as exc:
        early_labeled, early_problem = None, str(exc)

    bases: dict[pd.Timestamp, BTYDModel] = {}

    def base_at(cutoff: pd.Timestamp, summary: pd.DataFrame) -> BTYDModel:
        # one BG/NBD fit per cutoff, shared by the candidates; only the model that is kept needs the spend
        if cutoff not in bases:
            bases[cutoff] = BTYDModel("bgnbd", unit, cutoff == end, config.min_customers,
                                      config.min_repeat_customers, config.grid_points).fit(summary)
        return bases[cutoff]

    def fitted(name: CandidateName, summary: pd.DataFrame, cutoff: pd.Timestamp, labeled: pd.DataFrame | None,
               labeled_cutoff: pd.Timestamp) -> CycleModel:
        if name == "bgnbd":
            return base_at(cutoff, summary)
        if name == "pareto_nbd":
            return BTYDModel("pareto_nbd", unit, cutoff == end, config.min_customers, config.min_repeat_customers,
                             config.grid_points).fit(summary)
        model = make_candidate(name, config)
        if isinstance(model, HybridModel):
            if labeled is None:
                raise CycleError(f"no labeled window before {cutoff.date()}: {early_problem}")
            return model.fit(summary, labeled, base=base_at(cutoff, summary),
                             labeled_base=base_at(labeled_cutoff, labeled))
        if name == "aft" and labeled is None:
            raise CycleError(f"no labeled window before {cutoff.date()}: {early_problem}")
        return model.fit(summary, labeled)

    scores: dict[str, dict[str, float]] = {}
    failures: dict[str, str] = {}
    predictions: dict[str, pd.DataFrame] = {}
    for name in dict.fromkeys(config.candidates):
        try:
            model = fitted(name, valid, inner, early_labeled, early)
            predictions[name] = model.predict(valid, h)
        except CycleError as exc:
            failures[name] = str(exc)
            log.warning("candidate %s skipped: %s", name, exc)
            continue
        scores[name] = cycle_metrics(valid, predictions[name])
        log.info("candidate %s: validation RMSE %.4f, MAE %.4f, total ratio %.3f", name, scores[name]["rmse"],
                 scores[name]["mae"], scores[name]["total_ratio"])
    if not scores:
        raise CycleError("no candidate could be fitted: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    winner = min(scores, key=lambda k: scores[k]["rmse"])
    log.info("selected %s (validation RMSE %.4f); refitting at %s", winner, scores[winner]["rmse"], end.date())
    final = fitted(winner, current, end, valid, inner)  # type: ignore[arg-type]
    return CycleSelection(winner=winner, model=final, scores=scores, failures=failures, validation=valid,
                          calibration_end=end, inner_cutoff=inner, config=config,
                          validation_predictions=predictions)


# --- MLflow ----------------------------------------------------------------------------------------------------
class CyclePyfunc(mlflow.pyfunc.PythonModel):
    """The fitted purchase-cycle model as an MLflow pyfunc: a per-customer frame with :data:`INPUT_COLUMNS` in,
    ``customer_id`` plus :data:`OUTPUT_COLUMNS` out. The horizon defaults to the trained one and can be changed
    per call with ``params={"horizon_days": ...}``."""

    def __init__(self, model: CycleModel, horizon_days: int) -> None:
        self.model = model
        self.horizon_days = horizon_days

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        horizon = int((params or {}).get("horizon_days") or self.horizon_days)
        return self.model.predict(pd.DataFrame(model_input), horizon)


def _requirements() -> list[str]:
    pins = []
    for package in ("mlflow", "pymc-marketing", "pymc", "pytensor", "xgboost", "pandas", "numpy", "scipy",
                    "cloudpickle", "pydantic"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_cycle_model(result: CycleSelection, heldout: pd.DataFrame | None = None, *, name: str = "model",
                    example_rows: int = 5) -> mlflow.models.model.ModelInfo:
    """Log the selected model into the active MLflow run (the caller starts the run and registers the model).

    Logs the per-candidate validation metrics (``valid_{metric}_{candidate}``), the held-out frame as
    ``heldout/heldout.parquet`` (input columns plus ``actual_purchases``), the run tags a promotion gate reads
    (``heldout_target``, ``heldout_prediction``, ``gate_metric``) and the pyfunc model with its signature. Pass as
    ``heldout`` a summary with targets the model has not seen (e.g. ``customer_summary(transactions,
    calibration_end, horizon)`` when the data extends past the calibration end); without one the inner validation
    window is logged, which the refitted winner has learned from (tagged ``heldout_source=inner_validation``).
    """
    from mlflow.models import infer_signature

    if mlflow.active_run() is None:
        raise CycleError("no active MLflow run: start one (mlflow.start_run) before logging the cycle model")
    source = "caller" if heldout is not None else "inner_validation"
    frame = result.validation if heldout is None else heldout
    _require(frame, (*INPUT_COLUMNS, "actual_purchases"), "held-out frame")
    frame = frame[[*INPUT_COLUMNS, "actual_purchases"]].reset_index(drop=True)
    h = result.config.horizon_days
    mlflow.log_metrics({f"valid_{metric}_{candidate}": value for candidate, metrics in result.scores.items()
                        for metric, value in metrics.items() if math.isfinite(value)})
    mlflow.log_metrics({f"valid_{metric}": value for metric, value in result.scores[result.winner].items()
                        if math.isfinite(value)})
    mlflow.log_params({"cycle_winner": result.winner, "horizon_days": h,
                       "calibration_end": str(result.calibration_end.date()),
                       "inner_cutoff": str(result.inner_cutoff.date()),
                       "candidates": ",".join(result.config.candidates),
                       "failed_candidates": ",".join(result.failures) or "-"})
    mlflow.set_tags({"heldout_target": "actual_purchases", "heldout_prediction": "expected_purchases",
                     "gate_metric": "rmse", "heldout_source": source, "cycle_winner": result.winner,
                     "heldout_params": json.dumps({"horizon_days": h})})
    from training.registry import log_heldout

    log_heldout(frame)
    wrapper = CyclePyfunc(result.model, h)
    example = frame[list(INPUT_COLUMNS)].head(example_rows)
    signature = infer_signature(example, wrapper.predict(None, example), params={"horizon_days": h})
    return mlflow.pyfunc.log_model(name=name, python_model=wrapper, signature=signature, input_example=example,
                                   pip_requirements=_requirements())


def train_and_register(settings: Any, dataset: str, config: CycleConfig = CycleConfig(),
                       calibration_end: pd.Timestamp | str | None = None) -> tuple[CycleSelection, dict[str, float],
                                                                                   str, str]:
    """Select and fit the purchase-cycle model of an ingested data set, log it in one MLflow run and register it
    as the ``challenger`` of ``purchase_cycle``; returns (selection, held-out metrics, run id, version).

    The calibration ends one horizon before the data does (or at ``calibration_end``), so the last horizon is a
    held-out window no candidate saw: the numbers reported and the frame the promotion gate scores."""
    from training.registry import connect, register
    from training.tracking import use_experiment

    from features.store import data_fingerprint

    client = connect(settings.tracking_uri)
    path = settings.dataset_dir(dataset) / "transactions.parquet"
    if not path.exists():
        raise CycleError(f"no transactions for {dataset!r}; ingest the data set first (`personalize ingest`)")
    transactions = pd.read_parquet(path)
    h = config.horizon_days
    data_end = transactions["timestamp"].max().floor("D") + _DAY  # the last day counts as observed
    end = _whole_day(calibration_end, "calibration end") if calibration_end is not None \
        else data_end - pd.Timedelta(days=h)
    first = transactions["timestamp"].min().floor("D")
    span = f"{dataset} runs {(data_end - first).days:,} days ({first.date()} to {(data_end - _DAY).date()})"
    if end >= data_end:
        raise CycleError(f"the calibration end {end.date()} leaves nothing to hold out: {span}")
    if end - pd.Timedelta(days=h) <= first:  # the candidates are validated on the horizon before the calibration end
        raise CycleError(f"a {h}-day horizon needs history before {(end - pd.Timedelta(days=h)).date()} (one horizon "
                         f"to validate the candidates on, before the calibration end {end.date()}): {span}; "
                         "use a shorter --horizon" + (" or a later --calibration-end" if calibration_end else ""))
    selection = select_cycle_model(transactions, end, config)
    heldout = customer_summary(transactions, end, h, time_unit_days=config.time_unit_days, data_end=data_end)
    metrics = cycle_metrics(heldout, selection.model.predict(heldout, h))
    calibration = customer_summary(transactions, end, time_unit_days=config.time_unit_days)
    rate = calibration["frequency"].sum() / max(float(calibration["T"].sum()), 1e-9) * h / config.time_unit_days
    # the floor: each customer's repeat rate to date, carried forward (what a spreadsheet would forecast)
    naive = calibration.set_index("customer_id")["frequency"] / calibration.set_index("customer_id")["T"].clip(lower=1)
    naive = heldout["customer_id"].map(naive * h / config.time_unit_days).fillna(rate).to_numpy(float)
    metrics["baseline_rmse"] = float(np.sqrt(np.mean((heldout["actual_purchases"].to_numpy(float) - naive) ** 2)))
    provenance = {"feature_version": "cycle_summary_v1", "data_fingerprint": data_fingerprint([path])}
    settings.home.mkdir(parents=True, exist_ok=True)
    use_experiment(settings.tracking_uri, "train-purchase_cycle", settings.artifact_root)
    with mlflow.start_run(run_name=f"purchase_cycle-{dataset}") as run:
        mlflow.set_tags({"kind": "training", "dataset": dataset, **provenance})
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items() if math.isfinite(v)})
        info = log_cycle_model(selection, heldout)
    version = register(client, "purchase_cycle", info.model_uri, run.info.run_id,
                       tags={"dataset": dataset, **provenance, "winner": selection.winner,
                             "test_rmse": f"{metrics['rmse']:.4f}",
                             "calibration_end": str(end.date())},
                       description=f"{selection.winner} on {dataset}, calibrated to {end.date()}: held-out "
                                   f"{h}-day RMSE {metrics['rmse']:.4f}, total ratio {metrics['total_ratio']:.3f}",
                       kind="regressor")
    return selection, metrics, run.info.run_id, version
