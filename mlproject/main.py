"""The ``main`` entry point: the platform's loop as MLflow project steps, each one a run nested under this one.

data (``synth`` or ``ingest``) -> ``features`` -> ``tune`` -> ``train`` -> ``evaluate`` -> ``promote`` -> ``replay``
-> ``monitor`` -> ``retrain``, each launched with :func:`mlflow.projects.run` on this project (MLflow's multistep
workflow), in the environment this driver runs in. A step that does not apply to the data set is skipped with its
reason: a labeled table (telco_churn, online_shoppers) has its features already and is tuned by ``tune``; a
transaction data set (synthetic, online_retail, cdnow) gets ``features`` and is tuned inside ``train`` (one study, a
nested run per trial), and only transaction data can be replayed and monitored.

A refused challenger is an outcome, not an error (as in ``personalize demo``): ``promote`` and ``retrain`` exit with
code 1 when the gate refuses, their step runs are FAILED as the command was, the registry's audit trail says
"refuse", and the loop goes on with the champion there is. Any other failure stops the loop and fails this run.

Tracking: this run, its steps and the runs the commands start all live in the store MLFLOW_TRACKING_URI names
(``mlflow run`` sets it; run by hand, the platform's own store under PERSONALIZE_HOME). The runs a step's command
started carry the tag ``personalize.launcher_run_id`` = the step's run (personalize/cli.py sets it); the step's
run lists their ids in ``personalize.runs`` and its outcome (ok, refused, failed) in ``personalize.outcome``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from personalize.settings import ERROR_TAG, LAUNCHER_TAG

PROJECT_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROJECT_DIR.parent  # where the entry points run `personalize` (they `cd ..`)
GATED = ("promote", "retrain")  # exit code 1: the gate refused
log = logging.getLogger("personalize.mlproject")


class Options(BaseModel):
    """The parameters of ``main`` (see MLproject), validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dataset: str = "synthetic"
    customers: int = Field(default=3000, ge=100)
    days: int = Field(default=730, ge=1)
    seed: int = 42
    data_root: Path = Path("../shared/data")
    task: Literal["churn", "propensity", "category-propensity"] = "churn"
    model: str = ""
    trials: int = Field(default=10, ge=1)
    family: Literal["", "lightgbm", "xgboost"] = ""
    fairness_attribute: str = ""
    replay: int = Field(default=1000, ge=0)
    retrain_trials: int = Field(default=5, ge=1)

    @property
    def model_name(self) -> str:
        """The registered model ``personalize train`` registers: ``--name``, else the task."""
        return self.model or self.task.replace("-", "_")


@dataclass(frozen=True)
class Step:
    entry_point: str
    parameters: dict[str, str] = field(default_factory=dict)
    skip: str = ""  # why the step does not apply; then it is not run
    needs_champion: bool = False
    empty_ok: bool = False  # monitor with replay=0: nothing logged in the window is a skip, not a failure


def plan(options: Options, kind: str, builtin: bool) -> list[Step]:
    """The steps of the loop for a data set of ``kind`` (synthetic, transactions or labeled); pure."""
    o, model = options, options.model_name
    labeled = kind == "labeled"
    if kind == "synthetic":
        data = Step("synth", {"customers": str(o.customers), "days": str(o.days), "seed": str(o.seed),
                              "name": o.dataset})
    elif builtin:
        data = Step("ingest", {"source": o.dataset, "data_root": str(o.data_root)})
    else:
        data = Step("ingest", skip=f"{o.dataset} is not a built-in data set: ingested already")
    # options an entry point does not declare: MLflow appends them to its command as --option value
    family = {"family": o.family} if o.family else {}
    train = {"task": o.task, "dataset": o.dataset, "trials": str(o.trials), "seed": str(o.seed), **family}
    train.update({k: v for k, v in (("fairness-attribute", o.fairness_attribute), ("name", o.model)) if v})
    no_transactions = "a labeled table has no transactions to replay or to label a window with"
    # a per-category model is trained and gated, not served: nothing replays, monitors or retrains it
    unserved = "a per-category propensity model is not served" if o.task == "category-propensity" else ""
    return [
        data,
        Step("features", {"dataset": o.dataset}, skip="a labeled table carries its features" if labeled else ""),
        Step("tune", {"dataset": o.dataset, "trials": str(o.trials), "seed": str(o.seed), **family},
             skip="" if labeled else "transaction data is tuned inside train (one study, a nested run per trial)"),
        Step("train", train),
        Step("evaluate", {"model": model}),
        Step("promote", {"model": model}),
        Step("replay", {"model": model, "dataset": o.dataset, "sample": str(o.replay), "seed": str(o.seed)},
             skip=unserved or (no_transactions if labeled else "" if o.replay else "replay=0: monitor the log as it "
                                                                                   "is"),
             needs_champion=True),
        Step("monitor", {"model": model}, skip=unserved or (no_transactions if labeled else ""), needs_champion=True,
             empty_ok=not o.replay),
        Step("retrain", {"model": model, "trials": str(o.retrain_trials), "reason": "mlflow run -e main"},
             skip=unserved, needs_champion=True),
    ]


@dataclass
class Outcome:
    entry_point: str
    status: str  # ok, refused, skipped, failed
    seconds: float = 0.0
    run_id: str = ""
    launched: dict[str, str] = field(default_factory=dict)  # the runs the command started: id -> experiment/name
    note: str = ""


def data_kind(dataset: str, data_root: Path, home_data: Path) -> tuple[str, bool]:
    """(synthetic | transactions | labeled, whether it is a built-in data set ingest knows)."""
    from features.datasets import labeled_sources, transaction_sources

    if dataset == "synthetic":
        return "synthetic", False
    if dataset in transaction_sources(data_root):
        return "transactions", True
    if dataset in labeled_sources(data_root):
        return "labeled", True
    if (home_data / dataset / "table.parquet").exists():
        return "labeled", False
    if (home_data / dataset / "transactions.parquet").exists():
        return "transactions", False
    raise typer.BadParameter(f"{dataset!r}: not synthetic, not a built-in data set, and not ingested under "
                             f"{home_data}", param_hint="--dataset")


def _champion(client: Any, model: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model, "champion").version)
    except Exception:  # no such model or alias yet
        return None


def _audit_actions(client: Any, model: str) -> list[str]:
    from training.registry import history

    try:
        return [e["action"] for e in history(client, model)]
    except Exception:  # not registered yet
        return []


def _step_run(client: Any, parent_id: str, experiment_id: str, entry_point: str) -> str:
    """The newest run of ``entry_point`` nested under ``parent_id`` (MLflow's failure gives no run object)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                              f"tags.`mlflow.project.entryPoint` = '{entry_point}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else ""


def launched_runs(client: Any, step_run_id: str) -> dict[str, str]:
    """The top-level runs a step's command started (their nested trial runs are theirs): id -> experiment/run name."""
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{LAUNCHER_TAG}` = '{step_run_id}'",
                              output_format="list", order_by=["attributes.start_time ASC"])
    tops = [r for r in runs if not r.data.tags.get("mlflow.parentRunId")]
    # a resumed study's trials are tagged with this step, their parent (the study's run) with the step that started
    # it: the parent is what this step ran
    parents = dict.fromkeys(r.data.tags["mlflow.parentRunId"] for r in runs if r.data.tags.get("mlflow.parentRunId"))
    tops += [client.get_run(p) for p in parents if p not in {r.info.run_id for r in tops}]
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    return {r.info.run_id: f"{names.get(r.info.experiment_id, r.info.experiment_id)}/{r.info.run_name}"
            for r in tops}


def run_step(client: Any, step: Step, parent_id: str, experiment_id: str, model: str) -> Outcome:
    import mlflow
    from mlflow.exceptions import ExecutionException

    before = _audit_actions(client, model) if step.entry_point in GATED else []
    started = time.perf_counter()
    try:
        run_id = mlflow.projects.run(str(PROJECT_DIR), entry_point=step.entry_point, parameters=step.parameters,
                                     env_manager="local", experiment_id=experiment_id, synchronous=True,
                                     run_name=step.entry_point).run_id
        status = "ok"
    except ExecutionException:
        run_id = _step_run(client, parent_id, experiment_id, step.entry_point)
        new = _audit_actions(client, model)[len(before):] if step.entry_point in GATED else []
        status = "refused" if "refuse" in new else "failed"
    error = client.get_run(run_id).data.tags.get(ERROR_TAG, "") if run_id and status == "failed" else ""
    if status == "failed" and step.empty_ok and error.startswith("no logged predictions"):
        status = "skipped"  # nothing to monitor (replay=0 on an empty log): not a broken loop
    out = Outcome(step.entry_point, status, time.perf_counter() - started, run_id, note=error[:300])
    if run_id:
        out.launched = launched_runs(client, run_id)
        client.set_tag(run_id, "personalize.outcome", status)
        if out.launched:
            client.set_tag(run_id, "personalize.runs", ",".join(out.launched)[:5000])
    if status == "refused":
        out.note = f"the gate refused the challenger; champion: v{_champion(client, model) or '-'}"
    return out


def summary_table(outcomes: list[Outcome], title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("step", "outcome", "seconds", "step run", "runs the command started", "note"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    colour = {"ok": "green", "refused": "yellow", "skipped": "dim", "failed": "red"}
    for o in outcomes:
        table.add_row(o.entry_point, f"[{colour[o.status]}]{o.status}", f"{o.seconds:.0f}" if o.run_id else "",
                      o.run_id[:12], "\n".join(o.launched.values()), o.note)
    return table


def run_loop(options: Options) -> list[Outcome]:
    """Every step of :func:`plan`, inside this entry point's run; stops at the first failure."""
    import mlflow
    from rich.console import Console

    from personalize.settings import Settings
    from training.registry import aliases, connect

    os.chdir(REPO_ROOT)  # a relative PERSONALIZE_HOME means what it means to the commands
    settings = Settings.from_env()
    os.environ["MLFLOW_TRACKING_URI"] = settings.tracking_uri  # the steps' runs and the platform's: one store
    client = connect(settings.tracking_uri)
    kind, builtin = data_kind(options.dataset, options.data_root, settings.home / "data")
    steps = plan(options, kind, builtin)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for the summary
        console = Console(width=160)
    model, outcomes = options.model_name, []
    if not os.environ.get("MLFLOW_RUN_ID"):  # run by hand, not by `mlflow run`: a run of our own
        from training.tracking import use_experiment

        use_experiment(settings.tracking_uri, "mlproject", settings.artifact_root)
    with mlflow.start_run() as parent:  # `mlflow run -e main`'s run (MLFLOW_RUN_ID), resumed
        mlflow.set_tags({"personalize.home": str(settings.home.resolve()), "personalize.data_kind": kind})
        for step in steps:
            if step.skip or (step.needs_champion and _champion(client, model) is None):
                why = step.skip or f"{model} has no champion (the gate refused every version)"
                outcomes.append(Outcome(step.entry_point, "skipped", note=why))
                mlflow.set_tag(f"personalize.step.{step.entry_point}", f"skipped: {why}"[:5000])
                continue
            log.info("step %s %s", step.entry_point, step.parameters)
            out = run_step(client, step, parent.info.run_id, parent.info.experiment_id, model)
            outcomes.append(out)
            mlflow.set_tag(f"personalize.step.{step.entry_point}", out.status)
            mlflow.log_metric(f"seconds_{step.entry_point}", round(out.seconds, 1))
            if out.status == "failed":
                break
        champion = _champion(client, model)
        mlflow.set_tag("personalize.champion", f"{model}@champion = v{champion}" if champion else f"{model}: none")
        console.print(summary_table(outcomes, f"mlflow run -e main: {options.dataset} ({kind}), run "
                                              f"{parent.info.run_id}"))
        if any(o.status == "ok" for o in outcomes if o.entry_point in ("train", "retrain", "promote")):
            console.print(f"{model}: " + ", ".join(f"{a} = v{v}" if v else f"{a} = -"
                                                  for a, v in aliases(client, model).items()), highlight=False)
        console.print(f"tracking store (runs and registry): {settings.tracking_uri}; data: {settings.home.resolve()}",
                      highlight=False, soft_wrap=True)
        if settings.tracking_uri != settings.model_copy(update={"mlflow_tracking_uri": None}).tracking_uri:
            console.print("not the platform's default store under PERSONALIZE_HOME: to serve, promote or monitor "
                          f"these models later, export MLFLOW_TRACKING_URI={settings.tracking_uri}", highlight=False,
                          soft_wrap=True)
        if outcomes and outcomes[-1].status == "failed":
            raise typer.Exit(1)  # the run ends FAILED
    return outcomes


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


@app.command()
def main(
    dataset: Annotated[str, typer.Option(help="synthetic (generated), a built-in data set or an ingested one.")]
    = "synthetic",
    customers: Annotated[int, typer.Option(min=100, help="Synthetic customers.")] = 3000,
    days: Annotated[int, typer.Option(min=1, help="Synthetic days.")] = 730,
    seed: Annotated[int, typer.Option(help="Seed of the data, the split and the study.")] = 42,
    data_root: Annotated[Path, typer.Option(help="Folder of the shared public data sets.")] = Path("../shared/data"),
    task: Annotated[str, typer.Option(help="churn, propensity or category-propensity.")] = "churn",
    model: Annotated[str, typer.Option(help="Registered model name (default: the task).")] = "",
    trials: Annotated[int, typer.Option(min=1, help="Tuning trials.")] = 10,
    family: Annotated[str, typer.Option(help="lightgbm or xgboost (default: both).")] = "",
    fairness_attribute: Annotated[str, typer.Option(help="Attribute the gate checks (default: none).")] = "",
    replay: Annotated[int, typer.Option(min=0, help="Customers replayed into the prediction log before monitoring "
                                             "(0: monitor the log as it is).")] = 1000,
    retrain_trials: Annotated[int, typer.Option(min=1, help="Tuning trials of the retrain.")] = 5,
) -> None:
    """Run the loop as MLflow project steps and print a summary."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:  # before any step: a bad value is one line, not a loop that fails after generating data
        options = Options(dataset=dataset, customers=customers, days=days, seed=seed,
                          data_root=(REPO_ROOT / data_root).resolve(), task=task, model=model, trials=trials,
                          family=family, fairness_attribute=fairness_attribute, replay=replay,
                          retrain_trials=retrain_trials)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise typer.BadParameter(error["msg"], param_hint=f"--{str(error['loc'][0]).replace('_', '-')}") from None
    if shutil.which("personalize") is None:
        raise SystemExit("error: `personalize` is not on PATH: start `mlflow run` from the project's environment "
                         "(source .venv/bin/activate) with --env-manager local")
    run_loop(options)


if __name__ == "__main__":
    app()
