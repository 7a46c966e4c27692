"""One monitoring pass over a window of the prediction log: read → compare (Evidently, CBPE, labels) → alert →
persist, and the retrain decision that follows it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from monitoring.alerts import Alert, AlertSink, evaluate, judged
from monitoring.cbpe import estimate
from monitoring.config import MonitorConfig
from monitoring.data import (MonitorError, OutcomesFile, Reference, Window, join_labels, load_reference, outcomes_for,
                             read_window)

log = logging.getLogger(__name__)

__all__ = ["PassResult", "compare", "run_pass", "window_bounds"]


@dataclass
class PassResult:
    model: str
    version: str
    window: dict[str, Any]
    metrics: dict[str, Any]
    alerts: list[Alert]
    persisted: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def alerted(self) -> bool:
        return bool(self.alerts)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "window": self.window,
                "metrics": {k: v for k, v in self.metrics.items() if not k.startswith("evidently.")},
                "alerts": [a.to_dict() for a in self.alerts], "persisted": self.persisted, "seconds": self.seconds}


def window_bounds(end: pd.Timestamp | str | None, days: float) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``[end - days, end)`` in UTC; ``end`` defaults to now."""
    from serving.predlog import utc

    end = utc(pd.Timestamp.now(tz="UTC") if end is None else end)
    return end - pd.Timedelta(days=days), end


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def compare(reference: Reference, window: Window, config: MonitorConfig, summary: bool = True,
            matured: Window | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pass's numbers and its Evidently snapshots (no I/O beyond the computation): drift and the CBPE estimate
    on ``window``; realized performance and target drift on ``matured`` (an earlier window whose labels have
    arrived, with a ``label`` column), when given.

    The drift share is over the ``tested_features``: a feature empty in the reference or the window is not tested
    and is listed in ``skipped_features`` with the reason (the ones only the window lacks also in
    ``empty_features``, which alerts); values clipped to stay finite in Evidently are counted in
    ``clipped_values`` (window) and ``reference_clipped_values``."""
    from monitoring.drift import LIMIT, build_drift_report, build_performance_report, drift_flags, drift_inputs, extract

    inputs = drift_inputs(reference, window)
    if inputs.skipped:
        log.info("drift not measured for %s", ", ".join(f"{c} ({why})" for c, why in inputs.skipped.items()))
    if inputs.clipped:
        log.warning("window values beyond ±%g clipped to it: %s", LIMIT, inputs.clipped)
    snapshot = build_drift_report(reference, window, config.drift, summary=summary, inputs=inputs)
    content = snapshot.dict()  # built once: it serializes every metric of the report
    flags = drift_flags(content)
    flat = extract(content)
    features = [c for c in reference.features if c in flags]
    drifted = sorted((c for c in features if flags[c]),
                     key=lambda c: -flat.get(f"ValueDrift.{c}", 0.0))
    p_ref, p_cur = reference.frame["probability"].to_numpy(), window.frame["probability"].to_numpy()
    est, est_ref = estimate(p_cur, reference.threshold), estimate(p_ref, reference.threshold)
    metrics: dict[str, Any] = {
        "rows": len(window.frame), "logged_rows": window.logged_rows, "cold_start_rows": window.cold_start_rows,
        "drift_share": len(drifted) / len(features) if features else 0.0, "drifted_features": drifted,
        "tested_features": len(features), "skipped_features": inputs.skipped, "empty_features": inputs.empty_in_window,
        "clipped_values": inputs.clipped, "reference_clipped_values": inputs.reference_clipped,
        "prediction_drift": flat.get("ValueDrift.probability", float("nan")),
        "prediction_drift_detected": bool(flags.get("probability", False)),
        "mean_probability": float(np.mean(p_cur)), "reference_mean_probability": float(np.mean(p_ref)),
        **{f"estimated_{k}": v for k, v in est.items() if k != "rows"},
        "reference_estimated_roc_auc": est_ref["roc_auc"],
        "reference_roc_auc": _auc(reference.frame["label"].to_numpy(), p_ref),
        "labeled_rows": 0, "horizon_days": reference.horizon_days,
    }
    snapshots = {"drift": snapshot}
    if matured is not None and "label" in matured.frame.columns:
        metrics["labeled_window"] = f"{matured.start} .. {matured.end}"
        labeled = matured.frame[matured.frame["label"].notna()]
        metrics["labeled_rows"] = len(labeled)
        if len(labeled) >= config.alerts.min_labeled and labeled["label"].nunique() == 2:
            y = labeled["label"].to_numpy(dtype=int)
            metrics["realized_roc_auc"] = _auc(y, labeled["probability"].to_numpy())
            metrics["realized_positive_rate"] = float(y.mean())
            performance = build_performance_report(reference, matured, labeled)
            snapshots["performance"] = performance
            flat.update({f"performance.{k}": v for k, v in extract(performance.dict()).items()})
    metrics.update({f"evidently.{k}": v for k, v in flat.items()})
    return metrics, snapshots


def run_pass(settings: Any, client: Any, model: str, start: pd.Timestamp, end: pd.Timestamp,
             config: MonitorConfig = MonitorConfig(), version: str | None = None, dataset: str | None = None,
             reference: Reference | None = None, persist_reports: bool = True, summary: bool = True,
             sink: AlertSink | None = None, outcomes: OutcomesFile | None = None) -> PassResult:
    """Monitor ``model`` (its champion, or ``version``) over ``[start, end)``. Raises :class:`MonitorError` when
    the pass cannot be done (no champion, no reference, no predictions in the window).

    Realized performance comes from ``outcomes`` when given (a file labelling the window's own predictions by
    customer), else from the transactions of the model's data set, for the predictions whose horizon has passed."""
    from monitoring.drift import persist
    from serving.predlog import load_salt

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if reference is None:
        if version is None:
            try:
                version = str(client.get_model_version_by_alias(model, "champion").version)
            except Exception:
                raise MonitorError(f"{model} has no champion to monitor (train and promote one first)") from None
        reference = load_reference(client, model, version)
    seconds["reference"] = time.perf_counter() - t0
    t = time.perf_counter()
    window = read_window(settings.log_root, reference, start, end)
    seconds["read"] = time.perf_counter() - t
    dataset = dataset or reference.dataset
    t = time.perf_counter()
    matured = None  # the predictions whose label horizon has just passed: realized performance
    known = None
    if outcomes is not None:
        known = outcomes_for(settings, reference, outcomes)
        # One outcome per customer, judged against the customer's latest prediction in the window: a customer the
        # API scored ten times would otherwise weigh ten times in the realized ROC-AUC.
        frame = window.frame.sort_values("ts", kind="stable")
        matched = int(frame["customer_key"].map(known.labels).notna().sum())
        frame = frame[~frame.duplicated("customer_key", keep="last") | frame["customer_key"].isna()]
        matured = replace(window, frame=frame.assign(label=frame["customer_key"].map(known.labels)))
    elif reference.horizon_days and dataset and (settings.dataset_dir(dataset) / "transactions.parquet").exists():
        shift = pd.Timedelta(days=reference.horizon_days)
        try:
            matured = read_window(settings.log_root, reference, start - shift, end - shift)
        except MonitorError:
            matured = None
        if matured is not None:
            matured.frame["label"] = join_labels(matured.frame, settings.dataset_dir(dataset),
                                                 load_salt(settings.home), reference.horizon_days, reference.task,
                                                 known_until=end)
    seconds["labels"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics, snapshots = compare(reference, window, config, summary=summary, matured=matured)
    if known is not None:
        metrics["outcomes"] = {**known.summary(), "matched_predictions": matched,
                               "evaluated_customers": int(matured.frame["label"].notna().sum())}
    seconds["compare"] = time.perf_counter() - t
    metrics["judged"] = judged(metrics, config.alerts)  # too few rows for every rule: said with the pass
    alerts = evaluate(metrics, config, model, reference.version, window.start, window.end)
    result = PassResult(model, reference.version, window.summary(), metrics, alerts)
    if persist_reports:
        result.seconds = {k: round(v, 3) for k, v in seconds.items()}  # the written summary's: up to here
        t = time.perf_counter()
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)}
        result.persisted = persist(settings, reference, window, snapshots, numeric,
                                   {**result.to_dict(), "alerts": [a.to_dict() for a in alerts]})
        seconds["persist"] = time.perf_counter() - t
    sink = sink or AlertSink(settings.monitoring_dir / "alerts.jsonl", config.alerts)
    sink.emit(alerts)
    t = time.perf_counter()
    if not sink.wait(sink.delivery_budget_s):  # the deliveries' threads die with a one-shot process: see them out
        log.error("webhook: alert deliveries still running after %.0f s; their outcome is not recorded",
                  sink.delivery_budget_s)
    seconds["deliver"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    result.seconds = {k: round(v, 3) for k, v in seconds.items()}
    return result
