"""Alerts: the rules that turn a pass's numbers into alerts (pure), and the sink that records and sends them.

Every alert is appended to the alert log (JSON lines, ``<home>/monitoring/alerts.jsonl``). When a webhook is
configured, it is POSTed as JSON from a background thread with retries and backoff, so a slow or dead receiver never
blocks the job; each delivery's outcome is appended to the same log (``"type": "delivery"``). The same alert (model
and rule) again within the cooldown is logged as ``suppressed`` and not sent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from monitoring.config import AlertPolicy, MonitorConfig, Severity
from serving.predlog import utc

log = logging.getLogger(__name__)

__all__ = ["Alert", "AlertSink", "evaluate", "read_alerts"]


@dataclass
class Alert:
    model: str
    version: str
    rule: str
    severity: Severity
    message: str
    value: float
    bound: float
    window_start: str
    window_end: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    suppressed: bool = False
    type: str = "alert"

    @property
    def key(self) -> str:
        return f"{self.model}:{self.rule}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judged(metrics: dict[str, Any], policy: AlertPolicy) -> bool:
    """Whether any rule of :func:`evaluate` could judge the window: enough predictions for the first four, or enough
    labeled ones for the realized-performance rule."""
    return (int(metrics.get("rows", 0)) >= policy.min_rows
            or int(metrics.get("labeled_rows", 0)) >= policy.min_labeled)


def evaluate(metrics: dict[str, Any], config: MonitorConfig, model: str, version: str, start: pd.Timestamp,
             end: pd.Timestamp) -> list[Alert]:
    """The alerts a pass's numbers raise under the policy (pure). ``metrics`` holds ``rows``, ``drift_share`` (of
    ``tested_features``), ``drifted_features``, ``empty_features`` (null on every row of the window, not of the
    reference: not tested for drift, so alerted on their own), ``prediction_drift``/``prediction_drift_detected``,
    the estimated and reference ROC-AUC, and, with labels, ``labeled_rows`` and ``realized_roc_auc``."""
    policy: AlertPolicy = config.alerts
    out: list[Alert] = []
    start, end = utc(start), utc(end)

    def alert(rule: str, severity: Severity, message: str, value: float, bound: float) -> None:
        out.append(Alert(model, version, rule, severity, message, round(float(value), 6), round(float(bound), 6),
                         str(start), str(end)))

    rows = int(metrics.get("rows", 0))
    if rows >= policy.min_rows:
        share = float(metrics.get("drift_share", 0.0))
        if share >= config.drift.share_threshold:
            drifted = metrics.get("drifted_features", [])
            tested = f"{metrics['tested_features']} tested " if "tested_features" in metrics else ""
            alert("dataset_drift", policy.dataset_drift,
                  f"{share:.0%} of the {tested}features drifted (at least {config.drift.share_threshold:.0%} alerts): "
                  f"{', '.join(drifted[:8])}{', ...' if len(drifted) > 8 else ''}", share,
                  config.drift.share_threshold)
        empty = metrics.get("empty_features", [])
        if empty:
            alert("empty_feature", policy.empty_feature,
                  f"{len(empty)} feature(s) null on every row of the window, not of the reference (not tested for "
                  f"drift): {', '.join(empty[:8])}{', ...' if len(empty) > 8 else ''}", len(empty), 0)
        if metrics.get("prediction_drift_detected"):
            alert("prediction_drift", policy.prediction_drift,
                  f"the score's distribution moved: {config.drift.prediction_method} "
                  f"{metrics['prediction_drift']:.3f} (threshold {config.drift.prediction_threshold})",
                  metrics["prediction_drift"], config.drift.prediction_threshold)
        drop = float(metrics.get("reference_estimated_roc_auc", float("nan"))) - \
            float(metrics.get("estimated_roc_auc", float("nan")))
        if drop == drop and drop >= policy.estimated_drop:
            alert("estimated_performance_drop", policy.estimated_severity,
                  f"estimated ROC-AUC (CBPE, no labels yet) {metrics['estimated_roc_auc']:.3f} against "
                  f"{metrics['reference_estimated_roc_auc']:.3f} on the reference: down {drop:.3f}",
                  drop, policy.estimated_drop)
    if int(metrics.get("labeled_rows", 0)) >= policy.min_labeled:
        drop = float(metrics.get("reference_roc_auc", float("nan"))) - float(metrics.get("realized_roc_auc",
                                                                                          float("nan")))
        if drop == drop and drop >= policy.realized_drop:
            alert("realized_performance_drop", policy.realized_severity,
                  f"ROC-AUC on {int(metrics['labeled_rows'])} labeled predictions {metrics['realized_roc_auc']:.3f} "
                  f"against {metrics['reference_roc_auc']:.3f} on the reference: down {drop:.3f}",
                  drop, policy.realized_drop)
    return out


def read_alerts(path: Path) -> list[dict[str, Any]]:
    """Every record of an alert log (alerts and deliveries), oldest first; a torn last line is skipped."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _post_json(url: str, body: dict[str, Any], timeout: float) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "personalize"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (the URL is configuration)
            return int(response.status)
    except urllib.error.HTTPError as exc:  # an answer, not a failure to deliver: its status is the outcome
        return int(exc.code)


class AlertSink:
    """Records alerts (JSON lines) and sends them to the webhook; ``post(url, body, timeout) -> status`` is the
    sender (urllib by default; a test passes its own)."""

    def __init__(self, path: Path, policy: AlertPolicy, post: Callable[[str, dict[str, Any], float], int] | None = None,
                 backoff_s: float = 1.0) -> None:
        self.path = Path(path)
        self.policy = policy
        self.post = post or _post_json
        self.backoff_s = backoff_s
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record, default=str) + "\n")

    def _last_sent(self) -> dict[str, pd.Timestamp]:
        last: dict[str, pd.Timestamp] = {}
        for r in read_alerts(self.path):
            if r.get("type") == "alert" and not r.get("suppressed"):
                last[f"{r['model']}:{r['rule']}"] = utc(r["window_end"])
        return last

    def emit(self, alerts: list[Alert]) -> list[Alert]:
        """Record each alert, suppressing repeats within the cooldown (measured on the windows' ends, so a replay
        of past windows behaves as live monitoring would), and send the others."""
        last = self._last_sent()
        cooldown = pd.Timedelta(hours=self.policy.cooldown_hours)
        for a in alerts:
            seen = last.get(a.key)
            a.suppressed = seen is not None and utc(a.window_end) - seen < cooldown
            self._append(a.to_dict())
            if not a.suppressed:
                last[a.key] = utc(a.window_end)
                log.warning("ALERT %s %s: %s", a.severity.upper(), a.key, a.message)
                if self.policy.webhook_url:
                    t = threading.Thread(target=self._deliver, args=(a,), name=f"webhook-{a.id}", daemon=True)
                    t.start()
                    self._threads.append(t)
        return alerts

    def _deliver(self, alert: Alert) -> None:
        url, error, status = str(self.policy.webhook_url), "", 0
        attempts = 0
        for attempts in range(1, self.policy.webhook_retries + 2):
            try:
                status = self.post(url, {"text": f"[{alert.severity}] {alert.model}: {alert.message}",
                                         **alert.to_dict()}, self.policy.webhook_timeout_s)
                if 200 <= status < 300:
                    error = ""
                    break
                error = f"HTTP {status}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            if attempts <= self.policy.webhook_retries:
                time.sleep(self.backoff_s * 2 ** (attempts - 1))
        if error:
            log.error("webhook: alert %s not delivered after %d attempt(s): %s", alert.id, attempts, error)
        self._append({"type": "delivery", "alert_id": alert.id, "delivered": not error, "attempts": attempts,
                      "status": status, "error": error, "at": pd.Timestamp.now(tz="UTC").isoformat()})

    @property
    def delivery_budget_s(self) -> float:
        """The longest one delivery can take: every attempt timing out, with the backoff between them."""
        retries = self.policy.webhook_retries
        return (retries + 1) * self.policy.webhook_timeout_s + self.backoff_s * (2 ** retries - 1) + 1.0

    def wait(self, timeout_s: float = 30.0) -> bool:
        """Give pending deliveries up to ``timeout_s`` in all; True when none is left running."""
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        return not self._threads
