"""The prediction log: every scored item, appended off the request path, in immutable Parquet segments.

The server calls :meth:`PredictionLog.append` (a lock and a list append); a background thread writes what has
gathered every ``flush_s`` seconds or ``batch_rows`` rows, whichever comes first, as one new segment file:

    <root>/date=YYYY-MM-DD/part-<unix ms>-<pid>-<seq>.parquet

A segment is written to a temporary name in the same folder and renamed into place (atomic on POSIX), so a reader
never sees a half-written file and a crash loses at most the rows not yet flushed; earlier segments are never
rewritten. :meth:`close` (graceful shutdown) flushes what is left. Several worker processes can log into one root:
the pid in the name keeps their segments apart.

One row per scored item: ``request_id``, ``ts`` (UTC), ``endpoint``, ``model``, ``version``, ``alias``,
``customer_key`` (the customer id pseudonymized: a salted SHA-256, never the id itself), ``cold_start``,
``features`` and ``outputs`` (JSON objects as text), ``shadow`` (the challenger's outputs and version as JSON
text, or null). :func:`read_log` reads a time window back as one frame for monitoring.

Upkeep (``personalize log``): a server flushing every second writes up to 86,400 segments a day, and a reader opens
every one; :func:`compact` merges each past day's segments into one file per up to
``max_rows`` rows (the rows, their order within a day and their schema unchanged; written and renamed into place
before the inputs are removed). :func:`prune` removes the days older than a retention period. :func:`log_status`
counts segments and rows per day from the Parquet footers, without reading the rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from personalize.errors import first_line

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("request_id", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("endpoint", pa.string()),
    ("model", pa.string()), ("version", pa.string()), ("alias", pa.string()), ("customer_key", pa.string()),
    ("cold_start", pa.bool_()), ("features", pa.string()), ("outputs", pa.string()), ("shadow", pa.string()),
])
COLUMNS = SCHEMA.names
_SEGMENT_SEQ = itertools.count(1)  # segment names, unique within a process (next() is atomic under the GIL)


def load_salt(home: Path, environ: dict[str, str] | None = None) -> bytes:
    """The pseudonymization salt: ``PERSONALIZE_ID_SALT`` if set, else a random one kept in ``<home>/secrets``
    (created once, readable by its owner only), so the same customer gets the same key across restarts."""
    env = os.environ if environ is None else environ
    if env.get("PERSONALIZE_ID_SALT"):
        return env["PERSONALIZE_ID_SALT"].encode()
    path = Path(home) / "secrets" / "id_salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(secrets.token_hex(32))
        tmp.chmod(0o600)
        try:
            os.link(tmp, path)  # first writer wins; a concurrent one reads the winner's salt
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()


def pseudonymize(customer_id: str | None, salt: bytes) -> str | None:
    if customer_id is None:
        return None
    return hashlib.sha256(salt + b"\x00" + str(customer_id).encode()).hexdigest()[:32]


class PredictionLog:
    """Buffered, append-only writer of prediction segments."""

    def __init__(self, root: Path, flush_s: float = 1.0, batch_rows: int = 512) -> None:
        self.root = Path(root)
        self.flush_s, self.batch_rows = flush_s, batch_rows
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.written = 0  # rows in segments on disk
        self.segments = 0
        self.dropped = 0  # rows that failed to write (kept in memory for the next try up to a limit)
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    # --- the request path -------------------------------------------------------------------------------------
    def append(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._rows.extend(rows)
            full = len(self._rows) >= self.batch_rows
        if full:
            self._wake.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    # --- the background writer --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Write what has gathered as one segment; returns the rows written."""
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return 0
        try:
            self._write(rows)
        except Exception as exc:  # a full disk must not take the server down: keep the rows for the next try
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("prediction log: could not write %d rows: %s", len(rows), exc)
            with self._lock:
                keep = rows[-100_000:]  # bounded: beyond this the oldest rows are lost, and counted
                self.dropped += len(rows) - len(keep)
                self._rows = keep + self._rows
            return 0
        self.last_error = None
        return len(rows)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """One segment per UTC day of the rows' own timestamps, so a day's partition holds exactly that day's rows
        (a window read opens only its days' folders)."""
        now = time.time()
        by_day: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            ts = r.get("ts")
            if ts is None:
                day = time.strftime("%Y-%m-%d", time.gmtime(now))
            else:
                ts = ts if isinstance(ts, datetime) else pd.Timestamp(ts)
                day = (ts if ts.tzinfo is None else ts.astimezone(timezone.utc)).strftime("%Y-%m-%d")
            by_day.setdefault(day, []).append(r)
        for day, part in by_day.items():
            write_segment(self.root, day, pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in part],
                                                               schema=SCHEMA))
            self.written += len(part)
            self.segments += 1

    def close(self) -> None:
        """Stop the writer and flush everything still buffered (graceful shutdown)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        self.flush()

    def status(self) -> dict[str, Any]:
        return {"root": str(self.root), "written": self.written, "segments": self.segments, "pending": self.pending,
                "dropped": self.dropped, "last_error": self.last_error}


def write_segment(root: Path, day: str, table: pa.Table) -> Path:
    """``table`` (the log's columns) as one new segment in ``day``'s folder (``YYYY-MM-DD``, the UTC day of its
    rows), written under a temporary name and renamed into place; the name is unique across the writers of a
    process (the server's log, a batch run) and, by the pid, across processes."""
    folder = Path(root) / f"date={day}"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"part-{int(time.time() * 1000)}-{os.getpid()}-{next(_SEGMENT_SEQ):06d}.parquet"
    tmp = folder / f".{name}.tmp"
    pq.write_table(table.select(COLUMNS).cast(SCHEMA), tmp)
    os.replace(tmp, folder / name)
    return folder / name


def batch_rows(request_id: str, ts: datetime, endpoint: str, model: dict[str, str], customer_keys: Any, features: Any,
               outputs: Any) -> pa.Table:
    """Log rows of one batch (one request id, one time; features and outputs as JSON text already, in lists or
    Arrow arrays), as a table."""
    n = len(outputs)
    constant = {"request_id": request_id, "ts": ts, "endpoint": endpoint, "model": model.get("name"),
                "version": model.get("version"), "alias": model.get("alias"), "cold_start": False}
    columns = {c: pa.array([v] * n, SCHEMA.field(c).type) for c, v in constant.items()}
    columns.update(customer_key=_text(customer_keys), features=_text(features), outputs=_text(outputs),
                   shadow=pa.nulls(n, pa.string()))
    return pa.table(columns).select(COLUMNS)


def _text(values: Any) -> Any:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values.cast(pa.string())
    return pa.array(values, pa.string())


def make_row(request_id: str, endpoint: str, model: dict[str, str], customer_key: str | None, cold_start: bool,
             features: dict[str, Any] | None, outputs: dict[str, Any], shadow: dict[str, Any] | None,
             ts: pd.Timestamp | None = None) -> dict[str, Any]:
    return {"request_id": request_id, "ts": ts if ts is not None else datetime.now(timezone.utc),
            "endpoint": endpoint, "model": model.get("name"), "version": model.get("version"),
            "alias": model.get("alias"), "customer_key": customer_key, "cold_start": cold_start,
            "features": None if features is None else json.dumps(features, default=str),
            "outputs": json.dumps(outputs, default=str),
            "shadow": None if shadow is None else json.dumps(shadow, default=str)}


def utc(t: pd.Timestamp | str) -> pd.Timestamp:
    """A time as an aware UTC timestamp (a naive one means UTC, as the log's ``ts`` does)."""
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def log_segments(root: Path, start: pd.Timestamp | None = None, end: pd.Timestamp | None = None) -> list[Path]:
    """The segments that can hold rows with ``start <= ts < end``: only the days' folders in range are opened."""
    root = Path(root)
    if not root.exists():
        return []
    first = utc(start).strftime("%Y-%m-%d") if start is not None else None
    last = (utc(end) - pd.Timedelta(nanoseconds=1)).strftime("%Y-%m-%d") if end is not None else None
    days = sorted(p for p in root.glob("date=*") if p.is_dir()
                  and (first is None or p.name[5:] >= first) and (last is None or p.name[5:] <= last))
    return [f for d in days for f in sorted(d.glob("part-*.parquet"))]


def read_log(root: Path, start: pd.Timestamp | None = None, end: pd.Timestamp | None = None,
             skipped: list[tuple[Path, str]] | None = None) -> pd.DataFrame:
    """Every logged row with ``start <= ts < end`` (UTC), oldest first. Temporary files are never read. A segment
    that cannot be read raises, unless ``skipped`` is given: then it is appended there (path, reason) and the rest
    is read."""
    tables = []
    for f in log_segments(root, start, end):
        try:
            tables.append(pq.read_table(f, schema=SCHEMA))
        except Exception as exc:
            if skipped is None:
                raise
            skipped.append((f, f"{type(exc).__name__}: {first_line(exc)}"))
    if not tables:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS})
    frame = pa.concat_tables(tables).to_pandas()
    if start is not None:
        frame = frame[frame["ts"] >= utc(start)]
    if end is not None:
        frame = frame[frame["ts"] < utc(end)]
    return frame.sort_values("ts", kind="stable").reset_index(drop=True)


def _day_folders(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).glob("date=*") if p.is_dir())


def log_status(root: Path) -> list[dict[str, Any]]:
    """Per day of the log: segments, rows and bytes, from the Parquet footers (an unreadable segment is counted in
    ``unreadable``, its rows unknown)."""
    out = []
    for day in _day_folders(root):
        segments, rows, size, unreadable = 0, 0, 0, 0
        for f in sorted(day.glob("part-*.parquet")):
            segments += 1
            size += f.stat().st_size
            try:
                rows += pq.ParquetFile(f).metadata.num_rows
            except Exception:
                unreadable += 1
        out.append({"day": day.name[5:], "segments": segments, "rows": rows, "bytes": size,
                    "unreadable": unreadable})
    return out


@contextmanager
def log_lock(root: Path) -> Iterator[None]:
    """One upkeep (compaction, retention) or erasure at a time on a log root: an advisory lock on ``<root>/.lock``.
    The server's writer never takes it: it only ever adds new files, which none of those touch."""
    import fcntl

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _merged(path: Path) -> bool:
    return path.stem.split("-")[-1].startswith("c")  # part-<ms>-<pid>-c00000.parquet, written by compact


def compact(root: Path, before: str | None = None, max_rows: int = 1_000_000) -> dict[str, int]:
    """Merge the segments of every day before ``before`` (``YYYY-MM-DD``; default: today, UTC, which is still being
    written) into files of up to ``max_rows`` rows (``part-…-c00000.parquet``; a merged file is not merged again),
    streamed a segment at a time in the order a reader takes them; an unreadable segment is left as it is.

    The merged files are written under temporary names, renamed into place once all are whole, and the inputs
    removed after their rows are counted again in the outputs (a crash between the two leaves rows twice, never
    none). Safe beside a running server (it only adds files); under :func:`log_lock`, so a concurrent compaction
    or erasure waits. A monitoring pass reading the same day meanwhile may see a row twice: run it between passes
    (``personalize schedule`` does)."""
    before = before or time.strftime("%Y-%m-%d", time.gmtime())
    report = {"days": 0, "segments_in": 0, "files_out": 0, "rows": 0, "unreadable": 0}
    if not Path(root).exists():
        return report
    with log_lock(root):
        for day in _day_folders(root):
            if day.name[5:] >= before:
                continue
            segments = []
            for f in sorted(f for f in day.glob("part-*.parquet") if not _merged(f)):
                try:
                    pq.ParquetFile(f).metadata  # the footer: a half-written or foreign file is left alone
                    segments.append(f)
                except Exception as exc:
                    report["unreadable"] += 1
                    log.warning("prediction log: left unreadable segment %s as it is (%s)", f, exc)
            if len(segments) < 2:  # merged already (a late segment or two join on a later run)
                continue
            rows, outputs = _merge(day, segments, max_rows)
            report["days"] += 1
            report["segments_in"] += len(segments)
            report["files_out"] += len(outputs)
            report["rows"] += rows
    return report


def _merge(day: Path, segments: list[Path], max_rows: int) -> tuple[int, list[Path]]:
    stamp, pending, rows = int(time.time() * 1000), [], 0
    writer, in_file = None, 0
    try:
        for f in segments:
            table = pq.read_table(f, schema=SCHEMA)
            rows += table.num_rows
            offset = 0
            while offset < table.num_rows:
                if writer is None or in_file >= max_rows:
                    if writer is not None:
                        writer.close()
                    pending.append(day / f".part-{stamp}-{os.getpid()}-c{len(pending):05d}.parquet.tmp")
                    writer, in_file = pq.ParquetWriter(pending[-1], SCHEMA), 0
                take = min(max_rows - in_file, table.num_rows - offset)
                writer.write_table(table.slice(offset, take))
                in_file, offset = in_file + take, offset + take
        if writer is not None:
            writer.close()
    except Exception:
        if writer is not None:
            writer.close()
        for tmp in pending:
            tmp.unlink(missing_ok=True)
        raise
    outputs = [tmp.with_name(tmp.name[1:-len(".tmp")]) for tmp in pending]
    for tmp, out in zip(pending, outputs):
        os.replace(tmp, out)
    if sum(pq.ParquetFile(f).metadata.num_rows for f in outputs) != rows:  # never lose a row
        raise RuntimeError(f"compacting {day} wrote a different number of rows than it read; its segments are kept")
    for f in segments:
        f.unlink()
    return rows, outputs


def prune(root: Path, keep_days: float, now: pd.Timestamp | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Remove the days whose every row is older than ``keep_days`` (a day folder at a time); returns the days,
    segments and rows removed (with ``dry_run``, that would be)."""
    import shutil

    cutoff = (utc(now if now is not None else pd.Timestamp.now(tz="UTC")) - pd.Timedelta(days=keep_days))
    last_whole_day = (cutoff.normalize() - pd.Timedelta(days=1)).strftime("%Y-%m-%d")  # its rows all end before
    report: dict[str, Any] = {"days": 0, "segments": 0, "rows": 0, "through": last_whole_day}
    if not Path(root).exists():
        return report
    with log_lock(root):
        for entry in log_status(root):
            if entry["day"] > last_whole_day:
                continue
            if not dry_run:
                shutil.rmtree(Path(root) / f"date={entry['day']}")
            report["days"] += 1
            report["segments"] += entry["segments"]
            report["rows"] += entry["rows"]
    return report
