"""Labeled customer tables: one row per customer (or session) with a label column, trained on directly.

Any CSV or Parquet table loads by configuration alone (:class:`LabeledTableSpec`): an id column (optional), the
label column and its positive value, an optional time column. Column types are inferred from the values (a column
whose every non-blank value is a number is numeric, ``TRUE``/``FALSE`` columns are boolean, the rest categorical)
and reported. Known tables (Telco churn, Online Shoppers) are also checked against their pandera contract.

Rows with a missing id or label, a duplicate id, an unparseable time, or a contract failure are quarantined with
their reason, exactly as for the raw tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pandera.pandas as pa
from pydantic import BaseModel, ConfigDict

from features.ingest import RowReasons, ValidationResult, is_blank, parse_timestamp
from features.loaders import CsvOptions, read_source
from personalize.errors import DataFileError

LABEL = "label"  # the normalised 0/1 target column added to every labeled table
_BOOL_TEXT = {"true": True, "false": False}


class LabeledTableSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    label_column: str
    positive: str  # the label value that means 1 (compared as text, case-insensitive)
    id_column: str | None = None
    time_column: str | None = None
    format: Literal["csv", "parquet"] | None = None
    csv: CsvOptions = CsvOptions()
    drop_columns: tuple[str, ...] = ()  # columns that must not become features (leaks, free text)

    @property
    def file_format(self) -> str:
        if self.format:
            return self.format
        return "parquet" if ".parquet" in [s.lower() for s in self.path.suffixes] else "csv"


@dataclass(frozen=True)
class LabeledTable:
    spec: LabeledTableSpec
    result: ValidationResult
    numeric: list[str]
    categorical: list[str]
    boolean: list[str]

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
            "label_rate": self.label_rate,
            "numeric": self.numeric,
            "categorical": self.categorical,
            "boolean": self.boolean,
        }


def infer_types(frame: pd.DataFrame, skip: set[str]) -> tuple[pd.DataFrame, list[str], list[str], list[str]]:
    """Type each text column by its values: numeric, boolean or categorical. Blank means missing."""
    out = frame.copy()
    numeric, categorical, boolean = [], [], []
    for name in frame.columns:
        if name in skip:
            continue
        s = frame[name]
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
        if len(present) and lowered.isin(_BOOL_TEXT).all():
            out[name] = s.astype(str).str.strip().str.lower().map(_BOOL_TEXT).astype("boolean")
            if not blank.any():
                out[name] = out[name].astype(bool)
            boolean.append(name)
            continue
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


def load_labeled(spec: LabeledTableSpec, schema: pa.DataFrameSchema | None = None) -> LabeledTable:
    raw, unreadable = read_source(spec.path, spec.file_format, spec.csv)
    for column in [spec.label_column, spec.id_column, spec.time_column, *spec.drop_columns]:
        if column and column not in raw.columns:
            raise DataFileError(spec.path, f"configured column is missing; the file has {list(raw.columns)}",
                                column=column)
    frame = raw.drop(columns=list(spec.drop_columns))
    reasons = RowReasons(frame.index)

    label_text = frame[spec.label_column].astype(str).str.strip().str.lower()
    label_blank = is_blank(frame[spec.label_column])
    reasons.add(label_blank, "missing_label")
    classes = sorted(set(label_text[~label_blank]))
    if spec.positive.strip().lower() not in classes:
        raise DataFileError(spec.path, f"positive value {spec.positive!r} never occurs; values are {classes[:10]}",
                            column=spec.label_column)
    if len(classes) > 2:
        raise DataFileError(spec.path, f"a binary label needs two values, found {len(classes)}: {classes[:10]}",
                            column=spec.label_column)
    skip: set[str] = set()
    if spec.id_column:
        ids = frame[spec.id_column].astype(str).str.strip()
        reasons.add(is_blank(frame[spec.id_column]), "missing_id")
        reasons.add(~is_blank(frame[spec.id_column]) & ids.duplicated(keep="first"), "duplicate")
        skip.add(spec.id_column)
    typed, numeric, categorical, boolean = infer_types(frame, skip | {spec.time_column} - {None})
    numeric, categorical, boolean = ([c for c in kind if c != spec.label_column]
                                     for kind in (numeric, categorical, boolean))
    if spec.time_column:
        typed[spec.time_column] = parse_timestamp(frame[spec.time_column], None)
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
    typed[LABEL] = (label_text == spec.positive.strip().lower()).astype("int64")
    result = ValidationResult("labeled", typed.drop(index=reasons.rows), reasons.quarantine(raw, str(spec.path)),
                              len(raw)).with_unreadable(unreadable)
    return LabeledTable(spec, result, numeric, categorical, boolean)
