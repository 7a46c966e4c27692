"""Point-in-time features and labels: hand-computed values, boundaries, offline = online, no leakage."""

from __future__ import annotations

import math
from pathlib import Path

import ibis
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from features.definitions import FEATURE_VERSION, FeatureSpec, customer_features
from features.store import (ARROW_SCHEMAS, FeatureStore, UnknownCustomer, default_cutoffs, read_frame, write_frame,
                            write_raw)
from personalize.errors import ConfigError, ContractError, PersonalizeError

CUTOFF = pd.Timestamp("2024-03-01")
SPEC = FeatureSpec(categories=("x", "y"))
T = pd.Timestamp


def customers() -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": ["A", "B", "C", "D", "E"],
        "signup_at": [T("2024-01-01"), T("2024-01-01"), T("2024-03-02"), T("2024-01-01"), T("2024-01-01")],
        "consent": [True, True, True, False, True],
    })


def transactions() -> pd.DataFrame:
    rows = [
        ("A", "o1", "2024-01-10 10:00", 10.0, 1, False, "x"),
        ("A", "o1", "2024-01-10 10:00", 5.0, 1, False, "y"),
        ("A", "o2", "2024-01-20 12:00", 30.0, 3, False, "x"),
        ("A", "o3", "2024-02-09 09:00", 15.0, 1, False, "y"),
        ("A", "r1", "2024-02-10 09:00", -5.0, -1, True, "x"),
        ("A", "o4", "2024-03-05 10:00", 40.0, 2, False, "y"),  # in the horizon
        ("D", "o5", "2024-02-01 00:00", 7.0, 1, False, "x"),
        ("D", "o6", "2024-03-01 00:00", 8.0, 1, False, "x"),  # exactly at the cutoff: a label, not a feature
        ("E", "o7", "2024-02-11 16:00", 5.0, 1, False, "y"),  # 30 h after E's cart: too late to count as bought
        ("E", "o8", "2024-03-01 05:00", 5.0, 1, False, "y"),  # after the cutoff, inside E's open cart window
    ]
    frame = pd.DataFrame(rows, columns=["customer_id", "order_id", "timestamp", "amount", "quantity", "is_return",
                                        "category"])
    return frame.assign(timestamp=pd.to_datetime(frame["timestamp"]), item=None)


def events() -> pd.DataFrame:
    rows = [
        ("A", "s0", "2024-01-15 10:00", "page_view", 50.0),  # older than 28 days
        ("A", "s1", "2024-02-09 08:00", "page_view", 30.0),
        ("A", "s1", "2024-02-09 08:10", "product_view", 60.0),
        ("A", "s1", "2024-02-09 08:50", "add_to_cart", None),  # bought at 09:00: not abandoned
        ("A", "s1", "2024-02-09 09:00", "purchase", None),
        ("A", "s2", "2024-02-20 09:00", "page_view", 20.0),
        ("A", "s2", "2024-02-20 09:30", "search", None),
        ("A", "s2", "2024-02-20 10:00", "add_to_cart", None),  # abandoned
        ("A", "s3", "2024-02-29 20:00", "add_to_cart", None),  # its 24 h run past the cutoff: not counted yet
        ("D", "s4", "2024-02-29 00:00", "add_to_cart", None),  # window closes at the cutoff, bought at the cutoff
        ("E", "s5", "2024-02-10 10:00", "add_to_cart", None),  # abandoned: the purchase came 30 h later
        ("E", "s6", "2024-02-29 20:00", "add_to_cart", None),  # window still open at the cutoff: not counted
    ]
    frame = pd.DataFrame(rows, columns=["customer_id", "session_id", "timestamp", "event_type", "duration_s"])
    return frame.assign(timestamp=pd.to_datetime(frame["timestamp"]), item=None, category=None)


@pytest.fixture()
def store(tmp_path: Path) -> FeatureStore:
    write_raw(tmp_path / "shop", {"customers": customers(), "transactions": transactions(), "events": events()})
    return FeatureStore(tmp_path / "shop")


@pytest.fixture()
def frame(store: FeatureStore) -> pd.DataFrame:
    return store.training_frame([CUTOFF], horizon_days=30, spec=SPEC, observed_until=T("2024-04-01"))


def row(frame: pd.DataFrame, customer: str) -> pd.Series:
    return frame.set_index("customer_id").loc[customer]


def test_only_customers_signed_up_before_the_cutoff_are_in_the_frame(frame: pd.DataFrame) -> None:
    assert frame["customer_id"].tolist() == ["A", "B", "D", "E"]


def test_rfm_and_purchase_cycle_match_a_hand_computation(frame: pd.DataFrame) -> None:
    a = row(frame, "A")
    assert a["frequency"] == 3 and a["monetary_total"] == 60 and a["monetary_mean"] == 20
    assert a["recency_days"] == pytest.approx(20 + 15 / 24)  # last order 2024-02-09 09:00
    assert a["first_purchase_days"] == pytest.approx(50 + 14 / 24)
    assert a["orders_30d"] == 1 and a["orders_90d"] == 3 and a["spend_30d"] == 15 and a["spend_90d"] == 60
    assert a["ipi_mean_days"] == 15 and a["ipi_std_days"] == pytest.approx(math.sqrt(50))  # gaps 10 and 20 days
    assert a["recency_ratio"] == pytest.approx((20 + 15 / 24) / 15)
    assert a["returns"] == 1 and a["return_rate"] == pytest.approx(1 / 3)
    assert a["tenure_days"] == 60  # 2024 is a leap year
    assert a["cat_share_x"] == pytest.approx(40 / 60) and a["cat_share_y"] == pytest.approx(20 / 60)
    assert a["n_categories"] == 2


def test_engagement_and_cart_abandonment_match_a_hand_computation(frame: pd.DataFrame) -> None:
    a = row(frame, "A")
    assert a["sessions_28d"] == 3 and a["sessions_per_week"] == 0.75
    assert a["pages_per_session"] == 1.0  # s1: 2 pages, s2: 1, s3: 0
    assert a["browse_sessions_28d"] == 2 and a["browse_pages_per_session"] == 0.5  # s2 and s3: no purchase in them
    assert a["time_on_site_per_session_s"] == pytest.approx(110 / 3)
    assert a["searches_28d"] == 1
    assert a["cart_adds_28d"] == 2 and a["cart_abandonments_28d"] == 1 and a["cart_abandon_rate"] == 0.5


def test_a_customer_without_history_has_zero_counts_and_missing_ratios(frame: pd.DataFrame) -> None:
    b = row(frame, "B")
    assert b["frequency"] == 0 and b["monetary_total"] == 0 and b["sessions_28d"] == 0
    assert math.isnan(b["recency_days"]) and math.isnan(b["monetary_mean"]) and math.isnan(b["cat_share_x"])


def test_labels_cover_the_horizon_from_the_cutoff_inclusive(frame: pd.DataFrame) -> None:
    a, b, d = row(frame, "A"), row(frame, "B"), row(frame, "D")
    assert (a["purchases_in_h"], a["spend_in_h"], a["propensity"], a["churn"]) == (1, 40, 1, 0)
    assert a["days_to_next_purchase"] == pytest.approx(4 + 10 / 24) and a["next_purchase_event"] == 1
    assert (a["buys_x"], a["buys_y"]) == (0, 1)
    assert d["recency_days"] == 29 and d["frequency"] == 1  # the order at the cutoff is not a feature ...
    assert d["days_to_next_purchase"] == 0 and d["propensity"] == 1  # ... it is a label
    assert d["cart_adds_28d"] == 0  # its 24 h window ends at the cutoff: the outcome is not known before it
    e = row(frame, "E")
    assert (e["cart_adds_28d"], e["cart_abandonments_28d"]) == (1, 1)
    assert b["propensity"] == 0 and pd.isna(b["churn"])  # never bought: nothing to churn from
    assert b["days_to_next_purchase"] == 30 and b["next_purchase_event"] == 0  # censored at H


def test_labels_end_where_the_transactions_end_not_the_events(tmp_path: Path) -> None:
    # given an event log that runs months past the last transaction
    late = pd.DataFrame({"customer_id": ["A"], "session_id": ["late"], "timestamp": [T("2024-12-31")],
                         "event_type": ["page_view"], "item": None, "category": None, "duration_s": [1.0]})
    write_raw(tmp_path / "shop", {"customers": customers(), "transactions": transactions(),
                                  "events": pd.concat([events(), late])})
    store = FeatureStore(tmp_path / "shop")
    # then a horizon is only as long as the purchase data
    assert store.observed_until() == T("2024-03-05 10:00") and store.events_until() == T("2024-12-31")
    with pytest.raises(ContractError, match="ends after the data does"):
        store.training_frame([CUTOFF], horizon_days=30, spec=SPEC)


def test_the_online_path_refuses_customers_the_offline_path_would_not_have(store: FeatureStore) -> None:
    with pytest.raises(UnknownCustomer, match="'NOPE'"):
        store.features_for("NOPE", CUTOFF, SPEC)
    with pytest.raises(UnknownCustomer, match="'C'"):  # signs up the day after
        store.features_for("C", CUTOFF, SPEC)


def test_categories_that_would_share_a_column_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="cat_share_home_garden"):
        FeatureSpec(categories=("Home & Garden", "home-garden"))
    with pytest.raises(ConfigError, match="cat_share_kuche"):
        FeatureSpec(categories=("Küche", "Kuche"))


def test_category_columns_spell_accented_letters_out() -> None:
    spec = FeatureSpec(categories=("Küche & Bad", "Straße", "Électronique", "Jardín", "Øl", "玩具"))
    assert list(spec.category_columns.values()) == [
        "cat_share_kuche_bad", "cat_share_strasse", "cat_share_electronique", "cat_share_jardin", "cat_share_ol",
        "cat_share_blank"]  # a name with no latin letter at all has nothing to spell


def test_a_labeled_table_is_not_a_feature_source(tmp_path: Path) -> None:
    (tmp_path / "telco").mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "telco" / "table.parquet")
    with pytest.raises(PersonalizeError, match="is a labeled table"):
        FeatureStore(tmp_path / "telco")


def test_a_horizon_past_the_data_is_refused(store: FeatureStore) -> None:
    with pytest.raises(ContractError, match="latest usable cutoff is 2024-02-01"):
        store.training_frame([CUTOFF], horizon_days=30, spec=SPEC, observed_until=T("2024-04-01") - pd.Timedelta(days=30))


def test_the_version_and_provenance_travel_with_the_frame(frame: pd.DataFrame, tmp_path: Path) -> None:
    path = write_frame(frame, tmp_path / "frame.parquet", frame.attrs)
    back = read_frame(path)
    assert back.attrs["feature_version"] == FEATURE_VERSION
    assert back.attrs["cutoffs"] == [str(CUTOFF)] and back.attrs["horizon_days"] == 30
    assert len(back.attrs["data_fingerprint"]) == 16 and len(back.attrs["definition_fingerprint"]) == 16
    assert back.attrs["definition_fingerprint"] != __import__("features.store").store.definition_fingerprint(
        FeatureSpec(categories=("x",)))
    assert back.attrs["feature_columns"] == SPEC.columns
    pd.testing.assert_frame_equal(back, frame, check_like=False)


def test_online_features_are_identical_to_offline(store: FeatureStore, frame: pd.DataFrame) -> None:
    for _, offline in frame.iterrows():
        online = store.features_for(offline["customer_id"], CUTOFF, SPEC)
        for column in SPEC.columns:
            expected = offline[column]
            assert (online[column] is None and pd.isna(expected)) or online[column] == expected, column


def test_default_cutoffs_end_where_the_last_full_horizon_does() -> None:
    cuts = default_cutoffs(T("2024-12-31 18:00"), horizon_days=90, count=3, step_days=30)
    assert cuts == [T("2024-08-03"), T("2024-09-02"), T("2024-10-02")]


# --- the point-in-time law -------------------------------------------------------------------------------------
# around the cutoff: mostly within two days of it, where windows (24 h carts, 30-day spend) straddle it
HOURS = st.one_of(st.integers(min_value=-48, max_value=48), st.integers(min_value=-24 * 40, max_value=24 * 40))


def _tx(hours: list[int], amounts: list[float], who: list[int]) -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": [f"c{w}" for w in who],
        "order_id": [f"o{i}-{h}" for i, h in enumerate(hours)],
        "timestamp": pd.to_datetime([CUTOFF + pd.Timedelta(hours=h) for h in hours]).astype("datetime64[ns]"),
        "amount": amounts,
        "quantity": 1,
        "is_return": [a < 0 for a in amounts],
        "category": [["x", "y", "z"][i % 3] for i in range(len(hours))],
        "item": None,
    })


def _ev(hours: list[int], kinds: list[str], who: list[int]) -> pd.DataFrame:
    return pd.DataFrame({
        "customer_id": [f"c{w}" for w in who],
        "session_id": [f"s{h // 2}" for h in hours],
        "timestamp": pd.to_datetime([CUTOFF + pd.Timedelta(hours=h) for h in hours]).astype("datetime64[ns]"),
        "event_type": kinds,
        "item": None, "category": None,
        "duration_s": [float(abs(h) % 90) for h in hours],
    })


def _features(cust: pd.DataFrame, tx: pd.DataFrame, ev: pd.DataFrame) -> pd.DataFrame:
    con = ibis.duckdb.connect()
    entities = ibis.memtable(pd.DataFrame({"customer_id": cust["customer_id"], "cutoff": CUTOFF}))

    def table(name: str, frame: pd.DataFrame) -> ibis.Table:
        import pyarrow as pa

        arrow = pa.Table.from_pandas(frame[ARROW_SCHEMAS[name].names], schema=ARROW_SCHEMAS[name],
                                     preserve_index=False)
        return ibis.memtable(arrow)

    expr = customer_features(entities, table("customers", cust), table("transactions", tx), table("events", ev), SPEC)
    return con.to_pandas(expr)


WHO = st.integers(min_value=0, max_value=2)
TX = st.lists(st.tuples(HOURS, st.floats(min_value=-50, max_value=500).map(lambda a: round(a, 2)), WHO),
              min_size=1, max_size=25)
EV = st.lists(st.tuples(HOURS, st.sampled_from(["page_view", "product_view", "add_to_cart", "search"]), WHO),
              max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tx=TX, ev=EV, later_tx=TX, later_ev=EV, drop=st.integers(min_value=0, max_value=10**6))
def test_data_at_or_after_the_cutoff_never_changes_a_feature(tx, ev, later_tx, later_ev, drop) -> None:
    cust = pd.DataFrame({"customer_id": ["c0", "c1", "c2"], "signup_at": T("2023-06-01"), "consent": True})
    tx_frame = _tx(*map(list, zip(*tx)))
    ev_frame = _ev(*map(list, zip(*ev))) if ev else _ev([], [], [])
    before = _features(cust, tx_frame, ev_frame)

    # change the world at and after the cutoff: delete some of it, rewrite amounts, add new rows and customers
    def future_changed(frame: pd.DataFrame, extra: pd.DataFrame) -> pd.DataFrame:
        past = frame[frame["timestamp"] < CUTOFF]
        future = frame[frame["timestamp"] >= CUTOFF]
        future = future.iloc[[i for i in range(len(future)) if (drop >> (i % 20)) & 1]]
        if "amount" in future:
            future = future.assign(amount=future["amount"] * 3 + 1)
        extra = extra[extra["timestamp"] >= CUTOFF]
        out = pd.concat([past, future, extra], ignore_index=True)
        return out.astype({"timestamp": "datetime64[ns]"})

    tx_after = future_changed(tx_frame, _tx(*map(list, zip(*later_tx))).assign(order_id=lambda f: "n" + f["order_id"]))
    ev_after = future_changed(ev_frame, _ev(*map(list, zip(*later_ev))) if later_ev else _ev([], [], []))
    cust_after = pd.concat([cust, pd.DataFrame({"customer_id": ["late"], "signup_at": [CUTOFF], "consent": [True]})])
    after = _features(cust_after, tx_after, ev_after)
    pd.testing.assert_frame_equal(before, after[after["customer_id"] != "late"].reset_index(drop=True))
