"""The loop for people without an orchestrator: every interval, monitor each model's last window and retrain it when
the policy says so (``personalize schedule``). :func:`step` is one tick for one model; cron or Airflow call
``personalize monitor MODEL --retrain`` instead, which runs the same step."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from monitoring.config import MonitorConfig
from monitoring.data import MonitorError
from monitoring.job import PassResult, run_pass, window_bounds
from monitoring.retrain import RetrainOutcome, decide, load_state, retrain, save_state

log = logging.getLogger(__name__)

__all__ = ["ScheduleSummary", "StepResult", "keep_log", "monitored_models", "schedule", "step"]


@dataclass
class StepResult:
    model: str
    result: PassResult | None
    due: bool
    why: str
    retrained: RetrainOutcome | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "pass": self.result.to_dict() if self.result else None, "retrain_due": self.due,
                "why": self.why, "retrained": self.retrained.to_dict() if self.retrained else None,
                "error": self.error}


def step(settings: Any, client: Any, model: str, end: pd.Timestamp | None, config: MonitorConfig,
         allow_retrain: bool = True, dataset: str | None = None, **pass_options: Any) -> StepResult:
    """Monitor ``[end - window, end)`` (raises :class:`MonitorError` when that cannot be done), fold the alerts into
    the model's retrain state, and retrain when due and allowed."""
    start, end = window_bounds(end, config.window_days)
    result = run_pass(settings, client, model, start, end, config, dataset=dataset, **pass_options)
    folder = settings.monitoring_dir / "state"
    reference_horizon = result.metrics.get("horizon_days")
    state, due, why = decide(load_state(folder, model), result.alerts, start, end, config.retrain, reference_horizon,
                             judged=result.metrics.get("judged", True))
    out = StepResult(model, result, due, why)
    if due and allow_retrain:
        log.warning("%s: retraining (%s)", model, why)
        out.retrained = retrain(settings, client, model, config.retrain, why)
        state.last_retrain, state.last_reason, state.streak, state.first_window = str(end), why, 0, None
    save_state(folder, model, state)
    return out


def keep_log(log_root: Any, config: MonitorConfig) -> dict[str, Any]:
    """The log upkeep the policy asks for (compaction of past days, retention); a failure is logged, never fatal:
    the passes read the log as it is."""
    from serving.predlog import compact, prune

    done: dict[str, Any] = {}
    try:
        if config.log.keep_days is not None:
            done["pruned"] = prune(log_root, config.log.keep_days)
        if config.log.compact:
            done["compacted"] = compact(log_root)
    except Exception as exc:
        log.error("prediction log upkeep failed: %s", exc)
        done["error"] = str(exc)
    if done.get("compacted", {}).get("segments_in") or done.get("pruned", {}).get("days"):
        log.info("prediction log upkeep: %s", done)
    return done


def monitored_models(client: Any) -> list[str]:
    """The registered classifiers that have a champion: what ``personalize schedule`` watches when not told."""
    from training.registry import CHAMPION, recorded_kind

    return sorted(m.name for m in client.search_registered_models(max_results=1000)
                  if CHAMPION in (m.aliases or {}) and recorded_kind(m.name, m.tags) == "classifier")


@dataclass
class ScheduleSummary:
    rounds: int = 0
    passes: int = 0
    failed: int = 0
    retrained: int = 0
    stopped: bool = False  # by a signal (``stop``), not by ``iterations``


def schedule(settings: Any, client: Any, models: list[str], config: MonitorConfig, every_s: float,
             iterations: int | None = None, allow_retrain: bool = True,
             on_step: Callable[[StepResult], None] | None = None, stop: threading.Event | None = None
             ) -> ScheduleSummary:
    """Run :func:`step` for every model each ``every_s`` seconds (``iterations`` times, or forever, or until
    ``stop`` is set: then after the pass under way); a model whose pass fails is reported and the others go on."""
    stop = stop or threading.Event()
    done = ScheduleSummary()
    while (iterations is None or done.rounds < iterations) and not stop.is_set():
        began = time.monotonic()
        keep_log(settings.log_root, config)
        for model in models:
            if stop.is_set():
                break
            try:
                out = step(settings, client, model, None, config, allow_retrain)
            except MonitorError as exc:
                done.failed += 1
                out = StepResult(model, None, False, "", error=str(exc))
                log.error("%s: %s", model, exc)
            done.passes += 1
            done.retrained += out.retrained is not None
            if on_step:
                on_step(out)
        done.rounds += 1
        if iterations is None or done.rounds < iterations:
            stop.wait(max(0.0, every_s - (time.monotonic() - began)))
    done.stopped = stop.is_set()
    return done
