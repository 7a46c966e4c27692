"""Shared fixtures: every test writes under its own tmp_path, reads real data from ../shared/data, no network."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every store the platform has at this test's tmp_path."""
    home = tmp_path / "home"
    monkeypatch.setenv("PERSONALIZE_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PERSONALIZE_OPTUNA_STORAGE", f"sqlite:///{tmp_path / 'optuna.db'}")
    monkeypatch.setenv("PERSONALIZE_DATA_ROOT", str(DATA_ROOT))
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID: an earlier test's experiment must not steer this one's
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    return home


@pytest.fixture(scope="session")
def data_root() -> Path:
    assert DATA_ROOT.is_dir(), f"the shared data sets are expected at {DATA_ROOT} (beside the repository)"
    return DATA_ROOT


@pytest.fixture
def redis_url(tmp_path: Path):
    """A real redis-server on a free loopback port for one test (skips, saying why, when none can start)."""
    import shutil
    import socket
    import time

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on this machine (`apt-get install redis-server`; .ci/run installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            pytest.skip("redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
