"""Batch scoring: every customer of a data set with a model's champion, from the offline store, to Parquet.

    personalize score churn --dataset synthetic                  # -> <home>/scores/churn/v<version>/scores.parquet
    personalize score churn --dataset synthetic --engine spark   # the same scores, computed by Spark
    personalize score churn --table new_customers.csv --id customer_id   # a model trained on a labeled table

A model trained on a labeled table scores a table file of the same columns (:func:`score_table`): each column the
model reads is typed as the model was trained (a value that is not a number where one goes quarantines its row,
with the reason, in ``<stem>-quarantine.parquet`` beside the scores), the other columns are ignored, and the label
need not be there. Scored plus quarantined rows always make the rows read.

The features come from the same definitions as training (:meth:`features.store.FeatureStore.offline` at
``as_of``); the model is the served one (:func:`serving.scoring.load`), scored in chunks straight on the booster
(:func:`score_matrix`), so batch and online answers agree to the last digit. With ``engine="spark"`` the features
are computed by Spark from the same definitions and the registered model runs in ``mlflow.pyfunc.spark_udf``;
Spark writes the scores as a directory of Parquet parts at the same path.

Given a ``log_root``, every score also goes to the prediction log as the API writes a request's (one row per
customer or table row: the pseudonymized id, the model's features as it read them, the probability and decision;
endpoint ``batch``, one request id for the whole run, stamped when scored), so ``personalize monitor`` watches
batch scoring beside online traffic and ``personalize forget`` finds it. On Spark, Spark writes the log rows too
(the same keys, features and outputs; :func:`_log_spark`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)
CHUNK = 200_000


@dataclass(frozen=True)
class ScoreReport:
    model: str
    version: str
    rows: int
    as_of: pd.Timestamp
    path: Path
    features_s: float
    score_s: float
    logged: int = 0  # rows written to the prediction log
    request_id: str | None = None  # the log rows' request id

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.score_s if self.score_s > 0 else float("inf")


def score_matrix(scorer: Any, frame: pd.DataFrame, chunk: int = CHUNK) -> np.ndarray:
    """Calibrated probabilities of a classifier for every row of ``frame`` (its feature columns, any order)."""
    missing = [c for c in scorer.features if c not in frame.columns]
    if missing:
        raise PersonalizeError(f"the frame lacks the model's feature(s) {', '.join(missing[:5])}")
    out = np.empty(len(frame))
    for start in range(0, len(frame), chunk):
        part = frame.iloc[start:start + chunk]
        if scorer.numeric_only:
            x = part[scorer.features].to_numpy(dtype=float, na_value=np.nan)
        else:
            x = scorer._matrix(part[scorer.features].to_dict("records"))
        out[start:start + len(part)] = scorer.calibrator.transform(scorer._raw(x))
    return out


def log_scores(log_root: Path, salt: bytes | None, loaded: Any, ids: pd.Series | None, frame: pd.DataFrame,
               p: np.ndarray, chunk: int = 100_000) -> tuple[int, str]:
    """Write one prediction-log row per scored row of ``frame`` (its ids in ``ids``, None when it has none), as the
    API logs a request; returns the rows written and their request id. The features' JSON is written by DuckDB
    (``to_json``, a chunk at a time), not row by row. Raises :class:`PersonalizeError` when the log cannot be
    written (the scores themselves are already on disk)."""
    import duckdb
    import pyarrow as pa

    from serving.predlog import pseudonymize

    if not salt:
        raise ValueError("logging scores needs the server's salt (serving.predlog.load_salt)")
    scorer, request_id, ts = loaded.scorer, uuid.uuid4().hex, datetime.now(timezone.utc)
    categorical = set(scorer.columns.categorical)
    keys = [None] * len(frame) if ids is None else [None if pd.isna(c) else pseudonymize(str(c), salt) for c in ids]
    con, written = duckdb.connect(), 0
    try:
        for start in range(0, len(frame), chunk):
            part = frame[scorer.features].iloc[start:start + chunk].copy()
            for c in categorical.intersection(part.columns):  # as the reference holds them: text
                part[c] = [None if pd.isna(v) else str(v) for v in part[c]]
            con.register("features", pa.Table.from_pandas(part, preserve_index=False))  # NaN -> null, as the API
            features = con.sql("SELECT to_json(features) FROM features").to_arrow_table().column(0)
            _segment(log_root, loaded, request_id, ts, keys[start:start + len(part)], features,
                     p[start:start + len(part)])
            con.unregister("features")
            written += len(part)
    except (OSError, pa.ArrowException, duckdb.Error) as exc:
        raise _unlogged(log_root, f"{written:,} of {len(frame):,}", exc) from exc
    finally:
        con.close()
    return written, request_id


def _unlogged(log_root: Path, logged: str, exc: Exception) -> PersonalizeError:
    text = (str(exc).splitlines() or [""])[0][:300]
    return PersonalizeError(f"the scores are written, but the prediction log under {log_root} is not ({logged} rows "
                            f"logged): {type(exc).__name__}: {text}")


def _segment(log_root: Path, loaded: Any, request_id: str, ts: datetime, keys: Any, features: Any,
             p: np.ndarray) -> None:
    """One prediction-log segment of a batch's scores ``p`` (the outputs as the API writes them: the probability
    rounded to 6 and the decision at the model's threshold)."""
    from serving.predlog import batch_rows, write_segment

    threshold = loaded.scorer.threshold
    outputs = [json.dumps({"probability": round(float(q), 6), "decision": bool(q >= threshold)}) for q in p]
    write_segment(log_root, ts.strftime("%Y-%m-%d"),
                  batch_rows(request_id, ts, "batch", loaded.ref, keys, features, outputs))


def per_category(loaded: Any) -> bool:
    """A per-category propensity model: one row per customer and category, which nothing serves or monitors."""
    return loaded.kind == "classifier" and {"category", "category_share"} <= set(loaded.scorer.features)


def check_batchable(loaded: Any, name: str) -> None:
    """Batch scoring covers the one-row-per-customer classifiers (churn, propensity, a labeled table's model)."""
    if loaded.kind != "classifier":
        raise PersonalizeError(f"{name} is a {loaded.kind} model; this covers the churn and propensity classifiers "
                               "(`personalize score purchase_cycle` writes the purchase cycle's answers)")
    if per_category(loaded):
        raise PersonalizeError(f"{name} is a per-category propensity model (one row per customer and category); "
                               "batch scoring, replay, monitoring and the API cover churn and propensity (its "
                               "per-category test ROC-AUC is in its model card)")


def score_dataset(client: Any, name: str, dataset_dir: Path, out_dir: Path, as_of: pd.Timestamp | None = None,
                  alias: str = "champion", engine: str = "duckdb", spark_master: str | None = None,
                  log_root: Path | None = None, salt: bytes | None = None) -> ScoreReport:
    """Score every customer known at ``as_of`` with ``name@alias`` and write ``<out_dir>/<name>/v<n>/scores.parquet``
    (on Spark, a directory of part files with the same columns); with ``log_root`` (and the server's ``salt``), log
    every score in the prediction log too."""
    from features.engines import connect
    from features.store import FeatureStore
    from serving.online import default_as_of
    from serving.scoring import load

    import os

    loaded = load(client, name, alias, threads=os.cpu_count() or 1)
    check_batchable(loaded, name)
    started = time.perf_counter()
    store = FeatureStore(dataset_dir, connect(engine, spark_master) if engine != "duckdb" else None)
    as_of = pd.Timestamp(as_of) if as_of is not None else default_as_of(store)
    spec = store.every_category(as_of)
    path = out_dir / name / f"v{loaded.version}" / "scores.parquet"
    if engine == "spark":
        return _score_spark(store, spec, loaded, as_of, path, started, log_root, salt)
    frame = store.offline([as_of], spec)
    features_s = time.perf_counter() - started
    started = time.perf_counter()
    p = score_matrix(loaded.scorer, frame)
    score_s = time.perf_counter() - started
    threshold = loaded.scorer.threshold
    out = pd.DataFrame({"customer_id": frame["customer_id"].astype(str), "as_of": as_of, "probability": p,
                        "decision": p >= threshold, "model": name, "version": loaded.version})
    _write_scores(out, path)
    log.info("scored %d customers with %s v%s in %.2fs (%.0f rows/s)", len(out), name, loaded.version, score_s,
             len(out) / max(score_s, 1e-9))
    logged, request_id = (log_scores(log_root, salt, loaded, out["customer_id"], frame, p)
                          if log_root is not None else (0, None))
    return ScoreReport(name, loaded.version, len(out), as_of, path, features_s, score_s, logged, request_id)


@dataclass(frozen=True)
class CycleScoreReport:
    model: str
    version: str
    rows: int  # customers with a purchase before as_of: each scored
    without_history: int  # customers with none (the API's cold start): not scored
    as_of: pd.Timestamp
    horizon_days: int
    path: Path
    score_s: float


def score_cycle(client: Any, name: str, dataset_dir: Path, out_dir: Path, as_of: pd.Timestamp | None = None,
                alias: str = "champion", horizon_days: int | None = None) -> CycleScoreReport:
    """Every customer's purchase cycle as of ``as_of`` (default: the day after the data's last row) by
    ``name@alias``: the summary ``materialize`` puts in the online store, predicted in one vectorized call, so the
    answers are the API's (``/next_purchase``) for the same summary. Writes ``<out_dir>/<name>/v<n>/scores.parquet``:
    ``customer_id``, ``as_of``, ``horizon_days``, expected purchases, expected days to the next purchase (the mean
    restricted to the horizon), P(purchase), P(alive), expected spend, ``model``, ``version``. A customer with no
    purchase before ``as_of`` has no summary: counted, not scored."""
    from features.store import FeatureStore
    from serving.online import default_as_of, purchase_summary
    from serving.scoring import load
    from training.cycle import CycleError

    loaded = load(client, name, alias)
    if loaded.kind != "cycle":
        raise PersonalizeError(f"{name} is a {loaded.kind} model, not a purchase-cycle one")
    h = int(horizon_days or loaded.scorer.horizon_days)
    store = FeatureStore(dataset_dir)
    as_of = pd.Timestamp(as_of) if as_of is not None else default_as_of(store)
    started = time.perf_counter()
    try:
        summary = purchase_summary(store, as_of)
    except CycleError as exc:
        raise PersonalizeError(f"no purchase-cycle summary as of {as_of}: {exc}") from None
    scorer = loaded.scorer
    frame = summary[["customer_id", *scorer.inputs]].reset_index(drop=True)
    predicted = scorer.model.model.predict(frame, h)[scorer.outputs].reset_index(drop=True)
    score_s = time.perf_counter() - started
    out = pd.concat([pd.DataFrame({"customer_id": frame["customer_id"].astype(str), "as_of": as_of.floor("D"),
                                   "horizon_days": h}), predicted.astype(float)], axis=1)
    out["model"], out["version"] = name, loaded.version
    customers = store.customers.select("customer_id").to_pandas()["customer_id"].astype(str)
    path = out_dir / name / f"v{loaded.version}" / "scores.parquet"
    _write_scores(out, path)
    return CycleScoreReport(name, loaded.version, len(out), int((~customers.isin(out["customer_id"])).sum()),
                            as_of.floor("D"), h, path, score_s)


def _score_spark(store: Any, spec: Any, loaded: Any, as_of: pd.Timestamp, path: Path, started: float,
                 log_root: Path | None = None, salt: bytes | None = None) -> ScoreReport:
    """Features computed by Spark and cached, then the registered model version applied by
    ``mlflow.pyfunc.spark_udf`` (in the executors' Python workers, the pyfunc's own ``predict``), written by Spark.
    With ``log_root``, the scores are cached too and Spark writes the log rows (:func:`_log_spark`)."""
    import mlflow.pyfunc
    import pyspark.sql.functions as F

    from features.engines import to_spark

    session = store.con._session
    features = to_spark(store.con, store.features(store.entities([as_of]), spec)).cache()
    rows = features.count()
    features_s = time.perf_counter() - started
    started = time.perf_counter()
    names = loaded.scorer.features
    predict = mlflow.pyfunc.spark_udf(session, f"models:/{loaded.name}/{loaded.version}",
                                      result_type="probability double, decision boolean", env_manager="local")
    scored = features.select(
        F.col("customer_id").cast("string").alias("customer_id"), *[F.col(c) for c in names],
        predict(*[F.col(c) for c in names]).alias("out"))
    if log_root is not None:
        scored = scored.cache()  # the model runs once for the scores and the log
    out = scored.select(
        "customer_id", F.lit(as_of.to_pydatetime()).cast("timestamp_ntz").alias("as_of"),  # naive UTC, as the store
        F.col("out.probability").alias("probability"), F.col("out.decision").alias("decision"),
        F.lit(loaded.name).alias("model"), F.lit(loaded.version).alias("version"))
    _clear(path)
    out.write.mode("overwrite").parquet(str(path.resolve()))
    score_s = time.perf_counter() - started
    for crc in path.glob(".*.crc"):  # Hadoop checksums would go stale when an erasure rewrites a part file
        crc.unlink()
    log.info("scored %d customers with %s v%s on Spark in %.2fs (%.0f rows/s)", rows, loaded.name, loaded.version,
             score_s, rows / max(score_s, 1e-9))
    try:
        logged, request_id = _log_spark(scored, loaded, log_root, salt) if log_root is not None else (0, None)
    finally:
        scored.unpersist()
        features.unpersist()
    return ScoreReport(loaded.name, loaded.version, rows, as_of, path, features_s, score_s, logged, request_id)


def _log_spark(scored: Any, loaded: Any, log_root: Path, salt: bytes | None) -> tuple[int, str]:
    """The prediction-log rows of Spark's scores, as :func:`log_scores` writes them: Spark computes the
    pseudonymized keys (the same salted SHA-256) and the features' JSON (NaN and infinities as null, categoricals
    as text) and writes them as Parquet parts to a temporary folder of the log root (which no reader looks in);
    each part then becomes one segment (the outputs' JSON added a part at a time), and the folder is removed."""
    import shutil

    import pyarrow.parquet as pq
    import pyspark.sql.functions as F

    if not salt:
        raise ValueError("logging scores needs the server's salt (serving.predlog.load_salt)")
    request_id, ts = uuid.uuid4().hex, datetime.now(timezone.utc)
    types, categorical = dict(scored.dtypes), set(loaded.scorer.columns.categorical)

    def as_logged(c: str) -> Any:
        if c in categorical:
            return F.col(c).cast("string").alias(c)
        if types[c] in ("double", "float"):  # JSON has no NaN; the API writes a missing value as null
            return F.when(F.isnan(c) | F.col(c).isin(float("inf"), float("-inf")), None).otherwise(F.col(c)).alias(c)
        return F.col(c).alias(c)

    key = F.substring(F.sha2(F.concat(F.lit(bytearray(salt + b"\x00")), F.col("customer_id").cast("binary")), 256),
                      1, 32)
    features = F.to_json(F.struct(*[as_logged(c) for c in loaded.scorer.features]), {"ignoreNullFields": "false"})
    staging = Path(log_root) / f".spark-{request_id}"
    written = 0
    try:
        scored.select(key.alias("customer_key"), features.alias("features"), F.col("out.probability").alias("p")) \
            .write.mode("overwrite").parquet(str(staging.resolve()))
        for part in sorted(staging.glob("part-*.parquet")):
            t = pq.read_table(part)
            _segment(log_root, loaded, request_id, ts, t.column("customer_key"), t.column("features"),
                     t.column("p").to_numpy())
            written += t.num_rows
    except Exception as exc:
        raise _unlogged(log_root, f"{written:,}", exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written, request_id


def _write_scores(out: pd.DataFrame, path: Path) -> None:
    """``out`` at ``path``, replacing an earlier output whole (written aside, then moved into place)."""
    _clear(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    out.to_parquet(tmp, index=False)
    tmp.replace(path)


def _clear(path: Path) -> None:
    """Remove an earlier output at ``path``: a file (the DuckDB path) or a directory of parts (Spark)."""
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@dataclass(frozen=True)
class TableScoreReport:
    model: str
    version: str
    rows_in: int
    rows: int
    quarantined: int
    reasons: dict[str, int]
    path: Path
    quarantine_path: Path | None
    score_s: float
    logged: int = 0  # rows written to the prediction log
    request_id: str | None = None
    id_column: str | None = None
    missing_ids: int = 0  # scored rows without an id: logged without one, so no outcome or erasure finds them
    repeated_ids: int = 0  # scored rows whose id another scored row has too: one customer to outcomes and erasure
    unseen: dict[str, int] = field(default_factory=dict)  # per column, scored rows with a category new to the model


def _typed(raw: pd.DataFrame, scorer: Any, decimal_comma: bool | None) -> tuple[pd.DataFrame, Any]:
    """The model's columns of ``raw`` typed as in training, and the reasons of the rows whose values are not;
    numbers are read as ingest reads them (``decimal_comma``: :func:`features.ingest.parse_number`)."""
    from features.ingest import RowReasons, is_blank, parse_number
    from features.labeled import BOOL_TEXT

    reasons = RowReasons(raw.index)
    out = pd.DataFrame(index=raw.index)
    for c in scorer.features:
        s = raw[c]
        blank = is_blank(s)
        kind = ("numeric" if c in scorer.columns.numeric else "boolean" if c in scorer.columns.boolean
                else "categorical")
        if kind == "categorical":
            if pd.api.types.is_float_dtype(s) and (s.dropna() % 1 == 0).all():
                s = s.astype("Int64")  # whole numbers read as floats because of a null: 1.0 is the category "1"
            out[c] = s.astype(object).where(~blank, None)
            continue
        if pd.api.types.is_bool_dtype(s) or (kind == "numeric" and pd.api.types.is_numeric_dtype(s)):
            out[c] = s.astype(float)  # typed already (Parquet, a stored table): checked below like text
        else:
            text = s.astype(str).str.strip()
            if kind == "boolean":
                values = text.str.lower().map({**BOOL_TEXT, "1": True, "0": False, "1.0": True, "0.0": False})
                out[c] = values.astype(float)
            else:
                out[c] = parse_number(text.where(~blank, None), decimal_comma)
        # as the API refuses them: a value that is no finite number, a negative count of the held-out data
        reasons.add((~blank & out[c].isna()) | np.isinf(out[c]), f"invalid_{c}")
        if c in getattr(scorer, "counts", ()):
            reasons.add(out[c] < 0, f"negative_{c}")
    return out, reasons


def score_table(client: Any, name: str, path: Path, out_dir: Path, alias: str = "champion",
                id_column: str | None = None, sep: str = ",", log_root: Path | None = None,
                salt: bytes | None = None) -> TableScoreReport:
    """Score every row of a CSV/Parquet table with ``name@alias`` (a model trained on a labeled table) and write
    ``<out_dir>/<name>/v<n>/<stem>-scores.parquet``: the id column (``id_column``, else the training table's if the
    file has it), ``_source_row``, ``probability``, ``decision``, ``model``, ``version``. Rows with a value the
    model cannot read go to ``<stem>-quarantine.parquet`` with their reason. With ``log_root``, the scored rows
    are logged in the prediction log too (keyed by their id, none without one)."""
    from features.ingest import ValidationResult, normalize_ids
    from features.loaders import CsvOptions, column_hint, file_format, read_source
    from personalize.errors import DataFileError
    from serving.scoring import load

    import os

    path = Path(path)
    loaded = load(client, name, alias, threads=os.cpu_count() or 1)
    check_batchable(loaded, name)
    scorer = loaded.scorer
    fmt, csv = file_format(path), CsvOptions(sep=sep)
    raw, unreadable = read_source(path, fmt, csv)
    trained_id = getattr(scorer.columns, "id_column", None)  # models registered before it was recorded: None
    if id_column is None and trained_id in raw.columns:
        id_column = trained_id
    for column in [id_column, *scorer.features]:
        if column and column not in raw.columns:
            what = "the id column" if column == id_column else f"a feature of {name} v{loaded.version}"
            hint = column_hint(path, fmt, csv, raw.columns)
            more = f" and {len(raw.columns) - 12} more" if len(raw.columns) > 12 else ""
            raise DataFileError(path, f"{what} is missing; the file has {list(raw.columns)[:12]}{more}{hint}",
                                column=column)
    started = time.perf_counter()
    typed, reasons = _typed(raw, scorer, decimal_comma=csv.decimal_comma if fmt == "csv" else False)
    quarantine = reasons.quarantine(raw, str(path))
    quarantine = pd.concat([quarantine, unreadable], ignore_index=True) if len(unreadable) else quarantine
    good = typed.drop(index=reasons.rows)
    p = score_matrix(scorer, good) if len(good) else np.zeros(0)
    score_s = time.perf_counter() - started
    out = pd.DataFrame({"_source_row": good.index.to_numpy(), "probability": p, "decision": p >= scorer.threshold,
                        "model": name, "version": loaded.version})
    if id_column:
        out.insert(0, id_column, normalize_ids(raw.loc[good.index, id_column]).to_numpy())
    folder = out_dir / name / f"v{loaded.version}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = path.name
    for suffix in (".gz", ".csv", ".parquet", ".pq", ".txt", ".tsv"):  # any case: customers.2024-06.CSV
        stem = stem[:-len(suffix)] if stem.lower().endswith(suffix) else stem
    target, bad = folder / f"{stem}-scores.parquet", folder / f"{stem}-quarantine.parquet"
    out.to_parquet(target.with_suffix(".tmp"), index=False)
    target.with_suffix(".tmp").replace(target)
    if len(quarantine):
        quarantine.to_parquet(bad, index=False)
    elif bad.exists():
        bad.unlink()
    result = ValidationResult("table", out, quarantine, len(raw) + len(unreadable))  # raises unless counts reconcile
    logged, request_id = (log_scores(log_root, salt, loaded, out[id_column] if id_column else None, good, p)
                          if log_root is not None else (0, None))
    ids = out[id_column] if id_column else None
    unseen = scorer.unseen_counts(good)
    return TableScoreReport(name, loaded.version, result.rows_in, len(out), len(quarantine), result.reasons, target,
                            bad if len(quarantine) else None, score_s, logged, request_id, id_column,
                            0 if ids is None else int(ids.isna().sum()),
                            0 if ids is None else int(ids.dropna().duplicated(keep=False).sum()), unseen)
