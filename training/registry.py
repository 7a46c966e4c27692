"""The model registry: register once, promote by alias through a gate, roll back, keep an audit trail.

Registered models: ``churn``, ``propensity`` (classifiers), ``purchase_cycle`` and ``purchase_forecast``
(regressors). A new version gets the alias ``challenger``; ``champion`` is what serving loads
(``models:/name@champion``). MLflow stages are deprecated and not used.

The promotion gate scores the challenger and the champion on the *same* held-out frame, the one logged with the
challenger's training run (``heldout/heldout.parquet``; the run's tags name its target and prediction columns):

1. **not worse**: the paired bootstrap interval of (challenger - champion) on the gate metric (ROC-AUC for
   classifiers, minus RMSE/MAE for regressors) must have its lower end above ``-tolerance``. The first version,
   with no champion yet, must instead beat a constant prediction (interval entirely above zero);
2. **calibrated** (classifiers): expected calibration error on the held-out frame at most ``max_ece``;
3. **fair** (classifiers, when an attribute is configured): across the attribute's groups, the gap in
   true-positive rate and in positive (action) rate at the model's own threshold within bounds.

The verdict and its numbers go to the version's tags, its description and its model card; every registration,
promotion, refusal and rollback is appended to the registered model's audit trail (tags ``audit.NNNNNN``, one JSON
entry each: who, when, action, from which version to which, why, the gate's numbers).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from personalize.errors import PersonalizeError, first_line
from personalize.settings import connect_timeout, redact
from training.evaluate import (bootstrap_delta, calibration_noise, expected_calibration_error, fairness_gaps,
                               fairness_noise)

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODELS: dict[str, str] = {  # registered model -> kind
    "churn": "classifier",
    "propensity": "classifier",
    "purchase_cycle": "regressor",
    "purchase_forecast": "regressor",
}
AUDIT_PREFIX = "audit."
HELDOUT_ARTIFACT = "heldout/heldout.parquet"  # in every training run: the rows the promotion gate scores


class RegistryError(PersonalizeError):
    """The registry cannot do what was asked (unknown model, no challenger, unreachable store, ...)."""


# --- the store ---------------------------------------------------------------------------------------------------
@contextmanager
def _no_retries() -> Iterator[None]:
    """A reachability probe must fail fast, not retry for minutes against a server that is not there."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


INIT_LOCK_KEY = "personalize:mlflow-store-init"


@contextmanager
def _first_use_lock(tracking_uri: str) -> Iterator[None]:
    """Held while MLflow opens a database store. On an empty database MLflow creates its tables, and several
    processes doing so at once collide (PostgreSQL: a duplicate key; the loser dies). With the lock the first
    creates them and the others find them. A database server's advisory lock (PostgreSQL, MySQL) holds across
    machines; a SQLite file gets a file lock beside it. Connecting for the lock is also the reachability check:
    10 s, where MLflow's own engine retries for minutes."""
    if tracking_uri.startswith(("postgresql", "mysql")):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        postgres = tracking_uri.startswith("postgresql")
        engine = sqlalchemy.create_engine(tracking_uri, poolclass=NullPool, **connect_timeout(tracking_uri))
        take, give = (("SELECT pg_advisory_lock(hashtext(:key))", "SELECT pg_advisory_unlock(hashtext(:key))")
                      if postgres else ("SELECT GET_LOCK(:key, 300)", "SELECT RELEASE_LOCK(:key)"))
        try:
            with engine.connect() as connection:
                if postgres:  # a holder that hangs fails us after 5 minutes, not never
                    connection.execute(sqlalchemy.text("SET lock_timeout = '300s'"))
                if connection.execute(sqlalchemy.text(take), {"key": INIT_LOCK_KEY}).scalar() == 0:
                    raise RegistryError("another process has held the MLflow store's start-up lock for 5 minutes")
                try:
                    yield
                finally:
                    connection.execute(sqlalchemy.text(give), {"key": INIT_LOCK_KEY})
        finally:
            engine.dispose()
    elif tracking_uri.startswith("sqlite:///"):
        import fcntl
        from pathlib import Path

        db = Path(tracking_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.parent / f".{db.name}.init-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    else:
        yield


def connect(tracking_uri: str):
    """An ``MlflowClient`` on ``tracking_uri`` (also the registry), after checking the store answers."""
    from mlflow.tracking import MlflowClient

    try:
        with _no_retries(), _first_use_lock(tracking_uri):
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            client.search_experiments(max_results=1)
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)  # models:/ URIs (loading a version to score it) resolve here too
        mlflow.set_registry_uri(tracking_uri)
    except Exception as exc:  # any failure here means: nothing can be tracked or registered
        reason = first_line(exc)
        raise RegistryError(f"the MLflow tracking store {redact(tracking_uri)} is unreachable ({reason}); "
                            "check MLFLOW_TRACKING_URI") from None
    return client


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,99}$")


def check_name(name: str) -> str:
    """A name fit for the registry (the defaults are :data:`MODELS`; ``--name`` may register others, e.g. one churn
    model per data set)."""
    if not _NAME.match(name):
        raise RegistryError(f"model name {name!r}: use letters, digits, '_' or '-', starting with a letter")
    return name


def kind_of(client, name: str) -> str:
    """classifier or regressor, as recorded when the model was first registered."""
    from mlflow.exceptions import MlflowException

    check_name(name)
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=200))
        raise RegistryError(f"unknown model {name!r}; registered: {', '.join(known) or 'none yet'} "
                            "(`personalize train ...` registers one)") from None
    return recorded_kind(name, tags)


def recorded_kind(name: str, tags: dict[str, str] | None) -> str:
    """A registered model's kind from its tags (models registered before the tag: by name, else classifier)."""
    return (tags or {}).get("kind") or MODELS.get(name, "classifier")


def _who() -> str:
    try:
        return os.environ.get("PERSONALIZE_USER") or getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _version_of(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


# --- audit -------------------------------------------------------------------------------------------------------
def history(client, name: str) -> list[dict[str, Any]]:
    """The audit trail of ``name``, oldest first."""

    kind_of(client, name)
    tags = client.get_registered_model(name).tags
    return [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith(AUDIT_PREFIX))]


def _audit(client, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    tags = client.get_registered_model(name).tags
    n = sum(k.startswith(AUDIT_PREFIX) for k in tags) + 1
    entry = {"seq": n, "when": _now(), "who": _who(), **entry}
    client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{n:06d}", json.dumps(entry, default=_json_default)[:4900])
    return entry


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


# --- register ----------------------------------------------------------------------------------------------------
def register(client, name: str, model_uri: str, run_id: str, tags: dict[str, str] | None = None,
             description: str | None = None, kind: str | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` with the alias ``challenger``. All or nothing: if any
    step after the version exists fails, the version is deleted again."""
    from mlflow.exceptions import MlflowException

    check_name(name)
    kind = kind or MODELS.get(name, "classifier")
    created = False
    try:
        existing = client.get_registered_model(name).tags.get("kind")
    except MlflowException:
        client.create_registered_model(name, tags={"kind": kind},
                                       description=f"{name} ({kind}); serve models:/{name}@champion")
        existing, created = kind, True
    if existing and existing != kind:
        raise RegistryError(f"{name} holds {existing} models; a {kind} cannot become a version of it")
    # a logged model's URI (models:/m-...) names its model id, which a tracking server asks for beside the source
    logged = model_uri.removeprefix("models:/")
    model_id = logged if model_uri.startswith("models:/m-") and "/" not in logged else None
    try:
        version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags or {},
                                              description=description, model_id=model_id)
    except Exception:
        if created:
            _drop_if_empty(client, name)
        raise
    try:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        _audit(client, name, {"action": "register", "version": str(version.version), "run_id": run_id,
                              "reason": "new challenger"})
    except Exception:
        client.delete_model_version(name, version.version)
        if created:
            _drop_if_empty(client, name)
        raise
    return str(version.version)


def _drop_if_empty(client, name: str) -> None:
    """Nothing half-registered: the registered model a failed ``register`` created goes again, unless another
    process has added a version to it meanwhile. A failure here must not hide the one that brought us here."""
    try:
        if not client.search_model_versions(f"name='{name}'", max_results=1):
            client.delete_registered_model(name)
    except Exception as exc:
        log.warning("could not remove the empty registered model %s: %s", name, exc)


# --- the gate ----------------------------------------------------------------------------------------------------
class GateConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    tolerance: float = Field(default=0.01, ge=0.0)  # ROC-AUC points a challenger may lose (at the interval's low end)
    relative_tolerance: float = Field(default=0.02, ge=0.0)  # regressors: share of the champion's error
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    bootstrap_rounds: int = Field(default=1000, ge=100)
    max_ece: float = Field(default=0.05, gt=0.0)
    fairness_attribute: str | None = None
    max_tpr_gap: float = Field(default=0.10, ge=0.0)
    max_positive_rate_gap: float = Field(default=0.10, ge=0.0)
    min_group_rows: int = Field(default=30, ge=1)
    # None: the challenger may be as good as the champion (within the tolerance). A number: it must be better, the
    # interval's low end above this gain (ROC-AUC points; a share of the champion's error for regressors). Retraining
    # asks for this, so a retrained model replaces a good champion only when it is better.
    min_gain: float | None = Field(default=None, ge=0.0)
    # What "better" means. None: the model's own (ROC-AUC for classifiers, the error for regressors). For classifiers
    # also log_loss or brier: proper scoring rules, which reward calibration as well as ranking; relative_tolerance
    # and min_gain are then shares of the champion's loss, as for regressors.
    metric: Literal["roc_auc", "log_loss", "brier"] | None = None
    seed: int = 42


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None
    bound: float | None
    detail: str


@dataclass
class GateReport:
    model: str
    challenger: str
    champion: str | None
    metric: str
    heldout_rows: int
    checks: list[Check] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail: " + "; ".join(c.name for c in self.checks if not c.passed)

    def tags(self) -> dict[str, str]:
        out = {"gate.verdict": self.verdict, "gate.compared_with": self.champion or "baseline",
               "gate.when": _now()}
        out.update({f"gate.{k}": f"{v:.6g}" for k, v in self.numbers.items() if v == v})
        return out

    def markdown(self) -> str:
        against = f"champion version {self.champion}" if self.champion else "a constant prediction (first version)"
        rows = [f"| {c.name} | {'pass' if c.passed else 'FAIL'} | {_fmt(c.value)} | {_fmt(c.bound)} | {c.detail} |"
                for c in self.checks]
        return "\n".join([
            f"## Promotion gate ({_now()})",
            f"Challenger version {self.challenger} against {against}, on the challenger's held-out frame "
            f"({self.heldout_rows:,} rows), gate metric {self.metric}. Verdict: **{self.verdict}**.",
            "", "| check | result | value | bound | detail |", "|---|---|---|---|---|", *rows, ""])


def _fmt(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.4f}"


def log_heldout(frame: pd.DataFrame) -> None:
    """Log the held-out frame the gate will score into the active run (at :data:`HELDOUT_ARTIFACT`)."""
    import tempfile
    from pathlib import Path

    import mlflow

    folder, name = HELDOUT_ARTIFACT.rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="heldout-") as tmp:
        frame.to_parquet(Path(tmp) / name, index=False)
        mlflow.log_artifact(str(Path(tmp) / name), artifact_path=folder)


def _heldout(client, run_id: str) -> tuple[pd.DataFrame, dict[str, str]]:
    import mlflow.artifacts

    run = client.get_run(run_id)
    tags = run.data.tags
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=HELDOUT_ARTIFACT)
    except Exception as exc:
        raise RegistryError(f"run {run_id} has no held-out frame ({HELDOUT_ARTIFACT}): {exc}") from None
    return pd.read_parquet(path), tags


def _score(name: str, version: str, heldout: pd.DataFrame, prediction: str,
           params: dict[str, Any] | None = None) -> pd.DataFrame:
    import mlflow.pyfunc

    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        out = model.predict(conform(heldout, model.metadata.get_input_schema()), params=params or None)
    except Exception as exc:
        text = str(exc)
        if text.startswith("Failed to enforce schema") and "Error: " in text:  # MLflow quotes the whole frame first
            text = "its input schema refuses it: " + text.rsplit("Error: ", 1)[1]
        raise RegistryError(f"{name} version {version} cannot score the held-out frame: "
                            f"{text.strip().splitlines()[0][:300]}") from None
    out = out if isinstance(out, pd.DataFrame) else pd.DataFrame({prediction: np.asarray(out).ravel()})
    if prediction not in out.columns:
        raise RegistryError(f"{name} version {version} returns no {prediction!r} column (it returns "
                            f"{', '.join(map(str, out.columns))})")
    return out.reset_index(drop=True)


def conform(frame: pd.DataFrame, schema: Any) -> pd.DataFrame:
    """The frame as a model's signature wants it: its columns only, integers as floats where it says double
    (MLflow refuses to convert int64 to float64 itself, though a count is a fine float)."""
    if schema is None or not schema.has_input_names():
        return frame
    out = frame[[c for c in schema.input_names() if c in frame.columns]].copy()
    for spec in schema.inputs:
        if spec.name in out.columns and str(spec.type) in ("double", "DataType.double", "float") \
                and pd.api.types.is_integer_dtype(out[spec.name]):
            out[spec.name] = out[spec.name].astype(float)
    return out


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


LOSSES = ("log_loss", "brier")


def _neg_error(kind: str):
    """Higher is better: minus the error (rmse, mae) or minus the loss of a probability (log_loss, brier)."""
    def metric(y: np.ndarray, p: np.ndarray) -> float:
        y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
        if kind == "log_loss":
            p = np.clip(p, 1e-7, 1 - 1e-7)
            return float(np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        err = y - p
        if kind == "rmse":
            return -float(np.sqrt(np.mean(err ** 2)))
        return -float(np.mean(err ** 2)) if kind == "brier" else -float(np.mean(np.abs(err)))
    return metric


def evaluate_gate(client, name: str, config: GateConfig = GateConfig()) -> GateReport:
    """Score challenger and champion on the challenger's held-out frame and run every check."""
    kind = kind_of(client, name)
    challenger = _version_of(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"{name} has no challenger to promote; train one first (`personalize train`)")
    champion = _version_of(client, name, CHAMPION)
    if champion == challenger:
        raise RegistryError(f"{name} version {challenger} is already the champion")
    run_id = client.get_model_version(name, challenger).run_id
    heldout, tags = _heldout(client, run_id)
    target, prediction = tags.get("heldout_target", "label"), tags.get("heldout_prediction", "probability")
    metric_name = tags.get("gate_metric", "roc_auc")
    if config.metric and config.metric != metric_name:
        if kind != "classifier":
            raise RegistryError(f"{name} is a {kind} model: its gate compares {metric_name}, not {config.metric}")
        metric_name = config.metric
    if target not in heldout.columns:
        raise RegistryError(f"the held-out frame of run {run_id} has no target column {target!r}")
    y = heldout[target].to_numpy()
    # how the frame is scored, by both (the purchase cycle's horizon: a champion trained for another one is scored
    # at the challenger's, as the targets were counted)
    call = json.loads(tags.get("heldout_params") or "{}")
    precomputed = tags.get("heldout_challenger_prediction")
    if precomputed and precomputed in heldout.columns:  # out-of-time predictions made before the refit
        ours = pd.DataFrame({prediction: heldout[precomputed].to_numpy()})
    else:
        ours = _score(name, challenger, heldout, prediction, call)
    report = GateReport(name, challenger, champion, metric_name, len(heldout))
    report.numbers.update({k: float(v) for k, v in call.items() if isinstance(v, (int, float))})
    metric = _auc if metric_name == "roc_auc" else _neg_error(metric_name)
    boot = {"rounds": config.bootstrap_rounds, "confidence": config.confidence, "seed": config.seed}
    report.numbers[f"challenger_{metric_name}"] = abs(metric(y, ours[prediction].to_numpy()))
    if champion is None:
        constant = np.full(len(y), 0.5 if metric_name == "roc_auc" else float(np.mean(y)))
        d = bootstrap_delta(metric, y, ours[prediction].to_numpy(), constant, **boot)
        report.checks.append(Check(
            "beats_baseline", d["ci_low"] > 0, d["ci_low"], 0.0,
            f"{metric_name} improvement over a constant {d['delta']:+.4f}, {config.confidence:.0%} interval "
            f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"))
    else:
        try:
            _same_params(client, name, run_id, champion, tags.get("gate_same_params", ""))
            theirs = _score(name, champion, heldout, prediction, call)
        except RegistryError as exc:  # e.g. the feature set changed: no like-for-like comparison is possible
            theirs, d = None, None
            report.checks.append(Check("not_worse_than_champion", False, None, None,
                                       f"{exc}; compare them by hand and promote with --force --reason"))
    if champion is not None and theirs is not None:
        d = bootstrap_delta(metric, y, ours[prediction].to_numpy(), theirs[prediction].to_numpy(), **boot)
        champion_value = abs(metric(y, theirs[prediction].to_numpy()))
        report.numbers[f"champion_{metric_name}"] = champion_value
        if kind == "classifier":  # ranking and calibration of both, whatever the gate compares: what moved
            p_ours, p_theirs = ours[prediction].to_numpy(), theirs[prediction].to_numpy()
            report.numbers.update({"challenger_roc_auc": _auc(y, p_ours), "champion_roc_auc": _auc(y, p_theirs),
                                   "champion_ece": expected_calibration_error(y, p_theirs)})
        if config.min_gain is None:
            name_, bound = "not_worse_than_champion", (-config.tolerance if metric_name == "roc_auc"
                                                        else -config.relative_tolerance * champion_value)
            passed = d["ci_low"] >= bound
        else:
            name_, bound = "better_than_champion", (config.min_gain if metric_name == "roc_auc"
                                                     else config.min_gain * champion_value)
            passed = d["ci_low"] > bound
        what = ("challenger - champion" if metric_name == "roc_auc" else
                f"the {'loss' if metric_name in LOSSES else 'error'} the challenger saves (champion - challenger)")
        report.checks.append(Check(
            name_, passed, d["ci_low"], bound,
            f"{metric_name}: {what} {d['delta']:+.4f}, {config.confidence:.0%} interval "
            f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"))
    if d is not None:
        report.numbers.update({"delta": d["delta"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]})
    if kind == "classifier":
        p = ours[prediction].to_numpy()
        ece, noise = expected_calibration_error(y, p), calibration_noise(p, seed=config.seed)
        bound = max(config.max_ece, noise)
        report.numbers.update({"ece": ece, "ece_noise95": noise})
        report.checks.append(Check(
            "calibrated", ece <= bound, ece, bound,
            f"expected calibration error, 10 equal-width bins; the bound is max(--max-ece {config.max_ece}, "
            f"{noise:.4f} = what a perfectly calibrated model shows on {len(y):,} rows 95% of the time)"))
        attribute = config.fairness_attribute or tags.get("fairness_attribute")
        if attribute:
            report.checks.extend(_fairness_checks(heldout, y, ours, attribute, config, report.numbers))
        else:
            report.checks.append(Check("fairness", True, None, None,
                                       "not checked: no attribute configured (--fairness-attribute)"))
    return report


def _same_params(client, name: str, run_id: str, champion: str, names: str) -> None:
    """Refuse a comparison of two versions whose runs differ in a parameter that changes what the model predicts
    (a forecaster's ``measure``: daily orders against daily spend)."""
    params = [p.strip() for p in names.split(",") if p.strip()]
    if not params:
        return
    try:
        ours = client.get_run(run_id).data.params
        theirs = client.get_run(client.get_model_version(name, champion).run_id).data.params
    except Exception as exc:  # a deleted run: no like-for-like comparison
        raise RegistryError(f"the runs of the challenger and champion (version {champion}) cannot be compared: "
                            f"{str(exc).splitlines()[0][:200]}") from None
    for param in params:
        if ours.get(param) != theirs.get(param):
            raise RegistryError(f"the champion (version {champion}) was trained with {param} "
                                f"{theirs.get(param, 'unset')!r} and the challenger with {ours.get(param, 'unset')!r}:"
                                " they do not predict the same thing")


def _fairness_checks(heldout: pd.DataFrame, y: np.ndarray, scored: pd.DataFrame, attribute: str,
                     config: GateConfig, numbers: dict[str, float]) -> list[Check]:
    if attribute not in heldout.columns:
        return [Check("fairness", False, None, None,
                      f"the held-out frame has no column {attribute!r} (it has: "
                      f"{', '.join(c for c in heldout.columns if c != 'label')})")]
    act = scored["decision"].to_numpy() if "decision" in scored.columns else scored.iloc[:, 0].to_numpy() >= 0.5
    gaps = fairness_gaps(y, act, heldout[attribute].to_numpy(), config.min_group_rows)
    numbers.update({"tpr_gap": gaps["tpr_gap"], "positive_rate_gap": gaps["positive_rate_gap"]})
    compared = int(gaps["groups_compared"])
    if compared < 2:
        return [Check("fairness", False, None, None,
                      f"{attribute}: fewer than two groups of {config.min_group_rows}+ rows; cannot compare")]
    groups = ", ".join(f"{g}: TPR {s['tpr']:.2f}, positive rate {s['positive_rate']:.2f}"
                       for g, s in gaps["groups"].items() if s["rows"] >= config.min_group_rows)
    # A gap that random groups of the same sizes reach 95% of the time is the sample's noise, not the model's
    # treatment of a group: the bound is the configured one or that noise, whichever is larger (as for calibration).
    tpr_noise, rate_noise = fairness_noise(y, act, heldout[attribute].to_numpy(), config.min_group_rows,
                                           seed=config.seed)
    numbers.update({"tpr_gap_noise95": tpr_noise, "positive_rate_gap_noise95": rate_noise})
    tpr_bound = max(config.max_tpr_gap, tpr_noise) if tpr_noise == tpr_noise else config.max_tpr_gap
    rate_bound = max(config.max_positive_rate_gap, rate_noise)
    noise = "the bound is max(--max-{} {:.2f}, {:.3f} = what random groups of these sizes reach 95% of the time)"
    return [
        Check("fairness_tpr_gap", bool(gaps["tpr_gap"] <= tpr_bound), gaps["tpr_gap"], tpr_bound,
              f"by {attribute} ({groups}); " + noise.format("tpr-gap", config.max_tpr_gap, tpr_noise)),
        Check("fairness_positive_rate_gap", bool(gaps["positive_rate_gap"] <= rate_bound),
              gaps["positive_rate_gap"], rate_bound, f"by {attribute}, {compared} groups; "
              + noise.format("positive-rate-gap", config.max_positive_rate_gap, rate_noise)),
    ]


# --- promote and roll back ---------------------------------------------------------------------------------------
def _record_verdict(client, name: str, report: GateReport) -> None:
    """The gate's verdict on the version's tags, description and model card."""
    for k, v in report.tags().items():
        client.set_model_version_tag(name, report.challenger, k, v)
    version = client.get_model_version(name, report.challenger)
    client.update_model_version(name, report.challenger,
                                description=f"{version.description or ''}\n\n{report.markdown()}".strip())
    try:
        import mlflow.artifacts

        card = mlflow.artifacts.load_text(f"runs:/{version.run_id}/model_card.md")
    except Exception:
        card = f"# Model card: {name} version {report.challenger}\n"
    client.log_text(version.run_id, f"{card.rstrip()}\n\n{report.markdown()}", "model_card.md")


def promote(client, name: str, config: GateConfig = GateConfig(), reason: str = "",
            force: bool = False) -> GateReport:
    """Run the gate; on a pass (or ``force``, which needs a reason) move ``champion`` to the challenger."""
    if force and not reason:
        raise RegistryError("--force needs a --reason: it is written to the audit trail")
    report = evaluate_gate(client, name, config)
    _record_verdict(client, name, report)
    entry = {"from": report.champion, "to": report.challenger, "verdict": report.verdict,
             "gate": {k: round(v, 6) for k, v in report.numbers.items() if v == v}, "reason": reason}
    if report.passed or force:
        client.set_registered_model_alias(name, CHAMPION, report.challenger)
        _audit(client, name, {"action": "promote" if report.passed else "force-promote", **entry})
    else:
        _audit(client, name, {"action": "refuse", **entry})
    return report


def set_champion(client, name: str, version: str, reason: str) -> str | None:
    """Make ``version`` the champion without a gate (models that have none, like clustering), recorded in the audit
    trail so ``rollback`` works; returns the previous champion."""
    previous = _version_of(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    _audit(client, name, {"action": "promote", "from": previous, "to": str(version), "reason": reason})
    return previous


def champion_stack(entries: list[dict[str, Any]]) -> list[str]:
    """Champion versions in the order they took over, replaying promotions (push) and rollbacks (pop)."""
    stack: list[str] = []
    for e in entries:
        if e["action"] in ("promote", "force-promote"):
            stack.append(str(e["to"]))
        elif e["action"] == "rollback" and stack:
            stack.pop()
    return stack


def rollback(client, name: str, reason: str) -> tuple[str, str]:
    """Move ``champion`` back to the previous champion; returns (from version, to version). The reason goes to
    the audit trail and may not be blank."""
    if not (reason or "").strip():
        raise RegistryError(f"rolling {name} back needs a reason: why the champion goes back, for the audit trail")
    reason = reason.strip()
    stack = champion_stack(history(client, name))
    current = _version_of(client, name, CHAMPION)
    if len(stack) < 2 or current is None:
        raise RegistryError(f"{name} has no previous champion to roll back to")
    if stack[-1] != current:
        raise RegistryError(f"{name}: the champion alias points to version {current}, but the audit trail says "
                            f"{stack[-1]}; it was moved outside personalize, set it back by hand")
    target = stack[-2]
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_model_version_tag(name, current, "rolled_back", _now())
    _audit(client, name, {"action": "rollback", "from": current, "to": target, "reason": reason})
    return current, target


def aliases(client, name: str) -> dict[str, str | None]:
    kind_of(client, name)
    return {alias: _version_of(client, name, alias) for alias in (CHAMPION, CHALLENGER)}


def report_dict(report: GateReport) -> dict[str, Any]:
    return {"model": report.model, "challenger": report.challenger, "champion": report.champion,
            "passed": report.passed, "verdict": report.verdict, "numbers": report.numbers,
            "checks": [asdict(c) for c in report.checks]}
