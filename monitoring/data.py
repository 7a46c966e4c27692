"""What a monitoring pass compares: the model version's reference and a window of the prediction log.

- **Reference**: the held-out frame logged with the model version (``heldout/heldout.parquet``: the rows the
  promotion gate scored, features and label), scored by that version exactly as the server scores, so the
  reference holds the same ``probability`` column a logged prediction has, and its realized and estimated
  performance are known.
- **Window**: the logged predictions of that version with ``start <= ts < end``, their feature records parsed
  into columns. Cold-start answers carry no features: they are counted, not compared. Unreadable log segments are
  skipped and reported.
- **Labels** arrive late: a churn or purchase outcome is known once the model's horizon has passed after the
  prediction. They are joined from the transactions by customer (the log keeps salted hashes, so the data set's
  ids are hashed with the same salt) and time, with the same label definition training used.
- **Outcomes** given as a file (:func:`read_outcomes`: an id and a label column, as the model's labeled table
  had them) label the window's own predictions by customer: how a model trained on a table without transactions
  gets its realized performance.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)

__all__ = ["MonitorError", "Outcomes", "OutcomesFile", "Reference", "Window", "join_labels", "load_reference",
           "outcomes_for", "read_outcomes", "read_window"]


class MonitorError(PersonalizeError):
    """The monitoring job cannot do its work (no reference, an empty window, nothing comparable)."""


@dataclass
class Reference:
    model: str
    version: str
    run_id: str
    task: str
    dataset: str | None
    horizon_days: int | None
    threshold: float
    numeric: list[str]
    categorical: list[str]
    frame: pd.DataFrame  # features, label, probability
    moment: pd.Timestamp | None = None  # the held-out rows' point in time (their cutoff), when they have one

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]


def _horizon(params: dict[str, str]) -> int | None:
    if params.get("horizon_days"):
        return int(params["horizon_days"])
    found = re.search(r"\((\d+)-day horizon\)", params.get("split", ""))  # versions logged before the parameter
    return int(found.group(1)) if found else None


def load_reference(client: Any, name: str, version: str) -> Reference:
    """The reference of ``name`` version ``version``; a clear :class:`MonitorError` when it has none."""
    from serving.batch import score_matrix
    from serving.batch import per_category
    from serving.scoring import NotServing, load
    from training.registry import RegistryError, _heldout

    try:
        loaded = load(client, name, "", threads=2, version=version)
    except NotServing as exc:
        raise MonitorError(str(exc)) from None
    if loaded.kind != "classifier":
        raise MonitorError(f"{name} is a {loaded.kind} model; the monitor watches churn and propensity classifiers")
    if per_category(loaded):
        raise MonitorError(f"{name} is a per-category propensity model (one row per customer and category), which is "
                           "not served or batch-scored; monitor and replay cover the churn and propensity classifiers")
    try:
        heldout, tags = _heldout(client, loaded.run_id)
    except RegistryError as exc:
        raise MonitorError(f"{name} version {version} has no reference data: {exc}") from None
    scorer = loaded.scorer
    missing = [c for c in scorer.features if c not in heldout.columns]
    if missing or "label" not in heldout.columns:
        raise MonitorError(f"{name} version {version}: the reference lacks {', '.join(missing or ['label'])}")
    frame = heldout[[*scorer.features, "label"]].copy()
    frame["probability"] = score_matrix(scorer, heldout)
    params = client.get_run(loaded.run_id).data.params
    moment = pd.Timestamp(heldout["cutoff"].max()) if "cutoff" in heldout.columns else None
    return Reference(name, str(version), loaded.run_id, params.get("task", tags.get("task", name)),
                     params.get("dataset"), _horizon(params), float(scorer.threshold),
                     list(scorer.columns.numeric), [*scorer.columns.categorical, *scorer.columns.boolean], frame,
                     moment)


@dataclass
class Window:
    start: pd.Timestamp
    end: pd.Timestamp
    frame: pd.DataFrame  # one row per warm prediction of the version: ts, customer_key, probability, features...
    logged_rows: int  # every row of the model in the window, any version, cold starts included
    cold_start_rows: int
    other_versions: dict[str, int]
    skipped_segments: list[tuple[Path, str]] = field(default_factory=list)
    extra_columns: list[str] = field(default_factory=list)  # logged but unknown to the reference: not compared

    def summary(self) -> dict[str, Any]:
        return {"start": str(self.start), "end": str(self.end), "rows": len(self.frame),
                "logged_rows": self.logged_rows, "cold_start_rows": self.cold_start_rows,
                "other_versions": self.other_versions, "extra_columns": self.extra_columns,
                "skipped_segments": [f"{p.name}: {why}" for p, why in self.skipped_segments]}


def read_window(log_root: Path, reference: Reference, start: pd.Timestamp, end: pd.Timestamp) -> Window:
    """The version's warm predictions in ``[start, end)`` as columns; raises :class:`MonitorError` when there is
    nothing to compare."""
    from serving.predlog import read_log

    skipped: list[tuple[Path, str]] = []
    rows = read_log(log_root, start, end, skipped=skipped)
    for path, why in skipped:
        log.warning("prediction log: skipped unreadable segment %s (%s)", path, why)
    rows = rows[rows["model"] == reference.model]
    if rows.empty:
        raise MonitorError(f"no logged predictions of {reference.model} between {start} and {end} in {log_root}"
                           + (f" ({len(skipped)} unreadable segment(s) skipped)" if skipped else ""))
    cold = rows["cold_start"].fillna(False).astype(bool)
    versions = rows["version"].astype(str)
    mine = rows[(versions == reference.version) & ~cold & rows["features"].notna()]
    other = versions[versions != reference.version].value_counts().to_dict()
    if mine.empty:
        raise MonitorError(f"{reference.model}: no warm predictions of version {reference.version} between {start} "
                           f"and {end} (logged: {len(rows)} rows, {int(cold.sum())} cold starts, other versions "
                           f"{other or 'none'})")
    features = pd.DataFrame.from_records([json.loads(x) for x in mine["features"]], index=mine.index)
    outputs = pd.DataFrame.from_records([json.loads(x) for x in mine["outputs"]], index=mine.index)
    extra = sorted(set(features.columns) - set(reference.features))
    shared = [c for c in reference.features if c in features.columns]
    if not shared:
        raise MonitorError(f"{reference.model}: the logged features ({', '.join(sorted(features.columns)[:6])}) "
                           f"share no column with version {reference.version}'s reference")
    missing = [c for c in reference.features if c not in features.columns]
    for c in missing:  # a feature the log lacks is all-missing: the pass reports it empty and alerts
        features[c] = np.nan
    frame = pd.concat([mine[["ts", "customer_key"]], outputs[["probability"]].astype(float),
                       features[reference.features]], axis=1)
    for c in reference.numeric:
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return Window(pd.Timestamp(start), pd.Timestamp(end), frame.reset_index(drop=True), len(rows), int(cold.sum()),
                  {str(k): int(v) for k, v in other.items()}, skipped, extra)


def join_labels(frame: pd.DataFrame, dataset_dir: Path, salt: bytes, horizon_days: int, task: str,
                known_until: pd.Timestamp | None = None) -> pd.Series:
    """The realized label of each logged prediction (NaN until its horizon has passed by ``known_until`` and the
    end of the data, or for a customer the data set does not know), by the training label definition at the
    prediction's time."""
    import ibis

    from features.labels import customer_labels
    from features.store import FeatureStore
    from serving.predlog import pseudonymize
    from training.train import TASK_LABELS

    label_column = TASK_LABELS.get(task)
    if label_column is None or "*" in label_column:
        raise MonitorError(f"labels for task {task!r} cannot be joined from transactions")
    store = FeatureStore(dataset_dir)
    observed_until = store.observed_until()
    if known_until is not None:
        known_until = pd.Timestamp(known_until)
        known_until = known_until.tz_convert("UTC").tz_localize(None) if known_until.tzinfo else known_until
        observed_until = min(observed_until, known_until)
    ids = store.customers.select("customer_id").to_pandas()["customer_id"].astype(str)
    by_key = {pseudonymize(c, salt): c for c in ids}
    ts = pd.to_datetime(frame["ts"], utc=True).dt.tz_localize(None)
    known = (ts + pd.Timedelta(days=horizon_days) <= observed_until) & frame["customer_key"].isin(by_key.keys())
    out = pd.Series(np.nan, index=frame.index)
    if not known.any():
        return out
    entities = pd.DataFrame({"customer_id": frame.loc[known, "customer_key"].map(by_key),
                             "cutoff": ts[known].astype("datetime64[ns]")}).drop_duplicates()
    labels = customer_labels(ibis.memtable(entities), store.transactions, horizon_days).to_pandas()
    labels = labels[["customer_id", "cutoff", label_column]]
    keyed = pd.DataFrame({"customer_id": frame.loc[known, "customer_key"].map(by_key),
                          "cutoff": ts[known].astype("datetime64[ns]")}, index=frame.index[known])
    merged = keyed.reset_index().merge(labels, on=["customer_id", "cutoff"], how="left").set_index("index")
    out.loc[merged.index] = merged[label_column].astype(float)
    return out


@dataclass(frozen=True)
class Outcomes:
    """Known outcomes from a file: a 0/1 label per pseudonymized customer key."""

    path: Path
    labels: pd.Series  # 0/1, indexed by customer_key
    rows_in: int
    skipped: dict[str, int]  # rows without a usable label, by reason; rows_in = len(labels) + sum(skipped)

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows_in": self.rows_in, "labels": len(self.labels),
                "positive_rate": round(float(self.labels.mean()), 4) if len(self.labels) else None,
                "skipped": self.skipped}


def read_outcomes(path: Path, id_column: str, label_column: str, positive: str, salt: bytes, sep: str = ",",
                  values: list[str] | None = None) -> Outcomes:
    """The outcomes in a CSV/Parquet file: ``label_column`` is 1 where it equals ``positive`` (compared as training
    compared it: text in any case, numbers as numbers), keyed by ``id_column`` pseudonymized with ``salt``. A row
    without an id or a label is skipped and counted; of one id given twice, the last row counts. With the training
    table's label ``values``, a value that is not one of them is an error (a file of only ``1`` read against
    ``Yes``/``No`` would otherwise be all negatives)."""
    from features.ingest import is_blank, normalize_ids
    from features.labeled import comparable_labels
    from features.loaders import CsvOptions, column_hint, file_format, read_source
    from personalize.errors import DataFileError
    from serving.predlog import pseudonymize

    path = Path(path)
    fmt, csv = file_format(path), CsvOptions(sep=sep)
    raw, unreadable = read_source(path, fmt, csv)
    for column, what, option in ((id_column, "id", "--labels-id"), (label_column, "label", "--labels-column")):
        if column not in raw.columns:
            raise DataFileError(path, f"no {what} column ({option} names another); the file has "
                                      f"{list(raw.columns)[:12]}{column_hint(path, fmt, csv, raw.columns)}",
                                column=column)
    text, positive_text, blank = comparable_labels(raw[label_column], positive)
    classes = sorted(set(text[~blank]))
    strangers = [c for c in classes if values and c not in values]
    if strangers or len(classes) > 2 or (len(classes) == 2 and positive_text not in classes):
        expected = (f"the training table's label values ({', '.join(values)}; in any case)" if values
                    else f"the positive value {positive!r} and one other")
        raise DataFileError(path, f"{expected} are expected; the file has {', '.join(classes[:10])}",
                            column=label_column)
    no_id = is_blank(raw[id_column])
    keys = normalize_ids(raw[id_column]).map(lambda c: None if c is None else pseudonymize(str(c), salt))
    usable = ~no_id & ~blank
    labels = pd.Series((text[usable] == positive_text).astype(int).to_numpy(), index=keys[usable].to_numpy())
    duplicate = int(labels.index.duplicated(keep="last").sum())
    labels = labels[~labels.index.duplicated(keep="last")].rename("label")
    skipped = {"missing_id": int(no_id.sum()), "missing_label": int((~no_id & blank).sum()),
               "duplicate_id": duplicate, "unreadable": len(unreadable)}
    return Outcomes(path, labels, len(raw) + len(unreadable), {k: v for k, v in skipped.items() if v})


@dataclass(frozen=True)
class OutcomesFile:
    """Where the outcomes are (``personalize monitor --labels FILE``); a column or value not given is the one the
    model's labeled table had (its id column, its label column, the positive value given at ingestion)."""

    path: Path
    id_column: str | None = None
    label_column: str | None = None
    positive: str | None = None
    sep: str = ","


def outcomes_for(settings: Any, reference: Reference, source: OutcomesFile) -> Outcomes:
    """Read ``source`` with the columns of ``reference``'s training table where it names none."""
    from serving.predlog import load_salt

    report: dict[str, Any] = {}
    path = settings.dataset_dir(reference.dataset) / "ingest_report.json" if reference.dataset else None
    if path is not None and path.exists():
        report = json.loads(path.read_text())
    id_column = source.id_column or report.get("id_column") or "customer_id"
    label_column = source.label_column or report.get("label")
    positive = source.positive or report.get("positive")
    if label_column is None or positive is None:
        missing = "--labels-column and --positive" if label_column is None else "--positive"
        why = ("was not trained on a labeled table" if label_column is None
               else "was ingested before the positive value was recorded")
        raise MonitorError(f"{reference.model} v{reference.version} {why}: name the outcome with {missing}")
    same_table = source.label_column is None and source.positive is None  # the training table's values apply
    return read_outcomes(source.path, id_column, label_column, str(positive), load_salt(settings.home), source.sep,
                         report.get("label_values") if same_table else None)
