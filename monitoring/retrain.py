"""The retrain policy: when alerts turn into ``personalize retrain``, and the retrain itself.

:func:`decide` is pure: it folds one pass's alerts into the model's state and says whether a retrain is due.
Hysteresis (``consecutive`` qualifying windows in a row), a cooldown between retrains, and waiting until the label
horizon has passed since the first qualifying window (before that, the challenger's held-out labels all come from
the world before the change, and the gate would judge it on the wrong data) keep it from retraining in storms.

:func:`retrain`: fresh features on the data set as it is now → a warm-started study with a small budget (the
champion's best trial runs first) → registered as ``challenger`` → the promotion gate asking for a real gain →
``champion`` moves only on a pass. Each step is in MLflow and the model's audit trail; a running server picks the
new champion up by its hot reload.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from monitoring.alerts import Alert
from monitoring.config import SEVERITY_RANK, RetrainPolicy
from personalize.errors import PersonalizeError, first_line

log = logging.getLogger(__name__)

__all__ = ["RetrainOutcome", "RetrainState", "decide", "load_state", "retrain", "save_state"]


@dataclass
class RetrainState:
    streak: int = 0  # qualifying windows in a row
    first_window: str | None = None  # start of the streak's first window
    last_retrain: str | None = None  # window end at which the last retrain ran
    last_reason: str = ""
    last_counted: str | None = None  # end of the last window counted (a later one must start after it to count)


def load_state(folder: Path, model: str) -> RetrainState:
    path = Path(folder) / f"{model}.json"
    if not path.exists():
        return RetrainState()
    try:
        return RetrainState(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        log.warning("retrain state %s unreadable: starting afresh", path)
        return RetrainState()


def save_state(folder: Path, model: str, state: RetrainState) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{model}.json.tmp"
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(folder / f"{model}.json")


def decide(state: RetrainState, alerts: list[Alert], window_start: pd.Timestamp, window_end: pd.Timestamp,
           policy: RetrainPolicy, horizon_days: int | None, *, judged: bool = True) -> tuple[RetrainState, bool, str]:
    """(new state, retrain now?, why) after one window's alerts. Windows in a row are distinct windows: a window
    that starts before the last counted one ended (hourly passes over 7-day windows, a look at the past with
    ``--end``) is not counted, nor is a quiet one too small for any alert rule to judge (not ``judged``,
    :func:`monitoring.alerts.judged`); either leaves the streak as it was, and the cooldown and the wait for labels
    are checked again."""
    qualifying = [a for a in alerts if SEVERITY_RANK[a.severity] >= SEVERITY_RANK[policy.on]
                  and a.rule not in policy.not_on]
    aside = ""
    if state.last_counted and pd.Timestamp(window_start) < pd.Timestamp(state.last_counted):
        aside = f"; this window overlaps the last one counted (until {state.last_counted}) and is not counted"
    elif not judged and not qualifying:
        aside = "; this window is too small for the alert rules to judge and is not counted"
    elif qualifying:
        state = RetrainState(state.streak + 1, state.first_window or str(window_start), state.last_retrain,
                             state.last_reason, str(window_end))
    else:
        state = RetrainState(0, None, state.last_retrain, state.last_reason, str(window_end))
    if not policy.enabled:
        return state, False, "retraining is off"
    if state.streak < policy.consecutive:
        return state, False, f"{state.streak}/{policy.consecutive} qualifying window(s) in a row{aside}"
    now = pd.Timestamp(window_end)
    if state.last_retrain and now - pd.Timestamp(state.last_retrain) < pd.Timedelta(days=policy.cooldown_days):
        return state, False, f"cooldown: last retrain at {state.last_retrain}{aside}"
    if policy.wait_for_labels and horizon_days and state.first_window:
        ready = pd.Timestamp(state.first_window) + pd.Timedelta(days=horizon_days)
        if now < ready:
            return state, False, f"waiting for labels from the changed data until {ready}{aside}"
    rules = ", ".join(sorted({a.rule for a in qualifying})) or "qualifying alerts"
    return state, True, f"{state.streak} window(s) in a row with {rules} since {state.first_window}"


@dataclass
class RetrainOutcome:
    model: str
    challenger: str
    champion_before: str | None
    champion_after: str | None
    promoted: bool
    verdict: str
    gate: dict[str, Any]
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _champion_recipe(client: Any, model: str) -> tuple[dict[str, str], dict[str, str], dict[str, Any] | None]:
    """(params, tags, decision policy) of the champion's training run."""
    import mlflow.artifacts

    mv = client.get_model_version_by_alias(model, "champion")
    run = client.get_run(mv.run_id)
    try:
        decision = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/decision.json")
    except Exception:
        decision = {}
    return run.data.params, run.data.tags, decision.get("policy")


def retrain(settings: Any, client: Any, model: str, policy: RetrainPolicy, reason: str,
            seed: int | None = None) -> RetrainOutcome:
    """Retrain ``model`` like its champion was trained, on the data as it is now, and gate it."""
    import optuna

    from training.registry import GateConfig, _audit, aliases, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig, ranked_trials

    try:
        params, tags, decision_policy = _champion_recipe(client, model)
    except Exception as exc:
        raise PersonalizeError(f"{model}: no champion to retrain from ({first_line(exc)})") from None
    task, dataset = params.get("task"), params.get("dataset")
    other = "purchase-cycle" if "cycle_winner" in tags else "forecast" if tags.get("kind") == "forecast" else None
    if other:
        raise PersonalizeError(f"{model} is a {other} model: retrain covers the churn and propensity classifiers; "
                               f"train a new version with `personalize train {other}` and promote it")
    if not task or not dataset:
        raise PersonalizeError(f"{model}: the champion's training run names no task or data set")
    warm: tuple[dict[str, Any], ...] = ()
    if tags.get("study"):
        try:
            study = optuna.load_study(study_name=tags["study"], storage=settings.optuna_storage_url)
            warm = tuple(dict(t.params) for t in ranked_trials(study)[:1])
        except Exception as exc:  # a study store that moved: tune cold rather than not at all
            log.warning("%s: the champion's study %s is not readable (%s); tuning without a warm start",
                        model, tags["study"], exc)
    families = tuple(sorted({str(w["family"]) for w in warm})) or ("lightgbm", "xgboost")
    config: dict[str, Any] = {"tune": TuneConfig(trials=policy.trials, warm_start=warm, families=families,
                                                 seed=seed if seed is not None else 42),
                              "calibration": params.get("calibration", "sigmoid")}
    for key in ("horizon_days", "train_cutoffs", "step_days", "top_categories"):
        if params.get(key):
            config[key] = int(params[key])
    if decision_policy:
        config["threshold"] = decision_policy
    if tags.get("fairness_attribute"):
        config["fairness_attribute"] = tags["fairness_attribute"]
    before = aliases(client, model).get("champion")
    _audit(client, model, {"action": "retrain", "reason": reason, "champion": before,
                           "trials": policy.trials, "warm_start": bool(warm)})
    outcome = train_and_register(settings, task, dataset, TrainConfig.model_validate(config), model_name=model)
    client.set_tag(outcome.run_id, "retrain_reason", reason[:4000])
    report = promote(client, model, GateConfig(min_gain=policy.min_gain, metric=policy.gate_metric),
                     reason=f"retrain: {reason}")
    after = aliases(client, model).get("champion")
    return RetrainOutcome(model, outcome.version, before, after, report.passed, report.verdict,
                          {k: round(v, 6) for k, v in report.numbers.items() if v == v}, outcome.run_id)
