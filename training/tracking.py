"""MLflow tracking of a tuning study: one parent run, a baseline first, then one nested run per trial.

The parent run carries the study's configuration and, at the end, the best trial (tagged, with its metrics).
The first nested run is the trivial baseline, a constant score at the training prior rate, so every trial's score
has a floor beside it in the MLflow UI. Each trial, pruned or not, gets its own nested run with its parameters,
state and validation score. Several processes tuning one study each log their own parent run.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import mlflow
import numpy as np
import optuna

from training.evaluate import classification_metrics
from training.tune import Split, TuneConfig, TuneResult, tune

log = logging.getLogger(__name__)


def _redact(url: str) -> str:
    """A storage URL without its password, fit for a run parameter."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: keep the scheme only
        return url.split("://", 1)[0] + "://…"


def use_experiment(tracking_uri: str, experiment: str, artifact_root: str | None = None) -> str:
    """Point MLflow at the tracking store and the experiment, creating it with our artifact root (without one,
    a SQLite-backed store would put artifacts in ./mlruns of whatever directory the command runs in)."""
    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else mlflow.create_experiment(
        experiment, artifact_location=f"{artifact_root}/{experiment}" if artifact_root else None)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def tracked_tune(split: Split, config: TuneConfig, storage: str, study_name: str, tracking_uri: str,
                 experiment: str, artifact_root: str | None = None,
                 on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
                 tags: dict[str, str] | None = None) -> tuple[TuneResult, str]:
    """:func:`training.tune.tune` inside an MLflow parent run; returns the result and the parent run id.

    When a run is already active (training: the study and the model it chooses belong to one run), the study logs
    into that run instead of starting its own."""
    active = mlflow.active_run()
    if active is None:
        use_experiment(tracking_uri, experiment, artifact_root)
    run = contextlib.nullcontext(active) if active else mlflow.start_run(run_name=study_name)
    with run as parent:
        mlflow.set_tags({"kind": "tuning", **(tags or {})} if active is None else (tags or {}))
        mlflow.log_params({"study": study_name, "storage": _redact(storage), "families": ",".join(config.families),
                           "trials": config.trials, "timeout_s": config.timeout_s, "seed": config.seed,
                           "max_rounds": config.max_rounds, "early_stopping_rounds": config.early_stopping_rounds,
                           "cv_folds": config.cv_folds, "report_every": config.report_every,
                           "train_rows": len(split.y_train), "valid_rows": len(split.y_valid),
                           "train_positive_rate": float(split.y_train.mean())})
        prior = np.full(len(split.y_valid), float(split.y_train.mean()))
        with mlflow.start_run(run_name="baseline", nested=True, tags={"kind": "baseline"}):
            mlflow.log_metrics({f"valid_{k}": v for k, v in classification_metrics(split.y_valid, prior).items()})

        def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                                  tags={"kind": "trial", "state": trial.state.name}):
                mlflow.log_params(trial.params)
                if trial.value is not None:  # cross-validated on the training rows, or on the validation split
                    mlflow.log_metric("cv_roc_auc" if config.cv_folds else "valid_roc_auc", trial.value)
                if trial.intermediate_values:
                    mlflow.log_metric("last_reported_roc_auc", trial.intermediate_values[max(trial.intermediate_values)])
                if "rounds" in trial.user_attrs:
                    mlflow.log_metric("rounds", trial.user_attrs["rounds"])
            if on_trial:
                on_trial(study, trial)

        result = tune(split, config, storage, study_name, log_trial)
        best = result.study.best_trial
        mlflow.set_tags({"best_trial": str(best.number), "best_family": result.family})
        mlflow.log_metrics({"best_cv_roc_auc" if config.cv_folds else "best_valid_roc_auc": result.valid_auc,
                            **({"best_holdout_roc_auc": result.holdout_auc} if result.holdout_auc is not None else {}),
                            "baseline_valid_roc_auc": result.baseline_auc,
                            "best_rounds": result.rounds,
                            "pruned_trials": sum(t.state == optuna.trial.TrialState.PRUNED
                                                 for t in result.study.trials)})
        mlflow.log_dict(_jsonable(result.params), "best_params.json")
        return result, parent.info.run_id


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
