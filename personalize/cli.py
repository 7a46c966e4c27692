"""The ``personalize`` command: one subcommand per stage.

Each command parses its options, reads its inputs, calls the core in ``features`` (later ``training``,
``serving``, ``monitoring``), logs and writes its outputs. Errors a user can act on (a bad file, a bad config) are
printed as one line and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from personalize.errors import PersonalizeError
from personalize.settings import Settings

app = typer.Typer(
    name="personalize",
    help="Predictive personalization: validated data -> point-in-time features and labels -> models -> API.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
features_app = typer.Typer(help="Build point-in-time features and labels, or look up one customer's features.",
                           no_args_is_help=True)
app.add_typer(features_app, name="features")

console = Console()
if not console.is_terminal:  # logs and CI: wide enough for the summary tables instead of 80 columns
    console = Console(width=160)
err_console = Console(stderr=True)
log = logging.getLogger("personalize")

DataRoot = Annotated[Path, typer.Option("--data-root", envvar="PERSONALIZE_DATA_ROOT",
                                        help="Folder of the shared public data sets.")]


@app.callback()
def _configure(
    ctx: typer.Context,
    home: Annotated[Path | None, typer.Option(envvar="PERSONALIZE_HOME",
                                              help="Where the platform keeps its data, stores and runs.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=True)],
                        force=True)
    for noisy in ("cmdstanpy", "prophet", "urllib3", "alembic", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings.from_env()
    ctx.obj = settings.model_copy(update={"home": home}) if home else settings


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a PersonalizeError into one red line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PersonalizeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _now() -> "pd.Timestamp":  # noqa: F821  pandas is imported lazily to keep --help fast
    """The ingestion clock (naive UTC): a timestamp after it is a future timestamp."""
    import pandas as pd

    return pd.Timestamp.now(tz="UTC").tz_localize(None)


# --- ingest ----------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def ingest(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="A built-in data set (online_retail, cdnow, telco_churn, "
                                               "online_shoppers), 'all', or a YAML mapping file.")],
    data_root: DataRoot = Path("../shared/data"),
) -> None:
    """Read, validate and store a data set; quarantine bad rows with their reason."""
    from features.pipeline import builtin_names, ingest_builtin, ingest_config, load_ingest_config

    settings: Settings = ctx.obj
    now = _now()
    if source == "all":
        reports = [ingest_builtin(settings, name, now, data_root) for name in builtin_names()]
    elif source.endswith((".yaml", ".yml")) or Path(source).is_file():
        reports = [ingest_config(settings, load_ingest_config(Path(source)), now)]
    else:
        reports = [ingest_builtin(settings, source, now, data_root)]
    console.print(ingest_table(reports))


def ingest_table(reports: list[Any]) -> Table:
    table = Table(title="Ingested", show_lines=False)
    for col, justify in [("data set", "left"), ("table", "left"), ("rows in", "right"), ("valid", "right"),
                         ("quarantined", "right"), ("reasons", "left")]:
        table.add_column(col, justify=justify)
    for report in reports:
        for name, t in report.tables.items():
            reasons = ", ".join(f"{k} {v:,}" for k, v in t["reasons"].items()) or "-"
            table.add_row(report.dataset, name, f"{t['rows_in']:,}", f"{t['valid']:,}", f"{t['quarantined']:,}",
                          reasons)
    return table


# --- synth -----------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def synth(
    ctx: typer.Context,
    customers: Annotated[int, typer.Option(min=1, help="Number of customers.")] = 5_000,
    days: Annotated[int, typer.Option(min=1, help="Length of the simulated period in days.")] = 730,
    start: Annotated[datetime, typer.Option(help="First day of the simulated period.")] = datetime(2024, 1, 1),
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same data.")] = 42,
    events: Annotated[bool, typer.Option(help="Also generate web events (sessions, views, carts).")] = True,
    drift_start: Annotated[datetime | None, typer.Option(help="When the drift begins (none: no drift).")] = None,
    drift_price: Annotated[float, typer.Option(help="Relative price shift after drift start (0.5 = +50%).")] = 0.0,
    drift_activity: Annotated[float, typer.Option(help="Relative activity shift after drift start.")] = 0.0,
    drift_mix: Annotated[float, typer.Option(min=0.0, max=1.0,
                                             help="Share of category affinity moved to one category.")] = 0.0,
    name: Annotated[str, typer.Option(help="Data set name to store it under.")] = "synthetic",
) -> None:
    """Generate a seeded synthetic data set with planted ground truth and an optional drift."""
    from features.synthetic import DriftSpec, SyntheticConfig, generate
    from features.pipeline import ingest_synthetic

    config = SyntheticConfig(
        customers=customers, start=start, days=days, seed=seed, events=events,
        drift=DriftSpec(start=drift_start, price=drift_price, activity=drift_activity, mix=drift_mix))
    started = time.perf_counter()
    with console.status(f"generating {customers:,} customers"):
        data = generate(config)
    report = ingest_synthetic(ctx.obj, name, data)
    console.print(ingest_table([report]))
    log.info("synthetic data set %r written to %s in %.1fs (ground truth: truth.parquet)", name,
             ctx.obj.dataset_dir(name), time.perf_counter() - started)


# --- features --------------------------------------------------------------------------------------------------
@features_app.command("build")
@user_errors
def features_build(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="An ingested data set.")],
    horizon: Annotated[int, typer.Option(min=1, help="Label horizon H in days after each cutoff.")] = 90,
    cutoffs: Annotated[int, typer.Option(min=1, help="Number of cutoffs (the latest one ends at the data).")] = 3,
    step: Annotated[int, typer.Option(min=1, help="Days between cutoffs.")] = 30,
    categories: Annotated[int, typer.Option(min=0, help="Category-affinity columns (top by spend).")] = 8,
    as_of: Annotated[list[datetime] | None, typer.Option(help="Explicit cutoff(s), instead of the default.")] = None,
) -> None:
    """Build the point-in-time training frame (features + labels) of a data set."""
    import pandas as pd

    from features.pipeline import build_training_frame

    summary = build_training_frame(ctx.obj, dataset, horizon, cutoffs, step, categories,
                                   [pd.Timestamp(a) for a in as_of] if as_of else None)
    console.print(frames_table([summary]))
    console.print(f"written [bold]{summary.path}[/] ({summary.feature_version})")


def frames_table(summaries: list[Any]) -> Table:
    table = Table(title="Training frames")
    for col in ("data set", "rows", "customers", "cutoffs", "feature columns", "churn rate", "propensity rate",
                "purchases in H"):
        table.add_column(col, justify="left" if col in ("data set", "cutoffs") else "right")
    for s in summaries:
        cuts = f"{s.cutoffs[0][:10]} … {s.cutoffs[-1][:10]} ({len(s.cutoffs)})"
        table.add_row(s.dataset, f"{s.rows:,}", f"{s.customers:,}", cuts, str(s.feature_columns),
                      f"{s.label_rates['churn']:.3f}", f"{s.label_rates['propensity']:.3f}",
                      f"{s.label_rates['purchases_in_h']:.2f}")
    return table


@features_app.command("get")
@user_errors
def features_get(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="An ingested data set.")],
    customer_id: Annotated[str, typer.Argument(help="The customer to look up.")],
    as_of: Annotated[datetime | None, typer.Option(help="Point in time (default: end of the data).")] = None,
) -> None:
    """Print one customer's features at a point in time: the online path over the same definitions."""
    import pandas as pd

    from features.definitions import FeatureSpec
    from features.store import FeatureStore, read_frame

    settings: Settings = ctx.obj
    store = FeatureStore(settings.dataset_dir(dataset))
    when = pd.Timestamp(as_of) if as_of else store.observed_until()
    frame_path = settings.features_dir(dataset) / "training_frame.parquet"
    categories = tuple(read_frame(frame_path).attrs.get("categories", ())) if frame_path.exists() else ()
    values = store.features_for(customer_id, when, FeatureSpec(categories=categories))
    console.print_json(json.dumps(values, default=str))


# --- tune ------------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def tune(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="An ingested labeled table (e.g. telco_churn).")],
    trials: Annotated[int | None, typer.Option(min=1, help="Trials to run (with --timeout: whichever ends first).")] = 30,
    timeout: Annotated[float | None, typer.Option(min=1, help="Wall-time budget in seconds.")] = None,
    family: Annotated[list[str] | None, typer.Option(help="Model families: lightgbm, xgboost (default both).")] = None,
    study: Annotated[str | None, typer.Option(help="Study name: processes giving the same name share the study.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sampler, the split and the boosters.")] = 42,
    valid_fraction: Annotated[float, typer.Option(min=0.05, max=0.5, help="Share held out for validation.")] = 0.2,
) -> None:
    """Tune LightGBM/XGBoost on a labeled table with Optuna (pruning, early stopping, persistent study), tracked in
    MLflow as one parent run with a baseline and a nested run per trial."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from training.tracking import tracked_tune
    from training.tune import TuneConfig, split_labeled_table

    settings: Settings = ctx.obj
    split = split_labeled_table(settings.dataset_dir(dataset), valid_fraction, seed)
    try:
        config = TuneConfig(trials=trials, timeout_s=timeout, seed=seed,
                            **({"families": tuple(family)} if family else {}))
    except ValueError as exc:
        raise PersonalizeError(str(exc).splitlines()[-1]) from None
    name = study or f"{dataset}-seed{seed}"
    storage = settings.optuna_storage_url
    settings.home.mkdir(parents=True, exist_ok=True)
    progress = Progress(TextColumn("trial {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("best valid AUC {task.fields[best]}"), TimeElapsedColumn(), console=console)
    with progress:
        task = progress.add_task("tune", total=trials, best="-")

        def on_trial(st, trial) -> None:
            best = f"{st.best_value:.4f}" if any(t.value is not None for t in st.trials) else "-"
            progress.update(task, advance=1, best=best)

        result, run_id = tracked_tune(split, config, storage, name, settings.tracking_uri, f"tune-{dataset}",
                                      settings.artifact_root, on_trial, tags={"dataset": dataset})
    table = Table(title=f"study {name}")
    for col in ("best family", "valid ROC-AUC", "baseline ROC-AUC", "boosting rounds", "trials (pruned)"):
        table.add_column(col, justify="right")
    pruned = sum(t.state.name == "PRUNED" for t in result.study.trials)
    table.add_row(result.family, f"{result.valid_auc:.4f}", f"{result.baseline_auc:.4f}", str(result.rounds),
                  f"{len(result.study.trials)} ({pruned})")
    console.print(table)
    console.print(f"study stored in {storage}; MLflow parent run {run_id} in {settings.tracking_uri} "
                  f"(experiment tune-{dataset})", highlight=False, soft_wrap=True)


# --- demo ------------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def demo(
    ctx: typer.Context,
    data_root: DataRoot = Path("../shared/data"),
    customers: Annotated[int, typer.Option(min=100, help="Synthetic customers.")] = 3_000,
) -> None:
    """Run everything that exists end to end on the embedded defaults and print a summary."""
    from personalize.demo import run_demo

    run_demo(ctx.obj, data_root, customers, console)


@app.command()
def info(ctx: typer.Context) -> None:
    """Show where the platform keeps its data and which stores it uses."""
    settings: Settings = ctx.obj
    table = Table(show_header=False)
    table.add_row("home", str(settings.home.resolve()))
    table.add_row("MLflow tracking URI", settings.tracking_uri)
    table.add_row("Optuna storage", settings.optuna_storage_url)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
