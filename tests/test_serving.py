"""The personalization API end to end: a real BentoML server on loopback over a real registry.

One module-scoped home holds small synthetic data, a churn and a propensity champion, a purchase-cycle champion
and a forecaster, and a materialized online store; one server (``personalize serve``) answers every test here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from personalize.settings import Settings

REPO = Path(__file__).resolve().parents[1]
MAX_BATCH = 50
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PERSONALIZE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
                "PERSONALIZE_OPTUNA_STORAGE": f"sqlite:///{home / 'optuna.db'}", "BENTOML_DO_NOT_TRACK": "True",
                "PERSONALIZE_MAX_BATCH": str(MAX_BATCH), **extra})
    return env


class Server:
    """``personalize serve`` in its own process group, stopped gracefully (SIGINT) or killed."""

    def __init__(self, home: Path, *args: str, **env: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(home / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "personalize"), "serve", "--port", str(self.port), "--reload-s", "0.5",
             *args],
            env=_env(home, **env), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def wait_ready(self, timeout_s: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                r = self.client.get("/readyz")
                if r.status_code == 200:
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(Path(self.log.name).read_text()[-3000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.client.close()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic data, four champions and the online store (built in-process with this home's settings)."""
    from features.pipeline import build_training_frame, ingest_synthetic
    from features.synthetic import SyntheticConfig, generate
    from serving.online import default_url, materialize
    from training.cycle import CycleConfig
    from training.cycle import train_and_register as train_cycle
    from training.forecast import ForecastConfig
    from training.forecast import train_and_register as train_forecast
    from training.registry import GateConfig, connect, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    home = tmp_path_factory.mktemp("serving") / "home"
    home.mkdir()
    saved = dict(os.environ)
    os.environ.update(_env(home))
    try:
        settings = Settings.from_env()
        ingest_synthetic(settings, "synthetic", generate(SyntheticConfig(customers=400, days=500)))
        build_training_frame(settings, "synthetic")
        fast = TuneConfig(trials=2, families=("lightgbm",), max_rounds=150, early_stopping_rounds=20)
        client = connect(settings.tracking_uri)
        for name in ("churn", "propensity"):
            train_and_register(settings, name, "synthetic", TrainConfig(tune=fast), model_name=name)
            promote(client, name, GateConfig(bootstrap_rounds=100), reason="serving tests", force=True)
        train_cycle(settings, "synthetic", CycleConfig(candidates=("aft",), horizon_days=60))
        promote(client, "purchase_cycle", GateConfig(bootstrap_rounds=100), reason="serving tests", force=True)
        train_forecast(settings, "synthetic", ForecastConfig(group_by=(), uncertainty_samples=20,
                                                             changepoint_prior_scales=(0.05,), holidays_country=None))
        promote(client, "purchase_forecast", GateConfig(bootstrap_rounds=100), reason="serving tests", force=True)
        materialize(settings.dataset_dir("synthetic"), default_url(home, "synthetic"), tracking_uri=settings.tracking_uri)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return home


API_KEY = "k3y"


@pytest.fixture(scope="module")
def server(home: Path):
    """The one server of this module: API key on, its own prediction log; the last test stops it."""
    srv = Server(home, PERSONALIZE_API_KEY=API_KEY, PERSONALIZE_PREDICTION_LOG=str(home / "predlog"))
    srv.client.headers["x-api-key"] = API_KEY
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _known_ids(home: Path, n: int = 5) -> list[str]:
    import sqlite3

    con = sqlite3.connect(home / "online" / "synthetic.sqlite")
    rows = con.execute("SELECT customer_id FROM customers WHERE cycle != '{}' ORDER BY customer_id LIMIT ?",
                       (n,)).fetchall()
    con.close()
    return [r[0] for r in rows]


def _features(home: Path, customer_id: str) -> dict[str, Any]:
    import sqlite3

    con = sqlite3.connect(home / "online" / "synthetic.sqlite")
    row = con.execute("SELECT features FROM customers WHERE customer_id = ?", (customer_id,)).fetchone()
    con.close()
    return json.loads(row[0])


def _model_features(home: Path, name: str) -> list[str]:
    import mlflow.pyfunc

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    return model.metadata.get_input_schema().input_names()


# --- scoring -----------------------------------------------------------------------------------------------------
def test_readiness_lists_the_champions(server: Server) -> None:
    ready = server.client.get("/readyz").json()
    assert ready["ready"] is True
    assert {e: m["version"] for e, m in ready["models"].items()} == {
        "churn": "1", "propensity": "1", "next_purchase": "1", "forecast": "1"}
    assert server.client.get("/healthz").status_code == 200
    metrics = server.client.get("/metrics")
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text
    spec = server.client.get("/docs.json").json()
    assert {"/churn", "/propensity", "/next_purchase", "/forecast"} <= set(spec["paths"])


def test_readiness_waits_for_a_model_the_operator_named_but_not_for_an_optional_endpoint() -> None:
    """`serve --model churn=churn_telco` names a model to serve: until it has a champion the server is not ready
    (a load balancer keeps traffic away). An endpoint left at its default (no forecaster trained) does not hold
    readiness back."""
    from serving.config import ServeConfig
    from serving.scoring import ModelSet

    class NoChampions:  # a registry where no model has the alias
        def get_model_version_by_alias(self, name: str, alias: str) -> Any:
            raise LookupError(f"no alias {alias} on {name}")

    config = ServeConfig.from_env({"PERSONALIZE_MODELS": "churn=churn_telco"})
    assert config.required == ("churn",) and ServeConfig.from_env({}).required == ()
    named = ModelSet(NoChampions(), config.models, required=config.required)
    default = ModelSet(NoChampions(), ServeConfig.from_env({}).models)
    named.refresh()
    default.refresh()
    assert default.ready and not named.ready
    assert named.errors["churn"] == "no version of churn_telco has the alias 'champion'"


def test_churn_by_id_by_record_and_in_a_batch_agree(server: Server, home: Path) -> None:
    cid = _known_ids(home, 1)[0]
    features = {c: _features(home, cid).get(c) for c in _model_features(home, "churn")}
    by_id = server.client.post("/churn", json={"customer_id": cid, "explain": True})
    assert by_id.status_code == 200, by_id.text
    body = by_id.json()
    assert body["model"] == {"name": "churn", "version": "1", "alias": "champion"}
    assert by_id.headers["x-request-id"] == body["request_id"]
    (one,) = body["results"]
    assert one["customer_id"] == cid and not one["cold_start"] and 0 < one["probability"] < 1
    assert one["decision"] == (one["probability"] >= one["threshold"])
    assert one["action"] == ("retention_offer" if one["decision"] else "none")
    reasons = one["reasons"]
    assert 1 <= len(reasons) <= 5 and {r["feature"] for r in reasons} <= set(features)
    assert all(abs(a["contribution"]) >= abs(b["contribution"]) for a, b in zip(reasons, reasons[1:]))

    by_record = server.client.post("/churn", json={"features": features}).json()["results"][0]
    assert by_record["probability"] == one["probability"]

    batch = server.client.post("/churn", json={"items": [{"customer_id": cid}, {"customer_id": "no-such-customer"},
                                                         {"features": features}]}).json()["results"]
    assert [r["cold_start"] for r in batch] == [False, True, False]
    assert batch[0]["probability"] == batch[2]["probability"] == one["probability"]
    assert "prior" in batch[1] and batch[1]["decision"] is False and batch[1]["action"] == "none"  # no offer blind
    metrics = server.client.get("/metrics").text
    counted = [line for line in metrics.splitlines() if line.startswith("personalize_predictions_total{")
               and 'endpoint="churn"' in line and 'cold_start="true"' in line and 'version="1"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 1


def test_a_cold_start_never_decides_to_act_even_above_the_threshold(home: Path, tmp_path: Path) -> None:
    """An unknown id gets the base rate; where that is above the threshold (here a threshold of 0), a known customer
    is acted on and the unknown one is not: no history, no offer."""
    from serving.api import Runtime
    from serving.config import ServeConfig

    config = ServeConfig(home=home, tracking_uri=f"sqlite:///{home / 'mlflow.db'}", prediction_log=tmp_path / "log")
    runtime = Runtime(config, start_reloader=False, freeze_heap=False)
    try:
        runtime.models.get("churn").scorer.threshold = 0.0
        known, unknown = runtime.classify("churn", items=[{"customer_id": _known_ids(home, 1)[0]},
                                                          {"customer_id": "no-such-customer"}])["results"]
        assert (known["decision"], known["action"]) == (True, "retention_offer")
        assert unknown["cold_start"] and unknown["probability"] > 0
        assert (unknown["decision"], unknown["action"]) == (False, "none")
    finally:
        runtime.close()
    # nor does a decision: the base rate is reported, but a rule on churn does not hold for a cold start
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("placements:\n  - name: p\n    policy: rules\n    default: plain\n    variants:\n"
                       "      - {id: offer, eligible: churn >= 0}\n      - {id: plain, eligible: churn < 0}\n")
    runtime = Runtime(config.model_copy(update={"catalog": catalog}), start_reloader=False, freeze_heap=False)
    try:
        assert runtime.personalize("p", customer_id=_known_ids(home, 1)[0], consent=True)["variant"] == "offer"
        cold = runtime.personalize("p", customer_id="no-such-customer", consent=True)
        assert cold["cold_start"] and cold["variant"] == "plain" and 0 < cold["scores"]["churn"] < 1, cold
    finally:
        runtime.close()


def test_an_integer_id_is_the_same_id_as_its_string(server: Server) -> None:
    def answer(path: str, body: dict[str, Any]) -> Any:
        r = server.client.post(path, json=body)
        assert r.status_code == 200, (path, body, r.text)
        data = r.json()
        return [{k: v for k, v in d.items() if k != "request_id"} for d in (data if isinstance(data, list) else [data])]

    # Given a client that holds numeric ids (Online Retail's 12347) and sends them as JSON integers
    for path, key in (("/churn", "customer_id"), ("/segment", "customer_id"), ("/churn/ids", "customer_ids")):
        as_int, as_str = (([12347], ["12347"]) if key == "customer_ids" else (12347, "12347"))
        # When both spellings are sent, Then they are one customer: the same answer, the id given back as a string
        given = answer(path, {key: as_int})
        assert given == answer(path, {key: as_str}), path
        assert '"customer_id": "12347"' in json.dumps(given) and '"customer_id": 12347' not in json.dumps(given)
        padded = ([" 12347 "] if key == "customer_ids" else " 12347 ")  # trimmed, as ingest trims ids
        assert answer(path, {key: padded}) == given, path


def test_request_metrics_count_each_route_and_status(server: Server, home: Path) -> None:
    """BentoML's request metrics, kept by serving.service.RequestMetrics: one count and one duration per request,
    by route and status; a path that is no route counts as "other"."""

    def value(name: str, **labels: str) -> float:
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        for line in server.client.get("/metrics").text.splitlines():
            if line.startswith(name + "{") and all(w in line for w in wanted):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    total, seconds = "bentoml_service_request_total", "bentoml_service_request_duration_seconds_count"
    before = (value(total, endpoint="/churn", http_response_code="200"),
              value(total, endpoint="/churn", http_response_code="400"),
              value(total, endpoint="other", http_response_code="404"),
              value(seconds, endpoint="/churn", http_response_code="200"))
    assert server.client.post("/churn", json={"customer_id": _known_ids(home, 1)[0]}).status_code == 200
    assert server.client.post("/churn", json={"customer_id": 5.5}).status_code == 400
    assert server.client.get("/no-such-page-1234").status_code == 404
    after = (value(total, endpoint="/churn", http_response_code="200"),
             value(total, endpoint="/churn", http_response_code="400"),
             value(total, endpoint="other", http_response_code="404"),
             value(seconds, endpoint="/churn", http_response_code="200"))
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1, 1]
    assert value("bentoml_service_request_in_progress", endpoint="/churn") == 0
    assert 'endpoint="/no-such-page-1234"' not in server.client.get("/metrics").text


def test_batch_scoring_gives_the_online_answer(server: Server, home: Path) -> None:
    from serving.batch import score_dataset
    from training.registry import connect

    cid = _known_ids(home, 1)[0]
    online = server.client.post("/churn", json={"customer_id": cid}).json()["results"][0]["probability"]
    client = connect(f"sqlite:///{home / 'mlflow.db'}")
    report = score_dataset(client, "churn", home / "data" / "synthetic", home / "scores")
    scores = pd.read_parquet(report.path).set_index("customer_id")
    assert report.rows == len(scores) >= 300
    assert scores.loc[cid, "probability"] == pytest.approx(online, abs=1e-6)


def test_batch_cycle_scores_give_the_online_answers_and_a_forecaster_is_refused_at_once(server: Server,
                                                                                         home: Path) -> None:
    """`score purchase_cycle` writes every customer's next-purchase answers, the API's for the same summary."""
    from typer.testing import CliRunner

    from personalize.cli import app

    cid = _known_ids(home, 1)[0]
    online = server.client.post("/next_purchase", json={"customer_id": cid, "horizon_days": 30}).json()["results"][0]
    runner, env = CliRunner(), _env(home)
    result = runner.invoke(app, ["score", "purchase_cycle", "--horizon", "30"], env=env)
    assert result.exit_code == 0, result.output
    assert "horizon 30 days" in " ".join(result.output.split()), result.output
    scores = pd.read_parquet(home / "scores" / "purchase_cycle" / "v1" / "scores.parquet").set_index("customer_id")
    assert len(scores) >= 300 and (scores["horizon_days"] == 30).all() and scores.index.is_unique
    for column in ("expected_purchases", "expected_days_to_next", "p_purchase"):
        assert scores.loc[cid, column] == pytest.approx(online[column], abs=1e-6), column
    for args, message in ((["score", "purchase_forecast"], "is a forecaster"),
                          (["score", "churn", "--horizon", "30"], "--horizon is for a purchase-cycle model")):
        refused = runner.invoke(app, args, env=env)
        assert refused.exit_code == 2 and message in refused.output, refused.output


def test_propensity_next_purchase_and_forecast(server: Server, home: Path) -> None:
    cid = _known_ids(home, 1)[0]
    prop = server.client.post("/propensity", json={"customer_id": cid}).json()["results"][0]
    assert 0 < prop["probability"] < 1 and prop["action"] in ("purchase_offer", "none")

    nxt = server.client.post("/next_purchase", json={"items": [{"customer_id": cid},
                                                               {"customer_id": "someone-new"}]})
    assert nxt.status_code == 200, nxt.text
    known, new = nxt.json()["results"]
    assert not known["cold_start"] and new["cold_start"]
    for r in (known, new):
        assert r["horizon_days"] == 60 and r["expected_purchases"] >= 0 and 0 <= r["p_purchase"] <= 1
    longer = server.client.post("/next_purchase", json={"customer_id": cid, "horizon_days": 180}).json()["results"][0]
    sent = server.client.post("/next_purchase", json={"summary": SUMMARY})  # a summary the application computed
    assert sent.status_code == 200 and 0 < sent.json()["results"][0]["p_purchase"] < 1, sent.text
    assert longer["expected_purchases"] >= known["expected_purchases"]

    fc = server.client.post("/forecast", json={"series": "total", "horizon_days": 14})
    assert fc.status_code == 200, fc.text
    points = fc.json()["forecast"]
    assert len(points) == 14 and all(p["yhat"] is not None and p["yhat"] >= 0 for p in points)
    assert fc.json()["measure"] == "orders"  # daily orders (the default), not spend or units


def test_adaptive_batching_merges_concurrent_calls_and_answers_each_its_own(server: Server, home: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ids = _known_ids(home, 20) + ["never-seen"]

    def call(i: int) -> tuple[str, httpx.Response]:
        cid = ids[i % len(ids)]
        return cid, server.client.post("/churn/ids", json={"customer_ids": [cid]})

    def batch_sizes() -> dict[str, float]:
        return {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
                for line in server.client.get("/metrics").text.splitlines()
                if line.startswith("personalize_batch_size_") and 'method_name="churn_ids"' in line}

    before = batch_sizes()
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(call, range(200)))
    assert all(r.status_code == 200 for _, r in answers), {r.status_code for _, r in answers}
    for cid, r in answers:
        (one,) = r.json()
        assert one["customer_id"] == cid and one["cold_start"] == (cid == "never-seen")
    single = server.client.post("/churn", json={"customer_id": ids[0]}).json()["results"][0]["probability"]
    assert [r.json()[0]["probability"] for c, r in answers if c == ids[0]][0] == single
    after = batch_sizes()  # the 200 calls' ids, in fewer merged calls (earlier tests' calls subtracted)
    assert after["personalize_batch_size_sum"] - before.get("personalize_batch_size_sum", 0) == 200
    assert after["personalize_batch_size_count"] - before.get("personalize_batch_size_count", 0) < 200


# --- bad input ---------------------------------------------------------------------------------------------------
# a purchase summary the cycle model scores (one repeat purchase day)
SUMMARY = {"frequency": 1, "recency": 20, "T": 60, "monetary": 12.5, "days_since_last": 40, "purchases_30d": 0,
           "purchases_90d": 2, "purchases_180d": 2, "purchases_365d": 2, "spend_total": 25.0, "spend_90d": 25.0,
           "gap_mean_days": 20.0}


def _bad_cases(home: Path) -> list[tuple[str, Any, str]]:
    cid = _known_ids(home, 1)[0]
    features = {c: _features(home, cid).get(c) for c in _model_features(home, "churn")}
    count = next(c for c in ("frequency", "orders_90d", "returns") if c in features)
    return [
        ("/churn", {"customer_id": 5.0}, "customer_id"),
        ("/churn", {"customer_id": True}, "customer_id"),
        ("/churn", {"features": {**features, "bogus": 1.0}}, "features.bogus"),
        ("/churn", {"features": {k: v for k, v in features.items() if k != count}}, f"features.{count}"),
        ("/churn", {"features": {**features, count: -3}}, f"features.{count}"),
        ("/churn", {"features": {**features, count: "many"}}, f"features.{count}"),
        ("/churn", {"items": []}, "items"),
        ("/churn", {"items": [{"customer_id": cid}] * (MAX_BATCH + 1)}, "items"),
        ("/churn", {}, "customer_id"),
        ("/churn", {"customer_id": cid, "items": [{"customer_id": cid}]}, "items"),
        ("/churn", {"items": [{}]}, "items[0]"),
        ("/churn", {"customer_id": cid, "colour": "red"}, "colour"),
        ("/churn", {"features": {**features, count: [1]}}, f"features.{count}"),
        ("/churn", {"items": [{"customer_id": [7]}]}, "items[0].customer_id"),
        ("/churn/ids", {"customer_ids": ["c1", 2.5]}, "customer_ids[1]"),
        ("/churn/ids", {"customer_ids": []}, "customer_ids"),
        ("/churn/ids", {"customer_ids": [cid], "explain": True}, "explain"),
        ("/next_purchase", {"summary": {"frequency": 2}}, "summary."),
        ("/next_purchase", {"summary": {**SUMMARY, "frequency": 4.5}}, "summary.frequency"),  # days are whole
        ("/next_purchase", {"summary": {**SUMMARY, "monetary": -35.2}}, "summary.monetary"),  # returns are not spend
        ("/next_purchase", {"customer_id": cid, "horizon_days": 0}, "horizon_days"),
        ("/forecast", {"series": "nope"}, "series"),
        ("/forecast", {"series": "total", "horizon_days": 10_000}, "horizon_days"),
        ("/forecast", {"series": "total", "start": "not a date"}, "start"),
        ("/forecast", {"series": "total", "start": "2999-01-01"}, "start"),  # past pandas' calendar: was a 500
        ("/forecast", {"series": "total", "start": "2262-04-10"}, "start"),
        ("/forecast", {"series": "total", "start": "1900-01-01"}, "start"),  # before the series' history
        ("/forecast", {"series": "total", "horizon_days": "30"}, "horizon_days"),  # types are not coerced
        ("/churn", {"customer_id": cid, "explain": "yes"}, "explain"),
        ("/churn", {"customer_id": cid, "explain": 1}, "explain"),
        ("/next_purchase", {"customer_id": cid, "horizon_days": 30.5}, "horizon_days"),
        ("/churn", {"customer_id": "   "}, "customer_id"),  # blank once trimmed, as ingest trims ids
        ("/churn", {"customer_id": "c1\u0000"}, "customer_id"),
        ("/feedback", {"decision_id": "d1", "event": "conversion", "value": "25"}, "value"),  # not coerced
        ("/feedback", {"decision_id": "d1", "event": "conversion", "value": True}, "value"),
    ]


def test_bad_requests_get_a_4xx_naming_the_field(server: Server, home: Path) -> None:
    """Whether pydantic turned the request away or the model did, the answer names the field the same way."""
    logged = Path(server.log.name).stat().st_size
    for path, body, field in _bad_cases(home):
        r = server.client.post(path, json=body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        answer = r.json()
        assert answer["field"].startswith(field) and answer["error"], (path, body, answer)
    raw = [("/churn", b'{"customer_id": "C1"', "application/json", "body"),  # malformed JSON
           ("/churn", b'{"features": {"recency_days": NaN}}', "application/json", "features.recency_days"),
           ("/churn", b'{"features": {"recency_days": Infinity}}', "application/json", "features.recency_days"),
           ("/churn", b"customer_id=C1", "multipart/form-data", "content-type"),
           ("/churn", b"", "application/json", "customer_id")]
    for path, content, media, field in raw:
        r = server.client.post(path, content=content, headers={"content-type": media})
        assert 400 <= r.status_code < 500, (content, r.status_code, r.text)
        assert r.json()["field"] == field, (content, r.text)
    # the message says what is wrong with the value sent: too long, not "not a number" (a union's other branch)
    long = {"/personalize": ({"placement": "email", "customer_id": "c1", "context": {"page": "x" * 5000}},
                             "context.page: String should have at most 4096 characters"),
            "/churn": ({"customer_id": "c" * 200}, "a customer id has at most 128 characters, not 200")}
    for path, (body, message) in long.items():
        r = server.client.post(path, json=body)
        assert r.status_code == 400 and message in r.json()["error"], (path, r.text)
    time.sleep(0.5)  # the server's log lines are written by its worker process
    with open(server.log.name) as f:
        f.seek(logged)
        text = f.read()
    assert "Traceback" not in text  # a client's mistake is an INFO line, not an error with a traceback
    # one line per bad request, whichever check turned it away (pydantic's, or the model's: an unknown series)
    assert text.count("bad request on") >= len(_bad_cases(home)), text[-3000:]
    assert "bad request on /forecast: series: unknown series 'nope'" in text, text[-3000:]


def test_schemathesis_finds_no_server_error(server: Server) -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/docs.json",
                          "--checks", "not_a_server_error", "--header", f"X-API-Key: {API_KEY}", "--max-examples", "25", "--seed", "1",
                          "--exclude-path", "/metrics"],
                         capture_output=True, text=True, timeout=600, cwd=server.log.name.rsplit("/", 1)[0])
    assert out.returncode == 0, out.stdout[-4000:]


# --- the prediction log and reloads ------------------------------------------------------------------------------
def test_champion_moves_are_picked_up_without_a_failed_request_and_a_broken_one_is_not(server: Server,
                                                                                       home: Path) -> None:
    import mlflow

    from training.registry import GateConfig, connect, promote, register

    client = connect(f"sqlite:///{home / 'mlflow.db'}")
    cid = _known_ids(home, 1)[0]
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=30, headers={"x-api-key": API_KEY}) as c:
            while not stop.is_set():
                r = c.post("/churn", json={"customer_id": cid})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["model"]["version"])

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        # a new version of the same model becomes champion
        v1 = client.get_model_version("churn", "1")
        new = register(client, "churn", v1.source, v1.run_id)
        promote(client, "churn", GateConfig(bootstrap_rounds=100), reason="reload test", force=True)
        deadline = time.monotonic() + 60
        while server.client.get("/readyz").json()["models"]["churn"]["version"] != new and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join()
    assert set(statuses) == {200} and len(statuses) > 10
    assert versions == {"1", new}

    # a version that cannot load: the old one keeps serving, and the status says why
    class Broken(mlflow.pyfunc.PythonModel):
        def load_context(self, context: Any) -> None:
            raise RuntimeError("corrupt artifact")

        def predict(self, context, model_input, params=None):  # noqa: ANN001
            return model_input

    mlflow.set_experiment("broken")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Broken(), pip_requirements=["mlflow"])
    broken = register(client, "churn", info.model_uri, run.info.run_id)
    client.set_registered_model_alias("churn", "champion", broken)  # moved by hand, past the gate
    try:
        deadline = time.monotonic() + 60
        status = server.client.get("/status").json()
        while "churn" not in status["errors"] and time.monotonic() < deadline:
            time.sleep(0.2)
            status = server.client.get("/status").json()
        assert f"version {broken}" in status["errors"]["churn"] and "still serving" in status["errors"]["churn"]
        assert status["models"]["churn"]["version"] == new
        assert "not_scoring_ids" not in status  # the champions read what the store holds
        r = server.client.post("/churn", json={"customer_id": cid})
        assert r.status_code == 200 and r.json()["model"]["version"] == new
        assert server.client.get("/readyz").status_code == 200
    finally:
        client.set_registered_model_alias("churn", "champion", new)


def test_an_api_key_guards_scoring_but_not_the_probes(server: Server, home: Path) -> None:
    cid = _known_ids(home, 1)[0]
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.post("/churn", json={"customer_id": cid}).status_code == 401
        assert anonymous.post("/churn", json={"customer_id": cid}, headers={"x-api-key": "nope"}).status_code == 401
        assert anonymous.post("/churn", json={"customer_id": cid},
                              headers={"authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert anonymous.get("/readyz").status_code == 200 and anonymous.get("/metrics").status_code == 200
        page = anonymous.get("/")  # the API's docs page, where `serve` points
        assert page.status_code == 200 and "swagger" in page.text.lower(), page.text[:200]
        assert anonymous.get("/docs.json").status_code == 200


# --- in process: shadow mode ---------------------------------------------------------------------------------------
def test_a_server_on_the_redis_store_answers_as_the_sqlite_one(server: Server, home: Path, redis_url: str,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The production option by configuration only: materialize into Redis, serve with PERSONALIZE_ONLINE_STORE."""
    from personalize.settings import Settings
    from serving.online import materialize

    for key, value in _env(home).items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    report = materialize(settings.dataset_dir("synthetic"), redis_url, tracking_uri=settings.tracking_uri)
    ids = _known_ids(home, 3)
    assert report.customers >= len(ids)
    on_redis = Server(home, PERSONALIZE_API_KEY=API_KEY, PERSONALIZE_ONLINE_STORE=redis_url,
                      PERSONALIZE_PREDICTION_LOG=str(tmp_path / "predlog"))
    on_redis.client.headers["x-api-key"] = API_KEY
    try:
        on_redis.wait_ready()
        status = on_redis.client.get("/status").json()["online_store"]
        assert status["url"].startswith("redis://") and "error" not in status
        for path, body in (("/churn", {"items": [{"customer_id": c} for c in [*ids, "never-seen"]]}),
                           ("/next_purchase", {"customer_id": ids[0]}), ("/segment", {"customer_id": ids[1]})):
            answers = [srv.client.post(path, json=body) for srv in (server, on_redis)]
            assert [a.status_code for a in answers] == [200, 200], path
            sqlite_answer, redis_answer = (a.json() for a in answers)
            for a in (sqlite_answer, redis_answer):
                a.pop("request_id", None)
            assert redis_answer == sqlite_answer, path
            if path == "/churn":  # the ids were found in Redis, the unknown one was not
                assert [r["cold_start"] for r in redis_answer["results"]] == [False, False, False, True]
    finally:
        on_redis.stop()


def test_shadow_challenger_is_logged_never_returned(home: Path, tmp_path: Path) -> None:
    from serving.api import Runtime
    from serving.config import ServeConfig
    from serving.predlog import read_log
    from training.registry import connect, register

    client = connect(f"sqlite:///{home / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("churn", "champion")
    client.set_registered_model_alias("churn", "challenger", champion.version)  # as a promotion leaves it
    config = ServeConfig(home=home, tracking_uri=f"sqlite:///{home / 'mlflow.db'}", shadow=True,
                         prediction_log=tmp_path / "log")
    runtime = Runtime(config, client, start_reloader=False, freeze_heap=False)
    try:
        assert "churn" not in runtime.status()["shadow"]  # the challenger is the champion: not loaded twice
        v1 = client.get_model_version("churn", "1")
        challenger = register(client, "churn", v1.source, v1.run_id)  # gets the challenger alias
        runtime.models.refresh()
        cid = _known_ids(home, 1)[0]
        answer = runtime.classify("churn", customer_id=cid)
        assert answer["model"]["version"] == str(champion.version)
        assert "shadow" not in json.dumps(answer)
        assert runtime.status()["shadow"]["churn"]["version"] == challenger
    finally:
        runtime.close()
    (row,) = read_log(tmp_path / "log").to_dict("records")
    shadow = json.loads(row["shadow"])
    assert shadow["version"] == challenger and 0 < shadow["probability"] < 1
    assert np.isclose(shadow["probability"], answer["results"][0]["probability"], atol=1e-6)  # the same model


# --- segments and decisions ----------------------------------------------------------------------------------------
NO_CONSENT_SENT: list[str] = []  # customers /personalize was asked about without consent: never in the log


def _profiles(home: Path) -> dict[str, dict[str, Any]]:
    import sqlite3

    con = sqlite3.connect(home / "online" / "synthetic.sqlite")
    rows = con.execute("SELECT customer_id, profile FROM customers").fetchall()
    con.close()
    return {cid: json.loads(p) for cid, p in rows}


def test_personalize_segment_and_feedback_over_http(server: Server, home: Path) -> None:
    profiles = _profiles(home)
    cid = next(c for c in _known_ids(home, 50) if profiles[c]["consent"])
    seg = server.client.post("/segment", json={"customer_id": cid}).json()
    assert seg["segments"] == profiles[cid]["segments"] and seg["segment"] == profiles[cid]["segment"]

    out = server.client.post("/personalize", json={"customer_id": cid, "placement": "email"}).json()
    assert set(out["scores"]) == {"churn", "days_to_next", "p_next"}  # what the email rules read, no more
    assert out["experiment"] == "email_rules" and out["arm"] in ("holdout", "rules")
    if out["arm"] == "rules":  # the rule engine's answer, recomputed from the scores it reports
        s = out["scores"]
        expected = ("retention_offer" if s["churn"] >= 0.7 else "cart_discount" if "cart_abandoner" in
                    out["segments"] else "replenish_reminder" if s["days_to_next"] <= 7 else "newsletter")
        assert out["variant"] == expected
    cycle = server.client.post("/next_purchase", json={"customer_id": cid}).json()["results"][0]
    assert profiles[cid]["cycle_scores"]["cycle_version"] == out["models"][-1]["version"]  # materialized by it ...
    assert out["scores"]["days_to_next"] == pytest.approx(cycle["expected_days_to_next"], rel=1e-6)  # ... = live
    assert out["scores"]["p_next"] == pytest.approx(cycle["p_purchase"], rel=1e-6)
    again = server.client.post("/personalize", json={"customer_id": cid, "placement": "email"}).json()
    assert again["arm"] == out["arm"] and again["decision_id"] != out["decision_id"]  # sticky arm, new decision

    banner = server.client.post("/personalize", json={"customer_id": cid, "placement": "homepage_banner"}).json()
    assert banner["policy"] == "bandit" and banner["bandit"]["segment"] == profiles[cid]["segment"]
    first = server.client.post("/feedback", json={"decision_id": banner["decision_id"], "event": "conversion",
                                                 "value": 25.0}).json()
    assert first["bandit_updated"] and first["implied_impression"]
    assert server.client.post("/feedback", json={"decision_id": banner["decision_id"],
                                                 "event": "conversion"}).json()["duplicate"] is True

    nocid = next(c for c, p in profiles.items() if not p["consent"])
    NO_CONSENT_SENT.append(nocid)
    plain = server.client.post("/personalize", json={"customer_id": nocid, "placement": "homepage_banner"}).json()
    assert plain["variant"] == "new_arrivals" and plain["scores"] == {} and plain["consent"] is False
    revoked = server.client.post("/personalize", json={"customer_id": cid, "placement": "email",
                                                       "consent": False}).json()
    assert revoked["variant"] == "newsletter" and revoked["policy"] == "default"

    cold = server.client.post("/personalize", json={"customer_id": "nobody-yet", "placement": "homepage_banner",
                                                    "consent": True}).json()
    assert cold["cold_start"] is True and "exploring" in cold["reason"]
    assert cold["scores"] == {}  # the banner's rules read no score
    page = server.client.post("/personalize", json={"customer_id": "nobody-yet", "placement": "product_page",
                                                    "consent": True}).json()
    assert set(page["scores"]) == {"propensity"} and page["cold_start"] is True  # the model's prior


@pytest.mark.parametrize("path, body, field", [
    ("/personalize", {"customer_id": "C1", "placement": "billboard"}, "placement"),
    ("/personalize", {"customer_id": "C1"}, "placement"),
    ("/personalize", {"placement": "email"}, "customer_id"),
    ("/personalize", {"placement": "email", "features": {"monetary_total": "lots"}}, "monetary_total"),
    ("/personalize", {"customer_id": "C1", "placement": "email", "consent": "maybe"}, "consent"),
    ("/personalize", {"customer_id": "C1", "placement": "email", "consent": "no"}, "consent"),  # not coerced
    ("/segment", {}, "customer_id"),
    ("/segment", {"features": {"monetary_totl": 900.0}}, "features.monetary_totl"),
    ("/personalize", {"placement": "email", "features": {"bogus": 1.0}}, "features.bogus"),
    ("/feedback", {"decision_id": "nope", "event": "click"}, "decision_id"),
    ("/feedback", {"decision_id": "nope", "event": "purchase"}, "event"),
    ("/feedback", {"decision_id": "nope", "event": "conversion", "value": -5}, "value"),
])
def test_bad_decision_requests_get_a_4xx_naming_the_field(server: Server, path: str, body: dict, field: str) -> None:
    r = server.client.post(path, json=body)
    assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
    assert field in r.json()["field"], (path, body, r.text)


# --- last: graceful shutdown ---------------------------------------------------------------------------------------
def test_zz_shutdown_flushes_every_logged_prediction_pseudonymized(server: Server, home: Path) -> None:
    from serving.predlog import load_salt, pseudonymize, read_log

    ids = _known_ids(home, 5)
    assert server.client.post("/churn", json={"items": [{"customer_id": c} for c in ids]}).status_code == 200
    served = server.client.get("/status").json()["served"]
    assert server.stop() is not None
    frame = read_log(home / "predlog")
    assert len(frame) == served  # every scored item, none lost on shutdown, none twice
    assert frame["request_id"].nunique() < len(frame)  # batches share their request id
    assert not frame["customer_key"].isin(ids).any()
    salt = load_salt(home)
    decided = frame[frame["endpoint"] == "personalize"]  # decisions log the scores they used ...
    assert len(decided) and NO_CONSENT_SENT  # ... but never for a customer without consent
    assert not decided["customer_key"].isin([pseudonymize(c, salt) for c in NO_CONSENT_SENT]).any()
    last = frame[frame["endpoint"] == "churn"].tail(5)
    assert last["customer_key"].nunique() == 5
    assert set(json.loads(last["features"].iloc[0])) == set(_model_features(home, "churn"))
    assert not list((home / "predlog").rglob("*.tmp"))


def test_an_endpoint_serves_a_model_of_another_name_and_says_what_it_cannot_score(
        home: Path, tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --model churn=churn_telco`: /churn answers with a model trained on a table of its own columns. Such a
    model scores the rows it is sent; by customer_id it would read none of its features from the online store, so
    that is a 400 saying so, and a decision leaves its score out. A model of the wrong kind is not served."""
    from features.pipeline import ingest_builtin
    from personalize.errors import ConfigError
    from serving.api import Runtime
    from serving.config import ServeConfig, endpoint_models
    from serving.scoring import InputError, NotServing
    from training.registry import GateConfig, connect, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    for key, value in _env(home).items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    ingest_builtin(settings, "telco_churn", None, data_root)
    fast = TuneConfig(trials=1, families=("lightgbm",), max_rounds=60, early_stopping_rounds=10)
    train_and_register(settings, "churn", "telco_churn", TrainConfig(tune=fast), model_name="churn_telco")
    client = connect(settings.tracking_uri)
    promote(client, "churn_telco", GateConfig(bootstrap_rounds=100), reason="serving tests", force=True)

    assert ServeConfig.from_env({"PERSONALIZE_MODELS": "churn=churn_telco"}).models == {
        "churn": "churn_telco", "propensity": "propensity", "next_purchase": "purchase_cycle",
        "forecast": "purchase_forecast"}
    for bad in ("nosuch=churn", "churn", "churn=no such"):
        with pytest.raises(ConfigError, match="give ENDPOINT=MODEL|use letters, digits"):
            endpoint_models([bad])
    config = ServeConfig(home=home, tracking_uri=settings.tracking_uri, prediction_log=tmp_path / "log",
                         models={"churn": "churn_telco", "propensity": "purchase_cycle"})
    runtime = Runtime(config, client, start_reloader=False, freeze_heap=False)
    try:
        row = pd.read_csv(data_root / "telco_churn" / "WA_Fn-UseC_-Telco-Customer-Churn.csv", nrows=1)
        answer = runtime.classify("churn", features=json.loads(row.to_json(orient="records"))[0])
        assert answer["model"]["name"] == "churn_telco" and 0 < answer["results"][0]["probability"] < 1
        # the row's own id column names the customer (answered and logged, so outcomes and erasure find it)
        assert answer["results"][0]["customer_id"] == row["customerID"].iloc[0]
        bare = {k: v for k, v in json.loads(row.to_json(orient="records"))[0].items() if k != "customerID"}
        assert runtime.classify("churn", features=bare)["results"][0]["customer_id"] is None
        assert runtime.classify("churn", customer_id="given", features=bare)["results"][0]["customer_id"] == "given"
        cid = _known_ids(home, 1)[0]
        for who in (cid, "never-seen"):  # neither a stored customer nor a new one is scored on made-up values
            with pytest.raises(InputError) as error:
                runtime.classify("churn", customer_id=who)
            assert error.value.field == "customer_id" and "send the customer's row as `features`" in str(error.value)
        with pytest.raises(NotServing, match="is a cycle model, and /propensity answers with a classifier"):
            runtime.classify("propensity", customer_id=cid)
        decision = runtime.personalize("email", customer_id=cid, consent=True)
        assert "churn" not in decision["scores"] and "days_to_next" in decision["scores"]
        assert "churn" not in runtime.personalize("email", customer_id="never-seen", consent=True)["scores"]
        assert "send its columns" in decision["unavailable_scores"]["churn"]
        # the table's row as it is (its id and label too, which the model ignores) is scored for the decision
        sent = runtime.personalize("email", features=json.loads(row.to_json(orient="records"))[0], consent=True)
        assert sent["scores"]["churn"] == answer["results"][0]["probability"]
    finally:
        runtime.close()

    # over HTTP: the adaptive-batching route by ids is a 400 naming the field, as /churn by id is (it was a 500)
    server = Server(home, "--model", "churn=churn_telco", PERSONALIZE_PREDICTION_LOG=str(tmp_path / "http-log"))
    try:
        server.wait_ready()
        for path, field in (("/churn/ids", "customer_ids"), ("/churn", "customer_id")):
            r = server.client.post(path, json={field: [row["customerID"].iloc[0]] if path.endswith("ids")
                                               else row["customerID"].iloc[0]})
            assert r.status_code == 400 and "send the customer's row as `features`" in r.json()["error"], r.text
            assert r.json()["field"] == field, r.text
        r = server.client.post("/churn", json={"features": json.loads(row.to_json(orient="records"))[0]})
        assert r.status_code == 200 and r.json()["results"][0]["customer_id"] == row["customerID"].iloc[0], r.text
    finally:
        server.stop()


def test_a_model_of_another_data_sets_features_is_not_scored_on_made_up_values(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An online store that lacks features the champion reads (it was materialized from another data set, other
    categories' shares): by id that is a 503 naming them, not a score on missing values; a decision leaves that
    score out; a record sent with the request is still scored."""
    from serving.api import Runtime
    from serving.config import ServeConfig
    from serving.online import default_url, open_store
    from serving.scoring import NotServing
    from training.registry import connect

    for key, value in _env(home).items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    cid = _known_ids(home, 1)[0]
    source = open_store(default_url(home, "synthetic"), "synthetic")
    record, meta = source.get_many([cid])[cid], source.meta()
    source.close()
    client = connect(settings.tracking_uri)
    config = ServeConfig(home=home, tracking_uri=settings.tracking_uri, prediction_log=tmp_path / "log",
                         online_store=f"sqlite:///{tmp_path / 'other.sqlite'}")
    runtime = Runtime(config, client, start_reloader=False, freeze_heap=False)
    try:
        features = runtime.models.get("churn").scorer.features
        foreign = [c for c in features if c.startswith("cat_share_")][:1] or features[:1]
        other = open_store(config.online_url, "synthetic")
        other.write({cid: {**record, "features": {k: v for k, v in record["features"].items() if k not in foreign}}},
                    {**meta, "feature_columns": [c for c in meta["feature_columns"] if c not in foreign]})
        other.close()
        with pytest.raises(NotServing, match=f"does not hold \\({foreign[0]}"):
            runtime.classify("churn", customer_id=cid)
        assert f"does not hold ({foreign[0]}" in runtime.status()["not_scoring_ids"]["churn"]  # /status says so
        decided = runtime.personalize("email", customer_id=cid, consent=True)
        assert "churn" not in decided["scores"]  # left out, and the answer says why
        assert f"does not hold ({foreign[0]}" in decided["unavailable_scores"]["churn"]
        sent = runtime.classify("churn", features=record["features"])
        assert 0 < sent["results"][0]["probability"] < 1 and not sent["results"][0]["cold_start"]
    finally:
        runtime.close()
