"""The demo's monitoring loop, run against the live API server: a stationary period, then the shop six months on,
after a change, replayed through the server; a monitoring pass per window; the retrain the alerts call for; the gate;
and the server answering with the new champion once it has reloaded.

The shop is the synthetic one (:func:`features.synthetic.generate`) with a planted change at ``CHANGE``: every
customer's dropout hazard triples (a competitor's launch; ``DriftSpec.dropout``). The demo first knows it only up to
``CHANGE`` (:func:`features.synthetic.until`), so the models are trained on the world before. Here:

1. **Stationary period.** A sample of the customers as they were at the churn champion's reference moment, posted to
   ``/churn`` with their features (as an application holding its own features would), then one monitoring pass over
   the minutes the replay took. Nothing changed, so nothing should fire.
2. **New data arrives.** The same shop, with everything up to its end (six months after the change), is ingested
   under the same name.
3. **Drifted period.** Two windows, each a sample of the customers as they are now, posted the same way, one pass
   each. The retrain policy counts qualifying windows in a row (``consecutive: 2``).
4. **Retrain → gate.** ``monitoring.retrain.retrain``: like the champion was trained, on the data as it is now; the
   gate asks for a significant log-loss gain on the new held-out cutoff (``retrain.gate_metric``).
5. **Hot reload.** The server polls the registry's aliases; the demo asks it until its answers carry the new
   champion's version (or says so when they do not).

The demo's policy differs from the defaults in two places, both because the simulated clock runs faster than the
real one: ``wait_for_labels`` is off (the replayed period is six months old, so its labels are in the data already)
and ``cooldown_days`` is 0 (a rerun of the demo minutes later retrains again).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from personalize.settings import Settings

MODEL = "churn"
DATASET = "synthetic"
CHANGE = datetime(2025, 7, 1)  # the planted change; the demo first knows the shop up to here
DROPOUT = 3.0  # every category's fans: their dropout hazard times this after CHANGE
SAMPLE = 600  # customers per replayed window
BATCH = 200  # items per request


@dataclass
class LoopOutcome:
    windows: list[dict[str, Any]] = field(default_factory=list)
    decision: str = ""
    retrain: dict[str, Any] | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    served_before: str | None = None
    served_after: str | None = None
    reload_s: float | None = None
    reports: str = ""
    alert_log: str = ""
    note: str = ""

    @property
    def alerts(self) -> int:
        return sum(len(w["alerts"]) for w in self.windows)

    @property
    def served_version_changed(self) -> bool:
        return self.served_before is not None and self.served_after not in (None, self.served_before)


def drift_spec() -> Any:
    from features.synthetic import DriftSpec, SyntheticConfig

    return DriftSpec(start=CHANGE, dropout={c: DROPOUT for c in SyntheticConfig().categories})


def _features_at(settings: Settings, moment: pd.Timestamp, features: list[str]) -> pd.DataFrame:
    """Every customer who had bought before ``moment`` (those a churn model is defined for), with the point-in-time
    features of that moment, in the model's columns."""
    from features.store import FeatureStore

    store = FeatureStore(settings.dataset_dir(DATASET))
    frame = store.offline([moment], store.every_category(moment))
    frame = frame[frame["frequency"] > 0].reset_index(drop=True)
    for c in features:
        if c not in frame.columns:
            frame[c] = 0.0  # a category share the model knows but nobody had bought yet
    return frame[["customer_id", *features]]


def _post(http: Any, frame: pd.DataFrame, features: list[str]) -> None:
    """The rows as ``/churn`` batches: customer id and the full feature record, as an application would send them."""
    records = frame[features].astype(float).replace({np.nan: None}).to_dict("records")
    ids = frame["customer_id"].astype(str).tolist()
    for lo in range(0, len(ids), BATCH):
        items = [{"customer_id": c, "features": f} for c, f in zip(ids[lo:lo + BATCH], records[lo:lo + BATCH])]
        r = http.post("/churn", json={"items": items})
        r.raise_for_status()


def _served_version(http: Any, customer: str) -> str | None:
    r = http.post("/churn", json={"customer_id": customer})
    return str(r.json()["model"]["version"]) if r.status_code == 200 else None


def monitor_loop(settings: Settings, http: Any, world: Any, trials: int, probe: str) -> LoopOutcome:
    """Steps 1 to 5 of the module's docstring, against the server behind ``http``; ``world`` is the whole shop and
    ``probe`` a customer to ask the server about before and after the retrain."""
    from features.pipeline import ingest_synthetic
    from monitoring.config import MonitorConfig, RetrainPolicy
    from monitoring.data import load_reference
    from monitoring.job import run_pass
    from monitoring.retrain import RetrainState, decide, retrain
    from serving.predlog import utc
    from training.registry import connect

    client = connect(settings.tracking_uri)
    out = LoopOutcome(alert_log=str(settings.monitoring_dir / "alerts.jsonl"),
                      reports=str(settings.monitoring_dir / "reports" / MODEL))
    try:
        version = str(client.get_model_version_by_alias(MODEL, "champion").version)
    except Exception:  # the gate refused every version: nothing is served, so nothing to monitor
        out.note = f"{MODEL} has no champion: the gate refused it, so there is nothing to monitor"
        return out
    out.champion_before = out.champion_after = version
    out.served_before = _served_version(http, probe)
    reference = load_reference(client, MODEL, version)
    features = [c for c in reference.frame.columns if c not in ("label", "probability")]  # the model's inputs
    config = MonitorConfig(retrain=RetrainPolicy(consecutive=2, wait_for_labels=False, cooldown_days=0,
                                                 trials=trials))
    rng = np.random.default_rng(0)

    def window(label: str, frame: pd.DataFrame) -> tuple[list[Any], pd.Timestamp, pd.Timestamp]:
        """Post ``frame``, monitor the minutes that took; (alerts, window start, window end)."""
        start = utc(pd.Timestamp.now(tz="UTC"))
        _post(http, frame, features)
        time.sleep(1.5)  # the server writes its prediction log every second (PERSONALIZE_LOG_FLUSH_S)
        end = utc(pd.Timestamp.now(tz="UTC")) + pd.Timedelta(seconds=1)
        result = run_pass(settings, client, MODEL, start, end, config, reference=reference, dataset=DATASET)
        m = result.metrics
        out.windows.append({"stream": label, "rows": m["rows"], "drift_share": round(m["drift_share"], 3),
                            "prediction_drift": round(m["prediction_drift"], 3),
                            "mean_probability": round(m["mean_probability"], 3),
                            "estimated_roc_auc": round(m["estimated_roc_auc"], 3),
                            "alerts": [a.rule for a in result.alerts]})
        return result.alerts, start, end

    def sample(frame: pd.DataFrame, n: int) -> pd.DataFrame:
        return frame.iloc[np.sort(rng.choice(len(frame), size=min(n, len(frame)), replace=False))]

    window(f"before the change ({reference.moment.date()})", sample(_features_at(settings, reference.moment,
                                                                                 features), SAMPLE))
    ingest_synthetic(settings, DATASET, world)  # six months of new data, the change in them
    from features.store import FeatureStore
    from serving.online import default_as_of

    now = default_as_of(FeatureStore(settings.dataset_dir(DATASET)))
    current = _features_at(settings, now, features)
    state, due, why = RetrainState(), False, ""
    for k in range(2):  # two windows of traffic from the same customers, each its own sample
        alerts, start, end = window(f"after the change ({now.date()}), window {k + 1}", sample(current, SAMPLE))
        state, due, why = decide(state, alerts, start, end, config.retrain, reference.horizon_days)
    out.decision = why
    if not due:
        return out
    outcome = retrain(settings, client, MODEL, config.retrain, why, seed=42)
    out.retrain = outcome.to_dict()
    out.champion_after = outcome.champion_after
    t0, deadline = time.monotonic(), time.monotonic() + 60
    out.served_after = _served_version(http, probe)
    while out.served_after != out.champion_after and time.monotonic() < deadline:
        time.sleep(1)
        out.served_after = _served_version(http, probe)
    out.reload_s = round(time.monotonic() - t0, 1)
    return out


def monitoring_table(outcome: LoopOutcome) -> Table:
    table = Table(title=f"Monitoring the {MODEL} champion: traffic replayed through the API")
    for col in ("window", "rows", "drifted features", "prediction drift", "mean p", "est. ROC-AUC", "alerts"):
        table.add_column(col)
    for w in outcome.windows:
        table.add_row(w["stream"], str(w["rows"]), f"{w['drift_share']:.0%}", f"{w['prediction_drift']:.3f}",
                      f"{w['mean_probability']:.3f}", f"{w['estimated_roc_auc']:.3f}", ", ".join(w["alerts"]) or "none")
    return table


def loop_lines(outcome: LoopOutcome) -> list[str]:
    if outcome.note:
        return [outcome.note]
    lines = [f"retrain policy: {outcome.decision}"]
    r = outcome.retrain
    if r is not None:
        g = r["gate"]
        metric = "log_loss" if "challenger_log_loss" in g else "roc_auc"
        lines.append(f"retrained {MODEL}: version {r['challenger']} against champion {r['champion_before']} on the new "
                     f"held-out cutoff: {metric} {g.get(f'challenger_{metric}', float('nan')):.4f} vs "
                     f"{g.get(f'champion_{metric}', float('nan')):.4f} (gain interval [{g.get('ci_low', 0):+.4f}, "
                     f"{g.get('ci_high', 0):+.4f}]) -> gate {r['verdict']}; champion now {r['champion_after']}")
        if "champion_ece" in g:
            lines.append(f"  what moved: ranking ROC-AUC {g['challenger_roc_auc']:.4f} vs {g['champion_roc_auc']:.4f}; "
                         f"calibration ECE {g['ece']:.4f} vs {g['champion_ece']:.4f} (challenger vs champion)")
    if outcome.served_version_changed:
        lines.append(f"the running API now answers with version {outcome.served_after} (was {outcome.served_before}; "
                     f"hot reload seen {outcome.reload_s}s after the promotion)")
    elif r is not None:
        lines.append(f"the running API answers with version {outcome.served_after} (champion {outcome.champion_after})")
    return lines
