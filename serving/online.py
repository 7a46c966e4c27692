"""The online feature store: each customer's latest features, looked up by id at request time.

``personalize materialize DATASET`` computes, at one ``as_of`` (default: the day after the data set's last
transaction or event), every customer's point-in-time features from the same Ibis definitions as the training
frames (:class:`features.store.FeatureStore`), and their purchase-cycle summary (:func:`training.cycle.
customer_summary`), and writes both to the online store in one transaction, so a running server reads either the
old snapshot or the new one, never half of each.

Two back ends, chosen by URL:

- ``sqlite:///path`` (the embedded default, ``<home>/online/<dataset>.sqlite``): one row per customer, WAL mode so
  readers never wait for a writer;
- ``redis://host:port/db``: one hash per customer (``personalize:<dataset>:<customer_id>``), for several servers
  sharing one store. Needs the ``redis`` package and a server.

A record is ``{"features": {...}, "cycle": {...}, "profile": {...}}``: the blocks keep their own names (features and
cycle both have a ``frequency``, with different meanings). The profile holds what decisions need besides scores:
``consent`` (from the customers table), the rule ``segments`` and primary ``segment`` (:mod:`features.segments`)
and, when a clustering model is the champion, the behavioural ``cluster``.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)

Record = dict[str, dict[str, Any]]


class OnlineStoreError(PersonalizeError):
    """The online store cannot be opened or has not been materialized."""


class OnlineStore(Protocol):
    def get_many(self, customer_ids: list[str]) -> dict[str, Record]: ...

    def write(self, records: dict[str, Record], meta: dict[str, Any]) -> int: ...

    def meta(self) -> dict[str, Any]: ...

    def delete(self, customer_ids: list[str]) -> int: ...

    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    """JSON-safe scalars: NaN and missing become null, numpy scalars plain Python."""
    if value is None:
        return None
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, pd.Timestamp):
        return str(value)
    return value


class SQLiteOnlineStore:
    """Embedded store: one SQLite file, a connection per thread (sqlite3 connections are not shared)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    def _con(self, create: bool = False) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            if not create and not self.path.exists():
                raise OnlineStoreError(f"no online store at {self.path}; run `personalize materialize` first")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("CREATE TABLE IF NOT EXISTS customers (customer_id TEXT PRIMARY KEY, features TEXT, "
                        "cycle TEXT, profile TEXT)")
            columns = {row[1] for row in con.execute("PRAGMA table_info(customers)")}
            if "profile" not in columns:  # a store materialized before profiles existed
                con.execute("ALTER TABLE customers ADD COLUMN profile TEXT")
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._local.con = con
        return con

    def get_many(self, customer_ids: list[str]) -> dict[str, Record]:
        if not customer_ids:
            return {}
        marks = ",".join("?" * len(customer_ids))
        rows = self._con().execute(f"SELECT customer_id, features, cycle, profile FROM customers WHERE customer_id "
                                   f"IN ({marks})", customer_ids).fetchall()
        return {cid: {"features": json.loads(f) if f else {}, "cycle": json.loads(c) if c else {},
                      "profile": json.loads(p) if p else {}} for cid, f, c, p in rows}

    def write(self, records: dict[str, Record], meta: dict[str, Any]) -> int:
        con = self._con(create=True)
        rows = [(cid, json.dumps(r.get("features") or {}), json.dumps(r.get("cycle") or {}),
                 json.dumps(r.get("profile") or {})) for cid, r in records.items()]
        with con:  # one transaction: readers see the old snapshot or the new one
            con.execute("DELETE FROM customers")
            con.executemany("INSERT INTO customers (customer_id, features, cycle, profile) VALUES (?, ?, ?, ?)",
                            rows)
            con.execute("DELETE FROM meta")
            con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        return len(rows)

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._con().execute("SELECT key, value FROM meta")}

    def delete(self, customer_ids: list[str]) -> int:
        con = self._con()
        with con:
            cur = con.executemany("DELETE FROM customers WHERE customer_id = ?", [(c,) for c in customer_ids])
        return cur.rowcount

    def count(self) -> int:
        return int(self._con().execute("SELECT COUNT(*) FROM customers").fetchone()[0])

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


class RedisOnlineStore:
    """Shared store on a Redis server: a hash per customer, written in pipelined chunks."""

    CHUNK = 5000

    def __init__(self, url: str, dataset: str) -> None:
        try:
            import redis
        except ImportError:  # pragma: no cover - redis is a dependency
            raise OnlineStoreError("the Redis online store needs the `redis` package") from None
        self.client = redis.Redis.from_url(url, socket_connect_timeout=3)
        self.prefix = f"personalize:{dataset}:"
        try:
            self.client.ping()
        except Exception as exc:
            raise OnlineStoreError(f"cannot reach the Redis online store at {url}: {exc}") from None

    def _key(self, customer_id: str) -> str:
        return f"{self.prefix}c:{customer_id}"

    def get_many(self, customer_ids: list[str]) -> dict[str, Record]:
        pipe = self.client.pipeline(transaction=False)
        for cid in customer_ids:
            pipe.hmget(self._key(cid), "features", "cycle", "profile")
        out = {}
        for cid, (f, c, p) in zip(customer_ids, pipe.execute()):
            if f is not None or c is not None:
                out[cid] = {"features": json.loads(f) if f else {}, "cycle": json.loads(c) if c else {},
                            "profile": json.loads(p) if p else {}}
        return out

    def write(self, records: dict[str, Record], meta: dict[str, Any]) -> int:
        # A new generation of keys, then the pointer moves, then the old generation goes: readers see one or
        # the other.
        old = set(self.client.scan_iter(match=f"{self.prefix}c:*", count=10_000))
        items = list(records.items())
        for start in range(0, len(items), self.CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for cid, r in items[start:start + self.CHUNK]:
                key = self._key(cid)
                pipe.hset(key, mapping={"features": json.dumps(r.get("features") or {}),
                                        "cycle": json.dumps(r.get("cycle") or {}),
                                        "profile": json.dumps(r.get("profile") or {})})
                old.discard(key.encode())
            pipe.execute()
        if old:
            self.client.delete(*old)
        self.client.set(f"{self.prefix}meta", json.dumps(meta))
        return len(items)

    def meta(self) -> dict[str, Any]:
        raw = self.client.get(f"{self.prefix}meta")
        if raw is None:
            raise OnlineStoreError("the Redis online store has not been materialized; run `personalize materialize`")
        return json.loads(raw)

    def delete(self, customer_ids: list[str]) -> int:
        return int(self.client.delete(*[self._key(c) for c in customer_ids])) if customer_ids else 0

    def close(self) -> None:
        self.client.close()


def default_url(home: Path, dataset: str) -> str:
    return f"sqlite:///{(Path(home) / 'online' / f'{dataset}.sqlite').resolve()}"


def open_store(url: str, dataset: str) -> OnlineStore:
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        return SQLiteOnlineStore(Path(url[len("sqlite:///"):]))
    if parsed.scheme in ("redis", "rediss", "unix"):
        return RedisOnlineStore(url, dataset)
    raise OnlineStoreError(f"unknown online store URL {url!r}: use sqlite:///path or redis://host:port/db")


# --- materialization -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaterializeReport:
    dataset: str
    as_of: pd.Timestamp
    customers: int
    with_cycle: int
    feature_version: str
    feature_columns: int
    url: str
    seconds: float
    clusters: str = ""  # the clustering champion that gave each customer a cluster, or why none did
    clustered: bool = False


def default_as_of(store: Any) -> pd.Timestamp:
    """The day after the last transaction or event: every known row counts."""
    ends = [store.observed_until(), store.events_until()]
    return max(pd.Timestamp(e) for e in ends if e is not None).floor("D") + pd.Timedelta(days=1)


def build_records(features: pd.DataFrame, cycle: pd.DataFrame | None,
                  profiles: dict[str, dict[str, Any]] | None = None) -> dict[str, Record]:
    """One record per customer from the feature rows, the cycle summary and the profiles (pure; no I/O)."""
    feature_columns = [c for c in features.columns if c not in ("customer_id", "cutoff")]
    records: dict[str, Record] = {}
    for row in features[["customer_id", *feature_columns]].itertuples(index=False, name=None):
        records[str(row[0])] = {"features": {c: _clean(v) for c, v in zip(feature_columns, row[1:])}, "cycle": {},
                                "profile": {}}
    if cycle is not None and not cycle.empty:
        cycle_columns = [c for c in cycle.columns if c != "customer_id"]
        for row in cycle[["customer_id", *cycle_columns]].itertuples(index=False, name=None):
            record = records.setdefault(str(row[0]), {"features": {}, "cycle": {}, "profile": {}})
            record["cycle"] = {c: _clean(v) for c, v in zip(cycle_columns, row[1:])}
    for cid, profile in (profiles or {}).items():
        if cid in records:
            records[cid]["profile"] = {k: _clean(v) for k, v in profile.items()}
    return records


def profiles(features: pd.DataFrame, customers: pd.DataFrame, segments: Any,
             clusters: Any | None = None) -> dict[str, dict[str, Any]]:
    """Each customer's consent, rule segments and primary segment (and cluster, given a fitted clustering model's
    labels as a Series indexed like ``features``). Pure."""
    from features.segments import assign

    assigned = assign(features, segments)
    consent = dict(zip(customers["customer_id"].astype(str), customers["consent"].fillna(False).astype(bool)))
    out = {}
    for i, cid in enumerate(features["customer_id"].astype(str)):
        out[cid] = {"consent": bool(consent.get(cid, False)), "segments": list(assigned["segments"].iat[i]),
                    "segment": assigned["segment"].iat[i]}
        if clusters is not None:
            out[cid]["cluster"] = int(clusters.iat[i])
    return out


def champion_clusters(tracking_uri: str | None, features: pd.DataFrame,
                      name: str = "customer_segments") -> tuple[pd.Series | None, str]:
    """The behavioural cluster of each row by the clustering champion (``<name>@champion``, by default
    ``customer_segments``) and which version gave them; or None and why not: there is no champion (clustering is
    optional), or it was fitted on another data set's features (a category share these customers do not have),
    which would not cluster them."""
    if tracking_uri is None:
        return None, "no tracking store"
    try:
        import mlflow

        from personalize.settings import model_uri
        from training.registry import connect

        client = connect(tracking_uri)
        version = client.get_model_version_by_alias(name, "champion").version
        mlflow.set_tracking_uri(tracking_uri)
        model = mlflow.pyfunc.load_model(model_uri(name, "champion"))
    except Exception as exc:  # no clustering champion: profiles without a cluster
        log.info("no clustering champion (%s): profiles carry no cluster", str(exc).splitlines()[0][:120])
        return None, f"no {name} champion"
    schema = model.metadata.get_input_schema()
    missing = [c for c in (schema.input_names() if schema is not None else []) if c not in features.columns]
    if missing:
        why = (f"{name} v{version} was fitted on features these customers do not have "
               f"({', '.join(missing[:3])}{'…' if len(missing) > 3 else ''}): cluster this data set and promote it")
        log.warning("profiles carry no cluster: %s", why)
        return None, why
    return pd.Series(list(model.predict(features)), index=features.index), f"{name} v{version}"


def purchase_summary(store: Any, as_of: pd.Timestamp) -> pd.DataFrame:
    """Every customer's purchase-cycle summary from the purchases (returns left out) before ``as_of``: what the
    online store holds and the purchase-cycle model reads. Raises :class:`training.cycle.CycleError` when there
    is none to make."""
    from training.cycle import customer_summary

    transactions = store.transactions.select("customer_id", "timestamp", "amount", "is_return").to_pandas()
    transactions = transactions[~transactions["is_return"].fillna(False).astype(bool)]
    return customer_summary(transactions[transactions["timestamp"] < as_of], as_of.floor("D"))


def champion_cycle_scores(tracking_uri: str | None, cycle: pd.DataFrame | None) -> dict[str, dict[str, Any]]:
    """Every customer's next-purchase scores by the purchase-cycle champion, in one vectorized call: what a decision
    reads (``days_to_next``, ``p_next``) without scoring one customer at request time (a BG/NBD model takes most of
    a second per customer there). Stamped with the champion's version: the server uses them only while that version
    is still the champion. Empty without a champion or a summary."""
    if tracking_uri is None or cycle is None or cycle.empty:
        return {}
    try:
        from serving.scoring import load
        from training.registry import connect

        loaded = load(connect(tracking_uri), "purchase_cycle", "champion")
    except Exception as exc:  # no cycle champion: decisions score live, or go without
        log.info("no purchase-cycle champion (%s): no precomputed cycle scores", str(exc).splitlines()[0][:120])
        return {}
    scorer = loaded.scorer
    frame = cycle.reset_index(drop=True)
    records = [{**{c: _clean(v) for c, v in zip(scorer.inputs, row)}, "customer_id": str(cid)}
               for cid, *row in frame[["customer_id", *scorer.inputs]].itertuples(index=False, name=None)]
    predicted = scorer.predict(records, scorer.horizon_days)
    return {r["customer_id"]: {"cycle_version": loaded.version, "days_to_next": _clean(p.get("expected_days_to_next")),
                               "p_next": _clean(p.get("p_purchase"))}
            for r, p in zip(records, predicted)}


def materialize(dataset_dir: Path, url: str, as_of: pd.Timestamp | None = None,
                categories: Iterable[str] | None = None, segments: Any | None = None,
                tracking_uri: str | None = None, engine: str = "duckdb",
                clusters_model: str = "customer_segments") -> MaterializeReport:
    """Compute every customer's features, cycle summary and profile at ``as_of`` and replace the online store's
    content. ``engine`` computes the features on DuckDB or Spark (:mod:`features.engines`); each profile's cluster
    comes from the champion of the registered clustering model ``clusters_model``."""
    import time

    from features.definitions import FeatureSpec
    from features.segments import check_columns, load_segments
    from features.store import FeatureStore
    from personalize.errors import PersonalizeError
    from training.cycle import CycleError

    started = time.perf_counter()
    segments = segments if segments is not None else load_segments()
    from features.engines import connect

    store = FeatureStore(dataset_dir, connect(engine) if engine != "duckdb" else None)
    as_of = pd.Timestamp(as_of) if as_of is not None else default_as_of(store)
    spec = FeatureSpec(categories=tuple(categories)) if categories is not None else store.every_category(as_of)
    check_columns(segments, spec.columns)
    features = store.offline([as_of], spec)
    if features.empty:
        raise PersonalizeError(f"no customer of {dataset_dir.name} has a row before {as_of}: nothing to materialize "
                               f"(the data runs to {store.observed_until()}; the online store is left as it is)")
    try:
        cycle = purchase_summary(store, as_of)
    except CycleError:
        cycle = None
    customers = store.customers.select("customer_id", "consent").to_pandas()
    clusters, clustered_by = champion_clusters(tracking_uri, features, clusters_model)
    profile = profiles(features, customers, segments, clusters)
    for cid, scores in champion_cycle_scores(tracking_uri, cycle).items():
        if cid in profile:
            profile[cid]["cycle_scores"] = scores
    records = build_records(features, cycle, profile)
    meta = {"dataset": dataset_dir.name, "as_of": str(as_of), "feature_version": spec.version,
            "feature_columns": spec.columns, "categories": list(spec.categories),
            "data_fingerprint": store.fingerprint(), "customers": len(records),
            "segments": segments.names, "segment_config": segments.model_dump(mode="json"),
            "clusters": clusters is not None}
    online = open_store(url, dataset_dir.name)
    try:
        written = online.write(records, meta)
    finally:
        online.close()
    log.info("materialized %d customers of %s at %s into %s", written, dataset_dir.name, as_of, url)
    return MaterializeReport(dataset_dir.name, as_of, written, 0 if cycle is None else len(cycle), spec.version,
                             len(spec.columns), url, time.perf_counter() - started, clustered_by,
                             clusters is not None)
