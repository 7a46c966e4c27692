"""Seeded synthetic customers, transactions and events with planted ground truth and a drift knob.

Generative story (all vectorized numpy, one ``np.random.default_rng(seed)`` split into independent
streams for customers, transactions and events, so switching events off or changing the drift never
changes the customers or the planted truth):

1. **Customers.** Each customer draws a segment from fixed proportions (``loyal_high_value``,
   ``regular``, ``bargain_hunter``, ``occasional``, ``new_explorer``). The segment sets the
   distributions of the customer's purchase rate (gamma), dropout time (exponential after activity
   starts, loyal customers rarely churn), category affinity (Dirichlet favouring one or two
   categories), price level (lognormal multiplier of the order value) and browsing-session rate
   (gamma). ``signup_at`` is spread over the first 60 % of the window, with a share of customers
   existing from the window's start. A customer is active on ``[signup_at, min(churn_at, end))``. With
   ``drift.dropout``, the dropout hazard of a category's fans is multiplied from ``drift.start`` on (a concept drift).
2. **Purchases.** A homogeneous Poisson process with the customer's rate over the active interval.
   The interval is cut at ``drift.start`` and the part after it uses ``rate * (1 + drift.activity)``
   (clamped at 0.05x). Each purchase is one order line: a category drawn from the affinity (after
   ``drift.start`` mixed toward the drift category, the last configured category, by ``drift.mix``),
   an item from a Zipf-like popularity within the category, a quantity ``1 + Poisson(0.3)`` and an
   amount ``price_level * category base price * item multiplier * lognormal noise * quantity``,
   times ``1 + drift.price`` after ``drift.start``.
3. **Returns.** About 2 % of purchases are returned within 30 days (and before the customer's churn
   and the window's end): a row with negative quantity and amount whose order id is the purchase's
   order id with the prefix ``r`` instead of ``o`` (``o000000042`` -> ``r000000042``).
4. **Events.** Every purchase gets a session ``[page_view|search] -> product_view -> add_to_cart ->
   purchase`` with the purchase event at the transaction's timestamp. Browsing sessions without a
   purchase arrive as a second Poisson process (same drift of activity), made of page views,
   searches and product views; some end with an ``add_to_cart`` (cart abandonment).

The ``truth`` frame holds the planted per-customer parameters (rates and prices before drift; ``churn_at`` as it
happened, after a dropout drift) so that models and monitors can be checked against what was planted. Timestamps
are naive ``datetime64[ns]`` meaning UTC, at one-second resolution.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.contracts import EVENT_TYPES
from features.store import write_raw

logger = logging.getLogger(__name__)

__all__ = [
    "EVENT_TYPES",
    "PLANTED_RESPONSE",
    "SEGMENTS",
    "DriftSpec",
    "SyntheticConfig",
    "SyntheticData",
    "generate",
    "until",
    "write",
]

_PAGE_VIEW, _PRODUCT_VIEW, _ADD_TO_CART, _PURCHASE, _SEARCH = range(5)  # positions in EVENT_TYPES

_SECONDS_PER_DAY = 86_400
_NS_PER_SECOND = 1_000_000_000
_SIGNUP_SPAN = 0.6  # signups fall in the first 60 % of the window
_ITEMS_PER_CATEGORY = 200
_ITEM_ZIPF_EXPONENT = 1.1
_ITEM_PRICE_SIGMA = 0.35
_AMOUNT_NOISE_SIGMA = 0.2
_EXTRA_QUANTITY_MEAN = 0.3
_RETURN_SHARE = 0.02
_RETURN_MIN_DELAY_S = 3_600
_RETURN_MAX_DELAY_S = 30 * _SECONDS_PER_DAY
_MIN_ACTIVITY_FACTOR = 0.05
_CONSENT_SHARE = 0.95
_COUNTRIES: tuple[str, ...] = ("DE", "FR", "GB", "NL", "ES", "IT", "US")
_COUNTRY_P: tuple[float, ...] = (0.25, 0.18, 0.17, 0.08, 0.1, 0.1, 0.12)
_AGE_BANDS: tuple[str, ...] = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
_AGE_BAND_P: tuple[float, ...] = (0.14, 0.27, 0.23, 0.17, 0.11, 0.08)
_DEFAULT_BASE_PRICES: dict[str, float] = {
    "electronics": 120.0,
    "fashion": 45.0,
    "home": 60.0,
    "beauty": 25.0,
    "sports": 50.0,
    "books": 15.0,
    "toys": 30.0,
    "grocery": 20.0,
}
_FALLBACK_BASE_PRICE = 40.0
# Browsing sessions: length 1 + Poisson(mean), abandonment share, gaps between events (seconds).
_BROWSE_EXTRA_EVENTS_MEAN = 2.5
_ABANDON_SHARE = 0.2
_BROWSE_GAP_MEAN_S = 40.0
_PURCHASE_LEAD_SHARE = 0.6
_PURCHASE_GAP_MEAN_S = 90.0
_MIN_GAP_S = 2
_ID_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Segment:
    """Distributions of one planted segment (rates per day, durations in days)."""

    name: str
    share: float
    rate_mean: float
    rate_shape: float
    churn_mean_days: float
    price_median: float
    price_sigma: float
    session_mean: float
    session_shape: float
    alpha_base: float
    alpha_favourite: float
    favourites: int
    at_start_share: float
    signup_skew: float  # exponent on a uniform draw: < 1 pushes signups later in the span


SEGMENTS: tuple[_Segment, ...] = (
    _Segment("loyal_high_value", 0.12, 0.100, 4.0, 4000.0, 1.6, 0.25, 0.35, 3.0, 0.2, 4.0, 2, 0.40, 1.0),
    _Segment("regular", 0.33, 0.047, 3.0, 1200.0, 1.0, 0.25, 0.15, 3.0, 0.3, 3.0, 2, 0.25, 1.0),
    _Segment("bargain_hunter", 0.20, 0.055, 3.0, 800.0, 0.6, 0.20, 0.25, 3.0, 0.5, 2.0, 2, 0.20, 1.0),
    _Segment("occasional", 0.22, 0.015, 2.0, 600.0, 0.9, 0.30, 0.05, 2.0, 0.3, 3.0, 1, 0.15, 1.0),
    _Segment("new_explorer", 0.13, 0.041, 2.0, 250.0, 1.0, 0.35, 0.30, 2.0, 1.5, 1.0, 1, 0.0, 0.5),
)

# Planted response: each segment's chance to convert on each variant of the default catalog's `homepage_banner`
# (serving/catalog.yaml). Every segment has a different best variant, so a decision policy that learns per
# segment can beat one that does not; the simulation in serving/simulation.py draws conversions from it.
PLANTED_RESPONSE: dict[str, dict[str, float]] = {
    "loyal_high_value": {"new_arrivals": 0.04, "discount_10": 0.03, "loyalty_points": 0.09, "bestsellers": 0.03,
                         "premium_picks": 0.06},
    "regular": {"new_arrivals": 0.07, "discount_10": 0.04, "loyalty_points": 0.03, "bestsellers": 0.045,
                "premium_picks": 0.03},
    "bargain_hunter": {"new_arrivals": 0.02, "discount_10": 0.09, "loyalty_points": 0.02, "bestsellers": 0.04,
                       "premium_picks": 0.01},
    "occasional": {"new_arrivals": 0.02, "discount_10": 0.035, "loyalty_points": 0.01, "bestsellers": 0.05,
                   "premium_picks": 0.01},
    "new_explorer": {"new_arrivals": 0.05, "discount_10": 0.03, "loyalty_points": 0.01, "bestsellers": 0.02,
                     "premium_picks": 0.075},
}


def _naive_utc(value: datetime) -> datetime:
    """Timestamps are naive with UTC meaning: convert aware ones to UTC and drop the zone."""
    if value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


class DriftSpec(BaseModel):
    """A planted shift of prices, activity, category mix and who drops out, from ``start`` on.

    ``dropout`` is a concept drift: per category, the factor on the dropout hazard, after ``start``, of the customers
    whose favourite it is (``{"books": 10}``: a competitor opens a book shop, and book lovers now leave ten times as
    fast). The other knobs move the features; this one moves who churns, so a model trained before it ranks customers
    worse after it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: datetime | None = None
    price: float = Field(default=0.0, gt=-1.0, allow_inf_nan=False)
    activity: float = Field(default=0.0, allow_inf_nan=False)
    mix: float = Field(default=0.0, ge=0.0, le=1.0)
    dropout: dict[str, float] = {}

    @field_validator("start")
    @classmethod
    def _start_naive_utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else _naive_utc(value)

    @field_validator("dropout")
    @classmethod
    def _dropout_factors(cls, value: dict[str, float]) -> dict[str, float]:
        for name, factor in value.items():
            if not (0 < factor < math.inf):
                raise ValueError(f"{name}: the dropout factor must be a positive number, not {factor}")
        return value


class SyntheticConfig(BaseModel):
    """Size, window, seed and drift of one synthetic data set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    customers: int = Field(default=5_000, ge=1)
    start: datetime = datetime(2024, 1, 1)
    days: int = Field(default=730, ge=1)
    seed: int = Field(default=42, ge=0)
    events: bool = True
    # Within-segment spread of the planted behaviour: 1 is the default shop; below 1 a segment's customers are more
    # alike (gamma shapes of the purchase and session rates and the Dirichlet concentrations of the category affinity
    # divided by spread^2, the price level's log-sigma times spread), so the segments show more in behaviour. The
    # segments' means, shares and planted response do not move.
    segment_spread: float = Field(default=1.0, gt=0.0, le=10.0, allow_inf_nan=False)
    categories: tuple[str, ...] = (
        "electronics",
        "fashion",
        "home",
        "beauty",
        "sports",
        "books",
        "toys",
        "grocery",
    )
    drift: DriftSpec = DriftSpec()

    @field_validator("start")
    @classmethod
    def _start_naive_utc(cls, value: datetime) -> datetime:
        return _naive_utc(value)

    @field_validator("categories")
    @classmethod
    def _categories_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one category is required")
        if any(not name for name in value):
            raise ValueError("category names must be non-empty")
        if len(set(value)) != len(value):
            raise ValueError("category names must be unique")
        return value

    @model_validator(mode="after")
    def _dropout_categories(self) -> SyntheticConfig:
        unknown = sorted(set(self.drift.dropout) - set(self.categories))
        if unknown:
            raise ValueError(f"drift.dropout names unknown categories {unknown} (categories: "
                             f"{', '.join(self.categories)})")
        return self

    @property
    def end(self) -> datetime:
        """The exclusive end of the window: ``start + days``."""
        return self.start + timedelta(days=self.days)

    @property
    def drift_category(self) -> str:
        """The category the ``mix`` drift moves affinity toward: the last configured category."""
        return self.categories[-1]


@dataclass(frozen=True)
class SyntheticData:
    """The generated tables; ``events`` is empty (with the right columns) when events are off."""

    customers: pd.DataFrame
    transactions: pd.DataFrame
    events: pd.DataFrame
    truth: pd.DataFrame


@dataclass(frozen=True)
class _Population:
    """Per-customer planted parameters; times are integer seconds since ``config.start``."""

    segment: np.ndarray
    rate: np.ndarray
    session_rate: np.ndarray
    price_level: np.ndarray
    affinity: np.ndarray  # (n, K), rows sum to 1
    signup_s: np.ndarray
    churn_s: np.ndarray  # may lie beyond the window
    stop_s: np.ndarray  # min(churn_s, window length)


@dataclass(frozen=True)
class _Catalog:
    """Category base prices, item price multipliers and the item popularity CDF."""

    base_price: np.ndarray  # (K,)
    item_multiplier: np.ndarray  # (K * items,)
    item_cdf: np.ndarray  # (items,)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _ids(prefix: str | np.ndarray, numbers: np.ndarray, width: int) -> np.ndarray:
    """Zero-padded string ids (``prefix`` + digits) as an object array of Python ``str``.

    ``prefix`` is one string or one string per number. Built in chunks through Arrow's string
    kernels so that the temporary buffers stay small next to the Python strings themselves.
    """
    out = np.empty(len(numbers), dtype=object)
    for begin in range(0, len(numbers), _ID_CHUNK):
        chunk = pa.array(numbers[begin : begin + _ID_CHUNK], type=pa.int64())
        digits = pc.utf8_lpad(pc.cast(chunk, pa.string()), width=width, padding="0")
        head = prefix if isinstance(prefix, str) else pa.array(prefix[begin : begin + _ID_CHUNK], pa.string())
        joined = pc.binary_join_element_wise(head, digits, "")
        out[begin : begin + _ID_CHUNK] = joined.to_numpy(zero_copy_only=False)
    return out


def _id_width(minimum: int, largest: int) -> int:
    return max(minimum, len(str(max(largest, 0))))


def _to_datetime(start_ns: int, seconds: np.ndarray) -> np.ndarray:
    """Integer seconds since the window start to naive ``datetime64[ns]``."""
    return (seconds.astype(np.int64) * _NS_PER_SECOND + start_ns).view("datetime64[ns]")


def _object_take(values: tuple[str | None, ...] | list[str | None], codes: np.ndarray) -> np.ndarray:
    lookup = np.empty(len(values), dtype=object)
    lookup[:] = list(values)
    return lookup[codes]


def _drift_offset_s(config: SyntheticConfig) -> int:
    """Seconds from the window start to the drift start; past the window end when there is no drift."""
    window_s = config.days * _SECONDS_PER_DAY
    if config.drift.start is None:
        return window_s + 1
    offset = math.ceil((config.drift.start - config.start).total_seconds())
    return int(min(max(offset, 0), window_s + 1))


def _activity_factor(config: SyntheticConfig) -> float:
    return max(1.0 + config.drift.activity, _MIN_ACTIVITY_FACTOR)


def _poisson_times(
    rng: np.random.Generator,
    rate_per_day: np.ndarray,
    lo_s: np.ndarray,
    hi_s: np.ndarray,
    drift_s: int,
    activity_factor: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Homogeneous Poisson arrivals on ``[lo, hi)`` per customer, rate scaled after ``drift_s``.

    Returns the customer index and the integer-second time of every arrival.
    """
    index_dtype = np.int32 if len(rate_per_day) < np.iinfo(np.int32).max else np.int64
    pieces = (
        (lo_s, np.minimum(hi_s, drift_s), 1.0),
        (np.maximum(lo_s, drift_s), hi_s, activity_factor),
    )
    customers: list[np.ndarray] = []
    times: list[np.ndarray] = []
    for begin, finish, factor in pieces:
        length = np.maximum(finish - begin, 0)
        counts = rng.poisson(rate_per_day * factor * (length / _SECONDS_PER_DAY))
        idx = np.repeat(np.arange(len(rate_per_day), dtype=index_dtype), counts)
        offsets = np.floor(rng.random(len(idx)) * length[idx]).astype(np.int64)
        customers.append(idx)
        times.append(begin[idx] + offsets)
    return np.concatenate(customers), np.concatenate(times)


def _draw_categories(
    rng: np.random.Generator,
    cum_affinity_t: np.ndarray,
    customers: np.ndarray,
    drifted: np.ndarray,
    mix: float,
) -> np.ndarray:
    """Category codes from each customer's affinity, mixed toward the last category when drifted.

    With ``a' = (1 - mix) a + mix * onehot(K - 1)`` the cumulative affinity below the last category
    is simply scaled by ``1 - mix``.
    """
    u = rng.random(len(customers))
    scale = np.where(drifted, 1.0 - mix, 1.0) if mix > 0 else None
    codes = np.zeros(len(customers), dtype=np.int32)
    for k in range(cum_affinity_t.shape[0] - 1):
        threshold = cum_affinity_t[k][customers]
        if scale is not None:
            threshold *= scale
        codes += u >= threshold
    return codes


def _draw_items(rng: np.random.Generator, catalog: _Catalog, categories: np.ndarray) -> np.ndarray:
    """Global item codes ``category * items + rank`` with Zipf-like popularity within a category."""
    rank = np.searchsorted(catalog.item_cdf, rng.random(len(categories)), side="right")
    rank = np.minimum(rank, _ITEMS_PER_CATEGORY - 1)
    return categories * _ITEMS_PER_CATEGORY + rank.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def _draw_population(rng: np.random.Generator, config: SyntheticConfig) -> _Population:
    n = config.customers
    k = len(config.categories)
    window_s = config.days * _SECONDS_PER_DAY

    def per_segment(field: str) -> np.ndarray:
        return np.array([getattr(s, field) for s in SEGMENTS], dtype=np.float64)

    shares = per_segment("share")
    segment = rng.choice(len(SEGMENTS), size=n, p=shares / shares.sum()).astype(np.int8)

    tighter = 1.0 / config.segment_spread**2  # 1 at the default spread: the same draws as without the knob
    rate_shape = per_segment("rate_shape")[segment] * tighter
    rate = rng.gamma(rate_shape, per_segment("rate_mean")[segment] / rate_shape)
    session_shape = per_segment("session_shape")[segment] * tighter
    session_rate = rng.gamma(session_shape, per_segment("session_mean")[segment] / session_shape)
    price_level = per_segment("price_median")[segment] * np.exp(
        per_segment("price_sigma")[segment] * config.segment_spread * rng.standard_normal(n)
    )

    # Dirichlet affinity: a base concentration everywhere plus a boost on one or two favourites,
    # the favourites drawn from a skewed global popularity of categories.
    popularity = 1.0 / np.arange(1, k + 1) ** 0.5
    popularity = rng.permutation(popularity / popularity.sum())
    alpha = np.repeat(per_segment("alpha_base")[segment][:, None] * tighter, k, axis=1)
    boost = per_segment("alpha_favourite")[segment] * tighter
    rows = np.arange(n)
    first = rng.choice(k, size=n, p=popularity)
    alpha[rows, first] += boost
    if k > 1:
        second = rng.choice(k, size=n, p=popularity)
        second = np.where(second == first, (second + 1) % k, second)
        two = per_segment("favourites")[segment] >= 2
        alpha[rows[two], second[two]] += boost[two]
    gammas = rng.gamma(alpha) + 1e-12
    affinity = gammas / gammas.sum(axis=1, keepdims=True)

    at_start = rng.random(n) < per_segment("at_start_share")[segment]
    spread = rng.random(n) ** per_segment("signup_skew")[segment]
    signup_s = np.where(at_start, 0, np.floor(spread * _SIGNUP_SPAN * window_s)).astype(np.int64)
    churn_days = rng.exponential(per_segment("churn_mean_days")[segment])
    churn_s = signup_s + np.ceil(np.minimum(churn_days, 1e6) * _SECONDS_PER_DAY).astype(np.int64)
    churn_s = np.maximum(churn_s, signup_s + 1)
    churn_s = _dropout_drift(config, np.argmax(affinity, axis=1), signup_s, churn_s)
    stop_s = np.minimum(churn_s, window_s)

    return _Population(
        segment=segment,
        rate=rate,
        session_rate=session_rate,
        price_level=price_level,
        affinity=affinity,
        signup_s=signup_s,
        churn_s=churn_s,
        stop_s=stop_s,
    )


def _dropout_drift(config: SyntheticConfig, favourite: np.ndarray, signup_s: np.ndarray,
                   churn_s: np.ndarray) -> np.ndarray:
    """Churn times under ``drift.dropout``: the hazard of a category's fans times ``factor`` from the drift start on
    (a fan: the category of the customer's largest planted affinity, the truth's ``top_category``). The lifetime
    is exponential, so the part of it left at ``max(signup, drift start)`` is exponential too, and dividing that part
    by the factor is a draw at the new hazard; it needs no random numbers, so nothing else in the data moves."""
    if not config.drift.dropout:
        return churn_s
    drift_s = _drift_offset_s(config)
    factor = np.ones(len(config.categories))
    for name, f in config.drift.dropout.items():
        factor[config.categories.index(name)] = f
    origin = np.maximum(signup_s, drift_s)
    moved = churn_s > origin
    residual = (churn_s - origin) / factor[favourite]
    return np.where(moved, origin + np.maximum(np.ceil(residual), 1).astype(np.int64), churn_s)


def _draw_catalog(rng: np.random.Generator, categories: tuple[str, ...]) -> _Catalog:
    base_price = np.array([_DEFAULT_BASE_PRICES.get(c, _FALLBACK_BASE_PRICE) for c in categories])
    item_multiplier = np.exp(_ITEM_PRICE_SIGMA * rng.standard_normal(len(categories) * _ITEMS_PER_CATEGORY))
    weights = 1.0 / np.arange(1, _ITEMS_PER_CATEGORY + 1) ** _ITEM_ZIPF_EXPONENT
    item_cdf = np.cumsum(weights / weights.sum())
    return _Catalog(base_price=base_price, item_multiplier=item_multiplier, item_cdf=item_cdf)


def _customers_frame(
    rng: np.random.Generator, config: SyntheticConfig, pop: _Population, ids: np.ndarray
) -> pd.DataFrame:
    n = config.customers
    start_ns = pd.Timestamp(config.start).value
    return pd.DataFrame(
        {
            "customer_id": ids,
            "signup_at": _to_datetime(start_ns, pop.signup_s),
            "consent": rng.random(n) < _CONSENT_SHARE,
            "country": _object_take(_COUNTRIES, rng.choice(len(_COUNTRIES), size=n, p=_COUNTRY_P)),
            "age_band": _object_take(_AGE_BANDS, rng.choice(len(_AGE_BANDS), size=n, p=_AGE_BAND_P)),
        },
        copy=False,
    )


def _truth_frame(config: SyntheticConfig, pop: _Population, ids: np.ndarray) -> pd.DataFrame:
    window_s = config.days * _SECONDS_PER_DAY
    start_ns = pd.Timestamp(config.start).value
    churn_at = _to_datetime(start_ns, pop.churn_s).copy()
    churn_at[pop.churn_s >= window_s] = np.datetime64("NaT")
    columns: dict[str, np.ndarray] = {
        "customer_id": ids.copy(),  # frames are built without copying: do not share arrays between them
        "segment": _object_take([s.name for s in SEGMENTS], pop.segment),
        "purchase_rate_per_day": pop.rate.astype(np.float64),
        "churn_at": churn_at,
        "top_category": _object_take(config.categories, np.argmax(pop.affinity, axis=1)),
    }
    for j, name in enumerate(config.categories):
        columns[f"affinity_{name}"] = pop.affinity[:, j]
    columns["price_level"] = pop.price_level.astype(np.float64)
    columns["session_rate_per_day"] = pop.session_rate.astype(np.float64)
    return pd.DataFrame(columns, copy=False)


@dataclass(frozen=True)
class _Purchases:
    """Purchase lines sorted by time (order number = position + 1)."""

    customer: np.ndarray
    time_s: np.ndarray
    category: np.ndarray
    item: np.ndarray
    quantity: np.ndarray
    amount: np.ndarray


def _draw_purchases(
    rng: np.random.Generator, config: SyntheticConfig, pop: _Population, catalog: _Catalog
) -> _Purchases:
    drift_s = _drift_offset_s(config)
    customer, time_s = _poisson_times(
        rng, pop.rate, pop.signup_s, pop.stop_s, drift_s, _activity_factor(config)
    )
    order = np.argsort(time_s, kind="stable")
    customer, time_s = customer[order], time_s[order]
    drifted = time_s >= drift_s

    cum_affinity_t = np.ascontiguousarray(np.cumsum(pop.affinity, axis=1).T)
    category = _draw_categories(rng, cum_affinity_t, customer, drifted, config.drift.mix)
    item = _draw_items(rng, catalog, category)
    quantity = 1 + rng.poisson(_EXTRA_QUANTITY_MEAN, size=len(customer)).astype(np.int64)
    amount = pop.price_level[customer] * catalog.base_price[category] * catalog.item_multiplier[item]
    amount *= np.exp(_AMOUNT_NOISE_SIGMA * rng.standard_normal(len(customer)))
    amount *= quantity
    if config.drift.price != 0.0:
        amount *= np.where(drifted, 1.0 + config.drift.price, 1.0)
    amount = np.maximum(np.round(amount, 2), 0.01)
    return _Purchases(customer, time_s, category, item, quantity, amount)


def _transactions_frame(
    rng: np.random.Generator,
    config: SyntheticConfig,
    pop: _Population,
    purchases: _Purchases,
    ids: np.ndarray,
    item_names: np.ndarray,
) -> pd.DataFrame:
    n_purchases = len(purchases.customer)
    candidates = np.flatnonzero(rng.random(n_purchases) < _RETURN_SHARE)
    delay = rng.integers(_RETURN_MIN_DELAY_S, _RETURN_MAX_DELAY_S, size=len(candidates), endpoint=True)
    return_time = purchases.time_s[candidates] + delay
    keep = return_time < pop.stop_s[purchases.customer[candidates]]
    returned, return_time = candidates[keep], return_time[keep]

    customer = np.concatenate([purchases.customer, purchases.customer[returned]])
    time_s = np.concatenate([purchases.time_s, return_time])
    order_number = np.concatenate([np.arange(1, n_purchases + 1, dtype=np.int64), returned + 1])
    is_return = np.zeros(len(customer), dtype=bool)
    is_return[n_purchases:] = True
    order = np.argsort(time_s, kind="stable")

    def both(values: np.ndarray, sign: int) -> np.ndarray:
        return np.concatenate([values, sign * values[returned]])[order]

    customer, time_s = customer[order], time_s[order]
    order_number, is_return = order_number[order], is_return[order]
    category = both(purchases.category, 1)
    item = both(purchases.item, 1)
    quantity = both(purchases.quantity, -1)
    amount = both(purchases.amount, -1)

    prefixes = _object_take(("o", "r"), is_return.view(np.int8))
    order_id = _ids(prefixes, order_number, _id_width(9, n_purchases))
    logger.debug("drew %d purchases and %d returns", n_purchases, len(returned))
    return pd.DataFrame(
        {
            "customer_id": ids[customer],
            "order_id": order_id,
            "timestamp": _to_datetime(pd.Timestamp(config.start).value, time_s),
            "amount": amount.astype(np.float64),
            "quantity": quantity.astype(np.int64),
            "category": _object_take(config.categories, category),
            "item": item_names[item],
            "is_return": is_return,
        },
        copy=False,
    )


def _events_frame(
    rng: np.random.Generator,
    config: SyntheticConfig,
    pop: _Population,
    catalog: _Catalog,
    purchases: _Purchases,
    ids: np.ndarray,
    item_names: np.ndarray,
) -> pd.DataFrame:
    k = len(config.categories)
    no_category, no_item = k, k * _ITEMS_PER_CATEGORY
    drift_s = _drift_offset_s(config)

    # Purchase sessions: [lead] -> product_view -> add_to_cart -> purchase, in a (P, 4) grid.
    p = len(purchases.customer)
    has_lead = rng.random(p) < _PURCHASE_LEAD_SHARE
    lead_type = np.where(rng.random(p) < 0.5, _PAGE_VIEW, _SEARCH)
    gaps = _MIN_GAP_S + np.floor(rng.exponential(_PURCHASE_GAP_MEAN_S, size=(p, 3))).astype(np.int64)
    back = np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1]  # seconds before the purchase, per step
    grid_t = np.column_stack([purchases.time_s[:, None] - back, purchases.time_s])
    grid_t = np.maximum(grid_t, pop.signup_s[purchases.customer][:, None])
    grid_type = np.column_stack(
        [lead_type, np.full(p, _PRODUCT_VIEW), np.full(p, _ADD_TO_CART), np.full(p, _PURCHASE)]
    )
    grid_duration = np.column_stack([np.diff(grid_t, axis=1).astype(np.float64), np.full(p, np.nan)])
    grid_category = np.column_stack(
        [np.full(p, no_category), np.repeat(purchases.category[:, None], 3, axis=1)]
    )
    grid_item = np.column_stack([np.full(p, no_item), np.repeat(purchases.item[:, None], 3, axis=1)])
    valid = np.column_stack([has_lead, np.ones((p, 3), dtype=bool)])
    purchase_session = np.repeat(np.arange(p, dtype=np.int64)[:, None], 4, axis=1)[valid]
    purchase_session_start = np.where(has_lead, grid_t[:, 0], grid_t[:, 1])

    # Browsing sessions without purchase.
    session_customer, session_start = _poisson_times(
        rng, pop.session_rate, pop.signup_s, pop.stop_s, drift_s, _activity_factor(config)
    )
    s = len(session_customer)
    abandon = rng.random(s) < _ABANDON_SHARE
    length = 1 + rng.poisson(_BROWSE_EXTRA_EVENTS_MEAN, size=s)
    length = np.where(abandon, np.maximum(length, 2), length)
    session = np.repeat(np.arange(s, dtype=np.int64), length)
    first_row = np.cumsum(length) - length
    position = np.arange(len(session)) - first_row[session]
    gap = _MIN_GAP_S + np.floor(rng.exponential(_BROWSE_GAP_MEAN_S, size=len(session))).astype(np.int64)
    elapsed = np.cumsum(gap) - gap
    elapsed -= elapsed[first_row][session]
    customer = session_customer[session]
    browse_t = np.minimum(session_start[session] + elapsed, pop.stop_s[customer] - 1)
    first_type = np.where(rng.random(len(session)) < 0.65, _PAGE_VIEW, _SEARCH)
    later_type = np.array([_PRODUCT_VIEW, _PAGE_VIEW, _SEARCH])[
        rng.choice(3, size=len(session), p=[0.6, 0.25, 0.15])
    ]
    browse_type = np.where(position == 0, first_type, later_type)
    is_last = position == length[session] - 1
    abandoned = abandon[session]
    browse_type = np.where(abandoned & (position == length[session] - 2), _PRODUCT_VIEW, browse_type)
    browse_type = np.where(abandoned & is_last, _ADD_TO_CART, browse_type)
    cum_affinity_t = np.ascontiguousarray(np.cumsum(pop.affinity, axis=1).T)
    browse_category = _draw_categories(rng, cum_affinity_t, customer, browse_t >= drift_s, config.drift.mix)
    browse_item = _draw_items(rng, catalog, browse_category)
    carts = np.flatnonzero(browse_type == _ADD_TO_CART)  # the row before is the viewed product
    browse_category[carts] = browse_category[carts - 1]
    browse_item[carts] = browse_item[carts - 1]
    has_product = (browse_type == _PRODUCT_VIEW) | (browse_type == _ADD_TO_CART)
    browse_category = np.where(has_product, browse_category, no_category)
    browse_item = np.where(has_product, browse_item, no_item)
    last_duration = _MIN_GAP_S + np.floor(rng.exponential(_BROWSE_GAP_MEAN_S, size=len(session)))
    next_t = np.append(browse_t[1:], 0)
    browse_duration = np.where(is_last, last_duration, next_t - browse_t).astype(np.float64)

    # Number sessions by start time, then order all events by time, session and position.
    session_rank = np.empty(p + s, dtype=np.int64)
    by_start = np.argsort(np.concatenate([purchase_session_start, session_start]), kind="stable")
    session_rank[by_start] = np.arange(p + s)
    all_session = np.concatenate([session_rank[purchase_session], session_rank[p + session]])
    all_customer = np.concatenate([np.repeat(purchases.customer[:, None], 4, axis=1)[valid], customer])
    all_t = np.concatenate([grid_t[valid], browse_t])
    all_position = np.concatenate([np.cumsum(valid, axis=1)[valid], position])
    order = np.lexsort((all_position, all_session, all_t))

    item_lookup = np.append(item_names, None)
    category_lookup = np.empty(k + 1, dtype=object)
    category_lookup[:k] = list(config.categories)
    events = pd.DataFrame(
        {
            "customer_id": ids[all_customer[order]],
            "session_id": _ids("s", all_session[order] + 1, _id_width(9, p + s)),
            "timestamp": _to_datetime(pd.Timestamp(config.start).value, all_t[order]),
            "event_type": _object_take(EVENT_TYPES, np.concatenate([grid_type[valid], browse_type])[order]),
            "item": item_lookup[np.concatenate([grid_item[valid], browse_item])[order]],
            "category": category_lookup[np.concatenate([grid_category[valid], browse_category])[order]],
            "duration_s": np.concatenate([grid_duration[valid], browse_duration])[order],
        },
        copy=False,
    )
    logger.debug("drew %d purchase sessions and %d browsing sessions", p, s)
    return events


def _empty_events() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": np.array([], dtype=object),
            "session_id": np.array([], dtype=object),
            "timestamp": np.array([], dtype="datetime64[ns]"),
            "event_type": np.array([], dtype=object),
            "item": np.array([], dtype=object),
            "category": np.array([], dtype=object),
            "duration_s": np.array([], dtype=np.float64),
        },
        copy=False,
    )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def generate(config: SyntheticConfig) -> SyntheticData:
    """Generate customers, transactions, events and the planted truth for ``config``.

    Deterministic for a given config: the same config always yields identical frames.
    """
    customer_rng, transaction_rng, event_rng = np.random.default_rng(config.seed).spawn(3)
    population = _draw_population(customer_rng, config)
    ids = _ids("c", np.arange(1, config.customers + 1), _id_width(7, config.customers))
    customers = _customers_frame(customer_rng, config, population, ids)
    truth = _truth_frame(config, population, ids)

    catalog = _draw_catalog(transaction_rng, config.categories)
    item_names = np.array(
        [f"{c}-{i:04d}" for c in config.categories for i in range(_ITEMS_PER_CATEGORY)], dtype=object
    )
    purchases = _draw_purchases(transaction_rng, config, population, catalog)
    transactions = _transactions_frame(transaction_rng, config, population, purchases, ids, item_names)
    events = (
        _events_frame(event_rng, config, population, catalog, purchases, ids, item_names)
        if config.events
        else _empty_events()
    )
    logger.info(
        "generated %d customers, %d transaction rows (%d returns), %d events",
        len(customers),
        len(transactions),
        int(transactions["is_return"].sum()),
        len(events),
    )
    return SyntheticData(customers=customers, transactions=transactions, events=events, truth=truth)


def write(data: SyntheticData, out_dir: Path) -> dict[str, Path]:
    """Write the raw tables in the contract's Parquet layout (:func:`features.store.write_raw`) and the truth
    beside them as ``truth.parquet``; return ``{table_name: path}``."""
    out_dir = Path(out_dir)
    paths = write_raw(out_dir, {"customers": data.customers, "transactions": data.transactions,
                                "events": data.events})
    paths["truth"] = out_dir / "truth.parquet"
    data.truth.to_parquet(paths["truth"], index=False)
    logger.info("wrote %s to %s", ", ".join(f"{k} ({len(getattr(data, k)):,} rows)" for k in paths), out_dir)
    return paths


def until(data: SyntheticData, end: datetime | pd.Timestamp) -> SyntheticData:
    """The data set as it was known at ``end``: customers signed up, transactions and events before it (the truth
    is kept whole). Used to train on the past of a world whose future is then replayed."""
    end = pd.Timestamp(end)
    return SyntheticData(customers=data.customers[data.customers["signup_at"] < end].reset_index(drop=True),
                         transactions=data.transactions[data.transactions["timestamp"] < end].reset_index(drop=True),
                         events=data.events[data.events["timestamp"] < end].reset_index(drop=True),
                         truth=data.truth)
