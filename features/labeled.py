"""Labeled customer tables: one row per customer (or session) with a label column, trained on directly.

Any CSV or Parquet table loads by configuration alone (:class:`LabeledTableSpec`): an id column (optional), the
label column and its positive value, an optional time column. Column types are inferred from the values (a column
whose every non-blank value is a number is numeric, ``TRUE``/``FALSE`` columns are boolean, the rest categorical)
and reported. Known tables (Telco churn, Online Shoppers) are also checked against their pandera contract.

Columns that cannot be features are set aside with their reason (:func:`unusable`, ``LabeledTable.ignored``) and
stay in the stored table: entirely missing, one value on every row, a date or time other than the time column, text
with a distinct value on nearly every row (an identifier, an e-mail, free text), a row number or index, a column
without a name. Columns named in ``drop_columns`` (a leak, say) are removed before anything else; the id, label and
time columns cannot be.

Rows with a missing id or label, a duplicate id, an unparseable time, or a contract failure are quarantined with
their reason, exactly as for the raw tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import re

import pandas as pd
import pandera.pandas as pa
from pydantic import BaseModel, ConfigDict, field_validator

from features.ingest import RowReasons, ValidationResult, has_decimal_commas, dot_decimals, is_blank, parse_timestamp
from features.loaders import CsvOptions, column_hint, file_format, read_source
from personalize.errors import DataFileError

LABEL = "label"  # the normalised 0/1 target column added to every labeled table
BOOL_TEXT = {"true": True, "false": False}
# Dates that look like dates: ISO (2024-05-31, 2024/05/31, 2024.05.31; 2024.1.15 may be a version), day-first or
# month-first (31/05/2024, 5-31-24, 31.05.2024; not 10.2.21), with the month in words (31-May-2024, 31 May 2024,
# May 31, 2024), each optionally followed by a time of day. Every value must also parse as a date (not 99/99/9999).
_DATE_TEXT = re.compile(r"(\d{4}[-/]\d{1,2}[-/]\d{1,2}|\d{4}\.\d{2}\.\d{2}|\d{1,2}[-/]\d{1,2}[-/]\d{2,4}"
                        r"|\d{1,2}\.\d{1,2}\.\d{4}|\d{1,2}[- ][A-Za-z]{3,9}[- ,]+\d{2,4}|[A-Za-z]{3,9} \d{1,2},? \d{4})"
                        r"([ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?( ?[AaPp][Mm])?(Z|[+-]\d{2}:?\d{2})?)?")
DISTINCT_SHARE = 0.95  # text with a distinct value on at least this share of its rows is not a category
_DATE_REASON = "a date or time; to split out of time by it, make it the time column"
MIN_DISTINCT = 50  # ... once it has more than this many values (a small table's categories may all differ)


class LabeledTableSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    label_column: str
    positive: str  # the label value that means 1 (compared as text, case-insensitive)
    id_column: str | None = None
    time_column: str | None = None
    timestamp_format: str | None = None  # strftime format of the time column; None accepts ISO 8601 only
    format: Literal["csv", "parquet"] | None = None
    csv: CsvOptions = CsvOptions()
    drop_columns: tuple[str, ...] = ()  # columns that must not become features (leaks, free text)

    @field_validator("csv")
    @classmethod
    def _no_thousands(cls, value: CsvOptions) -> CsvOptions:
        if value.thousands:  # infer_types reads a decimal comma, not thousands commas: refused, not ignored
            raise ValueError("thousands is read for mapped tables (tables:), not for a labeled table")
        return value

    @property
    def file_format(self) -> str:
        return self.format or file_format(self.path)


@dataclass(frozen=True)
class LabeledTable:
    spec: LabeledTableSpec
    result: ValidationResult
    numeric: list[str]
    categorical: list[str]
    boolean: list[str]
    ignored: dict[str, str]  # column -> why it is not a feature (see :func:`unusable`)
    label_values: list[str] = field(default_factory=list)  # the label's two values, as comparable_labels writes them

    @property
    def frame(self) -> pd.DataFrame:
        return self.result.valid

    @property
    def label_rate(self) -> float:
        return float(self.frame[LABEL].mean()) if len(self.frame) else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            **self.result.summary(),
            "label": self.spec.label_column,
            "positive": self.spec.positive,
            "label_values": self.label_values,
            "label_rate": self.label_rate,
            "numeric": self.numeric,
            "categorical": self.categorical,
            "boolean": self.boolean,
            "ignored": self.ignored,
        }


def infer_types(frame: pd.DataFrame, skip: set[str],
                decimal_comma: bool = False) -> tuple[pd.DataFrame, list[str], list[str], list[str]]:
    """Type each text column by its values: numeric, boolean or categorical. Blank means missing. With
    ``decimal_comma`` (a CSV separated by something other than ','), a column of numbers written ``29,85`` or
    ``1.621,37`` (at least one with a comma) is numeric."""
    out = frame.copy()
    numeric, categorical, boolean = [], [], []
    for name in frame.columns:
        if name in skip:
            continue
        s = frame[name]
        if isinstance(s.dtype, pd.CategoricalDtype):  # a Parquet file's pandas categories: read as their values
            s = s.astype(object).where(s.notna(), None)
            out[name] = s
        if not (s.dtype == object or pd.api.types.is_string_dtype(s)):
            if pd.api.types.is_bool_dtype(s):
                boolean.append(name)
            elif pd.api.types.is_numeric_dtype(s):
                numeric.append(name)
            else:
                categorical.append(name)
            continue
        blank = is_blank(s)
        present = s[~blank].astype(str).str.strip()
        lowered = present.str.lower()
        if len(present) and lowered.isin(BOOL_TEXT).all():
            out[name] = s.astype(str).str.strip().str.lower().map(BOOL_TEXT).astype("boolean")
            if not blank.any():
                out[name] = out[name].astype(bool)
            boolean.append(name)
            continue
        if decimal_comma and has_decimal_commas(present):
            present, s = dot_decimals(present), dot_decimals(s)
        as_number = pd.to_numeric(present, errors="coerce")
        if len(present) and as_number.notna().all():
            values = pd.to_numeric(s.where(~blank, None), errors="coerce")
            integral = (values.dropna() % 1 == 0).all() and not blank.any()
            out[name] = values.astype("int64") if integral else values.astype(float)
            numeric.append(name)
        else:
            out[name] = s.where(~blank, None)
            categorical.append(name)
    return out, numeric, categorical, boolean


def unusable(raw: pd.Series, kind: str) -> str | None:
    """Why a column of a labeled table cannot be a feature, or None. ``raw`` is the column as read (text for a
    CSV), ``kind`` what :func:`infer_types` made of it."""
    blank = is_blank(raw)
    present = raw[~blank]
    if present.empty:
        return "entirely missing"
    if pd.api.types.is_datetime64_any_dtype(raw):
        return _DATE_REASON
    if pd.api.types.is_timedelta64_dtype(raw):
        return "a duration (timedelta), which no request can send: store it as a number (days, say) to use it"
    text = present.astype(str).str.strip()
    distinct = text.nunique()
    if distinct == 1 and not blank.any():
        return "one value on every row"
    if str(raw.name).startswith("Unnamed: ") or not str(raw.name).strip():
        return "a column without a name (an index written with the file)"
    if kind == "categorical":
        if text.str.fullmatch(_DATE_TEXT).all() and _all_dates(text.drop_duplicates()):
            return _DATE_REASON
        if distinct > MIN_DISTINCT and distinct >= DISTINCT_SHARE * len(text):
            return f"text with a distinct value on {distinct / len(text):.0%} of its rows: an identifier or free text"
    if kind == "numeric" and not blank.any() and len(present) > MIN_DISTINCT:
        values = pd.to_numeric(present, errors="coerce")
        if values.notna().all() and (values % 1 == 0).all() and (values.diff().iloc[1:] > 0).all():
            return "a row number or index (whole numbers, each larger than the one before)"
    return None


def _all_dates(values: pd.Series) -> bool:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas warns when it infers a format per value
        return bool(pd.to_datetime(values, errors="coerce", format="mixed").notna().all())


def comparable_labels(values: pd.Series, positive: str) -> tuple[pd.Series, str, pd.Series]:
    """A label column as comparable text (stripped, lower case; when every value is a number, as that number, so
    1, 1.0 and 1e0 are one class: a float column, a null in ints), the positive value written the same way, and
    which values are blank."""
    text = values.astype(str).str.strip().str.lower()
    blank = is_blank(values)
    positive = positive.strip().lower()
    as_number = pd.to_numeric(text[~blank], errors="coerce")
    if len(as_number) and as_number.notna().all():
        text = text.where(blank, as_number.map("{:.17g}".format))
        positive = f"{float(positive):.17g}" if pd.notna(pd.to_numeric(positive, errors="coerce")) else positive
    return text, positive, blank


def load_labeled(spec: LabeledTableSpec, schema: pa.DataFrameSchema | None = None) -> LabeledTable:
    raw, unreadable = read_source(spec.path, spec.file_format, spec.csv)
    for column in [spec.label_column, spec.id_column, spec.time_column, *spec.drop_columns]:
        if column and column not in raw.columns:
            hint = column_hint(spec.path, spec.file_format, spec.csv, raw.columns)
            raise DataFileError(spec.path, f"configured column is missing; the file has {list(raw.columns)}{hint}",
                                column=column)
    kept = {spec.label_column: "the label", spec.id_column: "the id", spec.time_column: "the time column"}
    for column in spec.drop_columns:
        if column in kept:
            raise DataFileError(spec.path, f"cannot drop {kept[column]} column", column=column)
    if LABEL in raw.columns and spec.label_column != LABEL and LABEL not in spec.drop_columns:
        raise DataFileError(spec.path, f"a column named {LABEL!r} would be overwritten by the 0/1 target; rename or "
                                       "drop it", column=LABEL)
    frame = raw.drop(columns=list(spec.drop_columns))
    reasons = RowReasons(frame.index)

    label_text, positive, label_blank = comparable_labels(frame[spec.label_column], spec.positive)
    reasons.add(label_blank, "missing_label")
    classes = sorted(set(label_text[~label_blank]))
    if positive not in classes:
        raise DataFileError(spec.path, f"positive value {spec.positive!r} never occurs; values are {classes[:10]}",
                            column=spec.label_column)
    if len(classes) > 2:
        raise DataFileError(spec.path, f"a binary label needs two values, found {len(classes)}: {classes[:10]}",
                            column=spec.label_column)
    skip: set[str] = set()
    if spec.id_column:
        if spec.id_column == spec.label_column:
            raise DataFileError(spec.path, "the id column cannot be the label column", column=spec.id_column)
        ids = frame[spec.id_column].astype(str).str.strip()
        named = ~is_blank(frame[spec.id_column])
        if not named.any():
            raise DataFileError(spec.path, "the id column is entirely missing", column=spec.id_column)
        repeated = named & ids.duplicated(keep="first")
        same = frame.astype(str).duplicated(keep="first")  # the whole row again: an exported duplicate
        other = repeated & ~same
        if other.sum() >= 0.5 * (named & ~same).sum():  # an id names one row: this names groups (a plan, a label)
            raise DataFileError(spec.path, f"not an id: {int(other.sum()):,} of {int((named & ~same).sum()):,} "
                                           "distinct rows repeat an earlier row's value; give the column that names "
                                           "each customer, or no --id", column=spec.id_column)
        reasons.add(~named, "missing_id")
        reasons.add(repeated & same, "duplicate")
        reasons.add(other, "repeated_id")  # the same customer, other values: the first row is kept
        skip.add(spec.id_column)
    decimal_comma = spec.file_format == "csv" and spec.csv.decimal_comma is not False
    typed, numeric, categorical, boolean = infer_types(frame, skip | {spec.time_column} - {None}, decimal_comma)
    numeric, categorical, boolean = ([c for c in kind if c != spec.label_column]
                                     for kind in (numeric, categorical, boolean))
    kinds = {**dict.fromkeys(numeric, "numeric"), **dict.fromkeys(categorical, "categorical"),
             **dict.fromkeys(boolean, "boolean")}
    ignored = {c: why for c in frame.columns if c in kinds and (why := unusable(frame[c], kinds[c])) is not None}
    numeric, categorical, boolean = ([c for c in kind if c not in ignored] for kind in (numeric, categorical, boolean))
    if not (numeric or categorical or boolean):
        reasons_text = "; ".join(f"{c}: {why}" for c, why in ignored.items()) or "the file has no other columns"
        raise DataFileError(spec.path, f"no column can be a feature besides the id, label and time ({reasons_text})")
    if spec.time_column:
        typed[spec.time_column] = parse_timestamp(frame[spec.time_column], spec.timestamp_format)
        reasons.add(typed[spec.time_column].isna(), "unparseable_time")
    if schema is not None:
        candidates = typed.drop(index=reasons.rows)
        try:
            schema.validate(candidates, lazy=True)
        except pa.errors.SchemaErrors as err:
            frame_level = reasons.add_schema_failures(err)
            if len(frame_level):
                first = frame_level.iloc[0]
                raise DataFileError(spec.path, f"breaks the contract ({first['check']}: {first['failure_case']})",
                                    column=str(first["column"])) from None
    typed[LABEL] = (label_text == positive).astype("int64")
    result = ValidationResult("labeled", typed.drop(index=reasons.rows), reasons.quarantine(raw, str(spec.path)),
                              len(raw)).with_unreadable(unreadable)
    return LabeledTable(spec, result, numeric, categorical, boolean, ignored, classes)
