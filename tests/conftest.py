"""Shared fixtures: every test writes under its own tmp_path, reads real data from ../shared/data, no network."""

from __future__ import annotations

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
