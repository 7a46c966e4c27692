"""Behavioural tests of the seeded synthetic generator: contracts, planted truth and drift knobs."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from features.synthetic import EVENT_TYPES, DriftSpec, SyntheticConfig, SyntheticData, generate, write

SMALL = SyntheticConfig(customers=300, days=365, seed=7)
DRIFT_START = datetime(2024, 7, 1)
DRIFT_BASE = SyntheticConfig(customers=1_500, days=365, seed=11, events=False)

EXPECTED_DTYPES: dict[str, dict[str, str]] = {
    "customers": {
        "customer_id": "object",
        "signup_at": "datetime64[ns]",
        "consent": "bool",
        "country": "object",
        "age_band": "object",
    },
    "transactions": {
        "customer_id": "object",
        "order_id": "object",
        "timestamp": "datetime64[ns]",
        "amount": "float64",
        "quantity": "int64",
        "category": "object",
        "item": "object",
        "is_return": "bool",
    },
    "events": {
        "customer_id": "object",
        "session_id": "object",
        "timestamp": "datetime64[ns]",
        "event_type": "object",
        "item": "object",
        "category": "object",
        "duration_s": "float64",
    },
}


def _truth_dtypes(categories: tuple[str, ...]) -> dict[str, str]:
    return {
        "customer_id": "object",
        "segment": "object",
        "purchase_rate_per_day": "float64",
        "churn_at": "datetime64[ns]",
        "top_category": "object",
        **{f"affinity_{c}": "float64" for c in categories},
        "price_level": "float64",
        "session_rate_per_day": "float64",
    }


def _dtypes(frame: pd.DataFrame) -> dict[str, str]:
    return {str(name): str(dtype) for name, dtype in frame.dtypes.items()}


def _active_windows(data: SyntheticData, config: SyntheticConfig) -> pd.DataFrame:
    """Per customer: the planted active interval [signup_at, min(churn_at, end))."""
    windows = data.customers[["customer_id", "signup_at"]].merge(data.truth[["customer_id", "churn_at"]])
    end = pd.Timestamp(config.end)
    windows["stop"] = windows["churn_at"].fillna(end).clip(upper=end)
    return windows


def _assert_inside_windows(frame: pd.DataFrame, windows: pd.DataFrame) -> None:
    joined = frame[["customer_id", "timestamp"]].merge(windows, on="customer_id", how="left", validate="m:1")
    assert joined["signup_at"].notna().all(), "activity of an unknown customer"
    assert (joined["timestamp"] >= joined["signup_at"]).all(), "activity before signup"
    assert (joined["timestamp"] < joined["stop"]).all(), "activity at/after churn or window end"


def _purchases(data: SyntheticData) -> pd.DataFrame:
    return data.transactions[~data.transactions["is_return"]]


@pytest.fixture(scope="module")
def small() -> SyntheticData:
    return generate(SMALL)


@pytest.fixture(scope="module")
def drift_baseline() -> SyntheticData:
    return generate(DRIFT_BASE)


# --- determinism ---------------------------------------------------------------------------------


def test_same_seed_gives_identical_frames(small: SyntheticData) -> None:
    # Given the same config twice / When generating / Then every frame is identical
    again = generate(SMALL)
    for name in ("customers", "transactions", "events", "truth"):
        pd.testing.assert_frame_equal(getattr(small, name), getattr(again, name))


def test_different_seeds_give_different_frames(small: SyntheticData) -> None:
    # Given another seed / When generating / Then the frames differ
    other = generate(SMALL.model_copy(update={"seed": SMALL.seed + 1}))
    for name in ("customers", "transactions", "events", "truth"):
        assert not getattr(small, name).equals(getattr(other, name)), name


def test_switching_events_off_keeps_customers_and_transactions(small: SyntheticData) -> None:
    # Given the same config without events / When generating / Then only the events change (to empty)
    lean = generate(SMALL.model_copy(update={"events": False}))
    pd.testing.assert_frame_equal(small.customers, lean.customers)
    pd.testing.assert_frame_equal(small.transactions, lean.transactions)
    pd.testing.assert_frame_equal(small.truth, lean.truth)
    assert lean.events.empty
    assert _dtypes(lean.events) == EXPECTED_DTYPES["events"]


def test_drift_leaves_customers_and_truth_unchanged(small: SyntheticData) -> None:
    # Given a drifted config with the same seed / When generating / Then the planted population is the same
    drifted = generate(SMALL.model_copy(update={"drift": DriftSpec(start=DRIFT_START, price=0.3, mix=0.5)}))
    pd.testing.assert_frame_equal(small.customers, drifted.customers)
    pd.testing.assert_frame_equal(small.truth, drifted.truth)


# --- contracts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("table", ["customers", "transactions", "events"])
def test_columns_and_dtypes(small: SyntheticData, table: str) -> None:
    # Given generated data / Then each table has exactly the contracted columns and dtypes
    assert _dtypes(getattr(small, table)) == EXPECTED_DTYPES[table]


def test_truth_columns_and_dtypes(small: SyntheticData) -> None:
    assert _dtypes(small.truth) == _truth_dtypes(SMALL.categories)


def test_identifiers_and_value_domains(small: SyntheticData) -> None:
    customers, tx, events = small.customers, small.transactions, small.events
    # customers: zero-padded unique ids, mostly consenting, small vocabularies
    assert customers["customer_id"].is_unique
    assert customers["customer_id"].str.fullmatch(r"c\d{7}").all()
    assert customers["customer_id"].iloc[0] == "c0000001"
    assert 0.88 < customers["consent"].mean() <= 1.0
    assert customers["country"].nunique() <= 10
    assert set(customers["age_band"]) <= {"18-24", "25-34", "35-44", "45-54", "55-64", "65+"}
    # transactions: unique order ids, purchases positive, items named after their category
    assert tx["order_id"].is_unique
    purchases, returns = tx[~tx["is_return"]], tx[tx["is_return"]]
    assert purchases["order_id"].str.fullmatch(r"o\d{9}").all()
    assert returns["order_id"].str.fullmatch(r"r\d{9}").all()
    assert (purchases["amount"] > 0).all() and (purchases["quantity"] >= 1).all()
    assert (returns["amount"] < 0).all() and (returns["quantity"] <= -1).all()
    assert set(tx["category"]) <= set(SMALL.categories)
    assert (tx["item"].str.split("-").str[0] == tx["category"]).all()
    assert tx["item"].str.fullmatch(r"[a-z]+-\d{4}").all()
    assert set(tx["customer_id"]) <= set(customers["customer_id"])
    # events: known types; product rows carry item and category, page views and searches none
    assert set(events["event_type"]) == set(EVENT_TYPES)
    with_product = events["event_type"].isin(["product_view", "add_to_cart", "purchase"])
    assert events.loc[with_product, ["item", "category"]].notna().all().all()
    assert events.loc[~with_product, ["item", "category"]].isna().all().all()
    assert (events["duration_s"].dropna() >= 0).all()
    assert events.loc[events["event_type"] != "purchase", "duration_s"].notna().all()


def test_returns_are_a_small_share(small: SyntheticData) -> None:
    share = small.transactions["is_return"].mean()
    assert 0.005 < share < 0.04


def test_truth_is_one_consistent_row_per_customer(small: SyntheticData) -> None:
    truth = small.truth
    assert list(truth["customer_id"]) == list(small.customers["customer_id"])
    affinity = truth[[f"affinity_{c}" for c in SMALL.categories]].to_numpy()
    np.testing.assert_allclose(affinity.sum(axis=1), 1.0)
    assert (affinity >= 0).all()
    assert (np.array(SMALL.categories)[affinity.argmax(axis=1)] == truth["top_category"].to_numpy()).all()
    segments = {"loyal_high_value", "regular", "bargain_hunter", "occasional", "new_explorer"}
    assert set(truth["segment"]) == segments
    assert (truth["purchase_rate_per_day"] > 0).all()
    assert (truth["session_rate_per_day"] > 0).all()
    assert (truth["price_level"] > 0).all()
    churned = truth["churn_at"].notna()
    assert 0 < churned.mean() < 1
    assert (truth.loc[churned, "churn_at"] < pd.Timestamp(SMALL.end)).all()
    signup = small.customers.set_index("customer_id")["signup_at"]
    churned_signup = signup[truth.loc[churned, "customer_id"]].to_numpy()
    assert (truth.loc[churned, "churn_at"].to_numpy() > churned_signup).all()


def test_signups_spread_over_the_first_part_of_the_window(small: SyntheticData) -> None:
    signup = small.customers["signup_at"]
    assert (signup >= pd.Timestamp(SMALL.start)).all()
    assert (signup <= pd.Timestamp(SMALL.start) + timedelta(days=0.6 * SMALL.days)).all()
    assert (signup == pd.Timestamp(SMALL.start)).any(), "some customers exist from the start"


def test_custom_categories_shape_the_tables() -> None:
    # Given custom categories / When generating / Then items, categories and affinity columns follow them
    config = SyntheticConfig(customers=50, days=120, categories=("tea", "coffee", "cocoa"), events=True)
    data = generate(config)
    assert set(data.transactions["category"]) <= {"tea", "coffee", "cocoa"}
    assert _dtypes(data.truth) == _truth_dtypes(config.categories)
    assert set(data.events["category"].dropna()) <= {"tea", "coffee", "cocoa"}


# --- planted truth is recoverable --------------------------------------------------------------


def test_purchase_counts_recover_the_planted_rate() -> None:
    # Given a population with planted rates and active windows
    config = SyntheticConfig(customers=2_000, days=730, seed=3, events=False)
    data = generate(config)
    windows = _active_windows(data, config)
    active_days = (windows["stop"] - windows["signup_at"]).dt.total_seconds() / 86_400
    expected = data.truth["purchase_rate_per_day"].to_numpy() * active_days.to_numpy()
    # When counting purchases per customer
    counts = _purchases(data).groupby("customer_id").size().reindex(data.truth["customer_id"], fill_value=0)
    # Then the counts rank like the planted expectation and match it on average
    spearman = pd.Series(counts.to_numpy()).rank().corr(pd.Series(expected).rank())
    assert spearman > 0.6
    assert counts.sum() == pytest.approx(expected.sum(), rel=0.05)


def test_segment_spread_tightens_each_segment_around_its_planted_mean() -> None:
    # Given the same shop at the default spread and at half of it
    config = SyntheticConfig(customers=3_000, days=200, seed=11, events=False)
    default, tight = generate(config).truth, generate(config.model_copy(update={"segment_spread": 0.5})).truth
    # Then the segments keep their members and means ...
    assert (tight["segment"] == default["segment"]).all()
    for column in ("purchase_rate_per_day", "session_rate_per_day"):
        by_default, by_tight = (t.groupby("segment")[column] for t in (default, tight))
        assert np.allclose(by_tight.mean(), by_default.mean(), rtol=0.15)
        # ... while each segment's spread halves (gamma: the coefficient of variation is 1 / sqrt(shape))
        ratio = (by_tight.std() / by_tight.mean()) / (by_default.std() / by_default.mean())
        assert ratio.between(0.4, 0.6).all(), ratio
    log_price = [t.assign(p=np.log(t["price_level"])).groupby("segment")["p"].std() for t in (default, tight)]
    assert (log_price[1] / log_price[0]).between(0.4, 0.6).all()


def test_segments_order_spend_as_planted() -> None:
    data = generate(SyntheticConfig(customers=2_000, days=365, seed=5, events=False))
    # Given planted segments and top categories / When looking at their purchases
    purchases = _purchases(data).merge(data.truth[["customer_id", "segment", "top_category"]])
    # Then spend follows the segments' price levels and purchases lean to the top category
    mean_amount = purchases.groupby("segment")["amount"].mean()
    assert mean_amount["loyal_high_value"] > mean_amount["regular"] > mean_amount["bargain_hunter"]
    top_share = (purchases["category"] == purchases["top_category"]).mean()
    assert top_share > 1.5 / len(SyntheticConfig().categories)


def test_no_activity_outside_the_active_window(small: SyntheticData) -> None:
    windows = _active_windows(small, SMALL)
    _assert_inside_windows(small.transactions, windows)
    _assert_inside_windows(small.events, windows)


def test_returns_follow_their_purchase(small: SyntheticData) -> None:
    # Given the returns / When matching each to the purchase its order id refers to
    tx = small.transactions
    returns = tx[tx["is_return"]].assign(number=lambda f: f["order_id"].str[1:])
    purchases = tx[~tx["is_return"]].assign(number=lambda f: f["order_id"].str[1:])
    assert len(returns) > 0
    matched = returns.merge(purchases, on="number", suffixes=("_ret", "_buy"), how="left", validate="1:1")
    # Then the purchase exists, belongs to the same customer and line, and precedes the return by <= 30 days
    assert matched["order_id_buy"].notna().all()
    assert (matched["customer_id_ret"] == matched["customer_id_buy"]).all()
    assert (matched["item_ret"] == matched["item_buy"]).all()
    assert (matched["category_ret"] == matched["category_buy"]).all()
    delay = matched["timestamp_ret"] - matched["timestamp_buy"]
    assert (delay > pd.Timedelta(0)).all() and (delay <= pd.Timedelta(days=30)).all()
    assert (matched["timestamp_ret"] < pd.Timestamp(SMALL.end)).all()
    np.testing.assert_allclose(matched["amount_ret"], -matched["amount_buy"])
    assert (matched["quantity_ret"] == -matched["quantity_buy"]).all()


def test_purchase_events_match_transactions_one_to_one(small: SyntheticData) -> None:
    # Given purchases and purchase events / Then they pair up exactly on customer, time and item
    keys = ["customer_id", "timestamp", "item", "category"]
    bought = _purchases(small)[keys].sort_values(keys).reset_index(drop=True)
    events = small.events
    purchase_events = events.loc[events["event_type"] == "purchase", keys]
    purchase_events = purchase_events.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(bought, purchase_events)


def test_purchase_sessions_lead_up_to_the_purchase(small: SyntheticData) -> None:
    # Given the sessions that contain a purchase
    events = small.events
    buying = events.groupby("session_id")["event_type"].transform(lambda t: (t == "purchase").any())
    sessions = events[buying].groupby("session_id", sort=False)
    # Then each ends product_view -> add_to_cart -> purchase, same item, nondecreasing time
    tails = sessions["event_type"].agg(lambda t: tuple(t.iloc[-3:]))
    assert (tails == ("product_view", "add_to_cart", "purchase")).all()
    assert (sessions["item"].agg(lambda i: i.iloc[-3:].nunique()) == 1).all()
    assert sessions["timestamp"].agg(lambda t: t.is_monotonic_increasing).all()
    assert (sessions["customer_id"].nunique() == 1).all()
    # And some browsing sessions end in an abandoned cart
    browsing = events[~buying].groupby("session_id")["event_type"].last()
    assert (browsing == "add_to_cart").any()
    assert (browsing.index.size > tails.index.size), "browsing sessions outnumber purchase sessions"


# --- drift knobs ---------------------------------------------------------------------------------


def _split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    after = frame["timestamp"] >= pd.Timestamp(DRIFT_START)
    return frame[~after], frame[after]


def test_price_drift_scales_amounts_after_start(drift_baseline: SyntheticData) -> None:
    # Given a +50 % price drift / When comparing mean amounts after vs before the drift start
    drifted = generate(DRIFT_BASE.model_copy(update={"drift": DriftSpec(start=DRIFT_START, price=0.5)}))

    def after_over_before(data: SyntheticData) -> float:
        before, after = _split(_purchases(data))
        return after["amount"].mean() / before["amount"].mean()

    # Then the ratio is about 1.5x the baseline's ratio
    assert 1.35 < after_over_before(drifted) / after_over_before(drift_baseline) < 1.65


def test_activity_drift_halves_the_purchase_rate_after_start(drift_baseline: SyntheticData) -> None:
    # Given a -50 % activity drift
    drifted = generate(DRIFT_BASE.model_copy(update={"drift": DriftSpec(start=DRIFT_START, activity=-0.5)}))

    def rate_after_over_before(data: SyntheticData) -> float:
        windows = _active_windows(data, DRIFT_BASE)
        cut = pd.Timestamp(DRIFT_START)
        days_before = (windows["stop"].clip(upper=cut) - windows["signup_at"]).clip(lower=pd.Timedelta(0))
        days_after = (windows["stop"] - windows["signup_at"].clip(lower=cut)).clip(lower=pd.Timedelta(0))
        before, after = _split(_purchases(data))
        exposure_after = days_after.dt.total_seconds().sum()
        exposure_before = days_before.dt.total_seconds().sum()
        return (len(after) / exposure_after) / (len(before) / exposure_before)

    # Then the purchases per active customer-day after start roughly halve relative to the baseline
    assert 0.4 < rate_after_over_before(drifted) / rate_after_over_before(drift_baseline) < 0.6
    # And browsing sessions drift too
    with_events = DRIFT_BASE.model_copy(update={"customers": 300, "events": True})
    base_events = generate(with_events).events
    drift = DriftSpec(start=DRIFT_START, activity=-0.5)
    events = generate(with_events.model_copy(update={"drift": drift})).events
    ratio = len(_split(events)[1]) / len(_split(base_events)[1])
    assert 0.4 < ratio < 0.6


def test_mix_drift_moves_transactions_to_the_drift_category(drift_baseline: SyntheticData) -> None:
    # Given a 0.8 mix drift toward the last category
    drifted = generate(DRIFT_BASE.model_copy(update={"drift": DriftSpec(start=DRIFT_START, mix=0.8)}))
    target = DRIFT_BASE.drift_category
    assert target == DRIFT_BASE.categories[-1]

    def shares(data: SyntheticData) -> tuple[float, float]:
        before, after = _split(_purchases(data))
        return (before["category"] == target).mean(), (after["category"] == target).mean()

    # Then the drift category's share after start rises strongly, and not before
    before, after = shares(drifted)
    base_before, base_after = shares(drift_baseline)
    assert before == pytest.approx(base_before, abs=0.03)
    assert base_after < 0.3
    assert after > 0.7


def test_dropout_drift_makes_one_categorys_fans_leave_faster_and_no_one_else(drift_baseline: SyntheticData) -> None:
    # Given a tripled dropout hazard, from the drift start, for the fans of one category
    fan_of = DRIFT_BASE.categories[0]
    drifted = generate(DRIFT_BASE.model_copy(update={"drift": DriftSpec(start=DRIFT_START, dropout={fan_of: 3.0})}))
    base, moved = drift_baseline.truth, drifted.truth
    fans = (base["top_category"] == fan_of).to_numpy()
    cut = pd.Timestamp(DRIFT_START)

    alive = ((base["churn_at"].isna() | (base["churn_at"] > cut)).to_numpy() & fans
             & (drift_baseline.customers["signup_at"] < cut).to_numpy())

    def hazard_after(truth: pd.DataFrame) -> float:
        """Dropouts per customer-day after the drift start, over the fans alive at the start (censored at the end)."""
        churn = truth.loc[alive, "churn_at"]
        exposure = (churn.fillna(pd.Timestamp(DRIFT_BASE.end)) - cut).dt.total_seconds().sum() / 86_400
        return churn.notna().sum() / exposure

    # Then the fans alive at the start drop out about three times as fast, nobody else's churn moves, and no
    # dropout moves before the start
    assert alive.sum() > 50
    ratio = hazard_after(moved) / hazard_after(base)
    assert 2.3 < ratio < 3.9, ratio
    pd.testing.assert_series_equal(moved.loc[~fans, "churn_at"], base.loc[~fans, "churn_at"])
    early = (base["churn_at"] <= cut).to_numpy()
    pd.testing.assert_series_equal(moved.loc[early, "churn_at"], base.loc[early, "churn_at"])
    # And the transactions stop at the new dropout: nobody buys after their churn_at
    tx = _purchases(drifted).merge(moved[["customer_id", "churn_at"]], on="customer_id")
    assert not (tx["timestamp"] >= tx["churn_at"]).any()
    # And an unknown category is refused, naming the categories
    with pytest.raises(ValidationError, match="unknown categories"):
        SyntheticConfig(customers=10, drift=DriftSpec(start=DRIFT_START, dropout={"cars": 2.0}))
    with pytest.raises(ValidationError, match="positive number"):
        DriftSpec(dropout={fan_of: 0.0})


def test_drift_before_the_window_applies_everywhere_and_after_it_nowhere(
    drift_baseline: SyntheticData,
) -> None:
    early = generate(DRIFT_BASE.model_copy(update={"drift": DriftSpec(start=datetime(2020, 1, 1), mix=1.0)}))
    assert (_purchases(early)["category"] == DRIFT_BASE.drift_category).all()
    never = DriftSpec(start=datetime(2030, 1, 1), mix=1.0, price=2.0, activity=-0.9)
    late = generate(DRIFT_BASE.model_copy(update={"drift": never}))
    pd.testing.assert_frame_equal(late.transactions, drift_baseline.transactions)


# --- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"customers": 0},
        {"days": 0},
        {"categories": ()},
        {"categories": ("a", "a")},
        {"unknown": 1},
        {"drift": {"mix": 1.5}},
        {"drift": {"price": -1.0}},
        {"drift": {"surprise": 0.1}},
        {"segment_spread": 0.0},
        {"segment_spread": float("nan")},
    ],
)
def test_invalid_configs_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SyntheticConfig.model_validate(bad)


def test_config_is_frozen_and_normalises_aware_times() -> None:
    config = SyntheticConfig(
        start=datetime(2024, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
        drift=DriftSpec(start=datetime(2024, 6, 1, tzinfo=timezone.utc)),
    )
    assert config.start == datetime(2024, 1, 1)
    assert config.drift.start == datetime(2024, 6, 1)
    with pytest.raises(ValidationError):
        config.customers = 3  # type: ignore[misc]


# --- persistence ---------------------------------------------------------------------------------


@pytest.mark.parametrize("events", [True, False])
def test_write_round_trips_through_parquet(tmp_path: Path, small: SyntheticData, events: bool) -> None:
    # Given data (with or without events) / When writing and reading back / Then the frames are unchanged
    data = small if events else generate(SMALL.model_copy(update={"events": False}))
    paths = write(data, tmp_path / "out")
    assert set(paths) == {"customers", "transactions", "events", "truth"}
    for name, path in paths.items():
        assert path == tmp_path / "out" / f"{name}.parquet"
        # the store keeps rows sorted by customer and time, contract columns first: same content, own order
        written, expected = pd.read_parquet(path), getattr(data, name)
        key = list(expected.columns)
        pd.testing.assert_frame_equal(
            written[key].sort_values(key, ignore_index=True), expected.sort_values(key, ignore_index=True))


# --- property: activity never leaves the planted window ------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    customers=st.integers(1, 25),
    days=st.integers(1, 90),
    seed=st.integers(0, 2**32 - 1),
    drift_day=st.integers(-10, 100),
    activity=st.floats(-1.0, 1.0),
    price=st.floats(-0.5, 1.0),
    mix=st.floats(0.0, 1.0),
)
def test_any_config_keeps_activity_in_window_and_contracts(
    customers: int, days: int, seed: int, drift_day: int, activity: float, price: float, mix: float
) -> None:
    config = SyntheticConfig(
        customers=customers,
        days=days,
        seed=seed,
        drift=DriftSpec(
            start=datetime(2024, 1, 1) + timedelta(days=drift_day), activity=activity, price=price, mix=mix
        ),
    )
    data = generate(config)
    windows = _active_windows(data, config)
    _assert_inside_windows(data.transactions, windows)
    _assert_inside_windows(data.events, windows)
    for table in ("customers", "transactions", "events"):
        assert _dtypes(getattr(data, table)) == EXPECTED_DTYPES[table]
    assert _dtypes(data.truth) == _truth_dtypes(config.categories)
    assert (data.events["event_type"] == "purchase").sum() == (~data.transactions["is_return"]).sum()
    assert len(data.truth) == len(data.customers) == customers
