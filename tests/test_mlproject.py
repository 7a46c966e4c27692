"""The MLflow Project front door: `mlflow run mlproject -e main --env-manager local` from the repository root.

The fast tests read mlproject/MLproject and parse every command it can run (each entry point with its defaults, and
each step ``main`` plans) as ``personalize`` (or the project's scripts) would, without running it. The slow test
runs the loop end to end on a small synthetic shop.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import typer
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "mlproject"
TYPES = {"string", "float", "int", "path", "uri"}
STAGES = {"ingest", "features", "tune", "train", "evaluate", "promote", "monitor", "retrain", "main"}


def spec() -> dict:
    return yaml.safe_load((PROJECT / "MLproject").read_text())


def script(path: Path) -> ModuleType:
    """One of the project's scripts, imported by path (the project is not a package)."""
    name = f"mlproject_{path.stem}"
    if name not in sys.modules:
        module_spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(module_spec)  # dataclasses look their module up
        module_spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def command_line(entry_point: dict, values: dict[str, str]) -> list[str]:
    """The command MLflow runs: declared parameters substituted (shell-quoted), the others appended as --key value."""
    declared = entry_point.get("parameters", {})
    filled = {k: shlex.quote(str(values.get(k, d.get("default")))) for k, d in declared.items()}
    extra = [f"--{k} {shlex.quote(v)}" for k, v in values.items() if k not in declared]
    return shlex.split(" ".join([entry_point["command"].format(**filled), *extra]))


def parse(argv: list[str]) -> str:
    """Parse ``argv`` as its program would (subcommands, option names, types, ranges) without running it; returns the
    command's path, e.g. ``personalize features build``."""
    from personalize.cli import app

    cwd = PROJECT
    if argv[:3] == ["cd", "..", "&&"]:
        cwd, argv = REPO, argv[3:]
    if argv[0] == "personalize":
        command, args, path = typer.main.get_command(app), argv[1:], ["personalize"]
    else:
        assert argv[0] == "python", argv
        command, args, path = typer.main.get_command(script(cwd / argv[1]).app), argv[2:], argv[:2]
    while hasattr(command, "list_commands"):  # a group (typer ships its own click)
        sub = command.get_command(command.context_class(command), args[0]) if args else None
        assert sub is not None, f"{' '.join(path)}: no subcommand {args[:1]}"
        command, args, path = sub, args[1:], [*path, args[0]]
    command.make_context(" ".join(path), list(args))  # raises on an unknown option or a bad value
    return " ".join(path)


def test_the_project_declares_every_stage_with_typed_parameters() -> None:
    entry_points = spec()["entry_points"]
    assert STAGES <= set(entry_points)
    for name, entry_point in entry_points.items():
        for parameter, declared in entry_point.get("parameters", {}).items():
            assert isinstance(declared, dict) and declared.get("type") in TYPES, (name, parameter)
            assert declared.get("default") is not None, (name, parameter)  # runs as is on the embedded defaults


@pytest.mark.parametrize("name", sorted(yaml.safe_load((PROJECT / "MLproject").read_text())["entry_points"]))
def test_every_entry_point_is_a_command_that_parses_with_its_defaults(name: str) -> None:
    expected = {"main": "python main.py",
                "features": "personalize features build", "train": "personalize train churn",
                "train_forecast": "personalize train forecast",
                "train_purchase_cycle": "personalize train purchase-cycle"}
    assert parse(command_line(spec()["entry_points"][name], {})) == expected.get(name, f"personalize {name}")


LOOP = ["train", "evaluate", "promote", "replay", "monitor", "retrain"]


@pytest.mark.parametrize(("dataset", "kind", "builtin", "expected"), [
    ("synthetic", "synthetic", False, ["synth", "features", *LOOP]),
    ("cdnow", "transactions", True, ["ingest", "features", *LOOP]),
    ("telco_churn", "labeled", True, ["ingest", "tune", "train", "evaluate", "promote", "retrain"]),
    ("my_table", "labeled", False, ["tune", "train", "evaluate", "promote", "retrain"]),
])
def test_every_step_main_plans_is_an_entry_point_whose_command_parses(dataset: str, kind: str, builtin: bool,
                                                                      expected: list[str]) -> None:
    main = script(PROJECT / "main.py")
    options = main.Options(dataset=dataset, trials=2, family="lightgbm", fairness_attribute="age_band",
                           model="churn_x", replay=50)
    steps = [s for s in main.plan(options, kind, builtin) if not s.skip]
    assert [s.entry_point for s in steps] == expected
    for step in steps:
        parse(command_line(spec()["entry_points"][step.entry_point], step.parameters))


def test_main_refuses_a_bad_task_or_family_first_and_skips_what_a_per_category_model_has_not() -> None:
    main = script(PROJECT / "main.py")
    for bad in ({"task": "foo"}, {"family": "catboost"}):
        with pytest.raises(ValidationError):
            main.Options(**bad)
    result = CliRunner().invoke(main.app, ["--task", "foo"])  # before any step runs: one line, exit 2
    assert result.exit_code == 2 and "--task" in result.output and "Traceback" not in result.output
    steps = main.plan(main.Options(task="category-propensity", trials=2), "synthetic", False)
    assert [s.entry_point for s in steps if not s.skip] == ["synth", "features", "train", "evaluate", "promote"]
    assert {s.entry_point: s.skip for s in steps}["monitor"] == "a per-category propensity model is not served"


def test_a_failed_command_tags_the_entry_points_run_with_its_error(isolated_home: Path) -> None:
    """`main`'s summary shows why a step failed: the command's one-line error is a tag of the step's run."""
    import json

    from mlflow.tracking import MlflowClient

    from personalize.cli import app

    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    step = client.create_run(client.create_experiment("steps")).info.run_id
    result = CliRunner().invoke(app, ["monitor", "churn"], env={
        "MLFLOW_RUN_CONTEXT": json.dumps({"personalize.launcher_run_id": step})})
    assert result.exit_code == 2
    error = client.get_run(step).data.tags["personalize.error"]
    assert error == "churn has no champion to monitor (train and promote one first)"


@pytest.mark.slow
def test_mlflow_run_main_goes_from_data_to_a_monitored_champion(isolated_home: Path, tmp_path: Path) -> None:
    # Given a fresh home and tracking store (conftest) and the project's environment on PATH
    from mlflow.tracking import MlflowClient

    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri, registry_uri=uri)
    # (the project's runs in an experiment of their own, whose artifact location is under tmp_path, not ./mlruns)
    client.create_experiment("mlproject", artifact_location=(tmp_path / "project-artifacts").as_uri())
    # (an experiment or run chosen by an earlier test of this process must not reach `mlflow run`)
    leaked = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    env = {**{k: v for k, v in os.environ.items() if k not in leaked},
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    tiny = {"customers": 1000, "days": 540, "trials": 1, "family": "lightgbm", "replay": 300, "retrain_trials": 1}
    # When the front door runs the whole loop
    result = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "run", "mlproject", "-e", "main",
                             "--env-manager", "local", "--experiment-name", "mlproject",
                             *[a for k, v in tiny.items() for a in ("-P", f"{k}={v}")]],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    # Then it succeeds, the registry has a champion, and every step's run is in the one tracking store
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    champion = client.get_model_version_by_alias("churn", "champion")
    experiment = client.get_experiment_by_name("mlproject").experiment_id
    runs = client.search_runs([experiment])
    (main,) = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "main"]
    assert main.info.status == "FINISHED"
    assert main.data.tags["personalize.step.tune"].startswith("skipped")  # synthetic data is tuned inside train
    steps = {r.data.tags["mlflow.project.entryPoint"]: r for r in runs
             if r.data.tags.get("mlflow.parentRunId") == main.info.run_id}
    assert set(steps) == {"synth", "features", "train", "evaluate", "promote", "replay", "monitor", "retrain"}
    for name, run in steps.items():
        outcome = run.data.tags["personalize.outcome"]
        assert (run.info.status, outcome) == ("FINISHED", "ok") or (name, outcome) == ("retrain", "refused"), name
    # the runs the commands started are their own, linked to the step that launched them
    trained = client.get_run(champion.run_id)
    assert client.get_experiment(trained.info.experiment_id).name == "train-churn"
    assert trained.data.tags["personalize.launcher_run_id"] in (steps["train"].info.run_id,
                                                                 steps["retrain"].info.run_id)
    (monitored,) = steps["monitor"].data.tags["personalize.runs"].split(",")
    assert client.get_experiment(client.get_run(monitored).info.experiment_id).name == "monitor-churn"
