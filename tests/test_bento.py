"""The API with several worker processes, and built into a Bento that serves its champions without the registry.

One small module-scoped home (300 synthetic customers, a one-trial LightGBM churn champion, a materialized online
store) serves both: ``personalize serve --workers 2`` over the registry, then ``personalize bento build`` and
``bentoml serve`` of the exported Bento (what an image holds) with the registry and the BentoML store out of reach.
Each server runs in its own process group and is stopped gracefully (SIGINT), as an orchestrator would. The BentoML
stores live under the test's tmp folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from personalize.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PERSONALIZE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
                "PERSONALIZE_OPTUNA_STORAGE": f"sqlite:///{home / 'optuna.db'}", "BENTOML_DO_NOT_TRACK": "True",
                "BENTOML_HOME": str(home.parent / "bentoml"), **extra})
    return env


class Server:
    """A server command in its own process group, on a free port; stopped gracefully (SIGINT) or killed."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(cwd / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        # a new connection per request: the kernel hands each to whichever worker accepts it first
        self.client = httpx.Client(base_url=self.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))

    def output(self) -> str:
        return Path(self.log.name).read_text()[-3000:]

    def ready_workers(self, workers: int, timeout_s: float = 180) -> dict[int, dict[str, Any]]:
        """Each worker's ``/readyz`` answer by pid, once ``workers`` distinct workers have answered ready."""
        seen: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                r = self.client.get("/readyz")
                if r.status_code == 200 and "worker" in r.json():
                    seen[r.json()["worker"]] = r.json()
                    if len(seen) >= workers:
                        return seen
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{len(seen)} of {workers} workers ready: {self.output()}")

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
    """300 synthetic customers, a churn champion (one LightGBM trial) and the online store."""
    from features.pipeline import build_training_frame, ingest_synthetic
    from features.synthetic import SyntheticConfig, generate
    from serving.online import default_url, materialize
    from training.registry import GateConfig, connect, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    home = tmp_path_factory.mktemp("bento") / "home"
    home.mkdir()
    saved = dict(os.environ)
    os.environ.update(_env(home))
    try:
        settings = Settings.from_env()
        ingest_synthetic(settings, "synthetic", generate(SyntheticConfig(customers=300, days=400)))
        build_training_frame(settings, "synthetic")
        fast = TuneConfig(trials=1, families=("lightgbm",), max_rounds=60, early_stopping_rounds=10)
        train_and_register(settings, "churn", "synthetic", TrainConfig(tune=fast), model_name="churn")
        promote(connect(settings.tracking_uri), "churn", GateConfig(bootstrap_rounds=100), reason="bento tests",
                force=True)
        materialize(settings.dataset_dir("synthetic"), default_url(home, "synthetic"),
                    tracking_uri=settings.tracking_uri)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return home


def _customer_ids(home: Path, n: int) -> list[str]:
    import sqlite3

    con = sqlite3.connect(home / "online" / "synthetic.sqlite")
    rows = con.execute("SELECT customer_id FROM customers ORDER BY customer_id LIMIT ?", (n,)).fetchall()
    con.close()
    return [r[0] for r in rows]


def _client(home: Path):
    from training.registry import connect

    return connect(f"sqlite:///{home / 'mlflow.db'}")


# --- pure parts ------------------------------------------------------------------------------------------------------
def test_requirements_are_this_environments_pins_without_the_project_or_bentoml() -> None:
    from importlib.metadata import version

    from serving.bento import pinned_requirements

    pins = pinned_requirements()
    assert f"mlflow=={version('mlflow')}" in pins and f"lightgbm=={version('lightgbm')}" in pins
    assert f"duckdb=={version('duckdb')}" in pins  # through ibis-framework[duckdb]: extras are followed
    assert not any(p.startswith(("personalize==", "bentoml==")) for p in pins)
    assert pins == sorted(set(pins))


def test_a_requirements_file_is_read_as_plain_requirements() -> None:
    from serving.bento import requirement_lines

    text = ("# uv export\n-e .\n--index-url https://example.org/simple\nnumpy==2.1.0 \\\n"
            "    --hash=sha256:abc\npandas==2.2.3 ; python_version >= '3.11'  # via personalize\n"
            "bentoml==1.4.0\npersonalize==0.1.0\n\n")
    assert requirement_lines(text) == ["numpy==2.1.0", "pandas==2.2.3 ; python_version >= '3.11'"]


def test_the_bentofile_carries_the_service_the_packages_and_the_models() -> None:
    from serving.bento import PACKAGES, SERVICE, bentofile

    spec = bentofile(["personalize-churn:v3-abc"], ["numpy==2.1.0"], {"churn": "3"})
    assert spec["service"] == SERVICE and spec["models"] == ["personalize-churn:v3-abc"]
    assert {"serving/**/*.yaml", "features/**/*.yaml"} <= set(spec["include"])  # the catalogs
    assert all(f"{p}/**/*.py" in spec["include"] for p in PACKAGES)
    assert spec["python"] == {"packages": ["numpy==2.1.0"], "lock_packages": False}


def test_the_bento_registry_answers_for_the_models_it_carries_only() -> None:
    import io
    from types import SimpleNamespace

    import pandas as pd

    from serving.bento import HELDOUT_OBJECT, BentoRegistry

    buffer = io.BytesIO()
    pd.DataFrame({"label": [0, 1, 1, 1]}).to_parquet(buffer)
    churn = SimpleNamespace(tag="personalize-churn:v7-abc", custom_objects={HELDOUT_OBJECT: buffer.getvalue()},
                            info=SimpleNamespace(module="bentoml.mlflow", labels={
                                "registered_model": "churn", "version": "7", "alias": "champion", "run_id": "r7"}))
    other = SimpleNamespace(tag="iris:v1", custom_objects={}, info=SimpleNamespace(module="bentoml.sklearn", labels={}))
    registry = BentoRegistry([churn, other])
    assert registry.describe() == {"churn": "personalize-churn:v7-abc"}
    mv = registry.get_model_version_by_alias("churn", "champion")
    assert (mv.version, mv.run_id) == ("7", "r7") and registry.get_model_version("churn", "7").version == "7"
    assert registry.heldout("churn", "7")["label"].mean() == 0.75
    for ask in (lambda: registry.get_model_version_by_alias("churn", "challenger"),
                lambda: registry.get_model_version("churn", "6"),
                lambda: registry.get_model_version_by_alias("propensity", "champion")):
        with pytest.raises(LookupError):
            ask()
    # a Bento answers for the alias it was built with, whatever label an earlier import left on a reused model
    churn.info.labels["alias"] = "challenger"  # imported by a challenger Bento, promoted since
    assert BentoRegistry([churn], alias="champion").get_model_version_by_alias("churn", "champion").version == "7"


def test_a_bento_says_how_it_serves_in_its_labels() -> None:
    from types import SimpleNamespace

    from serving.bento import ALIAS_LABEL, ENDPOINTS_LABEL, bento_serving

    bento = SimpleNamespace(info=SimpleNamespace(labels={"churn_telco": "2", ALIAS_LABEL: "challenger",
                                                         ENDPOINTS_LABEL: "churn=churn_telco"}))
    assert bento_serving(bento) == ({"churn": "churn_telco"}, "challenger")
    old = SimpleNamespace(info=SimpleNamespace(labels={"churn": "3"}))  # built before the labels were written
    assert bento_serving(old) == ({}, None) and bento_serving(None) == ({}, None)


# --- several workers -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_workers_answer_log_every_request_once_and_reload_together(home: Path) -> None:
    from serving.predlog import log_segments, read_log
    from training.registry import GateConfig, promote, register

    predlog = home / "predlog-workers"
    srv = Server([str(BIN / "personalize"), "serve", "--workers", "2", "--reload-s", "0.5"],
                 _env(home, PERSONALIZE_PREDICTION_LOG=str(predlog)), home)
    sent: dict[str, str] = {}  # request id -> model version answered
    statuses: list[int] = []
    lock = threading.Lock()
    ids = _customer_ids(home, 20) + ["never-seen"]

    def churn(i: int) -> None:
        rid = uuid.uuid4().hex
        r = srv.client.post("/churn", json={"customer_id": ids[i % len(ids)]}, headers={"x-request-id": rid})
        with lock:
            statuses.append(r.status_code)
            if r.status_code == 200:
                sent[rid] = r.json()["model"]["version"]

    try:
        # Given a server with two workers, both ready on version 1
        workers = srv.ready_workers(2)
        assert len(workers) == 2 and all(w["models"]["churn"]["version"] == "1" for w in workers.values())
        assert all(w["source"] == "registry" for w in workers.values())
        # When concurrent requests arrive on new connections
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(churn, range(120)))
        assert set(statuses) == {200}

        # When a new version becomes champion while requests keep coming
        client = _client(home)
        v1 = client.get_model_version("churn", "1")
        new = register(client, "churn", v1.source, v1.run_id)
        promote(client, "churn", GateConfig(bootstrap_rounds=100), reason="two-worker reload", force=True)
        stop = threading.Event()

        def hammer() -> None:
            i = 0
            while not stop.is_set():
                churn(i)
                i += 1

        background = threading.Thread(target=hammer)
        background.start()
        try:
            # Then every worker picks it up
            serving: dict[int, str] = {}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (
                    set(serving) >= set(workers) and set(serving.values()) == {new}):
                ready = srv.client.get("/readyz").json()
                serving[ready["worker"]] = ready["models"]["churn"]["version"]
                time.sleep(0.1)
        finally:
            stop.set()
            background.join()
        assert set(serving) == set(workers) and set(serving.values()) == {new}, serving
        before = len(sent)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(churn, range(40)))
        assert set(statuses) == {200}  # none failed during the swap
        assert {v for rid, v in list(sent.items())[before:]} == {new}
        assert set(sent.values()) == {"1", new}
    finally:
        code = srv.stop()
    # Then, after a graceful shutdown, the log holds every answered request exactly once, from both workers
    assert code is not None
    frame = read_log(predlog)
    assert len(frame) == len(sent) and frame["request_id"].is_unique
    assert set(frame["request_id"]) == set(sent)
    assert dict(zip(frame["request_id"], frame["version"])) == sent
    writers = {int(p.name.split("-")[2]) for p in log_segments(predlog)}
    assert writers == set(workers)
    assert not list(predlog.rglob("*.tmp"))


# --- a Bento ---------------------------------------------------------------------------------------------------------
def _uv_dir(tmp_path: Path) -> Path | None:
    """A folder with uv in it, for PATH: BentoML 1.4 writes a Bento's requirements with uv."""
    found = shutil.which("uv") or next((str(p) for p in (REPO / ".tools" / "bin" / "uv",) if p.exists()), None)
    if found is None:
        return None
    folder = tmp_path / "uvbin"
    folder.mkdir()
    (folder / "uv").symlink_to(found)
    return folder


@pytest.mark.slow
def test_a_bento_carries_the_champion_and_serves_it_without_the_registry(home: Path, tmp_path: Path) -> None:
    import mlflow.artifacts
    import pandas as pd
    import yaml

    from serving.scoring import load
    from training.registry import HELDOUT_ARTIFACT

    uv = _uv_dir(tmp_path)
    if uv is None:
        pytest.skip("`bentoml build` needs uv on PATH (BentoML 1.4 writes the Bento's requirements with it)")
    env = _env(home, PATH=f"{uv}{os.pathsep}{os.environ.get('PATH', '')}")

    # Given the registry's champion, as the registry serves it
    client = _client(home)
    champion = client.get_model_version_by_alias("churn", "champion")
    cid = _customer_ids(home, 1)[0]
    registry_model = load(client, "churn", "champion")
    features = {c: v for c, v in _stored_features(home, cid).items() if c in registry_model.scorer.features}
    expected = float(registry_model.scorer.score([features])[0])
    base_rate = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=champion.run_id, artifact_path=HELDOUT_ARTIFACT, dst_path=str(tmp_path / "heldout")))["label"].mean()

    # When a Bento is built from it
    # (its churn model also answering /propensity: an endpoint given a model by name, which `bentoml serve` reads
    # from the Bento's labels, with no environment set)
    out = subprocess.run([str(BIN / "personalize"), "bento", "build", "--models", "churn", "--model",
                          "propensity=churn"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    tag = re.search(r"built (personalization:\w+)", out.stdout).group(1)
    assert f"bentoml containerize {tag}" in out.stdout

    # Then the Bento store has it (exported by its tag, unpacked: what an image holds), with the champion's model
    subprocess.run([str(BIN / "bentoml"), "export", tag, str(tmp_path / "bento.tar")], env=env, check=True,
                   capture_output=True)
    with tarfile.open(tmp_path / "bento.tar") as archive:
        archive.extractall(tmp_path / "bento", filter="data")
    info = yaml.safe_load((tmp_path / "bento" / "bento.yaml").read_text())
    assert f"{info['name']}:{info['version']}" == tag and info["labels"] == {
        "churn": str(champion.version), "personalize.alias": "champion", "personalize.endpoints": "propensity=churn"}
    (model_tag,) = [m["tag"] for m in info["models"]]
    assert model_tag.startswith(f"personalize-churn:v{champion.version}-")
    name, version = model_tag.split(":")
    assert (tmp_path / "bento" / "models" / name / version / "mlflow_model" / "MLmodel").is_file()

    # When it is served from there with an empty BentoML store and the registry out of reach (moved away, the
    # tracking URI pointing nowhere)
    away = tmp_path / "registry-away"
    away.mkdir()
    moved = [(home / n, away / n) for n in ("mlflow.db", "mlartifacts")]
    for src, dst in moved:
        src.rename(dst)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    srv = Server([str(BIN / "bentoml"), "serve", str(tmp_path / "bento")],
                 {**env, "PERSONALIZE_HOME": str(empty / "home"), "BENTOML_HOME": str(empty / "bentoml"),
                  "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}",
                  "PERSONALIZE_ONLINE_STORE": f"sqlite:///{home / 'online' / 'synthetic.sqlite'}"}, empty)
    try:
        (ready,) = srv.ready_workers(1).values()
        # Then it answers with the Bento's champion: the version, the scores and the prior the registry gives
        assert ready["source"] == "bento"
        assert ready["models"]["churn"] == {"name": "churn", "version": str(champion.version), "alias": "champion",
                                            "kind": "classifier"}
        status = srv.client.get("/status").json()
        assert status["model_source"] == {"source": "bento", "bento": tag, "models": {"churn": model_tag}}
        r = srv.client.post("/churn", json={"items": [{"customer_id": cid}, {"features": features},
                                                      {"customer_id": "never-seen"}]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == {"name": "churn", "version": str(champion.version), "alias": "champion"}
        by_id, by_record, cold = r.json()["results"]
        assert by_id["probability"] == by_record["probability"] == pytest.approx(expected, abs=1e-6)
        assert cold["cold_start"] and cold["probability"] == pytest.approx(base_rate, abs=1e-6)
        assert srv.client.post("/propensity", json={"customer_id": cid}).json()["model"]["name"] == "churn"
        assert srv.client.post("/next_purchase", json={"customer_id": cid}).status_code == 503  # not carried
    finally:
        srv.stop()
        for src, dst in moved:
            dst.rename(src)
    assert not (tmp_path / "nowhere").exists()  # the registry was never asked


def _stored_features(home: Path, customer_id: str) -> dict[str, Any]:
    import json
    import sqlite3

    con = sqlite3.connect(home / "online" / "synthetic.sqlite")
    row = con.execute("SELECT features FROM customers WHERE customer_id = ?", (customer_id,)).fetchone()
    con.close()
    return json.loads(row[0])
