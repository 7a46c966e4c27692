"""What the service serves and how: one frozen configuration, read once at start-up.

From the environment (``personalize serve`` sets these from its options; ``bentoml serve`` reads them as is):

=================================  ==========================================================================
``PERSONALIZE_HOME``               the project home (models' tracking store, online store, prediction log)
``MLFLOW_TRACKING_URI``            the registry to load champions from (default: SQLite under home)
``PERSONALIZE_SERVE_DATASET``      the customer base whose online store answers ``customer_id`` requests
``PERSONALIZE_ONLINE_STORE``       ``sqlite:///path`` or ``redis://host:port/db`` (default: SQLite under home)
``PERSONALIZE_PREDICTION_LOG``     folder of the prediction log (default ``<home>/predictions``)
``PERSONALIZE_API_KEY``            when set, every scoring request needs ``Authorization: Bearer <key>`` or
                                   ``X-API-Key: <key>`` (401 otherwise)
``PERSONALIZE_SHADOW``             ``1``: the ``challenger`` scores the same requests; logged, never returned
``PERSONALIZE_RELOAD_S``           seconds between two checks of the registry's aliases (hot reload)
``PERSONALIZE_MODEL_SOURCE``       ``auto`` (default): the champions a Bento carries when served from one that
                                   carries them (``personalize bento build``), the registry otherwise;
                                   ``registry`` or ``bento`` (the last champions imported into the BentoML model
                                   store) to choose; bento-sourced models are never hot-reloaded
``PERSONALIZE_WORKERS``            server worker processes (each loads the models and logs on its own)
``PERSONALIZE_MAX_CONCURRENCY``    requests in flight per worker before the server answers 503 (default: no limit)
``PERSONALIZE_MAX_BATCH``          most items in one request (and in one adaptive batch)
``PERSONALIZE_BATCH_LATENCY_MS``   adaptive batching's latency bound (503 past it: load shedding)
``PERSONALIZE_LOG_FLUSH_S``        seconds between two prediction-log segments (default 1)
``PERSONALIZE_ID_SALT``            the pseudonymization salt (default: a random one kept under home)
``PERSONALIZE_CATALOG``            the placements, variants and experiments YAML (default: serving/catalog.yaml)
``PERSONALIZE_SEGMENTS``           the rule segments YAML (default: features/segments.yaml)
``PERSONALIZE_DECISIONS``          the decision log and bandit store (default ``<home>/decisions/decisions.sqlite``)
``PERSONALIZE_MODELS``             which registered model an endpoint serves, e.g. ``churn=churn_telco``
                                   (comma-separated; the others keep their default: churn, propensity,
                                   purchase_cycle, purchase_forecast)
=================================  ==========================================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from personalize.errors import ConfigError
from personalize.settings import Settings

# endpoint -> registered model it serves
ENDPOINT_MODELS: dict[str, str] = {
    "churn": "churn",
    "propensity": "propensity",
    "next_purchase": "purchase_cycle",
    "forecast": "purchase_forecast",
}
# endpoint -> the kind of model it answers with (serving.scoring.Loaded.kind)
ENDPOINT_KINDS: dict[str, str] = {"churn": "classifier", "propensity": "classifier", "next_purchase": "cycle",
                                  "forecast": "forecast"}
# what a classifier's positive decision means to the application
DEFAULT_ACTIONS: dict[str, str] = {"churn": "retention_offer", "propensity": "purchase_offer"}


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    home: Path = Path(".personalize")
    tracking_uri: str | None = None
    dataset: str = "synthetic"
    online_store: str | None = None
    prediction_log: Path | None = None
    api_key: str | None = None
    alias: str = "champion"
    shadow: bool = False
    shadow_alias: str = "challenger"
    reload_s: float = Field(default=10.0, gt=0)
    # where the champions come from: the registry (hot reload) or a Bento's own model store (fixed at build)
    model_source: Literal["auto", "registry", "bento"] = "auto"
    workers: int = Field(default=1, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)  # requests in flight per worker before BentoML's 503
    max_batch: int = Field(default=1000, ge=1)
    # adaptive batching: BentoML answers 503 rather than let a merged batch's expected latency pass this
    batch_latency_ms: int = Field(default=250, ge=1)
    explain_top: int = Field(default=5, ge=1)
    log_flush_s: float = Field(default=1.0, gt=0)
    actions: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    catalog: Path | None = None
    segments: Path | None = None
    decisions: Path | None = None
    # a customer whose consent neither the request nor the customers table states: personalize or not
    assume_consent: bool = False
    models: dict[str, str] = Field(default_factory=lambda: dict(ENDPOINT_MODELS))
    # the endpoints given a model by name (`serve --model`): /readyz waits for their champion
    required: tuple[str, ...] = ()

    @field_validator("models")
    @classmethod
    def _known_endpoints(cls, models: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(models) - set(ENDPOINT_MODELS))
        if unknown:
            raise ValueError(f"no endpoint {unknown[0]!r}; endpoints: {', '.join(ENDPOINT_MODELS)}")
        return {**ENDPOINT_MODELS, **models}

    @property
    def settings(self) -> Settings:
        return Settings(home=self.home, mlflow_tracking_uri=self.tracking_uri, prediction_log=self.prediction_log)

    @property
    def online_url(self) -> str:
        from serving.online import default_url

        return self.online_store or default_url(self.home, self.dataset)

    @property
    def decisions_path(self) -> Path:
        return self.decisions or self.settings.decisions_path

    @property
    def log_root(self) -> Path:
        return self.settings.log_root

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServeConfig:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {
            "home": Path(env.get("PERSONALIZE_HOME", ".personalize")),
            "tracking_uri": env.get("MLFLOW_TRACKING_URI") or None,
            "dataset": env.get("PERSONALIZE_SERVE_DATASET", "synthetic"),
            "online_store": env.get("PERSONALIZE_ONLINE_STORE") or None,
            "api_key": env.get("PERSONALIZE_API_KEY") or None,
            "shadow": env.get("PERSONALIZE_SHADOW", "0").lower() in ("1", "true", "yes", "on"),
            "model_source": env.get("PERSONALIZE_MODEL_SOURCE") or "auto",
        }
        for key, name in (("prediction_log", "PERSONALIZE_PREDICTION_LOG"), ("catalog", "PERSONALIZE_CATALOG"),
                          ("segments", "PERSONALIZE_SEGMENTS"), ("decisions", "PERSONALIZE_DECISIONS")):
            if env.get(name):
                values[key] = Path(env[name])
        for key, name, kind in (("reload_s", "PERSONALIZE_RELOAD_S", float), ("workers", "PERSONALIZE_WORKERS", int),
                                ("max_batch", "PERSONALIZE_MAX_BATCH", int),
                                ("batch_latency_ms", "PERSONALIZE_BATCH_LATENCY_MS", int),
                                ("log_flush_s", "PERSONALIZE_LOG_FLUSH_S", float),
                                ("max_concurrency", "PERSONALIZE_MAX_CONCURRENCY", int)):
            if env.get(name):
                values[key] = kind(env[name])
        if env.get("PERSONALIZE_MODELS"):
            values["models"] = endpoint_models(env["PERSONALIZE_MODELS"].split(","))
            values["required"] = tuple(values["models"])
        return cls(**values)


def endpoint_models(pairs: list[str]) -> dict[str, str]:
    """``["churn=churn_telco", ...]`` as ``{endpoint: registered model}``, every endpoint and name checked; a bad
    pair is a :class:`ConfigError` naming it."""
    from training.registry import RegistryError, check_name

    out: dict[str, str] = {}
    for pair in (p.strip() for p in pairs):
        if not pair:
            continue
        endpoint, _, name = (x.strip() for x in pair.partition("="))
        if endpoint not in ENDPOINT_MODELS or not name:
            raise ConfigError(f"{pair!r}: give ENDPOINT=MODEL with an endpoint of {', '.join(ENDPOINT_MODELS)}, "
                              "e.g. churn=churn_telco")
        try:
            out[endpoint] = check_name(name)
        except RegistryError as exc:
            raise ConfigError(f"{pair!r}: {exc}") from None
    return out
