"""Validate a raw table against its contract and split it into valid rows and quarantined rows.

The core is :func:`validate_table`: a frame whose columns already carry the contract names (values still as read:
strings from CSV, typed from Parquet) goes in; typed valid rows and quarantined rows come out. A row is quarantined
for the first of these that applies, and every reason that applies is kept in ``detail``:

1. parsing: a missing id, a timestamp or number that does not parse, a non-integer quantity;
2. duplicates: a repeat of an earlier row (same key for customers, every contract column otherwise); the first
   occurrence stays valid;
3. the pandera contract (:mod:`features.contracts`), checked lazily so that every failing row is found at once:
   negative quantity or amount that is not a return, future timestamps, unknown event types, ...

``valid + quarantined == input`` always holds; :class:`ValidationResult` checks it against the input's row count
on construction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

from features.contracts import (DERIVED_WHEN_UNMAPPED, KEY_COLUMNS, OPTIONAL_COLUMNS, RAW_SCHEMAS, REQUIRED_COLUMNS,
                                TIME_COLUMNS, missing_required)
from personalize.errors import ContractError

SOURCE_ROW = "_source_row"
REASON = "_reason"
DETAIL = "_detail"
SOURCE_FILE = "_source_file"
RAW_LINE = "_raw_line"  # the text of a line that could not be split into the file's columns
NUMBER_COLUMNS = frozenset({"quantity", "unit_price", "amount", "duration_s"})  # source text read by parse_number
CUSTOMER = "_customer_id"  # the row's customer id as parsed (whatever the source column is called): for erasure
BOOKKEEPING = (SOURCE_FILE, SOURCE_ROW, RAW_LINE, REASON, DETAIL, CUSTOMER)
TRUE_TEXT = {"true", "t", "yes", "y", "1", "1.0"}
FALSE_TEXT = {"false", "f", "no", "n", "0", "0.0", ""}


@dataclass(frozen=True)
class ParseOptions:
    """How to read the values of a mapped table (set by the column-mapping config)."""

    timestamp_format: str | None = None  # strftime format; None accepts ISO 8601 only (never guesses day/month)
    return_prefix: str | None = None  # order ids that start with it are returns (Online Retail: "C")
    # "17850.0" -> "17850" (ids written as floats by a spreadsheet or pandas export): True strips every such id,
    # False none, None (the default) strips a column's ids when every one of them is written so
    strip_float_ids: bool | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # contract column -> value when the column is absent
    # numbers written 29,85 / 1.621,37: True, 29.85: False, None decides per column (see parse_number)
    decimal_comma: bool | None = False
    thousands_comma: bool = False  # beside a decimal dot, 1,234.50 is 1234.5 (see parse_number)


@dataclass(frozen=True)
class ValidationResult:
    table: str
    valid: pd.DataFrame
    quarantined: pd.DataFrame  # the rows as read, with SOURCE_ROW, REASON and DETAIL (and SOURCE_FILE)
    rows_in: int

    def __post_init__(self) -> None:
        if self.rows_in != len(self.valid) + len(self.quarantined):
            raise AssertionError(f"{self.table}: {self.rows_in} rows in, but {len(self.valid)} valid + "
                                 f"{len(self.quarantined)} quarantined")

    def with_unreadable(self, unreadable: pd.DataFrame) -> ValidationResult:
        """Add rows the reader could not split into columns (they were never in ``valid`` nor the input frame)."""
        if unreadable.empty:
            return self
        quarantined = pd.concat([self.quarantined, unreadable], ignore_index=True)
        return ValidationResult(self.table, self.valid, quarantined, self.rows_in + len(unreadable))

    @property
    def reasons(self) -> dict[str, int]:
        counts = self.quarantined[REASON].value_counts()
        return {str(k): int(v) for k, v in counts.items()}

    def summary(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "rows_in": self.rows_in,
            "valid": len(self.valid),
            "quarantined": len(self.quarantined),
            "reasons": self.reasons,
        }


class RowReasons:
    """Collects reasons per row (by index label), keeping their order."""

    def __init__(self, index: pd.Index) -> None:
        self.index = index
        self.by_row: dict[Any, list[str]] = {}

    def add(self, mask: pd.Series | np.ndarray, reason: str) -> None:
        for row in self.index[np.asarray(mask, dtype=bool)]:
            self.by_row.setdefault(row, []).append(reason)

    def add_rows(self, rows: pd.Index | list[Any], reason: str) -> None:
        for row in rows:
            reasons = self.by_row.setdefault(row, [])
            if reason not in reasons:
                reasons.append(reason)

    @property
    def rows(self) -> pd.Index:
        return pd.Index(list(self.by_row), dtype=self.index.dtype)

    def add_schema_failures(self, err: pa.errors.SchemaErrors) -> pd.DataFrame:
        """Record pandera's row-level failures; return the frame-level ones (a broken column, not a row)."""
        cases = err.failure_cases
        for (column, check), group in cases[cases["index"].notna()].groupby(["column", "check"], dropna=False):
            self.add_rows(pd.Index(group["index"].unique()), reason_for_check(column, check))
        return cases[cases["index"].isna()]

    def quarantine(self, source: pd.DataFrame, source_file: str | None = None,
                   customers: pd.Series | None = None) -> pd.DataFrame:
        """The rejected rows as read (as text, nulls kept), with their file, row, first reason and every reason,
        and, when ``customers`` (the parsed ids, by row) is given, the row's customer id."""
        clash = [c for c in BOOKKEEPING if c in source.columns]
        if clash:
            raise ContractError(f"the input has a column named {clash[0]!r}, which quarantine uses; rename it")
        bad = self.rows
        out = source.loc[bad].astype("string")
        out.insert(0, SOURCE_ROW, bad.to_numpy())
        out.insert(0, SOURCE_FILE, source_file)
        out[REASON] = [self.by_row[r][0] for r in bad]
        out[DETAIL] = ["; ".join(self.by_row[r]) for r in bad]
        if customers is not None:
            out[CUSTOMER] = customers.loc[bad].astype("string").to_numpy()
        return out.reset_index(drop=True)


def is_blank(s: pd.Series) -> pd.Series:
    if s.dtype == object or pd.api.types.is_string_dtype(s):
        return s.isna() | (s.astype(str).str.strip() == "")
    return s.isna()


def _parse_id(s: pd.Series, strip_float: bool | None) -> pd.Series:
    """Ids as trimmed text, blanks None. Whole numbers written as floats (``"17850.0"``) lose the ``.0`` when
    ``strip_float`` is True, or, when it is None, if every id of the column is written so (an id column exported
    through floats), so that the customer ``17850`` is ``"17850"`` wherever it is looked up."""
    if pd.api.types.is_float_dtype(s) and (s.dropna() % 1 == 0).all():
        s = s.astype("Int64")  # integer ids read as floats because of a null (Parquet, pandas): 1.0 means "1"
    out = s.astype(object).where(s.notna(), None)
    out = out.map(lambda v: None if v is None else (str(v).strip() or None))
    whole = out.map(lambda v: isinstance(v, str) and v.endswith(".0") and v[:-2].isdigit())
    if strip_float is None:
        strip_float = bool(whole[out.notna()].all()) and bool(whole.any())
    if strip_float:
        out = out.where(~whole, out.str[:-2])
    return out


def line_order_ids(customer_id: pd.Series, timestamp: pd.Series) -> pd.Series:
    """Order ids for transactions without them: each line its own order, ``<customer>-<timestamp as written>-<n>``
    with n counting the customer's lines at that timestamp in file order (CDNOW: ``00001-19970101-0``). Repeated
    lines stay separate purchases rather than duplicates, since nothing tells a repeat purchase from a repeated
    row."""
    keys = pd.DataFrame({"c": customer_id.astype(str), "t": timestamp.astype(str)}, index=customer_id.index)
    line = keys.groupby(["c", "t"], sort=False, dropna=False).cumcount().astype(str)
    return keys["c"] + "-" + keys["t"] + "-" + line


def normalize_ids(s: pd.Series) -> pd.Series:
    """Ids as text: whole floats as integers (``1.0`` -> ``"1"``), blanks None."""
    return _parse_id(s, strip_float=False)


def parse_timestamp(s: pd.Series, fmt: str | None) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(s):
        parsed = s
    else:
        text = s.astype(object).where(~is_blank(s), None)
        parsed = pd.to_datetime(text, errors="coerce", format=fmt if fmt else "ISO8601", utc=True)
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.astype("datetime64[ns]")


# A number written with a decimal comma, perhaps with thousands dots: 29,85  -3,5  1.621,37  12
COMMA_NUMBER = re.compile(r"[+-]?(\d{1,3}(\.\d{3})+|\d+)(,\d+)?")


def has_decimal_commas(text: pd.Series) -> bool:
    """Numbers written the continental way (``29,85``, ``1.621,37``): every value one, at least one with a comma."""
    return bool(text.str.contains(",", regex=False).any() and comma_numbers(text).all())


def comma_numbers(text: pd.Series) -> pd.Series:
    """Which values are numbers as a decimal comma writes them (``29,85``, ``1.621,37``, ``12``)."""
    return text.astype(str).str.fullmatch(COMMA_NUMBER)


def dot_decimals(text: pd.Series) -> pd.Series:
    """``1.621,37`` -> ``1621.37``."""
    return text.astype(str).str.replace(".", "", regex=False).str.replace(",", ".", regex=False)


# A number written with a decimal dot and thousands commas: 1,234.50  12,000  -3,500,000.25
THOUSANDS_COMMA_NUMBER = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")


def parse_number(s: pd.Series, decimal_comma: bool | None = False, thousands_comma: bool = False) -> pd.Series:
    """Numbers from text. ``decimal_comma``: True reads ``29,85`` and ``1.621,37`` (a value written otherwise, such as
    ``1.5``, is unparseable), False reads ``29.85``, None decides per column: a decimal comma when some value is
    plainly written with one (not three digits after it: ``1,000`` may be a thousand) and none is a number only the
    dot way reads (``1.5``, ``1e3``). ``thousands_comma`` (with a decimal dot) also reads ``1,234.50`` and ``12,000``;
    a comma elsewhere (``1,23``) stays unparseable."""
    if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
        return s.astype(float)
    text = s.astype(object).where(~is_blank(s), None)
    if thousands_comma and not decimal_comma:
        grouped = text.dropna().astype(str).str.strip()
        grouped = grouped[grouped.str.fullmatch(THOUSANDS_COMMA_NUMBER)]
        text = text.where(~text.index.isin(grouped.index), grouped.str.replace(",", "", regex=False))
        return pd.to_numeric(text, errors="coerce").astype(float)
    if decimal_comma is not False:
        present = text.dropna().astype(str).str.strip()
        written = comma_numbers(present)
        if decimal_comma is None:
            dot_only = pd.to_numeric(present[~written], errors="coerce").notna()
            plainly = present[written].str.contains(r",(?:\d{1,2}|\d{4,})$")
            decimal_comma = bool(plainly.any() and not dot_only.any())
        if decimal_comma:
            text = dot_decimals(present[written]).reindex(text.index)
    return pd.to_numeric(text, errors="coerce").astype(float)


def _parse_bool(s: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Returns (values, unparseable mask). Blank counts as False (e.g. no recorded consent = no consent)."""
    if pd.api.types.is_bool_dtype(s):
        return s.astype(bool), pd.Series(False, index=s.index)
    text = s.astype(object).map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    text = text.str.strip().str.lower()
    bad = ~text.isin(TRUE_TEXT | FALSE_TEXT)
    return text.isin(TRUE_TEXT), bad


def reason_for_check(column: Any, check: Any) -> str:
    check = str(check)
    column = None if column is None or (isinstance(column, float) and math.isnan(column)) else str(column)
    if check == "not_nullable":
        return f"missing_{column}"
    if check.startswith(("negative_", "positive_", "future_", "unknown_", "implausible_", "zero_")):
        return check.split("(")[0]
    if column and column != "None":
        return f"invalid_{column}"
    return f"invalid_{check.split('(')[0]}"


def validate_table(
    frame: pd.DataFrame,
    table: str,
    now: pd.Timestamp | None = None,
    options: ParseOptions | None = None,
    source: pd.DataFrame | None = None,
    known_customers: pd.Series | None = None,
    source_file: str | None = None,
) -> ValidationResult:
    """Split ``frame`` (contract column names, index = source row number) into valid and quarantined rows.

    ``source`` holds the rows as read, to be kept verbatim in quarantine; by default ``frame`` itself.
    ``now`` is the ingestion clock: a timestamp after it is a future timestamp. ``known_customers``, when
    given, are the valid customer ids: a transaction or event of anyone else is an ``unknown_customer``.
    """
    if table not in RAW_SCHEMAS:
        raise ContractError(f"unknown table {table!r}; expected one of {sorted(RAW_SCHEMAS)}")
    if not frame.index.is_unique:
        raise ContractError(f"{table}: the row index must be unique (it names each row in quarantine)")
    options = options or ParseOptions()
    provided = set(frame.columns) | set(options.defaults)
    derived = [c for c in DERIVED_WHEN_UNMAPPED.get(table, ()) if c not in provided]
    missing = missing_required(table, provided)
    if missing:
        raise ContractError(f"{table}: required column(s) {missing} are not mapped")
    source = frame if source is None else source
    reasons = RowReasons(frame.index)
    out = pd.DataFrame(index=frame.index)

    def col(name: str) -> pd.Series:
        if name in frame.columns:
            return frame[name]
        return pd.Series([options.defaults.get(name)] * len(frame), index=frame.index, dtype=object)

    # 1. parse
    time_col = TIME_COLUMNS[table]
    for name in ("customer_id", "order_id", "session_id"):
        if name in derived:
            out[name] = line_order_ids(out["customer_id"], col(time_col))
        elif name in REQUIRED_COLUMNS[table]:
            out[name] = _parse_id(col(name), options.strip_float_ids)
            reasons.add(out[name].isna(), f"missing_{name}")
    raw_time = col(time_col)
    out[time_col] = parse_timestamp(raw_time, options.timestamp_format)
    reasons.add(is_blank(raw_time), f"missing_{time_col}")
    reasons.add(~is_blank(raw_time) & out[time_col].isna(), f"unparseable_{time_col}")

    if table == "transactions":
        qty = parse_number(col("quantity"), options.decimal_comma, options.thousands_comma)
        reasons.add(is_blank(col("quantity")), "missing_quantity")
        reasons.add(~is_blank(col("quantity")) & qty.isna(), "unparseable_quantity")
        reasons.add(qty.notna() & ~np.isfinite(qty.fillna(0)), "non_finite_quantity")
        reasons.add(np.isfinite(qty.fillna(0)) & (qty.fillna(0) % 1 != 0), "non_integer_quantity")
        if "amount" in frame.columns or "amount" in options.defaults:
            amount_raw = col("amount")
        else:  # amount = quantity x unit price
            amount_raw = col("unit_price")
        amount = parse_number(amount_raw, options.decimal_comma, options.thousands_comma)
        reasons.add(is_blank(amount_raw), "missing_amount")
        reasons.add(~is_blank(amount_raw) & amount.isna(), "unparseable_amount")
        reasons.add(amount.notna() & ~np.isfinite(amount.fillna(0)), "non_finite_amount")
        if "amount" not in frame.columns and "amount" not in options.defaults:
            amount = amount * qty
        out["amount"] = amount.astype(float)
        out["quantity"] = qty.where(np.isfinite(qty.fillna(0)), 0).fillna(0).round().astype("int64")
        if "is_return" in provided:
            is_return, bad = _parse_bool(col("is_return"))
            reasons.add(bad, "unparseable_is_return")
        elif options.return_prefix:
            is_return = out["order_id"].fillna("").str.startswith(options.return_prefix)
        else:
            is_return = pd.Series(False, index=frame.index)
        out["is_return"] = is_return.astype(bool)
    elif table == "customers":
        consent, bad = _parse_bool(col("consent"))
        reasons.add(bad, "unparseable_consent")
        out["consent"] = consent.astype(bool)
    elif table == "events":
        out["event_type"] = col("event_type").astype(object).map(
            lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip().lower())
        reasons.add(out["event_type"].isna(), "missing_event_type")
        if "duration_s" in provided:
            duration = parse_number(col("duration_s"), options.decimal_comma, options.thousands_comma)
            reasons.add(~is_blank(col("duration_s")) & duration.isna(), "unparseable_duration_s")
            out["duration_s"] = duration
    for name in OPTIONAL_COLUMNS[table]:
        if name in ("item", "category") and name in provided:
            out[name] = _parse_id(col(name), strip_float=False)
    # Attributes beyond the contract (customers' country, age band, ...) pass through as read.
    if table == "customers":
        for name in frame.columns:
            if name not in out.columns and name not in REQUIRED_COLUMNS[table] + OPTIONAL_COLUMNS[table]:
                out[name] = frame[name]

    if known_customers is not None and table != "customers":
        known = out["customer_id"].isin(known_customers)
        reasons.add(out["customer_id"].notna() & ~known, "unknown_customer")

    # 2. duplicates among the rows that parsed
    parsed = out.drop(index=reasons.rows)
    key = KEY_COLUMNS[table] or [c for c in parsed.columns]
    dup = parsed.duplicated(subset=list(key), keep="first")
    reasons.add_rows(parsed.index[dup.to_numpy()], "duplicate")

    # 3. the contract
    candidates = out.drop(index=reasons.rows)
    schema = RAW_SCHEMAS[table](now)
    try:
        schema.validate(candidates, lazy=True)
    except pa.errors.SchemaErrors as err:
        frame_level = reasons.add_schema_failures(err)
        if len(frame_level):  # a wrong dtype or a missing column: the table, not a row, is broken
            first = frame_level.iloc[0]
            raise ContractError(
                f"{table}: column {first['column']!r} breaks the contract ({first['check']}: {first['failure_case']})"
            ) from None

    quarantined = reasons.quarantine(source, source_file, out["customer_id"])
    return ValidationResult(table, out.drop(index=reasons.rows), quarantined, len(frame))
