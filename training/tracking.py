"""MLflow tracking of a tuning study: one parent run, a baseline first, then one nested run per trial.

The parent run carries the study's configuration and, at the end, the best trial (tagged, with its metrics).
The first nested run is the trivial baseline, a constant score at the training prior rate, so every trial's score
has a floor beside it in the MLflow UI. Each trial, pruned or not, gets its own nested run with its parameters,
state, validation score and the ``worker`` (host:pid) that ran it.

A study is one parent run however many processes tune it. The worker that creates the study in Optuna's storage
(creation is atomic: exactly one of several workers starting at once succeeds) starts the parent run, logs the
configuration and the baseline, and records the run id in the study's user attribute ``mlflow_parent_run_id``;
the others wait for it (bounded) and log their trials under that run. Tuning an existing study again (a larger
budget, later) resumes its parent run when it still exists, undeleted, in this tracking store and experiment;
otherwise (another tracking store, a deleted run, a study tuned before parents were recorded) one worker, chosen
atomically by creating a marker study ``<study>:mlflow-parent-replacing:<old id or none>``, starts a new parent
run and records it. Each worker writes the study's best on the parent when it ends, and checks the study again
after writing, so whoever finishes last leaves the best of every worker's trials; the parent's status and end
time are those of the last worker to finish. A worker joining a study samples with its own seed (the given seed
mixed with its host:pid): with the same seed, concurrent workers would draw the same random startup trials.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from typing import Any, Callable
from urllib.parse import urlparse

import mlflow
import numpy as np
import optuna
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.exceptions import MlflowException

from personalize.errors import PersonalizeError
from personalize.settings import redact
from training.evaluate import classification_metrics
from training.tune import (Split, TuneConfig, TuneResult, best_of, claim_study, enqueue_starts, open_study,
                           ranked_trials, tune, worker_id)

log = logging.getLogger(__name__)
PARENT_RUN_ATTR = "mlflow_parent_run_id"
JOIN_WAIT_S = 30.0  # how long a joining worker waits for the creator of the study to record its parent run
_FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def use_experiment(tracking_uri: str, experiment: str, artifact_root: str | None = None) -> str:
    """Point MLflow at the tracking store and the experiment, creating it with our artifact root (without one,
    a SQLite-backed store would put artifacts in ./mlruns of whatever directory the command runs in). A tracking
    server (http/https) keeps its own artifact root (``--artifacts-destination``): a local path of whichever
    worker created the experiment would mean nothing to workers on other hosts. Safe when several workers create
    the experiment at once."""
    mlflow.set_tracking_uri(tracking_uri)
    if urlparse(tracking_uri).scheme in ("http", "https"):
        artifact_root = None
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        try:
            mlflow.create_experiment(experiment,
                                     artifact_location=f"{artifact_root}/{experiment}" if artifact_root else None)
        except MlflowException as exc:  # another worker created it in between
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = mlflow.get_experiment_by_name(experiment)
    mlflow.set_experiment(experiment_id=found.experiment_id)
    return found.experiment_id


def tracked_tune(split: Split, config: TuneConfig, storage: str, study_name: str, tracking_uri: str,
                 experiment: str, artifact_root: str | None = None,
                 on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
                 tags: dict[str, str] | None = None, join_wait_s: float = JOIN_WAIT_S) -> tuple[TuneResult, str]:
    """:func:`training.tune.tune` inside the study's MLflow parent run, shared by every worker of the study (see
    the module docstring); returns the result and the parent run id.

    When a run is already active (training: the study and the model it chooses belong to one run), or MLflow
    Projects launched the command into a run of its own (``MLFLOW_RUN_ID``), the study logs into that run instead,
    with its configuration and baseline, and records no parent on the study."""
    active = mlflow.active_run()
    worker, study, parent_id = worker_id(), None, None
    if active is None:
        experiment_id = use_experiment(tracking_uri, experiment, artifact_root)
    if active is None and not MLFLOW_RUN_ID.get():
        study, created = open_study(storage, study_name, config.seed)
        claim_study(study, split, config)  # another split is refused before this worker touches the parent run
        if created:
            enqueue_starts(study, config)  # before the parent is recorded: joiners then find them queued
        else:
            study.sampler = optuna.samplers.TPESampler(seed=zlib.crc32(f"{config.seed}:{worker}".encode()))
        parent_id = _join_parent(study, storage, experiment_id, created, join_wait_s)
    run = contextlib.nullcontext(active) if active else mlflow.start_run(
        run_id=parent_id, run_name=None if parent_id else study_name)
    with run as parent:
        mlflow.set_tags({"kind": "tuning", **(tags or {})} if active is None else (tags or {}))
        if parent_id is None:  # this worker owns the parent: the configuration and the baseline are logged once
            _log_configuration(split, config, storage, study_name)
            if study is not None:  # the joiners waiting for it start now, after the baseline
                study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)
        else:
            log.info("study %s: logging trials under its parent run %s", study_name, parent_id)

        def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, tags={
                    "kind": "trial", "state": trial.state.name, "worker": trial.user_attrs.get("worker", worker)}):
                mlflow.log_params(trial.params)
                if trial.value is not None:  # cross-validated on the training rows, or on the validation split
                    mlflow.log_metric("cv_roc_auc" if config.cv_folds else "valid_roc_auc", trial.value)
                if trial.intermediate_values:
                    mlflow.log_metric("last_reported_roc_auc", trial.intermediate_values[max(trial.intermediate_values)])
                if "rounds" in trial.user_attrs:
                    mlflow.log_metric("rounds", trial.user_attrs["rounds"])
            if on_trial:
                on_trial(study, trial)

        result = _record_best(tune(split, config, storage, study_name, log_trial, study=study), split, config)
        return result, parent.info.run_id


def _log_configuration(split: Split, config: TuneConfig, storage: str, study_name: str) -> None:
    """The study's configuration as parameters of the active run, then the baseline as its first nested run."""
    mlflow.log_params({"study": study_name, "storage": redact(storage), "families": ",".join(config.families),
                       "trials": config.trials, "timeout_s": config.timeout_s, "seed": config.seed,
                       "max_rounds": config.max_rounds, "early_stopping_rounds": config.early_stopping_rounds,
                       "cv_folds": config.cv_folds, "report_every": config.report_every,
                       "train_rows": len(split.y_train), "valid_rows": len(split.y_valid),
                       "train_positive_rate": float(split.y_train.mean())})
    prior = np.full(len(split.y_valid), float(split.y_train.mean()))
    with mlflow.start_run(run_name="baseline", nested=True, tags={"kind": "baseline"}):
        mlflow.log_metrics({f"valid_{k}": v for k, v in classification_metrics(split.y_valid, prior).items()})


def _join_parent(study: optuna.Study, storage: str, experiment_id: str, created: bool, wait_s: float) -> str | None:
    """The parent run this worker logs under, or None when it is to start one: it created the study, or it won
    the claim to replace a missing parent (none recorded, or not usable in this store and experiment). A study
    without a recorded parent and without a started trial is waited on for ``wait_s``: its creator is recording
    one; a claim taken by another worker is waited on as long again, then fails with what to do."""
    if created:
        return None
    client, deadline = mlflow.MlflowClient(), time.monotonic() + wait_s
    while True:
        ref = study.user_attrs.get(PARENT_RUN_ATTR)
        if ref and _usable(client, ref, experiment_id):
            return ref
        recording = ref is None and time.monotonic() < deadline and not study.get_trials(
            deepcopy=False, states=tuple(s for s in optuna.trial.TrialState if s != optuna.trial.TrialState.WAITING))
        claim = f"{study.study_name}:mlflow-parent-replacing:{ref or 'none'}"
        if not recording:
            try:
                optuna.create_study(storage=storage, study_name=claim)
                log.info("study %s: starting a new parent run (recorded: %s)", study.study_name, ref or "none")
                return None
            except optuna.exceptions.DuplicatedStudyError:
                pass  # another worker is starting it
        if time.monotonic() > deadline + wait_s:
            raise PersonalizeError(
                f"study {study.study_name!r}: no usable MLflow parent run recorded after {2 * wait_s:.0f} s. If the "
                f"worker that claimed it died, delete its claim (optuna delete-study --storage URL --study-name "
                f"'{claim}') and start again")
        time.sleep(0.2)


def _usable(client: mlflow.MlflowClient, run_id: str, experiment_id: str) -> bool:
    """Whether the run exists, undeleted, in this tracking store and experiment."""
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id


def _record_best(result: TuneResult, split: Split, config: TuneConfig) -> TuneResult:
    """Write the study's chosen trial (:func:`training.tune.ranked_trials`) on the active run, then read the study
    again until nothing finished since the last write: of several workers, whoever writes last leaves the choice
    among all their trials. Metrics are logged at
    step = finished trials, so the latest value is that of the most advanced study whatever the writers' clocks."""
    study, written = result.study, None
    while True:
        finished = study.get_trials(deepcopy=False, states=_FINISHED)  # before the best: it is then at least as new
        chosen = ranked_trials(study, config.selection)[0].number
        if (chosen, len(finished)) == written:
            return result
        if chosen != result.trial:
            result = best_of(study, split, config)
        step = len(finished)
        mlflow.set_tags({"best_trial": str(result.trial), "best_family": result.family, "selection": config.selection})
        mlflow.log_metrics({"best_cv_roc_auc" if config.cv_folds else "best_valid_roc_auc": result.valid_auc,
                            **({"best_holdout_roc_auc": result.holdout_auc} if result.holdout_auc is not None else {}),
                            "baseline_valid_roc_auc": result.baseline_auc, "best_rounds": result.rounds,
                            "top_roc_auc": result.top_auc,
                            "pruned_trials": sum(t.state == optuna.trial.TrialState.PRUNED for t in finished)},
                           step=step)
        mlflow.log_dict(_jsonable(result.params), "best_params.json")
        written = (result.trial, step)


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}
