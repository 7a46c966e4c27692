"""Data contracts: pandera schemas for the raw tables and the labeled tables.

Three raw tables feed the feature definitions:

- ``customers``: one row per customer (``customer_id``, ``signup_at``, ``consent``, optional attributes);
- ``transactions``: one row per order line (``customer_id``, ``order_id``, ``timestamp``, ``amount``,
  ``quantity``, ``is_return``, optional ``category`` and ``item``); returns carry ``is_return`` and negative
  quantity and amount, anything else negative is a broken row;
- ``events``: one row per web/app event (``customer_id``, ``session_id``, ``timestamp``, ``event_type``, optional
  ``item``, ``category``, ``duration_s``).

Timestamps are naive and mean UTC. Every custom check is named after the quarantine reason it stands for, so a
failed check becomes a reason a person can read (see :mod:`features.ingest`); pandera's built-in checks ignore
``name``, so those reasons use custom checks.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa

EVENT_TYPES = ("page_view", "product_view", "add_to_cart", "purchase", "search")
RAW_TABLES = ("customers", "transactions", "events")

# Contract columns of each raw table; the first block is required, the second optional.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "customers": ("customer_id", "signup_at"),
    "transactions": ("customer_id", "order_id", "timestamp", "amount", "quantity"),
    "events": ("customer_id", "session_id", "timestamp", "event_type"),
}
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "customers": ("consent",),
    "transactions": ("is_return", "category", "item"),
    "events": ("item", "category", "duration_s"),
}
# Required columns a mapping may leave out: the ingest derives them (see features.ingest.line_order_ids).
DERIVED_WHEN_UNMAPPED: dict[str, tuple[str, ...]] = {"transactions": ("order_id",)}


def missing_required(table: str, provided: set[str]) -> list[str]:
    """The required columns of ``table`` that neither ``provided`` (mapped or defaulted) nor a derivation gives:
    ``amount`` comes from ``unit_price`` (times quantity), an unmapped ``order_id`` from the line."""
    given = set(provided) | ({"amount"} if table == "transactions" and "unit_price" in provided else set())
    return [c for c in REQUIRED_COLUMNS[table] if c not in given and c not in DERIVED_WHEN_UNMAPPED.get(table, ())]
# Columns that carry a time, checked against the ingestion clock ("future timestamps").
TIME_COLUMNS: dict[str, str] = {"customers": "signup_at", "transactions": "timestamp", "events": "timestamp"}
# What makes two rows the same record: a repeat of one of these is a duplicate.
KEY_COLUMNS: dict[str, tuple[str, ...] | None] = {
    "customers": ("customer_id",),
    "transactions": None,  # a repeated order line is a duplicate only when every column repeats
    "events": None,
}
ID_COLUMNS: dict[str, tuple[str, ...]] = {
    "customers": ("customer_id",),
    "transactions": ("customer_id", "order_id"),
    "events": ("customer_id", "session_id"),
}


def _id(name: str) -> pa.Column:
    return pa.Column(str, pa.Check.str_length(min_value=1), nullable=False, title=name)


def _not_in_future(now: pd.Timestamp | None) -> list[pa.Check]:
    if now is None:
        return []
    return [pa.Check(lambda s: s <= now, name="future_timestamp")]


def customers_schema(now: pd.Timestamp | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "customer_id": _id("customer_id"),
            "signup_at": pa.Column("datetime64[ns]", _not_in_future(now), nullable=False),
            "consent": pa.Column(bool, nullable=False),
        },
        unique=["customer_id"],
        strict=False,  # optional attributes (country, age band, ...) pass through
        name="customers",
    )


def transactions_schema(now: pd.Timestamp | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "customer_id": _id("customer_id"),
            "order_id": _id("order_id"),
            "timestamp": pa.Column("datetime64[ns]", _not_in_future(now), nullable=False),
            "amount": pa.Column(float, pa.Check(lambda s: pd.Series(s).abs() < 1e9, name="implausible_amount")),
            "quantity": pa.Column("int64", pa.Check(lambda s: s != 0, name="zero_quantity")),
            "is_return": pa.Column(bool),
            "category": pa.Column(str, nullable=True, required=False),
            "item": pa.Column(str, nullable=True, required=False),
        },
        checks=[
            # purchases have quantity > 0 and amount >= 0, returns quantity < 0 and amount <= 0
            pa.Check(lambda df: df["is_return"] | (df["quantity"] >= 0), name="negative_quantity_not_return"),
            pa.Check(lambda df: df["is_return"] | (df["amount"] >= 0), name="negative_amount_not_return"),
            pa.Check(lambda df: ~df["is_return"] | (df["quantity"] <= 0), name="positive_quantity_on_return"),
            pa.Check(lambda df: ~df["is_return"] | (df["amount"] <= 0), name="positive_amount_on_return"),
        ],
        strict=False,
        name="transactions",
    )


def events_schema(now: pd.Timestamp | None = None) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "customer_id": _id("customer_id"),
            "session_id": _id("session_id"),
            "timestamp": pa.Column("datetime64[ns]", _not_in_future(now), nullable=False),
            "event_type": pa.Column(str, pa.Check(lambda s: s.isin(EVENT_TYPES), name="unknown_event_type")),
            "item": pa.Column(str, nullable=True, required=False),
            "category": pa.Column(str, nullable=True, required=False),
            "duration_s": pa.Column(float, pa.Check(lambda s: s >= 0, name="negative_duration"), nullable=True,
                                    required=False),
        },
        strict=False,
        name="events",
    )


RAW_SCHEMAS = {"customers": customers_schema, "transactions": transactions_schema, "events": events_schema}


# --- labeled tables --------------------------------------------------------------------------------------------
_YES_NO = ["Yes", "No"]
_TELCO_SERVICE = ["Yes", "No", "No internet service"]

TELCO_SCHEMA = pa.DataFrameSchema(
    {
        "customerID": _id("customerID"),
        "gender": pa.Column(str, pa.Check.isin(["Female", "Male"])),
        "SeniorCitizen": pa.Column("int64", pa.Check.isin([0, 1])),
        "Partner": pa.Column(str, pa.Check.isin(_YES_NO)),
        "Dependents": pa.Column(str, pa.Check.isin(_YES_NO)),
        "tenure": pa.Column("int64", pa.Check.in_range(0, 1200)),
        "PhoneService": pa.Column(str, pa.Check.isin(_YES_NO)),
        "MultipleLines": pa.Column(str, pa.Check.isin(["Yes", "No", "No phone service"])),
        "InternetService": pa.Column(str, pa.Check.isin(["DSL", "Fiber optic", "No"])),
        **{c: pa.Column(str, pa.Check.isin(_TELCO_SERVICE)) for c in (
            "OnlineSecurity", "OnlineBackup", "DeviceProtection", "TechSupport", "StreamingTV", "StreamingMovies")},
        "Contract": pa.Column(str, pa.Check.isin(["Month-to-month", "One year", "Two year"])),
        "PaperlessBilling": pa.Column(str, pa.Check.isin(_YES_NO)),
        "PaymentMethod": pa.Column(str),
        "MonthlyCharges": pa.Column(float, pa.Check.ge(0)),
        # 11 customers with tenure 0 have a blank TotalCharges in the source: missing, not broken.
        "TotalCharges": pa.Column(float, pa.Check.ge(0), nullable=True),
        "Churn": pa.Column(str, pa.Check.isin(_YES_NO)),
    },
    unique=["customerID"],
    strict=True,
    name="telco_churn",
)

SHOPPERS_SCHEMA = pa.DataFrameSchema(
    {
        **{c: pa.Column("int64", pa.Check.ge(0)) for c in ("Administrative", "Informational", "ProductRelated")},
        **{c: pa.Column(float, pa.Check.ge(0)) for c in (
            "Administrative_Duration", "Informational_Duration", "ProductRelated_Duration", "PageValues")},
        **{c: pa.Column(float, pa.Check.in_range(0, 1)) for c in ("BounceRates", "ExitRates", "SpecialDay")},
        "Month": pa.Column(str, pa.Check.isin(
            ["Jan", "Feb", "Mar", "Apr", "May", "June", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"])),
        **{c: pa.Column("int64", pa.Check.ge(1)) for c in ("OperatingSystems", "Browser", "Region", "TrafficType")},
        "VisitorType": pa.Column(str, pa.Check.isin(["Returning_Visitor", "New_Visitor", "Other"])),
        "Weekend": pa.Column(bool),
        "Revenue": pa.Column(bool),
    },
    strict=True,
    name="online_shoppers",
)
