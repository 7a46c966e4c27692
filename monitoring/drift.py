"""Evidently reports for one monitoring pass, as build → extract → persist.

- :func:`drift_inputs`: the frames Evidently can take: a feature empty (all null) in the reference or the window has
  no distribution to compare and is left out of the drift tests, saying why; numeric values beyond ±``LIMIT``
  (infinities too) are clipped to it and counted.
- :func:`build_drift_report`: data drift of every feature (Evidently's ``DataDriftPreset`` with the configured
  method and threshold per feature), prediction drift of the score column, and data-quality summaries
  (``DataSummaryPreset``: missing values, ranges, quantiles), window against reference.
- :func:`build_performance_report`: once labels have arrived, ``ClassificationPreset`` on the labeled rows and
  target drift (the label's own distribution), against the reference's labeled rows.
- :func:`extract`: a snapshot as a flat ``{name: float}`` dict, and :func:`drift_flags` the per-column verdicts.
- :func:`persist`: the snapshot into the Evidently workspace (the UI's dashboards over time), its HTML beside the
  alert log, and the numbers into one MLflow run per pass.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from monitoring.config import DriftPolicy
from monitoring.data import Reference, Window

log = logging.getLogger(__name__)

__all__ = ["LIMIT", "DriftInputs", "build_drift_report", "build_performance_report", "drift_flags", "drift_inputs",
           "extract", "persist"]

PREDICTION = "probability"
# Evidently bins a column over max - min and squares its values for its statistics: a finite value the API accepted
# (1e308) overflows both and fails the whole report. Clipped to ±1e150, ranges and squares stay finite, and a clipped
# value still lies so far out that the column's drift test flags it.
LIMIT = 1e150
EMPTY_REFERENCE = "empty in the reference"
EMPTY_WINDOW = "empty in the current window"


def _definition(reference: Reference, extra_numeric: tuple[str, ...] = ()) -> Any:
    from evidently import DataDefinition

    return DataDefinition(numerical_columns=[*reference.numeric, *extra_numeric],
                          categorical_columns=list(reference.categorical))


def _when(window: Window) -> datetime:
    end = pd.Timestamp(window.end)
    return (end.tz_convert("UTC").tz_localize(None) if end.tzinfo else end).to_pydatetime()


@dataclass(frozen=True)
class DriftInputs:
    """The reference and window frames as the drift report reads them, and what was done to get there."""

    reference: pd.DataFrame  # features and probability, numeric values clipped to ±LIMIT
    current: pd.DataFrame
    tested: list[str]  # the features whose drift is measured
    skipped: dict[str, str]  # feature → why its drift is not measured (EMPTY_REFERENCE, EMPTY_WINDOW)
    clipped: dict[str, int]  # the window's values clipped to ±LIMIT, by column (none: not listed)
    reference_clipped: dict[str, int]

    @property
    def empty_in_window(self) -> list[str]:
        """Features the reference has values for and the window has none: a broken input, not a model property."""
        return [c for c, why in self.skipped.items() if why == EMPTY_WINDOW]


def _clip(frame: pd.DataFrame, numeric: list[str]) -> tuple[pd.DataFrame, dict[str, int]]:
    counts: dict[str, int] = {}
    for c in numeric:
        values = pd.to_numeric(frame[c], errors="coerce")  # an all-null column read as objects is not numeric yet
        beyond = int((values.abs() > LIMIT).sum())
        if beyond:
            counts[c] = beyond
        frame[c] = values.clip(-LIMIT, LIMIT)
    return frame, counts


def drift_inputs(reference: Reference, window: Window) -> DriftInputs:
    """The frames to compare (pure): numeric values beyond ±``LIMIT`` (infinities too) clipped to it and counted,
    and every feature that is all null in the reference or in the window left out of the drift tests (Evidently
    refuses an empty column; it stays in the data-quality summary, where its missing values show)."""
    columns = [*reference.features, PREDICTION]
    numeric = [*reference.numeric, PREDICTION]
    ref, reference_clipped = _clip(reference.frame[columns].copy(), numeric)
    cur, clipped = _clip(window.frame[columns].copy(), numeric)
    skipped = {c: EMPTY_REFERENCE if ref[c].isna().all() else EMPTY_WINDOW
               for c in reference.features if ref[c].isna().all() or cur[c].isna().all()}
    return DriftInputs(ref, cur, [c for c in reference.features if c not in skipped], skipped, clipped,
                       reference_clipped)


def build_drift_report(reference: Reference, window: Window, policy: DriftPolicy, summary: bool = True,
                       inputs: DriftInputs | None = None) -> Any:
    """The window's drift and data-quality snapshot against the reference (an Evidently ``Snapshot``), on
    ``inputs`` (default: :func:`drift_inputs` of the two): the drift of its tested features only."""
    from evidently import Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset, DataSummaryPreset

    if inputs is None:
        inputs = drift_inputs(reference, window)
    definition = _definition(reference, (PREDICTION,))
    tested = inputs.tested
    items: list[Any] = [
        DataDriftPreset(columns=tested, drift_share=policy.share_threshold,
                        num_method=policy.num_method, num_threshold=policy.num_threshold,
                        cat_method=policy.cat_method, cat_threshold=policy.cat_threshold,
                        per_column_method={c: f.method for c, f in policy.per_feature.items()
                                           if f.method and c in tested} or None,
                        per_column_threshold={c: f.threshold for c, f in policy.per_feature.items()
                                              if f.threshold and c in tested} or None),
    ] if tested else []  # no columns would be every column to Evidently
    items.append(ValueDrift(column=PREDICTION, method=policy.prediction_method, threshold=policy.prediction_threshold))
    if summary:
        items.append(DataSummaryPreset(columns=list(inputs.current.columns)))
    report = Report(items, include_tests=True, metadata={"model": reference.model, "version": reference.version},
                    tags=[reference.model, f"v{reference.version}", "drift"])
    with _quiet_evidently():
        return report.run(Dataset.from_pandas(inputs.current, data_definition=definition),
                          Dataset.from_pandas(inputs.reference, data_definition=definition),
                          timestamp=_when(window))


@contextmanager
def _quiet_evidently():
    """Evidently's column summary divides by the count of values, 0 for a feature empty in the window (numpy's
    "invalid value encountered in scalar divide", a dozen lines a pass); the report shows such a column as empty."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"evidently\.")
        yield


def build_performance_report(reference: Reference, window: Window, labeled: pd.DataFrame) -> Any:
    """Classification quality of the labeled rows of the window, and target drift, against the reference."""
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(numerical_columns=[PREDICTION], categorical_columns=["label"],
                                classification=[BinaryClassification(target="label", prediction_probas=PREDICTION,
                                                                     pos_label=1)])

    def part(frame: pd.DataFrame) -> Any:
        out = frame[["label", PREDICTION]].copy()
        out["label"] = out["label"].astype(int)
        return Dataset.from_pandas(out, data_definition=definition)

    report = Report([ClassificationPreset(probas_threshold=reference.threshold), ValueDrift(column="label")],
                    include_tests=False, metadata={"model": reference.model, "version": reference.version},
                    tags=[reference.model, f"v{reference.version}", "performance"])
    with _quiet_evidently():
        return report.run(part(labeled), part(reference.frame), timestamp=_when(window))


_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-/ ]+")


def _key(config: dict[str, Any]) -> str:
    parts = [str(config.get("type", "metric")).rsplit(":", 1)[-1]]
    if config.get("column"):
        parts.append(str(config["column"]))
    for k, v in config.items():
        if k in ("type", "column", "columns", "method", "threshold", "tests") or v is None or isinstance(v, (dict, list)):
            continue
        parts.append(f"{k}_{v}")
    return _UNSAFE.sub("_", ".".join(parts))[:240]


def extract(content: dict[str, Any]) -> dict[str, float]:
    """Every numeric value of a snapshot (its ``.dict()``) under a stable, MLflow-safe name (``ValueDrift.recency_days``,
    ``DriftedColumnsCount.share``, ``MissingValueCount.frequency.count``)."""
    out: dict[str, float] = {}
    for metric in content["metrics"]:
        key, value = _key(metric.get("config", {})), metric.get("value")
        while key in out:
            key += "_"
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                    out[f"{key}.{_UNSAFE.sub('_', str(sub))}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def drift_flags(content: dict[str, Any]) -> dict[str, bool]:
    """Column → drift detected, from a snapshot's (``.dict()``) per-column drift tests (the method's own rule: a distance above
    its threshold, or a p-value below it)."""
    flags: dict[str, bool] = {}
    for test in content.get("tests", []):
        params = (test.get("metric_config") or {}).get("params") or {}
        if str(params.get("type", "")).endswith("ValueDrift") and params.get("column"):
            flags[str(params["column"])] = test.get("status") == "FAIL"
    return flags


# --- persist -----------------------------------------------------------------------------------------------------
def _project(workspace: Any, model: str) -> Any:
    """The workspace's project of a model, created with its dashboard on first use."""
    name = f"personalize: {model}"
    found = workspace.search_project(name)
    if found:
        try:
            _panels_once(workspace, found[0])  # a project made before this was repaired here
        except Exception as exc:
            log.warning("Evidently dashboard not checked: %s", exc)
        return found[0]
    project = workspace.create_project(name, description=f"Monitoring of the {model} champion (personalize monitor)")
    try:
        from evidently.sdk.models import PanelMetric
        from evidently.sdk.panels import line_plot_panel

        dash = project.dashboard
        dash.add_panel(line_plot_panel("Share of drifted features", [
            PanelMetric(metric="DriftedColumnsCount", legend="share", metric_labels={"value_type": "share"})]),
            tab="Drift")
        dash.add_panel(line_plot_panel("Prediction drift (score)", [
            PanelMetric(metric="ValueDrift", legend=PREDICTION, metric_labels={"column": PREDICTION})]), tab="Drift")
        dash.add_panel(line_plot_panel("ROC-AUC on labeled predictions", [
            PanelMetric(metric="RocAuc", legend="ROC-AUC")]), tab="Performance")
        _panels_once(workspace, project)
    except Exception as exc:  # the reports are what matters; a dashboard the UI cannot draw is not worth a failed pass
        log.warning("Evidently dashboard panels not added: %s", exc)
    return project


def _panels_once(workspace: Any, project: Any) -> None:
    """Each dashboard panel listed once per tab: evidently 0.7.23's ``add_panel`` lists a panel twice in a tab that
    already exists, and the UI then draws it twice."""
    board = project.dashboard.model()
    if any(len(set(tab.panels)) < len(tab.panels) for tab in board.tabs):
        for tab in board.tabs:
            tab.panels = list(dict.fromkeys(tab.panels))
        workspace.save_dashboard(project.id, board)


def snapshot_workspace(path: str) -> Any:
    """Evidently's local workspace at ``path``, for projects and snapshots only. ``Workspace.__init__`` also builds
    its dataset manager, which reads and parses every snapshot of every project on opening: 26 s per pass once a
    workspace held ~80 snapshots (300 MB), growing with every pass of a long-lived schedule. Projects and runs go
    through the workspace's own file state, which reads only what it is asked for. (Checked against Evidently
    0.7.23, the locked version: ``create_project``, ``search_project``, the dashboard and ``add_run`` use only
    ``path`` and ``state``; tests/test_monitoring_inputs.py has the Evidently UI's Workspace read what it wrote.)"""
    from evidently.ui.storage.local.base import LocalState
    from evidently.ui.workspace import Workspace

    class SnapshotWorkspace(Workspace):
        def __init__(self, path: str) -> None:  # Workspace.__init__ minus the dataset, artifact and prompt APIs
            self.path = path
            self.state = LocalState(path)

    return SnapshotWorkspace(path)


def persist(settings: Any, reference: Reference, window: Window, snapshots: dict[str, Any],
            metrics: dict[str, float], summary: dict[str, Any]) -> dict[str, Any]:
    """Write each snapshot to the Evidently workspace and as HTML, and log ``metrics`` with the HTML and the
    pass's summary to an MLflow run in the experiment ``monitor-<model>``; returns where everything went."""
    import mlflow

    from training.tracking import use_experiment

    stamp = _when(window).strftime("%Y%m%dT%H%M%S")
    folder = settings.monitoring_dir / "reports" / reference.model
    folder.mkdir(parents=True, exist_ok=True)
    workspace = snapshot_workspace(str(settings.evidently_workspace))
    project = _project(workspace, reference.model)
    html: dict[str, str] = {}
    for kind, snapshot in snapshots.items():
        workspace.add_run(project.id, snapshot)
        path = folder / f"{stamp}-v{reference.version}-{kind}.html"
        snapshot.save_html(str(path))
        html[kind] = str(path)
    summary_path = folder / f"{stamp}-v{reference.version}-summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    use_experiment(settings.tracking_uri, f"monitor-{reference.model}", settings.artifact_root)
    with mlflow.start_run(run_name=f"{reference.model} v{reference.version} {window.start:%Y-%m-%d}..{window.end:%Y-%m-%d}") as run:
        mlflow.set_tags({"kind": "monitoring", "model": reference.model, "version": reference.version,
                         "window_start": str(window.start), "window_end": str(window.end),
                         "alerts": ",".join(a["rule"] for a in summary.get("alerts", [])) or "none"})
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)},
                           timestamp=int(_when(window).timestamp() * 1000))
        for path in html.values():
            mlflow.log_artifact(path, artifact_path="evidently")
        mlflow.log_artifact(str(summary_path))
    return {"html": html, "summary": str(summary_path), "mlflow_run_id": run.info.run_id,
            "workspace": str(settings.evidently_workspace), "project_id": str(project.id)}
