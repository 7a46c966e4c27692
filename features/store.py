"""The offline store: validated raw tables as Parquet, feature and label frames built from them by Ibis.

Layout under a data set's directory (``<home>/data/<dataset>/``): ``customers.parquet``, ``transactions.parquet``,
``events.parquet`` (always present, possibly empty, with the contract's Arrow schema). Frames are written with
their provenance in the Parquet metadata (feature version, cutoffs, horizon, categories, data fingerprint), so the
version travels with every training frame; :func:`read_frame` gives it back in ``frame.attrs``.

:class:`FeatureStore` binds those files to an Ibis backend (DuckDB in memory by default, or Spark:
:mod:`features.engines`) and runs the same definitions for a training frame (:meth:`FeatureStore.offline`) and
for one customer (:meth:`FeatureStore.features_for`).
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import ibis
import ibis.expr.types as ir
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from features.contracts import RAW_TABLES
from features.definitions import KEYS, FeatureSpec, attach, customer_features
from features.engines import read_table
from features.labels import LABEL_COLUMNS, category_label_columns, check_horizon, customer_labels
from personalize.errors import PersonalizeError


class UnknownCustomer(PersonalizeError):
    """The customer is not in the customers table, or had not signed up yet at the requested time."""

ARROW_SCHEMAS: dict[str, pa.Schema] = {
    "customers": pa.schema([("customer_id", pa.string()), ("signup_at", pa.timestamp("ns")),
                            ("consent", pa.bool_())]),
    "transactions": pa.schema([("customer_id", pa.string()), ("order_id", pa.string()),
                               ("timestamp", pa.timestamp("ns")), ("amount", pa.float64()),
                               ("quantity", pa.int64()), ("is_return", pa.bool_()), ("category", pa.string()),
                               ("item", pa.string())]),
    "events": pa.schema([("customer_id", pa.string()), ("session_id", pa.string()),
                         ("timestamp", pa.timestamp("ns")), ("event_type", pa.string()), ("item", pa.string()),
                         ("category", pa.string()), ("duration_s", pa.float64())]),
}
META_KEY = b"personalize"


def to_arrow(table: str, frame: pd.DataFrame) -> pa.Table:
    """The frame in the contract's Arrow schema (optional contract columns filled with nulls, extras kept)."""
    schema = ARROW_SCHEMAS[table]
    frame = frame.reset_index(drop=True)
    arrays, fields = [], []
    for f in schema:
        values = frame[f.name] if f.name in frame.columns else pd.Series([None] * len(frame), dtype=object)
        arrays.append(pa.array(values, type=f.type, from_pandas=True))
        fields.append(f)
    for name in frame.columns:
        if name not in schema.names:
            arrays.append(pa.array(frame[name], from_pandas=True))
            fields.append(pa.field(name, arrays[-1].type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_raw(dataset_dir: Path, tables: dict[str, pd.DataFrame]) -> dict[str, Path]:
    """Write the raw tables, sorted by customer and time so a lookup by customer reads few row groups."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for table in RAW_TABLES:
        frame = tables.get(table)
        if frame is None:
            frame = pd.DataFrame(columns=ARROW_SCHEMAS[table].names)
        arrow = to_arrow(table, frame)
        order = [(c, "ascending") for c in ("customer_id", "timestamp", "signup_at") if c in arrow.column_names]
        path = dataset_dir / f"{table}.parquet"
        pq.write_table(arrow.sort_by(order), path, row_group_size=256_000)
        paths[table] = path
    return paths


def data_fingerprint(paths: list[Path]) -> str:
    """sha256 over the files' bytes: the data snapshot a frame (and later a model) was built from."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def write_frame(frame: pd.DataFrame, path: Path, metadata: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    existing = table.schema.metadata or {}
    table = table.replace_schema_metadata({**existing, META_KEY: json.dumps(metadata, default=str).encode()})
    pq.write_table(table, path)
    return path


def read_frame(path: Path) -> pd.DataFrame:
    table = pq.read_table(path)
    frame = table.to_pandas()
    raw = (table.schema.metadata or {}).get(META_KEY)
    frame.attrs.update(json.loads(raw) if raw else {})
    return frame


def definition_fingerprint(spec: FeatureSpec) -> str:
    """A hash of the compiled feature expression: two frames with the same version but different definitions
    (a change that forgot to bump the version) still tell apart."""
    def empty(name: str) -> ir.Table:
        return ibis.table(ibis.schema({f.name: ibis.dtype(f.type) for f in ARROW_SCHEMAS[name]}), name=name)

    entities = ibis.table(ibis.schema({"customer_id": "string", "cutoff": "timestamp"}), name="entities")
    expr = customer_features(entities, empty("customers"), empty("transactions"), empty("events"), spec)
    return hashlib.sha256(str(ibis.to_sql(expr, dialect="duckdb")).encode()).hexdigest()[:16]


def collect(expr: ir.Table) -> pd.DataFrame:
    """An expression's rows as pandas, with the cutoff in microseconds whatever the engine (DuckDB gives
    microseconds, Spark through Arrow nanoseconds), so the same data gives the same frame on every engine."""
    frame = expr.to_pandas()
    if "cutoff" in frame.columns:
        frame["cutoff"] = frame["cutoff"].astype("datetime64[us]")
    return frame


def default_cutoffs(observed_until: pd.Timestamp, horizon_days: int, count: int, step_days: int) -> list[pd.Timestamp]:
    """``count`` cutoffs at midnight, ``step_days`` apart, the latest one whose horizon ends within the data."""
    last = (observed_until - timedelta(days=horizon_days)).floor("D")
    return sorted(last - timedelta(days=step_days * k) for k in range(count))


class FeatureStore:
    """A data set's raw tables on an Ibis backend, and the feature/label definitions over them."""

    def __init__(self, dataset_dir: Path, con: ibis.BaseBackend | None = None) -> None:
        self.dataset_dir = Path(dataset_dir)
        if (self.dataset_dir / "table.parquet").exists():
            raise PersonalizeError(f"{self.dataset_dir.name} is a labeled table: it is trained on as it is, there "
                                   "are no transactions to build point-in-time features from")
        if not self.dataset_dir.is_dir():
            from personalize.settings import ingested

            root = self.dataset_dir.parent
            raise PersonalizeError(f"no data set {self.dataset_dir.name!r} under {root} (ingested: "
                                   f"{', '.join(ingested(root)) or 'none yet'}); run `personalize ingest` for it first")
        missing = [t for t in RAW_TABLES if not (self.dataset_dir / f"{t}.parquet").exists()]
        if missing:
            raise PersonalizeError(
                f"{self.dataset_dir}: no {', '.join(missing)} table; run `personalize ingest` for this data set first")
        self.con = con if con is not None else ibis.duckdb.connect()
        self.customers, self.transactions, self.events = (
            read_table(self.con, self.dataset_dir / f"{t}.parquet", t) for t in ("customers", "transactions", "events"))

    @property
    def paths(self) -> list[Path]:
        return [self.dataset_dir / f"{t}.parquet" for t in RAW_TABLES]

    def fingerprint(self) -> str:
        return data_fingerprint(self.paths)

    def observed_until(self) -> pd.Timestamp:
        """How far the labels can see: the latest transaction (labels come from transactions only, so a longer
        event log must not stretch a horizon over time with no purchase data)."""
        end = self.transactions.timestamp.max().execute()
        if end is None or pd.isna(end):
            raise PersonalizeError(f"{self.dataset_dir}: no transactions")
        return pd.Timestamp(end)

    def observed_from(self) -> pd.Timestamp:
        """Where the purchase history starts: the earliest transaction (a cutoff at or before it has no history)."""
        start = self.transactions.timestamp.min().execute()
        if start is None or pd.isna(start):
            raise PersonalizeError(f"{self.dataset_dir}: no transactions")
        return pd.Timestamp(start)

    def events_until(self) -> pd.Timestamp | None:
        end = self.events.timestamp.max().execute()
        return None if end is None or pd.isna(end) else pd.Timestamp(end)

    def top_categories(self, before: pd.Timestamp, k: int = 8) -> tuple[str, ...]:
        """The k categories with the most spend before ``before`` (so the choice itself is point-in-time)."""
        t = self.transactions
        t = t.filter((t.timestamp < before) & ~t.is_return & t.category.notnull())
        top = t.group_by("category").aggregate(spend=t.amount.sum()).order_by(ibis.desc("spend")).limit(k)
        return tuple(str(c) for c in top.execute()["category"])

    def every_category(self, before: pd.Timestamp) -> FeatureSpec:
        """The features with every category's share (bought before ``before``): what the online store holds, so a
        model trained on the top k finds its columns among them."""
        return FeatureSpec(categories=self.top_categories(before, k=10_000))

    def entities(self, cutoffs: list[pd.Timestamp], customer_id: str | None = None) -> ir.Table:
        """Every customer (or the one named) who had signed up before a cutoff, at that cutoff."""
        cuts = ibis.memtable(pd.DataFrame({"cutoff": pd.to_datetime(list(cutoffs)).astype("datetime64[ns]")}))
        c = self.customers
        if customer_id is not None:
            c = c.filter(c.customer_id == str(customer_id))
        pairs = c.select("customer_id", "signup_at").cross_join(cuts)
        return pairs.filter(pairs.signup_at < pairs.cutoff).select(*KEYS)

    def features(self, entities: ir.Table, spec: FeatureSpec) -> ir.Table:
        return customer_features(entities, self.customers, self.transactions, self.events, spec)

    def offline(self, cutoffs: list[pd.Timestamp], spec: FeatureSpec) -> pd.DataFrame:
        return collect(self.features(self.entities(cutoffs), spec))

    def features_for(self, customer_id: str, as_of: pd.Timestamp, spec: FeatureSpec) -> dict[str, Any]:
        """The online path: one customer's features at ``as_of`` from the same definitions and the same entity
        rule as a training frame (a known customer who had signed up before ``as_of``)."""
        row = collect(self.features(self.entities([as_of], customer_id), spec))
        if row.empty:
            raise UnknownCustomer(f"customer {customer_id!r} is not known in {self.dataset_dir.name} before {as_of}")
        return {k: (None if pd.isna(v) else v) for k, v in row.iloc[0].items()}

    def training_frame(self, cutoffs: list[pd.Timestamp], horizon_days: int, spec: FeatureSpec,
                       observed_until: pd.Timestamp | None = None) -> pd.DataFrame:
        """Features joined with labels, one row per (customer, cutoff), provenance in ``frame.attrs``."""
        observed_until = observed_until if observed_until is not None else self.observed_until()
        check_horizon(list(cutoffs), horizon_days, observed_until)
        entities = self.entities(cutoffs)
        features = self.features(entities, spec)
        labels = customer_labels(entities, self.transactions, horizon_days, spec)
        frame = collect(attach(features, labels).order_by(KEYS))
        frame.attrs.update(self.provenance(cutoffs, horizon_days, spec, observed_until))
        return frame

    def provenance(self, cutoffs: list[pd.Timestamp], horizon_days: int | None, spec: FeatureSpec,
                   observed_until: pd.Timestamp | None) -> dict[str, Any]:
        return {
            "feature_version": spec.version,
            "feature_columns": spec.columns,
            "label_columns": [*LABEL_COLUMNS, *category_label_columns(spec).values()] if horizon_days else [],
            "categories": list(spec.categories),
            "cutoffs": [str(pd.Timestamp(c)) for c in cutoffs],
            "horizon_days": horizon_days,
            "observed_until": str(observed_until) if observed_until is not None else None,
            "events_until": str(self.events_until()),
            "definition_fingerprint": definition_fingerprint(spec),
            "data_fingerprint": self.fingerprint(),
            "dataset": self.dataset_dir.name,
        }
