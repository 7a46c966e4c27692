"""Erasure of one customer (``personalize forget <customer_id>``): find them in every store the platform owns,
remove them, prove nothing is left, and leave an audit line that does not re-identify them.

Where a customer can be, and how each store is erased (all under ``Settings.home`` unless configured elsewhere):

- **raw tables** ``data/<ds>/*.parquet`` (customers, transactions, events, a synthetic set's ``truth``, a labeled
  set's ``table`` by its ``id_column`` from ``ingest_report.json``): the rows are dropped and the file rewritten
  with the same schema, Parquet metadata, codec, row-group size and row order;
- **quarantine** ``quarantine/<ds>/<table>.parquet``: rejected rows *as read*, found by the id ingest parsed
  (``_customer_id``, whatever the source column is called), else as text in a source column (``customer_id``,
  ``CustomerID``, the labeled id column, ...; ``"17850.0"`` counts as ``"17850"``: files quarantined before
  ``_customer_id`` existed) or inside an unreadable line (``_raw_line``); a file left empty is removed, as ingest
  does;
- **feature and label frames** ``features/<ds>/*.parquet``: rows dropped, provenance (``b"personalize"``) kept
  as it was. The recorded ``data_fingerprint`` then names the snapshot before the erasure;
- **online store**: every ``online/*.sqlite`` under home, and the configured one (``online_url``, else
  ``PERSONALIZE_ONLINE_STORE``; a Redis URL is searched for every data set). SQLite files are vacuumed after the
  delete and their write-ahead log truncated, so the freed pages do not keep the deleted bytes;
- **prediction log** ``settings.log_root``: segments holding the customer's pseudonymized ``customer_key`` are
  rewritten without those rows (temporary file in the same folder, atomic rename, as the log writes); a segment
  left empty is removed;
- **decisions, feedback, bandit posteriors** (``settings.decisions_path`` or ``PERSONALIZE_DECISIONS``):
  :meth:`serving.decision_store.DecisionStore.forget` by key, which also takes the customer's trials and
  successes out of the posteriors; then vacuumed;
- **MLflow artifacts**: every local artifact location of the tracking store's experiments (and
  ``home/mlartifacts``): Parquet files with an id column (the held-out frames ``heldout/heldout.parquet``,
  logged by every training run) are rewritten, JSON input examples (``input_example.json``,
  ``serving_input_example.json``: the purchase-cycle model's has ``customer_id``) lose the customer's rows. A
  remote artifact store is not touched: each training run's held-out frame there is reported as not erased;
- **anything else** under home: a Parquet file with a ``customer_id`` or ``customer_key`` column (batch scores
  ``scores/<model>/v<n>/scores.parquet``) is rewritten the same way.

What holds row-level values but no id or key is reported as ``unattributed`` and left alone: Evidently snapshots
and their HTML (the drift plots keep every value of the monitored window's features and scores, in window
order; the reference only as summaries), MLflow model input examples without an id column and fitted
purchase-cycle models (per-customer summaries by position). Models trained on data that held the customer are
listed (``trained_models``): their parameters are not erased; retrain and promote to remove the customer's
influence.

:func:`find` is the check: every store above searched by id and by key, then a last resort over every file under
home, the log and the local artifact stores (except the audit log): Parquet read logically (pages may be
compressed) and every file searched byte for byte, for the id standing alone (``17850`` is not found inside the
float ``0.6498178506375228``, but is in ``17850.0`` and ``customer_17850.csv``), and a numeric id also in the integer
columns named like ids. A hit there is reported as ``scan:<file>``; for a short numeric id it may still be a
coincidence (the same number in another role), worth a look rather than a deletion.

The key is ``pseudonymize(customer_id, salt)`` with the server's salt (``PERSONALIZE_ID_SALT`` or
``<home>/secrets/id_salt``): run ``forget`` with the same environment as the server. Without any salt the keyed
stores (prediction log, decisions) cannot be searched and are reported as not erased. The audit log
(``<home>/erasure/log.jsonl``) keeps the key, never the id: who holds the salt and a guess can confirm the guess,
nobody can read the id back.

Limits: a running server may log the customer again after the erasure (stop serving them first, or run
``forget`` again); Redis persistence (RDB/AOF) and file-system blocks freed by a rewrite are outside reach.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import re
import shutil
import sqlite3
import stat
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from personalize.errors import first_line
from personalize.settings import Settings, redact
from serving.predlog import log_lock

log = logging.getLogger(__name__)

__all__ = ["AUDIT_LOG", "ErasureReport", "find", "forget"]

AUDIT_LOG = Path("erasure") / "log.jsonl"  # under home
ID_COLUMN = "customer_id"
KEY_COLUMN = "customer_key"
RAW_LINE = "_raw_line"  # quarantine's column for a line no column mapping could place (features.ingest)
PARSED_ID = "_customer_id"  # quarantine's column for the row's customer id as parsed, whatever the source names it
# Source column names (lower case, letters and digits only) that hold a customer id in a quarantined row.
_ID_NAMES = {"customerid", "customer", "custid", "clientid", "customerno", "customernumber", "userid"}
_ORDER = {"raw": 0, "features": 1, "quarantine": 2, "predictions": 3, "artifacts": 4, "other": 5}
_CODECS = {"UNCOMPRESSED": "none", "LZ4_RAW": "lz4"}
_REMOTE = "not erased: remote artifact store, erase by hand"


@dataclass
class ErasureReport:
    """What one erasure removed (or, for a dry run, would remove), per store location, and what is left."""

    customer_key: str | None
    dry_run: bool = False
    removed: dict[str, int] = field(default_factory=dict)  # location -> rows
    stores: dict[str, str] = field(default_factory=dict)  # location -> kind of store
    bandit_trials: int = 0  # trials taken out of the bandits' posteriors
    files_rewritten: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)
    not_erased: list[dict[str, str]] = field(default_factory=list)  # {"store", "where", "why"}
    unattributed: list[dict[str, str]] = field(default_factory=list)  # row-level values without id or key
    trained_models: list[str] = field(default_factory=list)  # "name/version" trained on data with the customer
    remaining: dict[str, int] = field(default_factory=dict)  # find() after the erasure
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.removed.values())

    @property
    def by_store(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for location, rows in self.removed.items():
            kind = self.stores.get(location, "other")
            out[kind] = out.get(kind, 0) + rows
        return out

    @property
    def clean(self) -> bool:
        """Nothing of the customer was found after the erasure (and nothing was left unerased)."""
        return not self.remaining and not self.not_erased

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "by_store": self.by_store, "clean": self.clean}


# --- where things are --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Who:
    customer_id: str
    key: str | None


@dataclass(frozen=True)
class _Rule:
    """How one file is searched: exact id columns, id-like text columns (quarantine), where its rows count."""

    store: str
    dataset: str | None = None
    ids: frozenset[str] = frozenset()  # compared exactly with the customer id
    loose_ids: frozenset[str] = frozenset()  # text as read: trimmed, "17850.0" == "17850" (quarantine)
    loose_names: bool = False  # also any column whose name looks like a customer id (quarantine)
    raw_lines: bool = False  # also unreadable lines, split into fields (quarantine)
    drop_empty: bool = False  # a file left without rows is removed
    aggregate: str | None = None  # report under this location instead of the file's


@dataclass
class _Layout:
    home: Path
    datasets: list[str]
    labeled_ids: dict[str, str]  # data set -> id column of its labeled table
    log_root: Path
    decisions: Path
    online: list[tuple[str, str, str]]  # (location, url, data set)
    artifact_dirs: list[Path]
    problems: list[dict[str, str]]
    client: Any = None  # MlflowClient when the tracking store answered

    @property
    def roots(self) -> list[Path]:
        """The folders to walk: home, the log, the local artifact stores; none inside another."""
        return _outermost([self.home, self.log_root, *self.artifact_dirs])

    @property
    def exclude(self) -> list[Path]:
        return [self.home / AUDIT_LOG.parent]

    def where(self, path: Path) -> str:
        return path.relative_to(self.home).as_posix() if path.is_relative_to(self.home) else str(path)


def _outermost(folders: list[Path]) -> list[Path]:
    out: list[Path] = []
    for folder in sorted(set(folders), key=lambda p: len(p.parts)):
        if not any(folder.is_relative_to(o) for o in out):
            out.append(folder)
    return out


class _Tally:
    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.stores: dict[str, str] = {}
        self.paths: set[Path] = set()
        self.rewritten: list[str] = []
        self.deleted: list[str] = []
        self.problems: list[dict[str, str]] = []
        self.datasets: set[str] = set()
        self.bandit_trials = 0

    def add(self, location: str, store: str, rows: int) -> None:
        if rows:
            self.rows[location] = self.rows.get(location, 0) + rows
            self.stores[location] = store

    def problem(self, store: str, where: str, why: str) -> None:
        self.problems.append({"store": store, "where": where, "why": why})


def _env(environ: dict[str, str] | None) -> dict[str, str]:
    return dict(os.environ if environ is None else environ)


def _who(settings: Settings, customer_id: str, env: dict[str, str]) -> _Who:
    """The customer's id and key. Without a salt (no ``PERSONALIZE_ID_SALT``, no salt file) there is no key: a
    new salt is not created here, it would give a key nothing was ever logged under."""
    from serving.predlog import load_salt, pseudonymize

    customer_id = str(customer_id).strip()
    if not customer_id:
        raise ValueError("a customer id is needed (an empty one would match every missing id)")
    if env.get("PERSONALIZE_ID_SALT") or (settings.home / "secrets" / "id_salt").exists():
        return _Who(customer_id, pseudonymize(customer_id, load_salt(settings.home, env)))
    return _Who(customer_id, None)


def _keyless(layout: _Layout) -> list[dict[str, str]]:
    """Stores keyed by the pseudonymized id that cannot be searched without the salt."""
    keyed = [(store, path) for store, path, present in (
        ("predictions", layout.log_root, any(layout.log_root.glob("date=*/part-*.parquet"))),
        ("decisions", layout.decisions, layout.decisions.exists())) if present]
    return [{"store": store, "where": layout.where(path),
             "why": "not searched: no pseudonymization salt (PERSONALIZE_ID_SALT unset, no secrets/id_salt under "
                    "home); run with the server's PERSONALIZE_ID_SALT"} for store, path in keyed]


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def _local_path(uri: str | None) -> Path | None:
    """The folder of a local artifact URI (``file://``, a plain path), None for a remote one."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a path (or a Windows drive letter)
        return Path(uri).resolve()
    return None


def _layout(settings: Settings, online_url: str | None, env: dict[str, str]) -> _Layout:
    from serving.online import default_url

    home = settings.home.resolve()
    datasets = sorted({p.name for base in ("data", "quarantine", "features") for p in (home / base).glob("*")
                       if p.is_dir()} | {p.stem for p in (home / "online").glob("*.sqlite")})
    labeled: dict[str, str] = {}
    for ds in datasets:
        report = home / "data" / ds / "ingest_report.json"
        try:
            id_column = json.loads(report.read_text()).get("id_column") if report.exists() else None
        except (OSError, ValueError):
            id_column = None
        if id_column:
            labeled[ds] = str(id_column)
    online: dict[tuple[str, str], tuple[str, str, str]] = {}
    for path in sorted((home / "online").glob("*.sqlite")):
        online[(str(path), "")] = (f"online:{path.stem}", default_url(home, path.stem), path.stem)
    configured = online_url or env.get("PERSONALIZE_ONLINE_STORE")
    if configured:
        path = _sqlite_path(configured)
        if path is not None:
            path = path.resolve()
            online.setdefault((str(path), ""), (f"online:{path.stem if path.parent == home / 'online' else path}",
                                                f"sqlite:///{path}", path.stem))
        else:
            for ds in datasets:
                online.setdefault((configured, ds), (f"online:{redact(configured)}#{ds}", configured, ds))
    decisions = Path(env["PERSONALIZE_DECISIONS"]) if env.get("PERSONALIZE_DECISIONS") else settings.decisions_path
    layout = _Layout(home, datasets, labeled, settings.log_root.resolve(), decisions.resolve(),
                     list(online.values()), [home / "mlartifacts"], [])
    _mlflow(settings, layout)
    return layout


def _mlflow(settings: Settings, layout: _Layout) -> None:
    """Add the tracking store's local artifact locations to the layout; a remote location's training runs become
    'not erased' problems (their held-out frames hold customer ids)."""
    uri = settings.tracking_uri
    db = _sqlite_path(uri)
    if db is not None and not db.exists():
        return  # nothing was ever tracked; do not create a store by looking
    try:
        from mlflow.entities import ViewType
        from mlflow.tracking import MlflowClient

        from training.registry import HELDOUT_ARTIFACT, _no_retries

        with _no_retries():
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            experiments = _pages(lambda token: client.search_experiments(view_type=ViewType.ALL, max_results=1000,
                                                                         page_token=token))
            for experiment in experiments:
                local = _local_path(experiment.artifact_location)
                if local is not None:
                    layout.artifact_dirs.append(local)
                    continue
                runs = _pages(lambda token: client.search_runs([experiment.experiment_id],
                                                               run_view_type=ViewType.ALL, max_results=1000,
                                                               page_token=token))
                for run in runs:
                    tags = run.data.tags
                    # training runs log their held-out rows with ids (a forecast's held-out frame is a daily series)
                    if tags.get("kind") != "forecast" and ("heldout_target" in tags or tags.get("kind") == "training"):
                        layout.problems.append({"store": "artifacts", "why": _REMOTE,
                                                "where": f"{run.info.artifact_uri.rstrip('/')}/{HELDOUT_ARTIFACT}"})
        layout.client = client
    except Exception as exc:  # an unreachable store must not stop the erasure of everything else
        layout.problems.append({"store": "artifacts", "where": redact(uri),
                                "why": f"the MLflow tracking store did not answer ({first_line(exc)}): the runs' "
                                       "artifacts outside home were not searched"})


def _pages(call: Any) -> Iterator[Any]:
    token = None
    while True:
        page = call(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def _rule(layout: _Layout, path: Path) -> _Rule:
    all_ids = frozenset({ID_COLUMN, *layout.labeled_ids.values()})
    if path.is_relative_to(layout.log_root):
        return _Rule("predictions", drop_empty=True, aggregate="predictions")
    if path.is_relative_to(layout.home):
        parts = path.relative_to(layout.home).parts
        if len(parts) > 2 and parts[0] in ("data", "features", "quarantine"):
            ds = parts[1]
            ids = frozenset({ID_COLUMN, *([layout.labeled_ids[ds]] if ds in layout.labeled_ids else [])})
            if parts[0] == "quarantine":
                return _Rule("quarantine", ds, loose_ids=ids | {PARSED_ID}, loose_names=True, raw_lines=True,
                             drop_empty=True)
            return _Rule("raw" if parts[0] == "data" else "features", ds, ids=ids)
    if any(path.is_relative_to(d) for d in layout.artifact_dirs):
        return _Rule("artifacts", ids=all_ids)
    return _Rule("other", ids=all_ids)


def _files(layout: _Layout) -> Iterator[Path]:
    for root in layout.roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            folder = Path(dirpath)
            dirnames[:] = sorted(n for n in dirnames if not any((folder / n).is_relative_to(e) for e in layout.exclude))
            for name in sorted(filenames):
                path = folder / name
                try:
                    if stat.S_ISREG(path.lstat().st_mode):
                        yield path
                except OSError:
                    continue


# --- matching ----------------------------------------------------------------------------------------------------
def _loose(value: Any) -> str | None:
    """An id as quarantine keeps it (text as read): trimmed, unquoted, ``17850.0`` read as ``17850``."""
    if value is None:
        return None
    text = str(value).strip().strip("\"'").strip()
    return text.split(".", 1)[0] if re.fullmatch(r"\d+\.0+", text) else text


def _fields(line: str | None) -> set[str | None]:
    return set() if line is None else {_loose(f) for f in re.split(r"[,;\t|]", line)}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _equal(column: pa.ChunkedArray, value: str) -> np.ndarray:
    try:
        text = column if pa.types.is_string(column.type) else pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return np.zeros(len(column), dtype=bool)
    return np.asarray(pc.fill_null(pc.equal(text, pa.scalar(value, pa.string())), False), dtype=bool)


def _parquet_mask(path: Path, rule: _Rule, who: _Who) -> np.ndarray | None:
    """The rows of a Parquet file that name the customer, None when it has no column that could."""
    names = pq.read_schema(path).names
    exact = {c: who.customer_id for c in names if c in rule.ids}
    if who.key is not None and KEY_COLUMN in names:
        exact[KEY_COLUMN] = who.key
    loose = [c for c in names
             if c not in exact and (c in rule.loose_ids or (rule.loose_names and _slug(c) in _ID_NAMES))]
    lines = [RAW_LINE] if rule.raw_lines and RAW_LINE in names else []
    if not (exact or loose or lines):
        return None
    with pq.ParquetFile(path) as pf:
        table = pf.read(columns=list(dict.fromkeys([*exact, *loose, *lines])))
    mask = np.zeros(table.num_rows, dtype=bool)
    for column, value in exact.items():
        mask |= _equal(table[column], value)
    target = _loose(who.customer_id)
    for column in loose:
        mask |= np.array([_loose(v) == target for v in table[column].to_pylist()], dtype=bool)
    for column in lines:
        mask |= np.array([target in _fields(v) for v in table[column].to_pylist()], dtype=bool)
    return mask


def _replace(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename over ``path`` (atomic on POSIX)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rewrite_parquet(path: Path, drop: np.ndarray, drop_empty: bool) -> bool:
    """Rewrite without the dropped rows, keeping schema, metadata, row order, codec and row-group size; returns
    whether the file was removed instead (nothing left and ``drop_empty``)."""
    with pq.ParquetFile(path) as pf:
        meta = pf.metadata
        table = pf.read()
    kept = table.filter(pa.array(~drop))
    if drop_empty and kept.num_rows == 0:
        path.unlink()
        return True
    codec = meta.row_group(0).column(0).compression if meta.num_row_groups and meta.num_columns else "SNAPPY"
    group = max((meta.row_group(i).num_rows for i in range(meta.num_row_groups)), default=0)
    _replace(path, lambda tmp: pq.write_table(kept, tmp, compression=_CODECS.get(codec, codec.lower()),
                                              row_group_size=group or None))
    return False


def _json_rows(obj: Any, columns: frozenset[str], values: set[str]) -> tuple[Any, int]:
    """An MLflow input example without the customer's rows (split or records orient, possibly wrapped)."""
    if isinstance(obj, dict):
        if isinstance(obj.get("columns"), list) and isinstance(obj.get("data"), list):
            at = [i for i, c in enumerate(obj["columns"]) if c in columns]
            keep = [r for r in obj["data"] if not (isinstance(r, list) and any(
                i < len(r) and r[i] is not None and str(r[i]) in values for i in at))]
            return {**obj, "data": keep}, len(obj["data"]) - len(keep)
        removed, out = 0, {}
        for k, v in obj.items():
            out[k], n = _json_rows(v, columns, values) if isinstance(v, (dict, list)) else (v, 0)
            removed += n
        return out, removed
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        keep = [r for r in obj if not any(c in r and r[c] is not None and str(r[c]) in values for c in columns)]
        return keep, len(obj) - len(keep)
    return obj, 0


# An id stands alone where neither neighbour continues it: a letter or digit does (x17850, 178506), and so does a dot
# with digits on both sides (the float 0.6498178506375228, the time 00:09:20.178506, 17850.5), except a whole
# number's .0 (17850.0 is the id written as a float). Punctuation does not (17850.json, customer_17850, C-17850).
_ALNUM = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_DIGITS = frozenset(b"0123456789")
_DOT, _ZERO = ord("."), ord("0")


def _standalone(data: Any, at: int, after: int) -> bool:
    """Whether ``data[at:after]`` (bytes or a mmap) stands alone (the rule above)."""
    end = len(data)
    if at and (data[at - 1] in _ALNUM or (at >= 2 and data[at - 1] == _DOT and data[at - 2] in _DIGITS)):
        return False
    if after < end and data[after] in _ALNUM:
        return False
    if after + 1 < end and data[after] == _DOT and data[after + 1] in _DIGITS:
        k = after + 1
        while k < end and data[k] == _ZERO:
            k += 1
        return not (k < end and data[k] in _ALNUM)  # 17850.0 is the id; 17850.05 or 17850.0e3 another number
    return True


def _token_regex(value: str) -> str:
    """:func:`_standalone` as an RE2 pattern (Arrow's regex engine has no lookaround)."""
    return (rf"(?:^|[^A-Za-z0-9.]|(?:^|[^0-9])\.){re.escape(value)}(?:\.0+)?"
            r"(?:$|[^A-Za-z0-9.]|\.(?:$|[^0-9]))")


def _occurrences(data: Any, needle: bytes) -> int:
    """Occurrences of ``needle`` in ``data`` (bytes or a mmap) that stand alone (:func:`_standalone`)."""
    count, at = 0, data.find(needle)
    while at != -1:
        count += _standalone(data, at, at + len(needle))
        at = data.find(needle, at + 1)
    return count


def _contains(path: Path, needles: list[bytes]) -> int:
    """Occurrences of the needles in the file's bytes, each standing alone (:func:`_occurrences`)."""
    try:
        if path.stat().st_size == 0:
            return 0
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return sum(_occurrences(mm, needle) for needle in needles)
    except (OSError, ValueError):
        return 0


def _needles(who: _Who) -> list[bytes]:
    return [who.customer_id.encode(), *([who.key.encode()] if who.key else [])]


# --- the stores --------------------------------------------------------------------------------------------------
def _sweep(layout: _Layout, who: _Who, apply: bool, tally: _Tally) -> None:
    """Every Parquet file (and, in artifact stores, every JSON input example) that names the customer."""
    files = [(path, _rule(layout, path)) for path in _files(layout)]
    files.sort(key=lambda item: _ORDER[item[1].store])
    for path, rule in files:
        if path.name.startswith("."):
            continue  # a writer's temporary file: never read as data
        if path.suffix == ".parquet":
            _sweep_parquet(layout, path, rule, who, apply, tally)
        elif path.suffix == ".json" and rule.store == "artifacts" and _contains(path, _needles(who)):
            _sweep_json(layout, path, rule, who, apply, tally)


def _sweep_parquet(layout: _Layout, path: Path, rule: _Rule, who: _Who, apply: bool, tally: _Tally) -> None:
    where = layout.where(path)
    try:
        mask = _parquet_mask(path, rule, who)
    except Exception as exc:  # a damaged file must not stop the erasure of the rest
        tally.problem(rule.store, where, f"not searched: unreadable Parquet ({first_line(exc)})")
        return
    if mask is None or not mask.any():
        return
    rows = int(mask.sum())
    if apply:
        try:
            deleted = _rewrite_parquet(path, mask, rule.drop_empty)
        except Exception as exc:  # e.g. a read-only file: report it, erase the rest
            tally.problem(rule.store, where, f"not erased: the rewrite failed ({first_line(exc)})")
            return
    else:
        deleted = rule.drop_empty and rows == len(mask)
    tally.add(rule.aggregate or where, rule.store, rows)
    tally.paths.add(path)
    (tally.deleted if deleted else tally.rewritten).append(where)
    if rule.store == "raw" and rule.dataset:
        tally.datasets.add(rule.dataset)


def _sweep_json(layout: _Layout, path: Path, rule: _Rule, who: _Who, apply: bool, tally: _Tally) -> None:
    where = layout.where(path)
    try:
        text = path.read_text()
        obj = json.loads(text)
    except (OSError, ValueError):
        return  # not JSON after all: the scan reports the bytes
    kept, rows = _json_rows(obj, frozenset({*rule.ids, KEY_COLUMN}), {who.customer_id, *([who.key] if who.key else [])})
    if not rows:
        return
    if apply:
        indent = 2 if "\n" in text.strip() else None
        try:
            _replace(path, lambda tmp: tmp.write_text(json.dumps(kept, indent=indent)))
        except OSError as exc:
            tally.problem(rule.store, where, f"not erased: the rewrite failed ({first_line(exc)})")
            return
    tally.add(where, rule.store, rows)
    tally.paths.add(path)
    tally.rewritten.append(where)


def _compact_sqlite(path: Path) -> str | None:
    """Vacuum the database and truncate its write-ahead log, so deleted rows leave no bytes behind; the reason
    when that could not be done."""
    try:
        con = sqlite3.connect(path, timeout=30, isolation_level=None)
    except sqlite3.Error as exc:
        return first_line(exc)
    try:
        con.execute("PRAGMA secure_delete=ON")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("VACUUM")
        busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy and busy[0]:
            return "a reader kept the write-ahead log busy"
        return None
    except sqlite3.Error as exc:
        return first_line(exc)
    finally:
        con.close()


def _sqlite_files(path: Path) -> list[Path]:
    return [path, Path(f"{path}-wal")]


def _sqlite_residue(path: Path, who: _Who) -> bool:
    return any(_contains(f, _needles(who)) for f in _sqlite_files(path))


def _compact_if_needed(path: Path, store: str, where: str, who: _Who, removed: int, tally: _Tally) -> None:
    if not (removed or _sqlite_residue(path, who)):
        return
    failed = _compact_sqlite(path)
    if failed:
        tally.problem(store, where, f"rows deleted, but freed pages may keep their bytes until a VACUUM "
                                    f"({failed}); run forget again when the server is idle")


def _online(layout: _Layout, who: _Who, apply: bool, tally: _Tally) -> None:
    from serving.online import open_store

    for location, url, dataset in layout.online:
        path = _sqlite_path(url)
        if path is not None and not path.exists():
            continue
        try:
            store = open_store(url, dataset)
            try:
                found = len(store.get_many([who.customer_id]))
                removed = store.delete([who.customer_id]) if apply and found else 0
            finally:
                store.close()
        except Exception as exc:  # an unreachable Redis must not stop the rest
            tally.problem("online", location, f"not searched or not erased: the online store failed "
                                              f"({first_line(exc)})")
            continue
        tally.add(location, "online", removed if apply else found)
        if found and path is not None:
            tally.paths.update(_sqlite_files(path))  # the store reports them: the scan need not again
        if apply and path is not None:
            _compact_if_needed(path, "online", location, who, removed, tally)


def _decisions(layout: _Layout, who: _Who, reward: str, apply: bool, tally: _Tally) -> None:
    path = layout.decisions
    if who.key is None or not path.exists():
        return
    if apply:
        from serving.decision_store import DecisionStore

        store = DecisionStore(path)
        try:
            out = store.forget(who.key, reward)
        except sqlite3.Error as exc:  # locked past the timeout: report it, erase the rest
            tally.problem("decisions", layout.where(path), f"not erased ({first_line(exc)})")
            return
        finally:
            store.close()
        tally.add("decisions", "decisions", out["decisions"])
        tally.add("feedback", "feedback", out["feedback"])
        tally.bandit_trials += out["bandit_trials_removed"]
        _compact_if_needed(path, "decisions", layout.where(path), who, out["decisions"] + out["feedback"], tally)
        return
    con = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        decisions = con.execute("SELECT COUNT(*) FROM decisions WHERE customer_key = ?", (who.key,)).fetchone()[0]
        feedback, trials = con.execute(
            "SELECT COUNT(*), SUM(f.event = 'impression' AND d.bandit_segment IS NOT NULL AND d.consent = 1) "
            "FROM feedback f JOIN decisions d ON d.decision_id = f.decision_id WHERE d.customer_key = ?",
            (who.key,)).fetchone()
    except sqlite3.Error as exc:
        tally.problem("decisions", layout.where(path), f"not searched ({first_line(exc)})")
        return
    finally:
        con.close()
    tally.add("decisions", "decisions", int(decisions))
    tally.add("feedback", "feedback", int(feedback))
    tally.bandit_trials += int(trials or 0)
    if decisions or feedback:
        tally.paths.update(_sqlite_files(path))


def _trained_models(layout: _Layout, datasets: set[str]) -> list[str]:
    """Registered model versions trained on a data set that held the customer (their ``dataset`` tag)."""
    if layout.client is None or not datasets:
        return []
    try:
        versions = list(_pages(lambda token: layout.client.search_model_versions(max_results=1000,
                                                                                 page_token=token)))
    except Exception as exc:
        log.warning("erasure: cannot list the registered model versions (%s)", first_line(exc))
        return []
    return sorted(f"{v.name}/{v.version}" for v in versions if (v.tags or {}).get("dataset") in datasets)


def _unattributed(settings: Settings, layout: _Layout) -> list[dict[str, str]]:
    out = []
    workspace = settings.evidently_workspace.resolve()
    if workspace.is_dir() and any(workspace.rglob("snapshots/*.json")):
        out.append({"store": "evidently", "where": layout.where(workspace),
                    "why": "Evidently snapshots keep every value of each monitored window's features and scores "
                           "(the drift plots), in window order, with no customer id or key: not attributable to one "
                           "customer once the prediction log rows are gone; delete old snapshots to remove them"})
    reports = (settings.monitoring_dir / "reports").resolve()
    if reports.is_dir() and any(reports.rglob("*.html")):
        out.append({"store": "monitoring", "where": layout.where(reports),
                    "why": "the HTML of the same Evidently reports: row-level feature values and scores, no id or key"})
    for folder in _outermost(layout.artifact_dirs):
        if folder.is_dir() and (any(folder.rglob("MLmodel")) or any(folder.rglob("evidently/*.html"))):
            out.append({"store": "artifacts", "where": layout.where(folder),
                        "why": "logged models (input examples of a few feature rows, fitted purchase-cycle models with "
                               "per-customer summaries by position) and monitoring runs' Evidently HTML hold "
                               "row-level values with no id or key"})
    return out


def _scan(layout: _Layout, who: _Who, skip: set[Path], problems: list[dict[str, str]]) -> dict[str, int]:
    """The last resort: every file searched byte for byte, Parquet files also read (their pages may be
    compressed): any text value equal to the id (containing it standing alone, for an id of 6 characters or more)
    or containing the key. In bytes, the id counts where it stands alone (:func:`_standalone`), not inside another
    number or word."""
    needles = _needles(who)
    hits: dict[str, int] = {}
    for path in _files(layout):
        if path in skip:
            continue
        count = _occurrences(path.name.encode(), who.customer_id.encode()) + _contains(path, needles)
        if path.suffix == ".parquet" and not path.name.startswith("."):
            try:
                count += _parquet_values(path, who)
            except Exception as exc:
                problems.append({"store": "scan", "where": layout.where(path),
                                 "why": f"Parquet not readable, searched as bytes only ({first_line(exc)})"})
        if count:
            hits[f"scan:{layout.where(path)}"] = count
    return hits


def _parquet_values(path: Path, who: _Who) -> int:
    """Text values naming the customer, and, for a numeric id, integers equal to it in a column whose name says id
    (``customer_id``, ``CustomerID``, ``user_id``: an export that kept ids as numbers; other integer columns hold
    counts, where a short id would match by coincidence)."""
    number = int(who.customer_id) if re.fullmatch(r"\d{1,18}", who.customer_id) else None
    with pq.ParquetFile(path) as pf:
        names = [f.name for f in pf.schema_arrow
                 if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                 or (pa.types.is_dictionary(f.type) and pa.types.is_string(f.type.value_type))]
        integers = [f.name for f in pf.schema_arrow if number is not None and pa.types.is_integer(f.type)
                    and (_slug(f.name) in _ID_NAMES or _slug(f.name).endswith("id"))]
        if not names and not integers:
            return 0
        table = pf.read(columns=list(dict.fromkeys([*names, *integers])))
    count = sum(int(pc.sum(pc.fill_null(pc.equal(table[c], number), False)).as_py() or 0) for c in integers)
    for column in (table[c] for c in names):
        text = pc.cast(column, pa.string())
        if len(who.customer_id) >= 6:  # inside a longer text, standing alone (_standalone)
            hit = pc.match_substring_regex(text, _token_regex(who.customer_id))
        else:
            hit = pc.equal(pc.utf8_trim_whitespace(text), who.customer_id)
        if who.key:
            hit = pc.or_(hit, pc.match_substring(text, who.key))
        count += int(pc.sum(pc.fill_null(hit, False)).as_py() or 0)
    return count


def _find(layout: _Layout, who: _Who, scan: bool, problems: list[dict[str, str]]) -> dict[str, int]:
    tally = _Tally()
    _sweep(layout, who, False, tally)
    _online(layout, who, False, tally)
    _decisions(layout, who, "conversion", False, tally)
    problems.extend(tally.problems)
    found = dict(tally.rows)
    if scan:
        found.update(_scan(layout, who, tally.paths, problems))
    return found


# --- the API -----------------------------------------------------------------------------------------------------
def find(settings: Settings, customer_id: str, online_url: str | None = None, *, scan: bool = True,
         unchecked: list[dict[str, str]] | None = None, environ: dict[str, str] | None = None) -> dict[str, int]:
    """Where the customer still is: location -> rows (or, for ``scan:`` locations, matches) naming them by id or
    by pseudonymized key. Empty means nothing was found. Stores that could not be searched (a remote artifact
    store, an unreachable online store) are appended to ``unchecked`` as ``{"store", "where", "why"}``.
    Reads only: nothing is created or changed (beyond the online store's SQLite opening its tables)."""
    env = _env(environ)
    who = _who(settings, customer_id, env)
    layout = _layout(settings, online_url, env)
    problems = [*layout.problems, *(_keyless(layout) if who.key is None else [])]
    found = _find(layout, who, scan, problems)
    if unchecked is not None:
        unchecked.extend(problems)
    return found


def forget(settings: Settings, customer_id: str, online_url: str | None = None, reward: str = "conversion",
           dry_run: bool = False, *, scan: bool = True, environ: dict[str, str] | None = None) -> ErasureReport:
    """Erase the customer from every store (see the module's docstring), then search again: ``remaining`` must
    be empty. Idempotent; an unknown customer is no error (nothing removed). ``reward`` is the bandits' reward
    event (the catalog's), whose successes are taken out of the posteriors. A dry run changes nothing and reports
    what would be removed. A real run appends one line to ``<home>/erasure/log.jsonl`` (the key, never the id)."""
    started = time.perf_counter()
    env = _env(environ)
    apply = not dry_run
    who = _who(settings, customer_id, env)
    layout = _layout(settings, online_url, env)
    if who.key is None:
        layout.problems.extend(_keyless(layout))
    tally = _Tally()
    # raw tables first: a materialization racing the erasure reads them without the customer; the prediction log
    # under its lock, so a compaction cannot write back rows the erasure took out
    with log_lock(layout.log_root) if apply and layout.log_root.exists() else contextlib.nullcontext():
        _sweep(layout, who, apply, tally)
    _online(layout, who, apply, tally)
    _decisions(layout, who, reward, apply, tally)
    problems: list[dict[str, str]] = []
    remaining = _find(layout, who, scan, problems)
    report = ErasureReport(
        customer_key=who.key, dry_run=dry_run, removed=dict(tally.rows), stores=dict(tally.stores),
        bandit_trials=tally.bandit_trials, files_rewritten=tally.rewritten, files_deleted=tally.deleted,
        not_erased=[*layout.problems, *tally.problems], unattributed=_unattributed(settings, layout),
        trained_models=_trained_models(layout, tally.datasets), remaining=remaining,
        seconds=round(time.perf_counter() - started, 3))
    if apply:
        _audit(settings, report, who.customer_id)
    log.info("erasure%s: %d rows from %d locations, %d files rewritten, %d removed, %d bandit trials; %d not "
             "erased, %d locations still holding the customer", " (dry run)" if dry_run else "", report.total,
             len(report.removed), len(report.files_rewritten), len(report.files_deleted), report.bandit_trials,
             len(report.not_erased), len(report.remaining))
    return report


def _scrub(value: Any, pattern: re.Pattern[str]) -> Any:
    """The value with the customer id replaced in every string, keys included (a file named after them)."""
    if isinstance(value, str):
        return pattern.sub("<customer>", value)
    if isinstance(value, dict):
        return {_scrub(k, pattern): _scrub(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v, pattern) for v in value]
    return value


def _audit(settings: Settings, report: ErasureReport, customer_id: str) -> Path:
    """One JSON line: when, the key, what was removed and what was not; never the id (an id that is part of a
    longer word or number, e.g. "12" in "2012", is left: it does not name the customer)."""
    pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(customer_id)}(?![A-Za-z0-9])")
    entry = _scrub({k: v for k, v in report.to_dict().items() if k != "customer_key"}, pattern)
    entry = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "action": "forget",
             "customer_key": report.customer_key, **entry}
    path = settings.home / AUDIT_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")
    return path
