"""Read CSV or Parquet files into the raw tables through a column-mapping config.

A mapping names, for one raw table, which source column feeds each contract column::

    table: transactions
    path: exports/orders.csv
    columns: {customer_id: CustomerID, order_id: InvoiceNo, timestamp: InvoiceDate,
              quantity: Quantity, unit_price: UnitPrice, item: StockCode}
    return_prefix: "C"

A file that cannot be read as that table (missing, empty, wrong encoding, a mapped column absent) is a
:class:`~personalize.errors.DataFileError` naming the file and the column; a row that cannot be read is quarantined
by :func:`features.ingest.validate_table` instead.
"""

from __future__ import annotations

import csv as csvlib
import difflib
import re
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.contracts import OPTIONAL_COLUMNS, REQUIRED_COLUMNS, TIME_COLUMNS, missing_required
from features.ingest import (DETAIL, NUMBER_COLUMNS, RAW_LINE, REASON, SOURCE_FILE, SOURCE_ROW, ParseOptions,
                             ValidationResult, is_blank, parse_number, parse_timestamp, validate_table)
from personalize.errors import ConfigError, DataFileError

TableName = Literal["customers", "transactions", "events"]


class CsvOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sep: str = ","
    encoding: str = "utf-8"
    header: bool = True
    names: list[str] | None = None  # column names when the file has no header
    # how numbers are written: "," reads 29,85 and 1.621,37, "." reads 29.85; unset, a file separated by
    # something other than "," reads a column with a decimal comma when its numbers are written so
    decimal: Literal[".", ","] | None = None
    thousands: Literal[","] | None = None  # "," (with a decimal dot): 1,234.50 and 12,000 are read

    @model_validator(mode="after")
    def _one_meaning_for_a_comma(self) -> CsvOptions:
        if self.thousands == "," and self.decimal == ",":
            raise ValueError('thousands "," needs a decimal dot: decimal "," reads 1.234,50 already')
        return self

    @property
    def decimal_comma(self) -> bool | None:
        """True or False when ``decimal`` says (or a thousands comma implies a dot), None (decide per column) for a
        file not separated by ","."""
        if self.decimal or self.thousands:
            return self.decimal == ","
        return None if self.sep != "," else False

    @field_validator("sep")
    @classmethod
    def _tab(cls, value: str) -> str:
        """``\\t`` as typed in a shell or YAML, or the word ``tab``: a tab."""
        return "\t" if value in ("\\t", "tab") else value


class TableMapping(BaseModel):
    """How one file maps to one raw table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: TableName
    path: Path
    format: Literal["csv", "parquet"] | None = None  # inferred from the file name when not set
    csv: CsvOptions = CsvOptions()
    columns: dict[str, str] = Field(description="contract column -> source column")
    timestamp_format: str | None = None
    return_prefix: str | None = None
    strip_float_ids: bool | None = None  # None: strip "17850.0" -> "17850" when every id of a column is so written
    defaults: dict[str, Any] = Field(default_factory=dict, description="contract column -> constant value")

    @model_validator(mode="after")
    def _known_columns(self) -> TableMapping:
        known = set(REQUIRED_COLUMNS[self.table]) | set(OPTIONAL_COLUMNS[self.table])
        if self.table == "transactions":
            known.add("unit_price")
        if self.table == "customers":
            known = None  # any attribute may be mapped
        if known is not None:
            for what, given in (("", self.columns), ("defaults for ", self.defaults)):  # a typo is never ignored
                unknown = sorted(set(given) - known)
                if unknown:
                    raise ValueError(f"{what}unknown contract column(s) {unknown} for table {self.table}; known: "
                                     f"{sorted(known)}")
        sources = list(self.columns.values())
        twice = sorted({c for c in sources if sources.count(c) > 1})
        if twice:
            raise ValueError(f"source column(s) {twice} are mapped to more than one contract column")
        missing = missing_required(self.table, set(self.columns) | set(self.defaults))
        if missing:
            raise ValueError(f"table {self.table} needs a mapping for {missing}")
        return self

    @property
    def file_format(self) -> str:
        if self.format:
            return self.format
        suffixes = [s.lower() for s in self.path.suffixes]
        return "parquet" if ".parquet" in suffixes or ".pq" in suffixes else "csv"

    @property
    def parse_options(self) -> ParseOptions:
        return ParseOptions(
            timestamp_format=self.timestamp_format,
            return_prefix=self.return_prefix,
            strip_float_ids=self.strip_float_ids,
            defaults=dict(self.defaults),
            decimal_comma=self.csv.decimal_comma if self.file_format == "csv" else False,
            thousands_comma=self.file_format == "csv" and self.csv.thousands == ",",
        )


def file_format(path: Path) -> str:
    """``parquet`` for a ``.parquet`` or ``.pq`` file (any case, also before ``.gz``), else ``csv``."""
    return "parquet" if {".parquet", ".pq"} & {x.lower() for x in Path(path).suffixes} else "csv"


def read_source(path: Path, file_format: str = "csv",
                csv: CsvOptions | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a file as it is: CSV values stay text, so that a bad value is quarantined rather than guessed.

    Returns the rows and the *unreadable* rows: CSV lines with more fields than the header, which no column
    mapping can place. Those are quarantined with their raw text as ``wrong_field_count`` (see
    :meth:`ValidationResult.with_unreadable`). The index of the rows is each row's 1-based position among the
    file's data rows, what quarantine reports as ``_source_row``. (A quoted field spanning lines shifts the line
    numbers pandas reports; such files should be read as Parquet.)
    """
    csv = csv or CsvOptions()
    path = Path(path)
    if not path.exists():
        raise DataFileError(path, "no such file")
    if path.is_dir():
        raise DataFileError(path, "is a directory, expected a file")
    if path.stat().st_size == 0:
        raise DataFileError(path, "the file is empty")
    skipped: list[tuple[int, str]] = []
    if file_format == "parquet":
        try:
            frame = pq.read_table(path).to_pandas()
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise DataFileError(path, f"not a readable Parquet file ({exc})") from None
    else:
        try:
            if csv.header:
                _check_header(path, csv)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", pd.errors.ParserWarning)
                frame = pd.read_csv(
                    path,
                    sep=csv.sep,
                    encoding=csv.encoding,
                    header=0 if csv.header else None,
                    names=csv.names,
                    dtype=str,
                    keep_default_na=False,
                    index_col=False,  # never take a column as the index, even when rows are wider than the header
                    on_bad_lines="warn",  # a line with too many fields is skipped with a warning naming it
                    engine="python" if len(csv.sep) > 1 else "c",
                )
            for warning in caught:
                for match in _SKIPPED.finditer(str(warning.message)):
                    skipped.append((int(match.group(1)), match.group(0)))
                if "Length of header or names does not match" in str(warning.message):
                    raise DataFileError(path, "rows have more fields than the header; fix the header or the "
                                              f"separator{separator_hint(path, csv)}")
        except UnicodeDecodeError as exc:
            raise DataFileError(
                path, f"is not {csv.encoding} text (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                f"{exc.start}); set csv.encoding in the mapping (e.g. latin-1)") from None
        except pd.errors.EmptyDataError:
            raise DataFileError(path, "the file has no columns (empty or only blank lines)") from None
        except pd.errors.ParserError as exc:
            raise DataFileError(path, f"is not valid CSV with separator {csv.sep!r}: {exc}") from None
    if frame.empty and skipped:
        raise DataFileError(path, "every row has more fields than the header; fix the header or the separator"
                                  f"{separator_hint(path, csv)}")
    if frame.empty:
        raise DataFileError(path, "the file has a header but no rows")
    frame.columns = [str(c).strip() for c in frame.columns]
    offset = 1 if csv.header and file_format != "parquet" else 0
    bad_rows = {line - offset for line, _ in skipped}
    total = len(frame) + len(bad_rows)
    frame.index = pd.Index([r for r in range(1, total + 1) if r not in bad_rows], dtype="int64")
    return frame, _unreadable(path, csv, skipped, offset)


_SKIPPED = re.compile(r"Skipping line (\d+): expected \d+ fields?, saw \d+")


def _open_text(path: Path, encoding: str):
    """A text handle on a plain or gzip-compressed file."""
    import gzip

    return (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding=encoding, newline="")


def _unreadable(path: Path, csv: CsvOptions, skipped: list[tuple[int, str]], offset: int) -> pd.DataFrame:
    """The skipped lines, with their raw text, in quarantine's layout."""
    columns = [SOURCE_FILE, SOURCE_ROW, RAW_LINE, REASON, DETAIL]
    if not skipped:
        return pd.DataFrame(columns=columns)
    wanted = dict(skipped)
    text: dict[int, str] = {}
    with _open_text(path, csv.encoding) as fh:
        for number, line in enumerate(fh, start=1):
            if number in wanted:
                text[number] = line.rstrip("\r\n")
    rows = [(str(path), line - offset, text.get(line), "wrong_field_count", message)
            for line, message in sorted(wanted.items())]
    return pd.DataFrame(rows, columns=columns).astype({SOURCE_FILE: "string", RAW_LINE: "string"})

_SEPARATORS = {";": "';'", "\t": "tab", "|": "'|'", ",": "','"}


def separator_hint(path: Path, csv: CsvOptions) -> str:
    """``"; the header looks ';'-separated: ..."`` when another common separator splits the header into more
    columns than the configured one, else nothing."""
    try:
        with _open_text(path, csv.encoding) as fh:
            line = fh.readline()
    except (OSError, UnicodeDecodeError):
        return ""
    counts = {sep: line.count(sep) for sep in _SEPARATORS if sep != csv.sep}
    likely = max(counts, key=counts.__getitem__, default=None)
    if likely is None or counts[likely] <= line.count(csv.sep):
        return ""
    given = "\\t" if likely == "\t" else likely
    return (f"; the header looks {_SEPARATORS[likely]}-separated: pass --sep '{given}' (or set csv.sep in the "
            "ingest config)")


def column_hint(path: Path, file_format: str, csv: CsvOptions, columns: Any) -> str:
    """For a CSV file read as one column (most likely a wrong separator), :func:`separator_hint`; else nothing."""
    return separator_hint(path, csv) if file_format == "csv" and len(columns) == 1 else ""


def _check_header(path: Path, csv: CsvOptions) -> None:
    """Duplicate column names (pandas would silently rename the second to ``name.1``) are an error."""
    with _open_text(path, csv.encoding) as fh:
        line = fh.readline().lstrip("\ufeff")
    if len(csv.sep) == 1:
        names = next(csvlib.reader([line], delimiter=csv.sep), [])
    else:
        names = re.split(csv.sep, line.strip())
    names = [n.strip() for n in names]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataFileError(path, "the header names this column more than once", column=twice[0])


def map_columns(raw: pd.DataFrame, mapping: TableMapping) -> pd.DataFrame:
    """Rename the mapped source columns to their contract names, or say which one is missing."""
    absent = [src for src in mapping.columns.values() if src not in raw.columns]
    if absent:
        src = absent[0]
        close = difflib.get_close_matches(src, raw.columns, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        contract = next(k for k, v in mapping.columns.items() if v == src)
        raise DataFileError(
            mapping.path,
            f"mapped column is missing (for {mapping.table}.{contract}); the file has {list(raw.columns)}{hint}",
            column=src,
        )
    return raw[list(mapping.columns.values())].set_axis(list(mapping.columns), axis=1)


def load_table(mapping: TableMapping, now: pd.Timestamp | None = None,
               known_customers: pd.Series | None = None) -> ValidationResult:
    """Read, map and validate one file: the loader's whole job."""
    raw, unreadable = read_source(mapping.path, mapping.file_format, mapping.csv)
    result = validate_table(map_columns(raw, mapping), mapping.table, now, mapping.parse_options, source=raw,
                            known_customers=known_customers, source_file=str(mapping.path))
    return result.with_unreadable(unreadable)


_UNREAD = "not readable as mapped: "  # a prefix no parser reads, before a value its file's own format could not read


def values_read(frame: pd.DataFrame, table: str, options: ParseOptions, times: bool) -> pd.DataFrame:
    """One file's ``frame`` (contract columns) with its numbers (and, with ``times``, its times) read as its own
    mapping says (its ``csv.decimal`` and separator, its ``timestamp_format``), before it joins the other files of
    its table: a value read becomes a float or a timestamp; one that is not keeps its text behind a prefix no parser
    reads, so that validation quarantines it as unparseable; a blank stays blank."""
    out = frame.copy()
    parsers = {c: lambda s: parse_number(s, options.decimal_comma, options.thousands_comma)
               for c in NUMBER_COLUMNS & set(frame.columns)}
    if times and TIME_COLUMNS[table] in frame.columns:
        parsers[TIME_COLUMNS[table]] = lambda s: parse_timestamp(s, options.timestamp_format)
    for column, parse in parsers.items():
        raw, parsed = frame[column], parse(frame[column])
        marked = (_UNREAD + raw.astype(str)).where(~is_blank(raw), None)
        out[column] = parsed.astype(object).where(parsed.notna(), marked)
    return out


def load_tables(mappings: list[TableMapping], now: pd.Timestamp | None = None,
                known_customers: pd.Series | None = None) -> ValidationResult:
    """Several files of one table (monthly exports, say), validated as one table so that a row repeated in two
    files is a duplicate; each quarantined row names its own file and line."""
    if len(mappings) == 1:
        return load_table(mappings[0], now, known_customers)
    # numbers are read file by file (values_read), and so are times where the files' formats differ (else the
    # shared format reads them, and an order id made of the time keeps the time as written)
    times = len({m.parse_options.timestamp_format for m in mappings}) > 1
    options = [replace(m.parse_options, decimal_comma=False, thousands_comma=False,
                       timestamp_format=None if times else m.parse_options.timestamp_format) for m in mappings]
    for m, o in zip(mappings[1:], options[1:]):
        differ = [*(["table"] if m.table != mappings[0].table else []),
                  *(f.name for f in fields(o) if getattr(o, f.name) != getattr(options[0], f.name))]
        if differ:
            raise ConfigError(f"files of one table must share their {', '.join(differ)}: {mappings[0].path} and "
                              f"{m.path} differ")
    raws, mapped, files, rows, unreadable = [], [], [], [], []
    for mapping in mappings:
        raw, bad = read_source(mapping.path, mapping.file_format, mapping.csv)
        unreadable.append(bad)
        raws.append(raw)
        mapped.append(values_read(map_columns(raw, mapping), mapping.table, mapping.parse_options, times))
        files += [str(mapping.path)] * len(raw)
        rows += list(raw.index)
    index = pd.RangeIndex(1, len(files) + 1)
    source = pd.concat(raws, ignore_index=True).set_axis(index)
    frame = pd.concat(mapped, ignore_index=True).set_axis(index)
    result = validate_table(frame, mappings[0].table, now, options[0], source=source,
                            known_customers=known_customers)
    at = result.quarantined[SOURCE_ROW].to_numpy(dtype="int64") - 1
    result.quarantined[SOURCE_FILE] = pd.Series(files, dtype="string").to_numpy()[at]
    result.quarantined[SOURCE_ROW] = pd.Series(rows).to_numpy()[at]
    unreadable = [bad for bad in unreadable if len(bad)]  # pandas warns about concatenating empty frames
    return result.with_unreadable(pd.concat(unreadable, ignore_index=True) if unreadable else pd.DataFrame())
