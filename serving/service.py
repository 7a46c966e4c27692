"""The personalization API: one BentoML service over the MLflow registry's champions.

    personalize serve                                   # or: bentoml serve serving.service:Personalization

Endpoints (POST, JSON): ``/churn``, ``/propensity`` (a ``customer_id`` looked up in the online store, a full
``features`` record, or a batch of ``items``; ``explain`` adds reason codes), ``/next_purchase`` (the same with a
purchase-cycle ``summary``), ``/forecast`` (a series' daily volume over a horizon), ``/segment`` (a customer's
rule segments and cluster), ``/personalize`` (a placement's variant for a customer: why, and the experiment arm),
``/feedback`` (an impression, click or conversion of a decision; the bandits learn from it). GET ``/healthz`` (alive),
``/readyz`` (models loaded, with their versions; 503 until then), ``/status`` (everything: versions, reload errors,
the prediction log, the online store), ``/metrics`` (Prometheus), ``/`` (the OpenAPI page with examples; the spec at
``/docs.json``). ``/readyz`` and ``/status`` also name the worker process that answered (``worker``: its pid) and
where its models come from.

Models come from the MLflow registry (hot-reloaded when an alias moves), or, when the service runs from a Bento that
carries them (``personalize bento build``; ``PERSONALIZE_MODEL_SOURCE`` chooses), from the Bento's own model store:
fixed at build time, no registry needed (:mod:`serving.bento`). With ``PERSONALIZE_WORKERS`` > 1 every worker
process loads the models, checks the registry and writes its own prediction-log segments.

The class is thin: configuration is read once (:class:`serving.config.ServeConfig`), the work is in
:class:`serving.api.Runtime`. Bad input is a 400 naming the field (pydantic's checks, then the model's own:
unknown, missing or mistyped features, negative counts); a model with no champion is a 503.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import os
import sys
import time
from datetime import date
from typing import Annotated, Any, Literal

import anyio
import bentoml
from bentoml.exceptions import ServiceUnavailable
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt
from starlette.responses import JSONResponse

from serving.config import ServeConfig
from serving.scoring import InputError, NotServing

log = logging.getLogger(__name__)
CONFIG = ServeConfig.from_env()

Number = Annotated[float, Field(allow_inf_nan=False)]
# a text value may be a labeled table's column the model set aside (free text, say), sent with the row and ignored
Value = Number | bool | Annotated[str, Field(max_length=4096)] | None


def _customer_id(value: Any) -> str:
    """A customer id as the stores keep it: a string, trimmed as ingest trims ids, or a JSON integer (Online Retail's
    12347 is "12347"). A float or a boolean is refused (``12347.0`` or ``true`` is no id anyone meant), and so is a
    blank id or one with control characters."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"a customer id is a string or an integer, not {type(value).__name__}")
    value = value.strip()
    if not value:
        raise ValueError("a customer id is not blank")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("a customer id has no control characters")
    if len(value) > 128:
        raise ValueError(f"a customer id has at most 128 characters, not {len(value):,}")
    return value


CustomerId = Annotated[str, BeforeValidator(_customer_id), Field(min_length=1, max_length=128, examples=["C000042"])]
FEATURES_EXAMPLE = {"recency_days": 12.0, "frequency": 7, "monetary_total": 412.5, "tenure_days": 380.0}
SUMMARY_EXAMPLE = {"frequency": 4, "recency": 120.0, "T": 200.0, "monetary": 35.2, "days_since_last": 80.0,
                   "purchases_30d": 0, "purchases_90d": 1, "purchases_180d": 3, "purchases_365d": 5,
                   "spend_total": 180.0, "spend_90d": 30.0, "gap_mean_days": 30.0}


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: CustomerId | None = None
    features: dict[Annotated[str, Field(max_length=128)], Value] | None = None


class CycleItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: CustomerId | None = None
    summary: dict[Annotated[str, Field(max_length=128)], Value] | None = None


Items = Annotated[list[Item], Field(min_length=1, max_length=CONFIG.max_batch)]
Ids = Annotated[list[CustomerId], Field(min_length=1, max_length=CONFIG.max_batch, examples=[["C000042", "C000043"]])]
CycleItems = Annotated[list[CycleItem], Field(min_length=1, max_length=CONFIG.max_batch)]
Features = Annotated[dict[Annotated[str, Field(max_length=128)], Value],
                     Field(description="every input feature of the model (null for unknown)",
                           examples=[FEATURES_EXAMPLE])]
Summary = Annotated[dict[Annotated[str, Field(max_length=128)], Value],
                    Field(description="the customer's purchase summary", examples=[SUMMARY_EXAMPLE])]


class ScoreRequest(BaseModel):
    """One customer by id (features from the online store), one full feature record, or a batch of items."""

    model_config = ConfigDict(extra="forbid")
    customer_id: CustomerId | None = None
    features: Features | None = None
    items: Items | None = None
    explain: StrictBool = Field(default=False, description="add the top reason codes (TreeSHAP contributions)")


class CycleRequest(BaseModel):
    """One customer by id (summary from the online store), one purchase summary, or a batch of items."""

    model_config = ConfigDict(extra="forbid")
    customer_id: CustomerId | None = None
    summary: Summary | None = None
    items: CycleItems | None = None
    horizon_days: Annotated[StrictInt, Field(ge=1, le=730)] | None = None


class IdsRequest(BaseModel):
    """Customer ids only, for the adaptive-batching routes."""

    model_config = ConfigDict(extra="forbid")
    customer_ids: Ids


class SegmentRequest(BaseModel):
    """One customer by id (segments materialized with the online store) or one feature record."""

    model_config = ConfigDict(extra="forbid")
    customer_id: CustomerId | None = None
    features: Features | None = None


class PersonalizeRequest(BaseModel):
    """A customer and a placement; ``consent``: false withdraws it (the non-personalized default), true decides only
    for a customer without a stored consent (a stored opt-out holds)."""

    model_config = ConfigDict(extra="forbid")
    customer_id: CustomerId | None = None
    placement: Annotated[str, Field(min_length=1, max_length=128, examples=["email"])]
    features: Features | None = None
    consent: StrictBool | None = None
    context: dict[Annotated[str, Field(max_length=128)], Value] | None = Field(
        default=None, description="extra names the catalog's eligibility rules may read (e.g. the page's category), "
                                  "declared under `context:` in the catalog")


class FeedbackRequest(BaseModel):
    """An impression, click or conversion of a decision (by the ``decision_id`` /personalize returned)."""

    model_config = ConfigDict(extra="forbid")
    decision_id: Annotated[str, Field(min_length=1, max_length=64, examples=["5f0c3b8e9a7d4e21b6f1c0a2d3e4f5a6"])]
    event: Literal["impression", "click", "conversion"]
    value: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)] | None = None  # "25" or true: a 400


class ForecastRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    series: Annotated[str, Field(min_length=1, max_length=256, examples=["total"])]
    horizon_days: Annotated[StrictInt, Field(ge=1, le=366)] = 30
    start: date | None = None


API_PATHS = ("/churn", "/propensity", "/next_purchase", "/forecast", "/churn/ids", "/propensity/ids", "/segment",
             "/personalize", "/feedback")


class Guard:
    """ASGI middleware: JSON only on the API routes (415 otherwise: BentoML would try to parse a malformed
    multipart body and fail with a 500), the API key on scoring routes, and JSON ``/readyz`` and ``/status``
    answers."""

    OPEN = ("/healthz", "/livez", "/metrics", "/docs.json", "/static_content", "/readyz", "/status")

    def __init__(self, app: Any, api_key: str | None = None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if scope.get("method") == "GET" and path in ("/readyz", "/status") and RUNTIME.get("runtime") is not None:
            runtime = RUNTIME["runtime"]
            if path == "/readyz":  # a probe: the models' state only, no store or log queries
                models = runtime.models
                status = models.status()
                body = {"ready": models.ready, "models": status["models"], "errors": status["errors"],
                        "worker": os.getpid(), "source": RUNTIME["source"]["source"]}
                return await _json(send, 200 if body["ready"] else 503, body)
            return await _json(send, 200, {**runtime.status(), "worker": os.getpid(),
                                           "model_source": RUNTIME["source"]})
        headers = dict(scope.get("headers") or [])
        if scope.get("method") == "POST" and path in API_PATHS:
            media = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
            if media not in (b"application/json", b""):
                return await _json(send, 415, {"error": f"content-type {media.decode(errors='replace')!r}: the API "
                                                        "takes application/json", "field": "content-type"})
            send = _named_400(send)
        if self.api_key and path != "/" and not path.startswith(self.OPEN):
            given = headers.get(b"x-api-key", b"").decode(errors="replace")
            auth = headers.get(b"authorization", b"").decode(errors="replace")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await _json(send, 401, {"error": "missing or wrong API key (send X-API-Key or "
                                                        "Authorization: Bearer)"})
        return await self.app(scope, receive, send)


def _named_400(send: Any) -> Any:
    """``send`` with every 400 answer made to name its field: pydantic's own checks (a mistyped or unknown field,
    malformed JSON) answer BentoML's ``{"error": "3 validation error for …", "detail": [...]}``, the model's checks
    ``{"error": ..., "field": ...}``; a client reads ``field`` from either."""
    held: dict[str, Any] = {}

    async def sending(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] == 400:
            held["start"], held["body"] = message, b""
            return None
        if "start" not in held or message["type"] != "http.response.body":
            return await send(message)
        held["body"] += message.get("body", b"")
        if message.get("more_body"):
            return None
        try:
            body = named_error(json.loads(held["body"]))
        except ValueError:
            body = {"error": held["body"].decode(errors="replace"), "field": "body"}
        raw = json.dumps(body, default=str, ensure_ascii=False).encode()
        headers = [(k, v) for k, v in held.pop("start")["headers"] if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": 400,
                    "headers": [*headers, (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    return sending


def named_error(body: Any) -> dict[str, Any]:
    """A 400 answer with a top-level ``field`` (dotted: ``features.recency_days``, ``items[0].customer_id``; ``body``
    for malformed JSON) and an ``error`` that starts with it; pydantic's ``detail`` list is kept."""
    if isinstance(body, list) and len(body) == 1 and isinstance(body[0], dict):
        body = body[0]  # BentoML answers its BadInput as a one-element list
    if not isinstance(body, dict):
        return {"error": str(body), "field": "body"}
    if "field" in body:
        return body
    detail = body.get("detail")
    if not (isinstance(detail, list) and detail and isinstance(detail[0], dict)):
        return {**body, "field": "body"}
    loc = list(detail[0].get("loc") or ())
    branches = [d for d in detail if list(d.get("loc") or ())[:-1] == loc[:-1] and len(d.get("loc") or ()) == len(loc)]
    union = len(loc) > 1 and len({d.get("type") for d in branches}) > 1  # a value that fits no branch of a union
    first = detail[0]
    if union:
        loc = loc[:-1]
        # the branch the value's type matched, failing a constraint (a string too long), says more than the branches
        # of other types ("Input should be a valid number")
        first = next((d for d in branches if not str(d.get("type", "")).endswith(("_type", "_parsing"))), first)
    field = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".") or "body"
    message = first.get("msg") or body.get("error")
    more = len(detail) - (len(branches) if union else 1)
    return {"error": f"{field}: {message}" + (f" (and {more} more)" if more > 0 else ""), "field": field,
            "detail": detail}


class QuietBadRequests(logging.Filter):
    """BentoML logs every request pydantic turns away at ERROR with a traceback; a client's mistake is one INFO
    line here (the 400 answer names the field)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            detail = exc.errors(include_context=False, include_input=False)
            record.msg, record.args = "bad request on %s: %s", (record.args[0] if record.args else "?",
                                                                 named_error({"detail": detail})["error"])
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(QuietBadRequests())


async def _json(send: Any, status: int, body: dict[str, Any]) -> None:
    raw = json.dumps(body, default=str, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


class RequestMetrics:
    """ASGI middleware: BentoML's HTTP request metrics, same names and labels (``bentoml_service_request_total``,
    ``_request_duration_seconds``, ``_request_in_progress``, ``_last_request_timestamp_seconds``), and the
    ``/metrics`` page, with BentoML's own middleware switched off (``metrics.enabled: false``).

    BentoML's middleware resolves four labelled children (``.labels()`` with five labels) on every request; here
    each child is resolved once and kept. On one ``/churn`` call through the whole ASGI stack in process, BentoML's
    middleware cost about 65 µs of ~810 (measured before it was switched off); this one costs 15-40 µs, most of it
    prometheus' multiprocess file writes (``python bench/serving_asgi.py``). Paths other than the service's routes
    count as ``other`` (a scanner's random paths would otherwise each add a time series)."""

    NAMESPACE = "bentoml_service"
    QUIET = ("/metrics", "/healthz", "/livez", "/readyz")  # not a "request" for the last-request timestamp

    def __init__(self, app: Any) -> None:
        self.app = app
        self._children: dict[tuple[int, str, int], Any] = {}
        self._routes: frozenset[str] | None = None
        self._metrics: tuple[Any, ...] | None = None

    def _setup(self) -> None:
        from bentoml._internal.context import server_context

        name, version = server_context.bento_name or "personalization", server_context.bento_version or "not available"
        self._labels = {"service_name": name, "service_version": version,
                        "runner_name": server_context.service_name or "personalization"}
        labels = ["endpoint", "service_name", "service_version", "http_response_code", "runner_name"]
        self._metrics = (
            bentoml.metrics.Counter(name=f"{self.NAMESPACE}_request_total", labelnames=labels,
                                    documentation="Total number of HTTP requests"),
            bentoml.metrics.Histogram(name=f"{self.NAMESPACE}_request_duration_seconds", labelnames=labels,
                                      documentation="HTTP request duration in seconds"),
            bentoml.metrics.Gauge(name=f"{self.NAMESPACE}_request_in_progress", labelnames=labels[:3] + labels[4:],
                                  documentation="HTTP requests in progress", multiprocess_mode="livesum"),
            bentoml.metrics.Gauge(name=f"{self.NAMESPACE}_last_request_timestamp_seconds",
                                  labelnames=["service_name", "service_version", "runner_name"],
                                  documentation="Time of the last request", multiprocess_mode="mostrecent"))
        self._routes = frozenset((*API_PATHS, *Guard.OPEN, "/", "/schema.json"))

    def _child(self, kind: int, endpoint: str = "", code: int = 0) -> Any:
        key = (kind, endpoint, code)
        child = self._children.get(key)
        if child is None:
            metric = self._metrics[kind]
            labels = dict(self._labels)
            if kind < 3:
                labels["endpoint"] = endpoint
            if kind < 2:
                labels["http_response_code"] = str(code)
            child = self._children[key] = metric.labels(**labels)
        return child

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._metrics is None:
            self._setup()
        path = scope.get("path", "")
        if path == "/metrics" and scope.get("method") == "GET":
            from bentoml._internal.configuration.containers import BentoMLContainer  # BentoML's multiprocess reader

            client = BentoMLContainer.metrics_client.get()
            body = await anyio.to_thread.run_sync(client.generate_latest)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", client.CONTENT_TYPE_LATEST.encode()),
                                    (b"content-length", str(len(body)).encode())]})
            return await send({"type": "http.response.body", "body": body})
        endpoint = path if path in self._routes else "other"
        if path not in self.QUIET:
            self._child(3).set_to_current_time()
        status = 0

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        in_progress = self._child(2, endpoint)
        in_progress.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, sending)
        except BaseException:
            status = status or (504 if isinstance(sys.exc_info()[1], anyio.get_cancelled_exc_class()) else 500)
            raise
        finally:
            in_progress.dec()
            self._child(0, endpoint, status).inc()
            self._child(1, endpoint, status).observe(time.perf_counter() - started)


RUNTIME: dict[str, Any] = {}  # this worker's Runtime and where its models come from, for the middleware
PREDICTIONS = bentoml.metrics.Counter(
    name="personalize_predictions", documentation="Scored items by endpoint, served model version and cold start",
    labelnames=["endpoint", "model", "version", "cold_start"])
DECISIONS = bentoml.metrics.Counter(
    name="personalize_decisions", documentation="Personalization decisions by placement, variant and policy",
    labelnames=["placement", "variant", "policy"])
BATCH_SIZE = bentoml.metrics.Histogram(
    name="personalize_batch_size", documentation="Customer ids scored in one merged call of an adaptive-batching route",
    labelnames=["method_name"], buckets=[2.0 ** i for i in range(max(CONFIG.max_batch, 1).bit_length() + 1)])


async def _call(ctx: bentoml.Context, endpoint: str, fn, *args: Any, offload: bool = False,
                **kwargs: Any) -> JSONResponse:
    """Run one request; a request the model cannot score is a 400 naming the field, a model not loaded a 503 saying
    why (BentoML's own exceptions would hide a 5xx's reason).

    A single record is scored on the event loop (well under a millisecond); explanations and batches, which take
    longer, run in a worker thread so they never hold up the requests behind them. The answer is a ready
    JSONResponse: BentoML would otherwise rebuild the output model's JSON schema for every response."""
    rid = ctx.request.headers.get("x-request-id")
    try:
        if offload:
            out = await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs, request_id=rid))
        else:
            out = fn(*args, **kwargs, request_id=rid)
    except InputError as exc:
        ctx.response.status_code = 400
        log.info("bad request on /%s: %s", endpoint, exc)  # as pydantic's turn-aways are logged (QuietBadRequests)
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)
    except NotServing as exc:
        ctx.response.status_code = 503
        return JSONResponse({"error": str(exc)}, status_code=503)
    ctx.response.headers["x-request-id"] = out["request_id"]
    if "model" in out:
        for result in out.get("results", [None]):
            _count(endpoint, out["model"], bool(result and result.get("cold_start")))
    elif endpoint == "personalize":
        DECISIONS.labels(placement=out["placement"], variant=out["variant"], policy=out["policy"]).inc()
    return JSONResponse(out)


_COUNTERS: dict[tuple[str, str, str, bool], Any] = {}


def _count(endpoint: str, model: dict[str, str], cold_start: bool) -> None:
    key = (endpoint, model["name"], model["version"], cold_start)
    counter = _COUNTERS.get(key)
    if counter is None:  # .labels() costs more than the increment: keep each child
        counter = _COUNTERS[key] = PREDICTIONS.labels(endpoint=endpoint, model=model["name"],
                                                      version=model["version"],
                                                      cold_start="true" if cold_start else "false")
    counter.inc()


@bentoml.service(
    name="personalization",
    workers=CONFIG.workers,
    traffic={"timeout": 30, **({"max_concurrency": CONFIG.max_concurrency} if CONFIG.max_concurrency else {})},
    logging={"access": {"enabled": False}},
    metrics={"enabled": False},  # RequestMetrics keeps BentoML's request metrics, cheaper (see there)
    # Request spans cost about half the throughput of a scoring call; tracing stays on for everything else.
    tracing={"excluded_urls": ["/churn", "/propensity", "/next_purchase", "/churn/ids", "/propensity/ids", "/segment",
                               "/personalize", "/feedback"]},
)
class Personalization:
    def __init__(self) -> None:
        from serving.api import Runtime

        # BentoML's server logging shows its own INFO lines but only WARNING from other loggers: the server's own
        # (models loaded and reloaded, a bad request the model turned away) are INFO lines an operator reads too
        if logging.getLogger("serving").level == logging.NOTSET:
            logging.getLogger("serving").setLevel(logging.INFO)
        bento_models = _bento_models()
        if bento_models is None:
            RUNTIME["source"] = {"source": "registry"}
            self.runtime = Runtime(CONFIG)
        else:  # a Bento's models are fixed at build time: nothing to hot-reload, no registry to ask
            RUNTIME["source"] = {"source": "bento", "bento": None if Personalization.bento is None else
                                 str(Personalization.bento.tag), "models": bento_models.describe()}
            if not bento_models.models:
                log.warning("no champion in the BentoML model store (`personalize bento build` imports them)")
            if CONFIG.shadow:
                log.warning("shadow mode needs the registry's challenger: off for models served from a Bento")
            self.runtime = Runtime(_bento_config(), bento_models, start_reloader=False)
        RUNTIME["runtime"] = self.runtime
        # BentoML looks the endpoint's method up on every request (``getattr(instance, name).local``), and its API
        # methods are non-data descriptors that build a new wrapper, with an ``inspect.signature``, on each lookup:
        # about 60 µs of a /churn call's 860 in process. Bound once here, the instance attribute answers instead.
        for name in Personalization.apis:
            setattr(self, name, getattr(self, name))

    def __is_ready__(self) -> bool:
        return self.runtime.models.ready

    @bentoml.on_shutdown
    def _flush(self) -> None:
        self.runtime.close()

    @bentoml.api(input_spec=ScoreRequest)
    async def churn(self, customer_id: CustomerId | None = None, features: Features | None = None,
                    items: Items | None = None, explain: StrictBool = False,
                    ctx: bentoml.Context = None) -> dict[str, Any]:
        """Churn risk: calibrated probability, the decision at the model's threshold and its action."""
        return await _call(ctx, "churn", self.runtime.classify, "churn", customer_id, features,
                           None if items is None else [i.model_dump() for i in items], explain,
                           offload=explain or items is not None)

    @bentoml.api(input_spec=ScoreRequest)
    async def propensity(self, customer_id: CustomerId | None = None, features: Features | None = None,
                         items: Items | None = None, explain: StrictBool = False,
                         ctx: bentoml.Context = None) -> dict[str, Any]:
        """Purchase propensity within the model's horizon."""
        return await _call(ctx, "propensity", self.runtime.classify, "propensity", customer_id, features,
                           None if items is None else [i.model_dump() for i in items], explain,
                           offload=explain or items is not None)

    @bentoml.api(route="/churn/ids", batchable=True, input_spec=IdsRequest, max_batch_size=CONFIG.max_batch,
                 max_latency_ms=CONFIG.batch_latency_ms)
    async def churn_ids(self, customer_ids: Ids) -> list[dict[str, Any]]:
        """Churn for customer ids, with adaptive batching: concurrent calls are merged into one lookup and one
        booster call (BentoML's dispatcher), then split back. Body: ``{"customer_ids": [...]}``."""
        return await self._batch("churn", customer_ids)

    @bentoml.api(route="/propensity/ids", batchable=True, input_spec=IdsRequest, max_batch_size=CONFIG.max_batch,
                 max_latency_ms=CONFIG.batch_latency_ms)
    async def propensity_ids(self, customer_ids: Ids) -> list[dict[str, Any]]:
        """Propensity for customer ids, with adaptive batching."""
        return await self._batch("propensity", customer_ids)

    async def _batch(self, endpoint: str, customer_ids: list[str]) -> list[dict[str, Any]]:
        try:
            out = await anyio.to_thread.run_sync(self.runtime.classify_ids, endpoint, list(customer_ids))
        except NotServing as exc:
            raise ServiceUnavailable(str(exc)) from None
        except InputError as exc:  # the model scores no id at all (a labeled table's): every merged call's 400
            from pydantic import ValidationError

            message = str(exc).removeprefix(f"{exc.field}: ")
            raise ValidationError.from_exception_data("IdsRequest", [{
                "type": "value_error", "loc": ("customer_ids",), "input": None,
                "ctx": {"error": ValueError(message)}}]) from None
        BATCH_SIZE.labels(method_name=f"{endpoint}_ids").observe(len(customer_ids))
        for r in out:
            _count(endpoint, r["model"], r["cold_start"])
        return out

    @bentoml.api(input_spec=CycleRequest)
    async def next_purchase(self, customer_id: CustomerId | None = None, summary: Summary | None = None,
                            items: CycleItems | None = None,
                            horizon_days: Annotated[StrictInt, Field(ge=1, le=730)] | None = None,
                            ctx: bentoml.Context = None) -> dict[str, Any]:
        """Expected purchases in the horizon, expected days to the next one, P(purchase), P(alive)."""
        return await _call(ctx, "next_purchase", self.runtime.next_purchase, customer_id, summary,
                           None if items is None else [i.model_dump() for i in items], horizon_days, offload=True)

    @bentoml.api(input_spec=SegmentRequest)
    async def segment(self, customer_id: CustomerId | None = None, features: Features | None = None,
                      ctx: bentoml.Context = None) -> dict[str, Any]:
        """The customer's rule segments (every one that holds, in priority order), the primary one, the cluster."""
        return await _call(ctx, "segment", self.runtime.segment, customer_id, features)

    @bentoml.api(input_spec=PersonalizeRequest)
    async def personalize(self, placement: Annotated[str, Field(min_length=1, max_length=128)],
                          customer_id: CustomerId | None = None, features: Features | None = None,
                          consent: StrictBool | None = None,
                          context: dict[Annotated[str, Field(max_length=128)], Value] | None = None,
                          ctx: bentoml.Context = None) -> dict[str, Any]:
        """One variant of a placement for the customer: the variant, why (rule or bandit, scores, segment), the
        experiment arm, and a ``decision_id`` to report feedback against."""
        return await _call(ctx, "personalize", self.runtime.personalize, placement, customer_id, features, consent,
                           context, offload=True)

    @bentoml.api(input_spec=FeedbackRequest)
    async def feedback(self, decision_id: Annotated[str, Field(min_length=1, max_length=64)],
                       event: Literal["impression", "click", "conversion"], value: float | None = None,
                       ctx: bentoml.Context = None) -> dict[str, Any]:
        """Record an impression, click or conversion of a decision (idempotent: a repeat is not counted twice)."""
        return await _call(ctx, "feedback", self.runtime.feedback, decision_id, event, value, offload=True)

    @bentoml.api(input_spec=ForecastRequest)
    async def forecast(self, series: Annotated[str, Field(min_length=1, max_length=256, examples=["total"])],
                 horizon_days: Annotated[StrictInt, Field(ge=1, le=366)] = 30,
                 start: date | None = None, ctx: bentoml.Context = None) -> dict[str, Any]:
        """Daily purchase volume of a segment/category series (Prophet), with its interval."""
        return await _call(ctx, "forecast", self.runtime.forecast, series, horizon_days,
                           None if start is None else start.isoformat(), offload=True)


def _bento_models():
    """The champions to serve from the BentoML model store (:class:`serving.bento.BentoRegistry`), or None for the
    registry: the Bento's own when it is served from one that carries them (``auto``), always with ``bento`` (the
    Bento's, else the last imported)."""
    if CONFIG.model_source == "registry":
        return None
    from serving.bento import BentoRegistry

    bento = Personalization.bento  # set by BentoML when the service is loaded from a Bento
    models = BentoRegistry.of_bento(bento) if bento is not None else None
    if CONFIG.model_source == "auto":
        return models if models is not None and models.models else None
    return models if models is not None and models.models else BentoRegistry.latest()


def _bento_config() -> ServeConfig:
    """The serving config of a Bento's models: the endpoints and alias it was built with (its labels), unless the
    environment names the endpoints' models itself (``PERSONALIZE_MODELS``)."""
    from serving.bento import bento_serving

    endpoints, alias = bento_serving(Personalization.bento)
    update: dict[str, Any] = {}
    if endpoints and not CONFIG.required:  # PERSONALIZE_MODELS, when set, names the endpoints' models itself
        update.update(models={**CONFIG.models, **endpoints}, required=tuple(endpoints))
    if alias:
        update["alias"] = alias
    return CONFIG.model_copy(update=update) if update else CONFIG


Personalization.add_asgi_middleware(RequestMetrics)
Personalization.add_asgi_middleware(Guard, api_key=CONFIG.api_key)
