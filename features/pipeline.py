"""The data-layer jobs the CLI runs: ingest a data set, build its training frame.

Each job reads its inputs, calls the pure cores (:mod:`features.ingest`, :mod:`features.definitions`,
:mod:`features.labels`) and writes its outputs under the settings' home:

- ``data/<dataset>/{customers,transactions,events}.parquet``: the valid rows (or ``table.parquet`` for a
  labeled table), plus ``ingest_report.json``;
- ``quarantine/<dataset>/<table>.parquet``: every rejected row as read, with ``_source_file``, ``_source_row``,
  ``_reason``, ``_detail`` and ``_customer_id`` (as parsed);
- ``features/<dataset>/training_frame.parquet``: features and labels per (customer, cutoff), with provenance.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from features.datasets import (DEFAULT_DATA_ROOT, derive_customers, labeled_sources, load_labeled_source,
                               load_transactions, transaction_sources)
from features.definitions import FeatureSpec
from features.ingest import FALSE_TEXT, TRUE_TEXT, ParseOptions, ValidationResult, validate_table
from features.labeled import LabeledTable, LabeledTableSpec, load_labeled
from features.loaders import TableMapping, load_tables
from features.store import FeatureStore, default_cutoffs, write_frame, write_raw
from features.synthetic import SyntheticData
from personalize.errors import ConfigError, ContractError
from personalize.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    dataset: str
    kind: str  # "raw" or "labeled"
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_in(self) -> int:
        """Rows read from the inputs (a customers table derived from the transactions is not an input)."""
        return sum(t["rows_in"] for t in self.tables.values() if not t.get("derived"))

    @property
    def quarantined(self) -> int:
        return sum(t["quarantined"] for t in self.tables.values() if not t.get("derived"))

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "kind": self.kind, "rows_in": self.rows_in,
                "quarantined": self.quarantined, "tables": self.tables, **self.extra}


def _write_quarantine(settings: Settings, dataset: str, table: str, result: ValidationResult) -> Path | None:
    path = settings.quarantine_dir(dataset) / f"{table}.parquet"
    if len(result.quarantined) == 0:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    result.quarantined.to_parquet(path, index=False)
    return path


def _finish(settings: Settings, report: IngestReport, results: dict[str, ValidationResult],
            derived: tuple[str, ...] = ()) -> IngestReport:
    for table, result in results.items():
        quarantine = _write_quarantine(settings, report.dataset, table, result)
        report.tables[table] = {**result.summary(), "quarantine_file": str(quarantine) if quarantine else None,
                                "derived": table in derived}
        if result.quarantined.shape[0]:
            log.info("%s.%s: quarantined %d of %d rows: %s", report.dataset, table, len(result.quarantined),
                     result.rows_in, result.reasons)
    out = settings.dataset_dir(report.dataset) / "ingest_report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return report


# What to check first when rows of a table are quarantined for this reason (all of them, or some: `ingest` prints it).
_NUMBER_HINT = ('numbers are read as the mapping\'s csv.decimal says: "," reads 29,85 and 1.621,37, "." reads 29.85 '
                '(thousands commas, 1,234.50, with csv.thousands: ","); unset, a file not separated by "," finds it '
                'per column. The quarantine file shows the values')
_BOOL_HINT = (f"accepted, in any case: {', '.join(sorted(TRUE_TEXT - {'1.0'}))} (true) and "
              f"{', '.join(sorted(FALSE_TEXT - {'', '0.0'}))} or blank (false)")
_RETURN_HINT = ("a negative quantity or amount is a return: set the mapping's return_prefix (order ids of returns "
                "start with it) or map an is_return column")
REASON_HINTS = {
    "unparseable_timestamp": "check the mapping's timestamp_format (without it only ISO 8601 is accepted)",
    "unparseable_signup_at": "check the mapping's timestamp_format (without it only ISO 8601 is accepted)",
    "unparseable_time": "give the time column's format (--time-format, or timestamp_format under labeled:; "
                        "without it only ISO 8601 is accepted)",
    "unparseable_amount": _NUMBER_HINT,
    "unparseable_quantity": _NUMBER_HINT,
    "unparseable_duration_s": _NUMBER_HINT,
    "unparseable_consent": _BOOL_HINT,
    "unparseable_is_return": _BOOL_HINT,
    "unknown_customer": "check that the customers table's customer_id maps the same ids",
    "future_timestamp": "check the mapping's timestamp_format (day and month swapped?) and the time zone",
    "repeated_id": "rows of an id seen before, with other values: the first is kept; check that the id column "
                   "names one customer per row",
    "negative_amount_not_return": _RETURN_HINT,
    "negative_quantity_not_return": _RETURN_HINT,
}


def refuse_nothing_valid(settings: Settings, dataset: str, results: dict[str, ValidationResult]) -> None:
    """A table whose every row is quarantined is a wrong mapping, not data: write its quarantine (to see why), store
    nothing (so a copy ingested before is kept, not replaced by an empty one) and say so in one error."""
    empty = [(t, r) for t, r in results.items() if r.rows_in and r.valid.empty]
    if not empty:
        return
    table, result = empty[0]
    path = _write_quarantine(settings, dataset, table, result)
    reasons = ", ".join(f"{k} {v:,}" for k, v in list(result.reasons.items())[:3])
    hint = REASON_HINTS.get(next(iter(result.reasons), ""))
    others = f" (also {', '.join(t for t, _ in empty[1:])})" if len(empty) > 1 else ""
    kept = ("the data set as ingested before is kept" if settings.dataset_dir(dataset).exists()
            else "nothing was stored")
    raise ContractError(f"{dataset}: every row of {table}{others} was quarantined ({result.rows_in:,} rows: "
                        f"{reasons}) -> {path}; {kept}" + (f"; {hint}" if hint else ""))


def ingest_raw(settings: Settings, dataset: str, results: dict[str, ValidationResult],
               now: pd.Timestamp | None, attributes: pd.DataFrame | None = None) -> IngestReport:
    """Write validated raw tables; derive the customers table from the transactions when there is none. Nothing
    is written when every row of a table was quarantined (:func:`refuse_nothing_valid`)."""
    refuse_nothing_valid(settings, dataset, results)
    derived: tuple[str, ...] = ()
    if "customers" not in results:
        results["customers"] = validate_table(derive_customers(results["transactions"].valid, attributes),
                                              "customers", now, ParseOptions(strip_float_ids=False))  # ids as parsed
        derived = ("customers",)
    write_raw(settings.dataset_dir(dataset), {t: r.valid for t, r in results.items()})
    customers = len(results["customers"].valid)
    return _finish(settings, IngestReport(dataset, "raw", extra={"customers": customers}), results, derived)


def ingest_builtin(settings: Settings, name: str, now: pd.Timestamp | None,
                   root: Path = DEFAULT_DATA_ROOT) -> IngestReport:
    """Ingest one of the shared data sets by name (see :mod:`features.datasets`)."""
    if name in transaction_sources(root):
        result, attributes = load_transactions(transaction_sources(root)[name], now)
        return ingest_raw(settings, name, {"transactions": result}, now, attributes)
    if name in labeled_sources(root):
        return ingest_labeled(settings, name, load_labeled_source(name, root))
    raise ConfigError(f"unknown data set {name!r}; built-in: {', '.join(builtin_names())}, or a YAML mapping file")


def builtin_names() -> list[str]:
    return [*transaction_sources(DEFAULT_DATA_ROOT), *labeled_sources(DEFAULT_DATA_ROOT)]


def ingest_labeled(settings: Settings, name: str, table: LabeledTable) -> IngestReport:
    refuse_nothing_valid(settings, name, {"table": table.result})
    out = settings.dataset_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    table.frame.to_parquet(out / "table.parquet", index=False)
    report = IngestReport(name, "labeled", extra={
        "label": table.spec.label_column, "positive": table.spec.positive, "label_values": table.label_values,
        "label_rate": table.label_rate,
        "numeric": table.numeric,
        "categorical": table.categorical, "boolean": table.boolean, "ignored": table.ignored,
        "dropped": list(table.spec.drop_columns), "id_column": table.spec.id_column,
        "time_column": table.spec.time_column, "source": str(Path(table.spec.path).resolve())})
    return _finish(settings, report, {"table": table.result})


def stored_source(settings: Settings, dataset: str) -> str | None:
    """The file a stored labeled table was ingested from (None: not a labeled table, or ingested before that was
    recorded)."""
    report = settings.dataset_dir(dataset) / "ingest_report.json"
    try:
        return json.loads(report.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


@contextmanager
def kept_unless_done(settings: Settings, dataset: str) -> Iterator[None]:
    """The data set's stored files as they were, put back if the block fails: a `train` that ingests a table file
    and then fails (too few rows, a bad --id, Ctrl-C) leaves the data set an earlier model was trained on alone."""
    import shutil

    stored = settings.dataset_dir(dataset)
    backup = settings.previous_dir(dataset)
    shutil.rmtree(backup, ignore_errors=True)
    existed = stored.exists()
    if existed:
        shutil.copytree(stored, backup)
    try:
        yield
    except BaseException:
        shutil.rmtree(stored, ignore_errors=True)  # a data set the failed train created goes with it
        if existed:
            backup.replace(stored)
            log.info("%s: the data set as stored before is back in place", dataset)
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


def ingest_synthetic(settings: Settings, dataset: str, data: SyntheticData) -> IngestReport:
    """Store a generated data set through the same contracts as real data, with its ground truth beside it."""
    def numbered(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.set_axis(pd.RangeIndex(1, len(frame) + 1))

    customers = validate_table(numbered(data.customers), "customers")
    known = customers.valid["customer_id"]
    results = {"customers": customers,
               **{t: validate_table(numbered(getattr(data, t)), t, known_customers=known)
                  for t in ("transactions", "events")}}
    report = ingest_raw(settings, dataset, results, None)
    data.truth.to_parquet(settings.dataset_dir(dataset) / "truth.parquet", index=False)
    return report


class IngestConfig(BaseModel):
    """A bring-your-own-data ingest config (YAML): raw table mappings or one labeled table."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str
    tables: list[TableMapping] = []
    labeled: LabeledTableSpec | None = None


def load_ingest_config(path: Path) -> IngestConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with `dataset:` and `tables:` or `labeled:`")
    base = Path(path).parent
    for table in raw.get("tables") or []:  # paths in the config are relative to the config file
        if isinstance(table, dict) and "path" in table and not Path(table["path"]).is_absolute():
            table["path"] = str(base / table["path"])
    labeled = raw.get("labeled")
    if isinstance(labeled, dict) and "path" in labeled and not Path(labeled["path"]).is_absolute():
        labeled["path"] = str(base / labeled["path"])
    try:
        config = IngestConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None
    if not config.tables and config.labeled is None:
        raise ConfigError(f"{path}: nothing to ingest; give `tables:` (raw tables) or `labeled:` (a labeled table)")
    if config.tables and not any(t.table == "transactions" for t in config.tables):
        raise ConfigError(f"{path}: the raw tables need a `transactions` table")
    return config


def ingest_config(settings: Settings, config: IngestConfig, now: pd.Timestamp | None) -> IngestReport:
    if config.labeled is not None:
        return ingest_labeled(settings, config.dataset, load_labeled(config.labeled))
    by_table: dict[str, list[TableMapping]] = {}
    for mapping in config.tables:
        by_table.setdefault(mapping.table, []).append(mapping)
    results: dict[str, ValidationResult] = {}
    known = None
    if "customers" in by_table:  # first, so that activity of customers nobody knows is caught
        results["customers"] = load_tables(by_table["customers"], now)
        known = results["customers"].valid["customer_id"]
    for table in ("transactions", "events"):
        if table in by_table:
            results[table] = load_tables(by_table[table], now, known)
    return ingest_raw(settings, config.dataset, results, now)


@dataclass(frozen=True)
class FrameSummary:
    dataset: str
    path: Path
    rows: int
    customers: int
    cutoffs: list[str]
    feature_columns: int
    label_rates: dict[str, float]
    feature_version: str


def build_training_frame(settings: Settings, dataset: str, horizon_days: int = 90, cutoffs: int = 3,
                         step_days: int = 30, top_categories: int = 8,
                         as_of: list[pd.Timestamp] | None = None, engine: str = "duckdb") -> FrameSummary:
    """Build and write a data set's training frame; cutoffs end where the latest full horizon does. ``engine``
    runs the definitions on DuckDB or Spark (:mod:`features.engines`): the frame is the same."""
    from features.engines import connect

    store = FeatureStore(settings.dataset_dir(dataset), connect(engine) if engine != "duckdb" else None)
    observed_until = store.observed_until()
    cuts = sorted(as_of) if as_of else default_cutoffs(observed_until, horizon_days, cutoffs, step_days)
    check_history(dataset, cuts, store.observed_from(), observed_until, explicit=bool(as_of))
    spec = FeatureSpec(categories=store.top_categories(cuts[0], top_categories))
    frame = store.training_frame(cuts, horizon_days, spec, observed_until)
    if frame.empty:  # never replace a frame with an empty one: the next command would fail far from the cause
        raise ContractError(f"{dataset}: no customer had signed up by the cutoffs {_dates(cuts)}; nothing written")
    path = write_frame(frame, settings.features_dir(dataset) / "training_frame.parquet", frame.attrs)
    rates = {c: float(frame[c].mean()) for c in ("churn", "propensity", "next_purchase_event") if len(frame)}
    rates["purchases_in_h"] = float(frame["purchases_in_h"].mean()) if len(frame) else float("nan")
    log.info("%s: %d rows, %d customers, cutoffs %s -> %s", dataset, len(frame), frame["customer_id"].nunique(),
             [str(c.date()) for c in cuts], path)
    return FrameSummary(dataset, path, len(frame), int(frame["customer_id"].nunique()),
                        [str(c) for c in cuts], len(spec.columns), rates, spec.version)


def _dates(cuts: list[pd.Timestamp]) -> str:
    return ", ".join(str(c.date()) for c in cuts) if len(cuts) <= 3 else f"{cuts[0].date()} … {cuts[-1].date()}"


def check_history(dataset: str, cuts: list[pd.Timestamp], observed_from: pd.Timestamp,
                  observed_until: pd.Timestamp, explicit: bool = False) -> None:
    """Refuse cutoffs at or before the first transaction, as training does: such a cutoff has no purchase history
    (no features, no churn label), so the frame would be empty or meaningless."""
    early = [c for c in cuts if c <= observed_from]
    if not early:
        return
    fix = (f"give --as-of dates after {observed_from.date()}" if explicit else
           "use a shorter --horizon, fewer --cutoffs or a smaller --step (the latest cutoff is one horizon before "
           "the data ends, the others step back from it)")
    raise ContractError(f"{dataset}: the cutoff(s) {_dates(early)} fall before the data starts (transactions "
                        f"{observed_from.date()} … {observed_until.date()}, {(observed_until - observed_from).days} "
                        f"days); {fix}")
