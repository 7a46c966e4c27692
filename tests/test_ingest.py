"""Row-level validation: every bad row is quarantined with its reason, and nothing is lost."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.ingest import DETAIL, REASON, SOURCE_ROW, ParseOptions, validate_table
from personalize.errors import ContractError

NOW = pd.Timestamp("2025-01-01")


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, index=range(1, len(rows) + 1))


def tx(**overrides) -> dict:
    row = {"customer_id": "c1", "order_id": "o1", "timestamp": "2024-05-01 10:00:00", "quantity": "2",
           "amount": "19.90", "category": "books"}
    return {**row, **overrides}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (tx(customer_id=""), "missing_customer_id"),
        (tx(customer_id="   "), "missing_customer_id"),
        (tx(order_id=None), "missing_order_id"),
        (tx(timestamp="yesterday-ish"), "unparseable_timestamp"),
        (tx(timestamp=""), "missing_timestamp"),
        (tx(timestamp="2031-01-01 00:00:00"), "future_timestamp"),
        (tx(quantity="-3", amount="-10"), "negative_amount_not_return"),
        (tx(quantity="-3"), "negative_quantity_not_return"),
        (tx(quantity="0"), "zero_quantity"),
        (tx(timestamp="03/04/2024 10:00"), "unparseable_timestamp"),  # day or month first? never guessed
        (tx(quantity="two"), "unparseable_quantity"),
        (tx(quantity="1.5"), "non_integer_quantity"),
        (tx(amount="abc"), "unparseable_amount"),
        (tx(amount="inf"), "non_finite_amount"),
    ],
)
def test_a_bad_transaction_is_quarantined_with_its_reason(row: dict, reason: str) -> None:
    # given one good row and one bad row
    given_rows = frame([tx(order_id="ok"), row])
    # when validated
    result = validate_table(given_rows, "transactions", NOW)
    # then the bad row, and only it, is quarantined for that reason
    assert list(result.valid["order_id"]) == ["ok"]
    assert len(result.quarantined) == 1
    assert reason in result.quarantined.loc[0, DETAIL].split("; ")
    assert result.quarantined.loc[0, SOURCE_ROW] == 2


def test_returns_are_valid_when_flagged_by_prefix() -> None:
    rows = frame([tx(order_id="C100", quantity="-1", amount="-19.90"), tx(order_id="100")])
    result = validate_table(rows, "transactions", NOW, ParseOptions(return_prefix="C"))
    assert result.quarantined.empty
    assert list(result.valid["is_return"]) == [True, False]


def test_signs_must_match_the_return_flag() -> None:
    rows = frame([tx(order_id="100", quantity="-1", amount="-5"), tx(order_id="C1", quantity="2", amount="5")])
    result = validate_table(rows, "transactions", NOW, ParseOptions(return_prefix="C"))
    details = [set(d.split("; ")) for d in result.quarantined[DETAIL]]
    assert details == [{"negative_quantity_not_return", "negative_amount_not_return"},
                       {"positive_quantity_on_return", "positive_amount_on_return"}]


def test_an_explicit_timestamp_format_reads_day_first_dates() -> None:
    rows = frame([tx(timestamp="03/04/2024 10:00"), tx(order_id="o2", timestamp="13/04/2024 10:00")])
    result = validate_table(rows, "transactions", NOW, ParseOptions(timestamp_format="%d/%m/%Y %H:%M"))
    assert result.valid["timestamp"].tolist() == [pd.Timestamp("2024-04-03 10:00"), pd.Timestamp("2024-04-13 10:00")]


def test_integer_ids_read_as_floats_stay_integers() -> None:
    # a Parquet integer column with a null arrives in pandas as float64: 1.0 must still mean customer "1"
    rows = frame([tx(), tx(order_id="o2")]).assign(customer_id=[1.0, None])
    result = validate_table(rows, "transactions", NOW)
    assert result.valid["customer_id"].tolist() == ["1"]
    assert result.quarantined.loc[0, REASON] == "missing_customer_id"


def test_activity_of_an_unknown_customer_is_quarantined() -> None:
    rows = frame([tx(customer_id="c1"), tx(customer_id="ghost", order_id="o2")])
    result = validate_table(rows, "transactions", NOW, known_customers=pd.Series(["c1", "c2"]))
    assert result.valid["customer_id"].tolist() == ["c1"] and result.reasons == {"unknown_customer": 1}


def test_quarantine_keeps_nulls_and_refuses_to_overwrite_a_source_column() -> None:
    rows = frame([tx(customer_id=None, category=None)])
    result = validate_table(rows, "transactions", NOW)
    assert pd.isna(result.quarantined.loc[0, "customer_id"]) and pd.isna(result.quarantined.loc[0, "category"])
    with pytest.raises(ContractError, match="'_reason'"):
        validate_table(rows, "transactions", NOW, source=rows.assign(_reason="damaged"))


def test_a_non_unique_row_index_is_refused() -> None:
    with pytest.raises(ContractError, match="unique"):
        validate_table(pd.DataFrame([tx(), tx()], index=[1, 1]), "transactions", NOW)


def test_duplicates_keep_the_first_occurrence() -> None:
    rows = frame([tx(), tx(), tx(order_id="o2"), tx()])
    result = validate_table(rows, "transactions", NOW)
    assert list(result.valid.index) == [1, 3]
    assert list(result.quarantined[SOURCE_ROW]) == [2, 4]
    assert set(result.quarantined[REASON]) == {"duplicate"}


def test_amount_is_quantity_times_unit_price_when_only_the_price_is_mapped() -> None:
    rows = frame([{k: v for k, v in tx(unit_price="2.50").items() if k != "amount"}])
    result = validate_table(rows, "transactions", NOW)
    assert result.valid["amount"].tolist() == [5.0]


def test_quarantine_keeps_the_row_as_read() -> None:
    source = frame([{"CustomerID": "", "When": "2024-01-01", "Qty": "1", "Value": "3"}])
    mapped = source.set_axis(["customer_id", "timestamp", "quantity", "amount"], axis=1).assign(order_id="o")
    result = validate_table(mapped, "transactions", NOW, source=source)
    assert result.quarantined.loc[0, ["CustomerID", "When", "Qty", "Value"]].tolist() == ["", "2024-01-01", "1", "3"]


def test_customers_are_unique_and_blank_consent_means_no_consent() -> None:
    rows = frame([
        {"customer_id": "a", "signup_at": "2024-01-01", "consent": "yes", "country": "FR"},
        {"customer_id": "b", "signup_at": "2024-01-02", "consent": ""},
        {"customer_id": "a", "signup_at": "2024-01-03", "consent": "no"},
        {"customer_id": "c", "signup_at": "2024-01-04", "consent": "maybe"},
    ])
    result = validate_table(rows, "customers", NOW)
    assert result.valid["consent"].tolist() == [True, False]
    assert result.valid["country"].tolist()[0] == "FR"
    assert dict(zip(result.quarantined[SOURCE_ROW], result.quarantined[REASON])) == {
        3: "duplicate", 4: "unparseable_consent"}


def test_unknown_event_types_and_negative_durations_are_quarantined() -> None:
    base = {"customer_id": "c", "session_id": "s", "timestamp": "2024-01-01 10:00"}
    rows = frame([
        {**base, "event_type": "Page_View ", "duration_s": "3"},
        {**base, "event_type": "teleport", "duration_s": "3"},
        {**base, "event_type": "search", "duration_s": "-1"},
    ])
    result = validate_table(rows, "events", NOW)
    assert result.valid["event_type"].tolist() == ["page_view"]
    assert sorted(result.quarantined[REASON]) == ["negative_duration", "unknown_event_type"]


MESSY = st.fixed_dictionaries({
    "customer_id": st.sampled_from(["c1", "c2", "", "  ", None]),
    "order_id": st.sampled_from(["o1", "o2", "C3", ""]),
    "timestamp": st.sampled_from(["2024-01-01", "2024-02-30", "2040-01-01", "", "2024-03-01 12:00:00", "x"]),
    "quantity": st.sampled_from(["1", "-1", "0", "2.5", "", "3"]),
    "amount": st.sampled_from(["1.5", "-1.5", "nan", "", "0", "abc", "1e12"]),
})


@settings(max_examples=150, deadline=None)
@given(st.lists(MESSY, min_size=1, max_size=30))
def test_valid_plus_quarantined_is_the_input(rows: list[dict]) -> None:
    given_rows = frame(rows)
    result = validate_table(given_rows, "transactions", NOW, ParseOptions(return_prefix="C"))
    assert len(result.valid) + len(result.quarantined) == len(given_rows)
    assert set(result.valid.index) | set(result.quarantined[SOURCE_ROW]) == set(given_rows.index)
    assert sum(result.reasons.values()) == len(result.quarantined)
