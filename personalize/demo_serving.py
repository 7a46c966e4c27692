"""The demo's serving step: materialize the online store, start the API in the background, ask it questions, stop
it, and check that the prediction log holds every answer.

The server is a real ``personalize serve`` process on a free loopback port (its own process group, stopped with
SIGINT so it flushes its log); the requests are plain HTTP, as an application would send them.
"""

from __future__ import annotations

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


@dataclass
class ServingOutcome:
    url: str
    answers: list[tuple[str, str, int, str]] = field(default_factory=list)  # endpoint, asked, status, answer
    served_items: int = 0
    logged_rows: int = 0
    versions: dict[str, str | None] = field(default_factory=dict)

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
    out = []
    for endpoint, asked, body in asks:
        r = client.post(f"/{endpoint}", json=body)
        out.append((endpoint, asked, r.status_code, _summary(endpoint, r.status_code, r.json())))
    return out


def serve_and_query(settings: Settings) -> ServingOutcome:
    import httpx

    from serving.online import default_url, materialize
    from serving.predlog import read_log

    materialize(settings.dataset_dir(DATASET), default_url(settings.home, DATASET))
    port = _free_port()
    log_root = settings.home / "predictions"
    before = len(read_log(log_root))
    log_path = settings.home / "serve.log"
    proc = start_server(settings, port, log_path, log_root)
    outcome = ServingOutcome(url=f"http://127.0.0.1:{port}")
    try:
        with httpx.Client(base_url=outcome.url, timeout=60) as client:
            ready = wait_ready(client, proc, log_path)
            outcome.versions = {e: (m or {}).get("version") for e, m in ready["models"].items()}
            from serving.online import open_store

            import pandas as pd

            known = pd.read_parquet(settings.dataset_dir(DATASET) / "customers.parquet", columns=["customer_id"])
            store = open_store(default_url(settings.home, DATASET), DATASET)
            found = store.get_many(sorted(known["customer_id"].astype(str))[:100])
            store.close()
            ids = [c for c in sorted(found) if found[c]["cycle"]][:2]
            outcome.answers = query(client, ids)
            outcome.served_items = client.get("/status").json()["served"]
    finally:
        stop_server(proc)
    outcome.logged_rows = len(read_log(log_root)) - before
    return outcome


def serving_table(outcome: ServingOutcome) -> Table:
    table = Table(title=f"personalize demo: the API ({outcome.url}, stopped after the demo)")
    for col in ("endpoint", "request", "status", "answer"):
        table.add_column(col)
    for endpoint, asked, status, answer in outcome.answers:
        table.add_row(f"POST /{endpoint}", asked, f"[green]{status}" if status == 200 else f"[yellow]{status}",
                      answer)
    return table
