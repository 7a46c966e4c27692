"""The monitor's thresholds and policies: one YAML file (``personalize monitor --config``), validated once.

Every field has a default, so the file only names what differs. Example::

    drift:
      num_method: wasserstein        # any Evidently stat test: ks, psi, wasserstein, jensenshannon, ...
      num_threshold: 0.1
      per_feature: {recency_days: {method: psi, threshold: 0.2}}
      share_threshold: 0.5           # dataset drift: this share of the features drifted
    alerts:
      estimated_drop: 0.05           # label-free (CBPE) ROC-AUC drop against the reference's estimate
      webhook_url: https://hooks.example.com/personalize
      cooldown_hours: 24
    retrain:
      consecutive: 2                 # hysteresis: this many alerting windows in a row
      cooldown_days: 30
      gate_metric: log_loss          # what the retrained model must be significantly better at
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from personalize.errors import load_yaml_model

Severity = Literal["info", "warning", "critical"]
Rule = Literal["dataset_drift", "prediction_drift", "empty_feature", "estimated_performance_drop",
               "realized_performance_drop"]
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FeatureDrift(_Strict):
    method: str | None = None
    threshold: float | None = Field(default=None, gt=0)


class DriftPolicy(_Strict):
    # Distances rather than p-values by default: a test's p-value shrinks with the window's size, so on large windows
    # every harmless wobble is "significant"; a distance means the same at 500 rows and at 500,000.
    num_method: str = "wasserstein"
    num_threshold: float = Field(default=0.1, gt=0)
    cat_method: str = "jensenshannon"
    cat_threshold: float = Field(default=0.1, gt=0)
    per_feature: dict[str, FeatureDrift] = {}
    share_threshold: float = Field(default=0.5, gt=0, le=1)  # dataset drift
    prediction_method: str = "wasserstein"
    # Wasserstein distance in reference standard deviations; at 0.1, windows of a few hundred rows resampled from the
    # reference itself crossed it (tests/test_monitoring.py measured 0.100 on 500 rows), so the default is 0.15.
    prediction_threshold: float = Field(default=0.15, gt=0)


class AlertPolicy(_Strict):
    dataset_drift: Severity = "warning"
    prediction_drift: Severity = "warning"
    empty_feature: Severity = "warning"  # a feature the reference has values for is null on every row of the window
    estimated_drop: float = Field(default=0.05, gt=0)  # ROC-AUC points, CBPE estimate against the reference's
    estimated_severity: Severity = "critical"
    realized_drop: float = Field(default=0.05, gt=0)  # ROC-AUC points, labeled rows against the reference's
    realized_severity: Severity = "critical"
    min_rows: int = Field(default=200, ge=1)  # below this a window is reported but raises no drift alert
    min_labeled: int = Field(default=200, ge=1)
    cooldown_hours: float = Field(default=24.0, ge=0)  # the same alert again within this is logged as suppressed
    webhook_url: str | None = None
    webhook_retries: int = Field(default=3, ge=0)
    webhook_timeout_s: float = Field(default=5.0, gt=0)


class RetrainPolicy(_Strict):
    enabled: bool = True
    # Alerts of at least this severity count toward a retrain. Sustained drift warnings qualify by default: the gate,
    # not the alert, decides whether the retrained model replaces the champion.
    on: Severity = "warning"
    # Alerts of these rules never count: an empty feature is a broken pipeline, fixed upstream, not learned from
    # (a model retrained on it would learn the feature's absence).
    not_on: list[Rule] = ["empty_feature"]
    consecutive: int = Field(default=2, ge=1)  # hysteresis: qualifying windows in a row
    cooldown_days: float = Field(default=30.0, ge=0)  # between two retrains of one model
    # A challenger is only judged on labeled data from the changed world: wait until the label horizon has passed
    # since the first qualifying window, or the gate would compare both models on data from before the change.
    wait_for_labels: bool = True
    trials: int = Field(default=5, ge=1)  # the warm-started study's budget (the champion's best trial comes first)
    # What the retrained model must be better at, on the held-out data of the world as it is now. The decisions
    # read the probabilities (a threshold, an expected value), and a changed world breaks a calibrated model's
    # probabilities before its ranking: the default is log-loss, a proper scoring rule that rewards both. roc_auc
    # asks for better ranking only.
    gate_metric: Literal["log_loss", "brier", "roc_auc"] = "log_loss"
    # What the challenger must gain at the interval's low end: ROC-AUC points, or a share of the champion's loss.
    min_gain: float = Field(default=0.0, ge=0)


class LogPolicy(_Strict):
    """Upkeep of the prediction log by ``personalize schedule``, before each round of passes."""

    compact: bool = True  # merge each past day's one-second segments into one file (readers pay per file)
    # Remove the days older than this. Keep at least a window plus the longest label horizon, or realized
    # performance has nothing to join; None keeps everything.
    keep_days: float | None = Field(default=None, gt=0)


class MonitorConfig(_Strict):
    window_days: float = Field(default=7.0, gt=0)
    drift: DriftPolicy = DriftPolicy()
    alerts: AlertPolicy = AlertPolicy()
    retrain: RetrainPolicy = RetrainPolicy()
    log: LogPolicy = LogPolicy()


def load_config(path: Path | None) -> MonitorConfig:
    """The config at ``path`` (YAML), or the defaults; a bad file is one clear error naming the field."""
    if path is None:
        return MonitorConfig()
    return load_yaml_model(path, MonitorConfig, f"{path}: cannot read the monitoring config: no such file")
