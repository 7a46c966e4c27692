"""The demo's monitoring step: replay the synthetic shop's customers through the churn champion on a simulated
clock, first as they were at the model's reference moment (a stationary stream), then from the same shop with its
activity drift knob turned, and run one monitoring pass per window (Evidently reports into the workspace, metrics
into MLflow, alerts into the alert log)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from rich.table import Table

from personalize.settings import Settings

MODEL = "churn"
SAMPLE = 1000


@dataclass
class MonitorOutcome:
    windows: list[dict[str, Any]] = field(default_factory=list)
    reports: str = ""
    alert_log: str = ""
    note: str = ""


def monitor_streams(settings: Settings, customers: int) -> MonitorOutcome:
    from features.pipeline import ingest_synthetic
    from features.synthetic import DriftSpec, SyntheticConfig, generate
    from monitoring.config import MonitorConfig
    from monitoring.data import load_reference
    from monitoring.job import run_pass
    from monitoring.replay import replay
    from serving.predlog import load_salt
    from training.registry import connect

    client = connect(settings.tracking_uri)
    try:
        version = str(client.get_model_version_by_alias(MODEL, "champion").version)
    except Exception:  # the gate refused every version: nothing is served, so nothing to monitor
        return MonitorOutcome(note=f"{MODEL} has no champion: the gate refused it, so there is nothing to monitor")
    reference = load_reference(client, MODEL, version)
    moment = reference.moment
    drifted = generate(SyntheticConfig(customers=customers, drift=DriftSpec(
        start=(moment - pd.Timedelta(days=28)).to_pydatetime(), activity=-0.6)))
    ingest_synthetic(settings, "synthetic_drifted", drifted)
    salt = load_salt(settings.home)
    # Simulated weeks, far from the demo's real requests, so the windows hold only the replayed rows.
    week = pd.Timedelta(days=7)
    stamps = [pd.Timestamp("2030-01-07") + k * week for k in range(3)]
    streams = [("stationary", "synthetic", stamps[0]), ("stationary", "synthetic", stamps[1]),
               ("activity -60%", "synthetic_drifted", stamps[2])]
    out = MonitorOutcome(alert_log=str(settings.monitoring_dir / "alerts.jsonl"))
    for k, (label, dataset, stamp) in enumerate(streams):
        replay(client, MODEL, settings.dataset_dir(dataset), settings.log_root, [stamp], salt, sample=SAMPLE,
               seed=k, as_of=moment)
        end = stamp + pd.Timedelta(hours=1)
        result = run_pass(settings, client, MODEL, end - week, end, MonitorConfig(), reference=reference,
                          dataset="synthetic")
        m = result.metrics
        out.windows.append({"stream": label, "window_end": str(end.date()), "rows": m["rows"],
                            "drift_share": round(m["drift_share"], 3),
                            "prediction_drift": round(m["prediction_drift"], 3),
                            "estimated_roc_auc": round(m["estimated_roc_auc"], 3),
                            "alerts": [a.rule for a in result.alerts]})
        out.reports = str(settings.monitoring_dir / "reports" / MODEL)
    return out


def monitoring_table(outcome: MonitorOutcome) -> Table:
    table = Table(title=f"Monitoring the {MODEL} champion (replayed windows)")
    for col in ("stream", "window end", "rows", "drifted features", "prediction drift", "est. ROC-AUC", "alerts"):
        table.add_column(col)
    for w in outcome.windows:
        table.add_row(w["stream"], w["window_end"], str(w["rows"]), f"{w['drift_share']:.0%}",
                      f"{w['prediction_drift']:.3f}", f"{w['estimated_roc_auc']:.3f}",
                      ", ".join(w["alerts"]) or "none")
    return table
