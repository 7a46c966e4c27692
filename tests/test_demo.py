"""The front door: `personalize demo` runs end to end on the shared data and ends with one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from personalize.cli import app


def test_the_demo_runs_end_to_end_and_twice(isolated_home: Path, data_root: Path) -> None:
    runner = CliRunner()
    for _ in range(2):  # rerunnable without cleaning by hand
        result = runner.invoke(app, ["demo", "--customers", "300", "--data-root", str(data_root)],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert last["demo"] == "ok"
    assert last["datasets"]["online_retail"] == {"rows_in": 541_909, "quarantined": 140_307}
    assert set(last["frames"]) == {"online_retail", "cdnow", "synthetic"}
    assert last["tuned"]["telco_churn"]["valid_auc"] > 0.8  # a constant score gets 0.5
    assert (isolated_home / "features" / "cdnow" / "training_frame.parquet").exists()
