"""Adapters for the real public data sets in ``../shared/data`` (see each folder's SOURCE.md).

- ``online_retail``: UCI Online Retail invoice lines -> transactions. Cancellations (InvoiceNo starting with "C")
  are returns; lines without CustomerID are quarantined; the category is derived from the product description
  by keyword (the data set has none; see :data:`RETAIL_CATEGORIES`).
- ``cdnow``: CDNOW master file -> transactions; no order ids, so one order per line (customer, day, n).
- ``telco_churn`` and ``online_shoppers``: labeled tables (label ``Churn`` = Yes, ``Revenue`` = TRUE).

Transaction-only data sets have no customers table: :func:`derive_customers` makes one from the valid
transactions (signup at the first purchase, consent assumed as the data sets are public research data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from features.contracts import SHOPPERS_SCHEMA, TELCO_SCHEMA
from features.ingest import ValidationResult, validate_table
from features.labeled import LabeledTable, LabeledTableSpec, load_labeled
from features.loaders import CsvOptions, TableMapping, map_columns, read_source

DEFAULT_DATA_ROOT = Path("../shared/data")

# Keyword rules, first match wins, over the upper-cased description. Non-product codes (postage, fees, manual
# adjustments) are "service". Anything else is "other".
RETAIL_SERVICE_CODES = {"POST", "DOT", "M", "C2", "BANK CHARGES", "AMAZONFEE", "CRUK", "D", "S", "PADS", "B", "m"}
RETAIL_CATEGORIES: dict[str, tuple[str, ...]] = {
    "christmas": ("CHRISTMAS", "XMAS", "ADVENT", "SANTA", "REINDEER", "SNOWFLAKE"),
    "bags": ("BAG", "SHOPPER", "TOTE"),
    "lights": ("CANDLE", "T-LIGHT", "LANTERN", "LIGHT", "LAMP", "NIGHT"),
    "kitchen": ("MUG", "CUP", "PLATE", "BOWL", "TEA", "CAKE", "BAKING", "JAR", "LUNCH", "CUTLERY", "NAPKIN",
                "TRAY", "KITCHEN", "SPOON", "BOTTLE", "PANTRY", "JUG", "GLASS"),
    "stationery": ("CARD", "WRAP", "PAPER", "NOTEBOOK", "PENCIL", "PEN ", "STICKER", "TAPE", "RIBBON", "CALENDAR"),
    "toys": ("TOY", "GAME", "DOLL", "PLAYHOUSE", "CHILDREN", "KIDS", "SPACEBOY", "JIGSAW", "PARTY", "BALLOON"),
    "garden": ("GARDEN", "PLANT", "FLOWER", "BIRD", "WATERING"),
    "fashion": ("JEWEL", "NECKLACE", "BRACELET", "EARRING", "HAIR", "PURSE", "UMBRELLA", "SCARF", "HAT ", "RING"),
    "decor": ("HEART", "FRAME", "SIGN", "CLOCK", "MIRROR", "CUSHION", "DOORMAT", "HOOK", "WREATH", "GARLAND",
              "BUNTING", "DECORATION", "HANGING", "ORNAMENT", "BOX", "TIN", "DRAWER", "CABINET"),
}


def retail_category(description: pd.Series, stock_code: pd.Series) -> pd.Series:
    text = description.fillna("").astype(str).str.upper()
    out = pd.Series("other", index=description.index, dtype=object)
    decided = np.zeros(len(text), dtype=bool)
    for category, words in RETAIL_CATEGORIES.items():
        pattern = "|".join(w.replace("(", r"\(") for w in words)
        hit = text.str.contains(pattern, regex=True).to_numpy() & ~decided
        out[hit] = category
        decided |= hit
    out[stock_code.astype(str).str.strip().isin(RETAIL_SERVICE_CODES).to_numpy()] = "service"
    return out


@dataclass(frozen=True)
class TransactionSource:
    """A transaction file plus the preparation it needs before the generic mapping applies."""

    mapping: TableMapping
    prepare: Callable[[pd.DataFrame], pd.DataFrame] = lambda raw: raw
    attributes: dict[str, str] | None = None  # customer attribute -> source column (taken from the latest row)


def _prepare_retail(raw: pd.DataFrame) -> pd.DataFrame:
    raw = raw.copy()
    raw["_category"] = retail_category(raw["Description"], raw["StockCode"])
    return raw


def transaction_sources(root: Path = DEFAULT_DATA_ROOT) -> dict[str, TransactionSource]:
    return {
        "online_retail": TransactionSource(
            TableMapping(
                table="transactions",
                path=root / "online_retail_uci" / "online-retail-dataset.csv.gz",
                columns={"customer_id": "CustomerID", "order_id": "InvoiceNo", "timestamp": "InvoiceDate",
                         "quantity": "Quantity", "unit_price": "UnitPrice", "item": "StockCode",
                         "category": "_category"},
                timestamp_format="%Y-%m-%d %H:%M:%S",
                return_prefix="C",
                strip_float_ids=True,
            ),
            prepare=_prepare_retail,
            attributes={"country": "Country"},
        ),
        "cdnow": TransactionSource(
            TableMapping(
                table="transactions",
                path=root / "cdnow" / "CDNOW_master.txt",
                csv=CsvOptions(sep=r"\s+"),
                columns={"customer_id": "customer_id", "timestamp": "date", "quantity": "number_of_cds",
                         "amount": "dollar_value"},  # no order ids: one per line (features.ingest.line_order_ids)
                timestamp_format="%Y%m%d",
            ),
        ),
    }


def labeled_sources(root: Path = DEFAULT_DATA_ROOT) -> dict[str, tuple[LabeledTableSpec, object]]:
    return {
        "telco_churn": (
            LabeledTableSpec(path=root / "telco_churn" / "WA_Fn-UseC_-Telco-Customer-Churn.csv",
                             id_column="customerID", label_column="Churn", positive="Yes"),
            TELCO_SCHEMA,
        ),
        "online_shoppers": (
            LabeledTableSpec(path=root / "online_shoppers_intention" / "online_shoppers_intention.csv",
                             label_column="Revenue", positive="TRUE"),
            SHOPPERS_SCHEMA,
        ),
    }


def load_transactions(source: TransactionSource, now: pd.Timestamp | None) -> tuple[ValidationResult, pd.DataFrame]:
    """Validated transactions plus, per customer, the attributes named by the source (latest value)."""
    raw, unreadable = read_source(source.mapping.path, source.mapping.file_format, source.mapping.csv)
    raw = source.prepare(raw)
    result = validate_table(map_columns(raw, source.mapping), "transactions", now, source.mapping.parse_options,
                            source=raw.drop(columns=[c for c in raw.columns if c.startswith("_")]),
                            source_file=str(source.mapping.path)).with_unreadable(unreadable)
    attributes = pd.DataFrame(index=pd.Index([], name="customer_id"))
    if source.attributes:
        valid = result.valid
        cols = raw.loc[valid.index, list(source.attributes.values())].set_axis(list(source.attributes), axis=1)
        cols["customer_id"] = valid["customer_id"].to_numpy()
        cols["_ts"] = valid["timestamp"].to_numpy()
        attributes = cols.sort_values("_ts").groupby("customer_id").last().drop(columns="_ts")
    return result, attributes


def derive_customers(transactions: pd.DataFrame, attributes: pd.DataFrame | None = None,
                     consent: bool = True) -> pd.DataFrame:
    """A customers table for data that has none: signup at the first transaction."""
    first = transactions.groupby("customer_id", sort=True)["timestamp"].min()
    customers = pd.DataFrame({"customer_id": first.index.astype(str), "signup_at": first.to_numpy(),
                              "consent": consent})
    if attributes is not None and len(attributes):
        customers = customers.join(attributes, on="customer_id")
    customers.index = pd.RangeIndex(1, len(customers) + 1)
    return customers


def load_labeled_source(name: str, root: Path = DEFAULT_DATA_ROOT) -> LabeledTable:
    spec, schema = labeled_sources(root)[name]
    return load_labeled(spec, schema)
