"""One place for paths, names and URIs.

Everything the platform writes lives under one home directory (``PERSONALIZE_HOME``, default ``.personalize`` in
the working directory): raw tables, quarantine, feature frames, the MLflow store and the Optuna store. Each store
can be pointed elsewhere (a PostgreSQL URI, a remote MLflow server) by environment variable, without code changes.
Nothing here touches the disk or a global: callers build a :class:`Settings` once at the entry point.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

DEFAULT_HOME = ".personalize"
# tags linking MLflow Project entry points and the runs their commands start (personalize/cli.py, mlproject/main.py):
# every run a command starts under `mlflow run` names the entry point's run; a command's one-line error goes on it
LAUNCHER_TAG = "personalize.launcher_run_id"
ERROR_TAG = "personalize.error"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path = Path(DEFAULT_HOME)
    mlflow_tracking_uri: str | None = None
    optuna_storage: str | None = None
    prediction_log: Path | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        return cls(
            home=Path(env.get("PERSONALIZE_HOME", DEFAULT_HOME)),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
            optuna_storage=env.get("PERSONALIZE_OPTUNA_STORAGE") or None,
            prediction_log=Path(env["PERSONALIZE_PREDICTION_LOG"]) if env.get("PERSONALIZE_PREDICTION_LOG") else None,
        )

    # --- data ---------------------------------------------------------------------------------------------------
    def previous_dir(self, dataset: str) -> Path:
        """A data set's stored files as they were, while a `train` replaces them (put back if it fails)."""
        return self.home / ".previous" / dataset

    def dataset_dir(self, dataset: str) -> Path:
        """Validated raw tables of one data set (customers/transactions/events or a labeled table). A file path is
        refused here, once for every command that takes a data set name (it would otherwise read as a data set
        nobody ingested, or, absolute, replace the home)."""
        if looks_like_file(dataset):
            from personalize.errors import PersonalizeError

            known = ", ".join(self.datasets()) or "none yet"
            raise PersonalizeError(f"{dataset}: a file, where a data set name goes (ingested: {known}); ingest it "
                                   "first: `personalize ingest MAPPING.yaml`, or `personalize train churn "
                                   "FILE` for a labeled table")
        return self.home / "data" / dataset

    def datasets(self) -> list[str]:
        """The data sets ingested under this home."""
        return ingested(self.home / "data")

    def quarantine_dir(self, dataset: str) -> Path:
        return self.home / "quarantine" / dataset

    def features_dir(self, dataset: str) -> Path:
        return self.home / "features" / dataset

    # --- tracking and tuning ------------------------------------------------------------------------------------
    @property
    def tracking_uri(self) -> str:
        """MLflow tracking URI: SQLite under home unless configured (``MLFLOW_TRACKING_URI``)."""
        return self.mlflow_tracking_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> str:
        return (self.home / "mlartifacts").resolve().as_uri()

    @property
    def optuna_storage_url(self) -> str:
        """Optuna RDB storage: SQLite under home unless configured (any SQLAlchemy URL)."""
        return self.optuna_storage or f"sqlite:///{(self.home / 'optuna.db').resolve()}"

    # --- serving and monitoring ---------------------------------------------------------------------------------
    @property
    def log_root(self) -> Path:
        """The prediction log the server writes and the monitor reads (``PERSONALIZE_PREDICTION_LOG``)."""
        return self.prediction_log or self.home / "predictions"

    @property
    def monitoring_dir(self) -> Path:
        """Reports, the alert log (``alerts.jsonl``) and the monitor's state."""
        return self.home / "monitoring"

    @property
    def decisions_path(self) -> Path:
        """The decision log, feedback and bandit posteriors (:mod:`serving.decision_store`)."""
        return self.home / "decisions" / "decisions.sqlite"

    @property
    def evidently_workspace(self) -> Path:
        """The Evidently workspace ``personalize ui`` shows: one project per monitored model."""
        return self.home / "evidently"


def model_uri(name: str, alias: str) -> str:
    """The registry URI a model is served and promoted by: ``models:/name@alias``."""
    return f"models:/{name}@{alias}"


FILE_SUFFIXES = (".csv", ".tsv", ".txt", ".gz", ".parquet", ".pq", ".yaml", ".yml")


def redact(url: str) -> str:
    """``url`` fit to print or log: its credentials hidden (``postgresql://…@db:5432/mlflow``; a ``password=``
    query parameter too), the rest kept; a URL without credentials as it is. Everything before the last ``@`` is
    taken for the credentials, so a password with an unescaped ``/`` or ``@`` is hidden too."""
    scheme, sep, rest = url.partition("://")
    head, at, tail = rest.rpartition("@")
    if sep and at and not rest.startswith("/"):  # "sqlite:////a@b/x.db": a path, no authority
        url = f"{scheme}://…@{tail}"
    return re.sub(r"(?i)(password=)[^&]*", r"\1…", url)


def connect_timeout(url: str, seconds: int = 10) -> dict[str, dict[str, int]]:
    """SQLAlchemy ``create_engine`` keywords that bound connecting to a database server (PostgreSQL, MySQL with
    their usual drivers) to ``seconds``: an unreachable store is then one error at once, not minutes of retries."""
    if url.startswith(("postgresql", "mysql")) and "+pg8000" not in url and "+asyncpg" not in url:
        return {"connect_args": {"connect_timeout": seconds}}
    return {}


def looks_like_file(dataset: str) -> bool:
    """A DATASET argument meant as a file, not a data set name: a table or config suffix, or a path separator (a
    data set name has neither), so a missing one is "no such file", not "no data set"."""
    return dataset.lower().endswith(FILE_SUFFIXES) or any(sep in dataset for sep in {"/", os.sep})


def ingested(data_root: Path) -> list[str]:
    """The data sets under a home's ``data`` folder (one folder each)."""
    return sorted(d.name for d in data_root.iterdir() if d.is_dir()) if data_root.is_dir() else []
