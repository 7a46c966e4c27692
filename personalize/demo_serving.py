"""The demo's serving step: materialize the online store, start the API in the background, ask it questions, run
the monitoring loop against it (:mod:`personalize.demo_monitoring`), stop it, and check that the prediction log
holds every answer.

The server is a real ``personalize serve`` process on a free loopback port (its own process group, stopped with
SIGINT so it flushes its log); the requests are plain HTTP, as an application would send them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from personalize.errors import PersonalizeError
from personalize.settings import Settings

DATASET = "synthetic"
EXPERIMENT = "email_rules"
EXPERIMENT_DECISIONS = 400  # simulated email decisions per demo run (each with an impression, some converting)


@dataclass
class ServingOutcome:
    url: str
    answers: list[tuple[str, str, int, str]] = field(default_factory=list)  # endpoint, asked, status, answer
    served_items: int = 0
    logged_rows: int = 0
    versions: dict[str, str | None] = field(default_factory=dict)
    experiment_arms: dict[str, int] = field(default_factory=dict)
    experiment: dict[str, Any] = field(default_factory=dict)
    clusters: dict[str, Any] = field(default_factory=dict)
    erasure: dict[str, Any] = field(default_factory=dict)
    requests_served: int = 0  # HTTP requests the server answered with 200, every step's
    loop: Any = None

    @property
    def requests_ok(self) -> int:
        return sum(1 for a in self.answers if a[2] == 200)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(settings: Settings, port: int, log_path: Path, log_root: Path) -> subprocess.Popen:
    from personalize.cli import serve_environment

    env = serve_environment(settings, DATASET, 1, False, None, 2.0, None)
    env["PERSONALIZE_PREDICTION_LOG"] = str(log_root)
    with open(log_path, "w") as out:
        return subprocess.Popen([str(Path(sys.executable).parent / "personalize"), "serve", "--port", str(port),
                                 "--dataset", DATASET, "--reload-s", "2"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(client: Any, proc: subprocess.Popen, log_path: Path, timeout_s: float = 180) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PersonalizeError(f"the API server exited (see {log_path})")
        try:
            r = client.get("/readyz")
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise PersonalizeError(f"the API server was not ready after {timeout_s:.0f}s (see {log_path})")


def _summary(endpoint: str, status: int, body: dict[str, Any]) -> str:
    if status != 200:
        return body.get("error", str(body))[:110]
    if endpoint == "segment":
        return f"segments {', '.join(body['segments']) or '-'} (primary {body['segment']})"
    if endpoint == "personalize":
        scores = ", ".join(f"{k} {v:.2f}" for k, v in body["scores"].items() if v is not None)
        arm = f", arm {body['arm']}" if body.get("arm") else ""
        return f"{body['variant']} ({body['policy']}{arm}): {body['reason']}" + (f" [{scores}]" if scores else "")
    if endpoint == "feedback":
        return f"{body['event']} recorded (bandit updated: {body['bandit_updated']})"
    if endpoint == "forecast":
        pts = body["forecast"]
        return f"next {len(pts)} days: " + ", ".join(f"{p['yhat']:.0f}" for p in pts) + f"  (v{body['model']['version']})"
    r = body["results"][0]
    v = f"(v{body['model']['version']}{', cold start' if r.get('cold_start') else ''})"
    if endpoint == "next_purchase":
        return (f"{r['expected_purchases']:.2f} purchases in {r['horizon_days']}d, next in "
                f"{r['expected_days_to_next']:.0f}d, P(alive) {r['p_alive']:.2f} {v}")
    why = ""
    if r.get("reasons"):
        why = "; top reasons " + ", ".join(f"{x['feature']} {x['direction']}" for x in r["reasons"][:2])
    return f"p={r['probability']:.3f} -> {r['action']} {v}{why}"


def query(client: Any, customers: list[str]) -> list[tuple[str, str, int, str]]:
    """The example requests, as an application would send them."""
    asks: list[tuple[str, str, dict[str, Any]]] = []
    for cid in customers[:2]:
        asks.append(("churn", f"customer {cid}, explain", {"customer_id": cid, "explain": True}))
        asks.append(("propensity", f"customer {cid}", {"customer_id": cid}))
        asks.append(("next_purchase", f"customer {cid}", {"customer_id": cid}))
    asks.append(("churn", "a customer never seen", {"customer_id": "new-visitor-1"}))
    asks.append(("forecast", "series total, 7 days", {"series": "total", "horizon_days": 7}))
    asks.append(("churn", "a bad request (an incomplete record)", {"features": {"frequency": 2}}))
    cid = customers[0]
    asks.append(("segment", f"customer {cid}", {"customer_id": cid}))
    for placement in ("email", "homepage_banner", "product_page"):
        asks.append(("personalize", f"customer {cid}, {placement}", {"customer_id": cid, "placement": placement}))
    asks.append(("personalize", f"customer {cid}, email, consent withdrawn",
                 {"customer_id": cid, "placement": "email", "consent": False}))
    asks.append(("personalize", "a new visitor (consent given), homepage_banner",
                 {"customer_id": "new-visitor-1", "placement": "homepage_banner", "consent": True}))
    asks.append(("personalize", "a bad request (unknown placement)", {"customer_id": cid, "placement": "billboard"}))
    out = []
    for endpoint, asked, body in asks:
        r = client.post(f"/{endpoint}", json=body)
        out.append((endpoint, asked, r.status_code, _summary(endpoint, r.status_code, r.json())))
        if endpoint == "personalize" and r.status_code == 200 and body.get("placement") == "homepage_banner":
            fb = client.post("/feedback", json={"decision_id": r.json()["decision_id"], "event": "conversion",
                                                "value": 30.0})
            out.append(("feedback", "a conversion of that banner", fb.status_code,
                        _summary("feedback", fb.status_code, fb.json())))
    return out


def run_experiment(client: Any, customers: list[str], decisions: int, seed: int = 7) -> dict[str, int]:
    """Simulated traffic on the email placement's experiment: each decision is seen (an impression) and converts
    with a planted chance, higher for the personalized variants than for the newsletter, so the report has
    something to find. Returns the decisions per arm."""
    import random

    rng = random.Random(seed)
    arms: dict[str, int] = {}
    for _ in range(decisions):
        cid = customers[rng.randrange(len(customers))]
        r = client.post("/personalize", json={"customer_id": cid, "placement": "email"})
        if r.status_code != 200:
            continue
        body = r.json()
        arms[str(body["arm"])] = arms.get(str(body["arm"]), 0) + 1
        client.post("/feedback", json={"decision_id": body["decision_id"], "event": "impression"})
        if rng.random() < (0.12 if body["variant"] != "newsletter" else 0.06):
            client.post("/feedback", json={"decision_id": body["decision_id"], "event": "conversion", "value": 25.0})
    return arms


def serve_and_query(settings: Settings, while_serving: Any = None) -> ServingOutcome:
    """Start the API, send the example requests and the experiment's traffic, then ``while_serving(http, probe)``
    (the monitoring loop) while it still runs, and stop it; ``outcome.loop`` is what that returned."""
    import httpx

    from serving.online import default_url, materialize
    from serving.predlog import read_log

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the demo's output
    outcome_clusters = cluster_customers(settings)
    materialize(settings.dataset_dir(DATASET), default_url(settings.home, DATASET),
                tracking_uri=settings.tracking_uri)
    port = _free_port()
    log_root = settings.home / "predictions"
    before = len(read_log(log_root))
    log_path = settings.home / "serve.log"
    proc = start_server(settings, port, log_path, log_root)
    consenting: list[str] = []
    outcome = ServingOutcome(url=f"http://127.0.0.1:{port}", clusters=outcome_clusters)

    def count(response: Any) -> None:
        outcome.requests_served += response.status_code == 200

    try:
        with httpx.Client(base_url=outcome.url, timeout=60, event_hooks={"response": [count]}) as client:
            ready = wait_ready(client, proc, log_path)
            outcome.versions = {e: (m or {}).get("version") for e, m in ready["models"].items()}
            from serving.online import open_store

            import pandas as pd

            known = pd.read_parquet(settings.dataset_dir(DATASET) / "customers.parquet", columns=["customer_id"])
            store = open_store(default_url(settings.home, DATASET), DATASET)
            found = store.get_many(sorted(known["customer_id"].astype(str))[:1000])
            store.close()
            ids = [c for c in sorted(found) if found[c]["cycle"] and found[c]["profile"].get("consent")][:2]
            outcome.answers = query(client, ids)
            consenting = [c for c in sorted(found) if found[c]["profile"].get("consent")]
            outcome.experiment_arms = run_experiment(client, consenting, EXPERIMENT_DECISIONS)
            if while_serving is not None:
                outcome.loop = while_serving(client, (ids or sorted(found))[0])
            outcome.served_items = client.get("/status").json()["served"]
    finally:
        stop_server(proc)
    outcome.logged_rows = len(read_log(log_root)) - before
    outcome.experiment = experiment_report(settings)
    if consenting:
        outcome.erasure = forget_one(settings, consenting[-1])
    return outcome


def cluster_customers(settings: Settings) -> dict[str, Any]:
    """K-Means on the synthetic customers' behaviour, registered and made champion so the online store carries each
    customer's cluster; scored against the generator's planted segments."""
    from features.clustering import CustomerClusters, adjusted_rand, cluster_frame, log_clusters

    frame = cluster_frame(settings.dataset_dir(DATASET))
    model = CustomerClusters(method="kmeans").fit(frame)
    _, version = log_clusters(model, frame, settings.tracking_uri, dataset=DATASET,
                              artifact_root=settings.artifact_root, promote=True)
    out: dict[str, Any] = {"k": int(model.k_), "version": version,
                           "names": [c["name"] for c in model.describe()]}
    truth_path = settings.dataset_dir(DATASET) / "truth.parquet"
    if truth_path.exists():
        import pandas as pd

        truth = pd.read_parquet(truth_path, columns=["customer_id", "segment"])
        joined = frame[["customer_id"]].assign(label=model.labels_).merge(truth, on="customer_id")
        out["ari_vs_planted"] = round(adjusted_rand(joined["label"], joined["segment"]), 3)
    return out


def forget_one(settings: Settings, customer_id: str) -> dict[str, Any]:
    """Erase one customer everywhere (the demo's consent story), and check nothing of them remains."""
    from personalize.erasure import forget

    report = forget(settings, customer_id)
    return {"customer": customer_id, "rows_removed": report.total, "by_store": report.by_store,
            "remaining": len(report.remaining), "seconds": round(report.seconds, 1)}


def experiment_report(settings: Settings) -> dict[str, Any]:
    """The email experiment's report (every decision logged so far, this run's and earlier runs'), into MLflow."""
    from monitoring.experiments import analyze, log_report
    from serving.decision_store import DecisionStore
    from serving.decisions import load_catalog

    experiment = load_catalog().experiment(EXPERIMENT)
    store = DecisionStore(settings.decisions_path)
    try:
        report = analyze(store.experiment_frame(EXPERIMENT), experiment)
    finally:
        store.close()
    run_id = log_report(report, settings.tracking_uri, settings.artifact_root)
    arms = {a.arm: {"exposed": a.exposed, "conversion_rate": a.conversion_rate} for a in report.arms}
    lift = {c.arm: {"uplift": c.uplift, "ci": list(c.uplift_ci), "p_value": c.p_value, "verdict": c.verdict}
            for c in report.comparisons}
    return {"name": EXPERIMENT, "arms": arms, "comparisons": lift, "srm_flag": report.srm_flag, "run_id": run_id}


def experiment_line(outcome: ServingOutcome) -> str:
    e = outcome.experiment
    if not e:
        return ""
    parts = [f"{arm}: {a['exposed']} exposed, {100 * (a['conversion_rate'] or 0):.1f}% converted"
             for arm, a in e["arms"].items()]
    for arm, c in e["comparisons"].items():
        if c["uplift"] is not None:
            lo, hi = c["ci"]
            parts.append(f"uplift of {arm} {100 * c['uplift']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}], "
                         f"p={c['p_value']:.3g}: {c['verdict']}")
    return (f"experiment {e['name']} (this run sent {sum(outcome.experiment_arms.values())} simulated decisions): "
            + "; ".join(parts) + f" -> MLflow run {e['run_id']}; [bold]personalize experiment report {e['name']}[/]")


def decisions_lines(outcome: ServingOutcome) -> list[str]:
    lines = []
    c = outcome.clusters
    if c:
        ari = f", adjusted Rand index vs the planted segments {c['ari_vs_planted']}" if "ari_vs_planted" in c else ""
        lines.append(f"behavioural clusters: k={c['k']} (customer_segments v{c['version']}, champion{ari}): "
                     + "; ".join(c["names"]))
    line = experiment_line(outcome)
    if line:
        lines.append(line)
    e = outcome.erasure
    if e:
        stores = ", ".join(f"{k} {v}" for k, v in e["by_store"].items())
        lines.append(f"personalize forget {e['customer']}: {e['rows_removed']} rows removed ({stores}) in "
                     f"{e['seconds']}s; searched again: {e['remaining']} locations still hold the customer")
    return lines


def serving_table(outcome: ServingOutcome) -> Table:
    table = Table(title=f"personalize demo: the API ({outcome.url}, stopped after the demo)")
    for col in ("endpoint", "request", "status", "answer"):
        table.add_column(col)
    for endpoint, asked, status, answer in outcome.answers:
        table.add_row(f"POST /{endpoint}", asked, f"[green]{status}" if status == 200 else f"[yellow]{status}",
                      answer)
    return table
