"""The ``personalize`` command: one subcommand per stage.

Each command parses its options, reads its inputs, calls the core in ``features`` (later ``training``,
``serving``, ``monitoring``), logs and writes its outputs. Errors a user can act on (a bad file, a bad config) are
printed as one line and exit with code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
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

from personalize.errors import PersonalizeError, first_line, option_error
from personalize.settings import ERROR_TAG, LAUNCHER_TAG, Settings, looks_like_file, redact

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
train_app = typer.Typer(help="Train a model, log it to MLflow and register it as the `challenger`.",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
segments_app = typer.Typer(help="Customer segments: rule segments over the features, behavioural clusters.",
                           no_args_is_help=True)
app.add_typer(segments_app, name="segments")
experiment_app = typer.Typer(help="A/B/n experiments on placements: per-arm results, uplift and significance.",
                             no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")

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
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # our own progress bars only
    # Started by `mlflow run` (an MLflow Project entry point), MLFLOW_RUN_ID names the entry point's run, and
    # MLflow's first start_run would resume it instead of starting ours (and refuse when our experiment differs).
    # Our commands start runs of their own, in their own experiments; each carries the launcher's id as a tag.
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    if launcher:
        context = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
        os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps({**context, LAUNCHER_TAG: launcher})
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a tracking server's "View run" lines
    for noisy in ("cmdstanpy", "prophet", "urllib3", "alembic", "numexpr", "mlflow.store.db.utils",
                  "mlflow.utils.uv_utils", "mlflow.tracking.fluent", "arviz", "pymc", "pymc_marketing",
                  "pytensor", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for chatty in ("mlflow.pyfunc", "mlflow.utils.environment", "mlflow.models.utils", "mlflow.models.model"):
        logging.getLogger(chatty).setLevel(logging.ERROR)  # pickling and pip-version notes on every logged model
    settings = Settings.from_env()
    ctx.obj = settings.model_copy(update={"home": home}) if home else settings


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a PersonalizeError into one red line on stderr and exit code 2; a command asked for ``--json`` also
    prints ``{"error": ...}`` on stdout, so a script reading it gets a document either way."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PersonalizeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            if kwargs.get("as_json"):
                print(json.dumps({"error": str(exc)}))
            _tag_launcher(ERROR_TAG, str(exc))
            raise typer.Exit(2) from None

    return wrapper


def _tag_launcher(key: str, value: str) -> None:
    """A tag on the MLflow Project entry point's run that launched this command, if one did (its summary shows
    why a step failed); best effort: the error is printed whatever happens here."""
    import os

    launcher = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}").get(LAUNCHER_TAG)
    if not launcher:
        return
    try:
        from mlflow import MlflowClient

        MlflowClient().set_tag(launcher, key, value[:5000])
    except Exception:  # an unreachable store: the error line above is what counts
        pass


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
    for report in reports:
        print_hints(report)
        print_columns(report)


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


def print_hints(report: Any) -> None:
    """What to check for the quarantine reasons that usually mean a mapping to fix rather than bad rows."""
    from features.pipeline import REASON_HINTS

    for name, t in report.tables.items():
        for reason, rows in t["reasons"].items():
            if reason in REASON_HINTS:
                what = f"{rows:,} row{'s' * (rows != 1)} {reason}"
                console.print(f"{report.dataset}.{name}: {what}: {REASON_HINTS[reason]}",
                              highlight=False, soft_wrap=True, markup=False)


def print_columns(report: Any) -> None:
    """A labeled table's inferred column types, the columns set aside (and why) and those dropped as asked."""
    if report.kind != "labeled":
        return
    x = report.extra
    console.print(f"{report.dataset}: numeric {', '.join(x['numeric']) or '-'}; categorical "
                  f"{', '.join(x['categorical']) or '-'}; boolean {', '.join(x['boolean']) or '-'}",
                  highlight=False, soft_wrap=True)
    for column, why in x.get("ignored", {}).items():
        console.print(f"not a feature: {column}, {why}", highlight=False, soft_wrap=True)
    if x.get("dropped"):
        console.print(f"dropped as asked: {', '.join(x['dropped'])}", highlight=False, soft_wrap=True)


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
    drift_dropout: Annotated[list[str] | None, typer.Option(
        metavar="CATEGORY=FACTOR", help="After drift start, the dropout hazard of the customers whose favourite "
                                        "category this is, times FACTOR (a concept drift); repeatable.")] = None,
    segment_spread: Annotated[float, typer.Option(
        min=0.05, max=10.0,
        help="Within-segment spread of the planted behaviour: below 1 the segments show more in it.")] = 1.0,
    name: Annotated[str, typer.Option(help="Data set name to store it under.")] = "synthetic",
) -> None:
    """Generate a seeded synthetic data set with planted ground truth and an optional drift."""
    from features.synthetic import DriftSpec, SyntheticConfig, generate
    from features.pipeline import ingest_synthetic

    dropout = {}
    for pair in drift_dropout or []:
        category, _, factor = pair.partition("=")
        try:
            dropout[category] = float(factor)
        except ValueError:
            raise typer.BadParameter(f"{pair!r}: expected CATEGORY=FACTOR, e.g. books=3",
                                     param_hint="--drift-dropout") from None
    from pydantic import ValidationError

    try:
        config = SyntheticConfig(
            customers=customers, start=start, days=days, seed=seed, events=events, segment_spread=segment_spread,
            drift=DriftSpec(start=drift_start, price=drift_price, activity=drift_activity, mix=drift_mix,
                            dropout=dropout))
    except ValidationError as exc:  # the knobs' own checks (e.g. an unknown category): a usage error, not a crash
        first = exc.errors()[0]
        raise typer.BadParameter(first["msg"].removeprefix("Value error, "),
                                 param_hint="--drift-" + str(first["loc"][0]) if first["loc"] else None) from None
    started = time.perf_counter()
    with console.status(f"generating {customers:,} customers"):
        data = generate(config)
    report = ingest_synthetic(ctx.obj, name, data)
    console.print(ingest_table([report]))
    log.info("synthetic data set %r written to %s in %.1fs (ground truth: truth.parquet)", name,
             ctx.obj.dataset_dir(name), time.perf_counter() - started)


# --- features --------------------------------------------------------------------------------------------------
def _engine(value: str) -> str:
    if value not in ("duckdb", "spark"):
        raise typer.BadParameter(f"{value!r} is not an engine: choose duckdb or spark")
    return value


EngineOption = Annotated[str, typer.Option(
    callback=_engine, metavar="duckdb|spark",
    help="Where the feature definitions run: DuckDB in process, or Spark (PERSONALIZE_SPARK_MASTER, default "
         "local[*]; needs the spark extra and Java 17+).")]

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
    engine: EngineOption = "duckdb",
) -> None:
    """Build the point-in-time training frame (features + labels) of a data set."""
    import pandas as pd

    from features.pipeline import build_training_frame

    summary = build_training_frame(ctx.obj, dataset, horizon, cutoffs, step, categories,
                                   [pd.Timestamp(a) for a in as_of] if as_of else None, engine)
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
    as_of: Annotated[datetime | None, typer.Option(help="Point in time (default: as `materialize`, the day after "
                                                         "the data's last row).")] = None,
) -> None:
    """Print one customer's features at a point in time: the online path over the same definitions (by default
    the values `materialize` puts in the online store, every category's share included)."""
    import pandas as pd

    from features.store import FeatureStore
    from serving.online import default_as_of

    settings: Settings = ctx.obj
    store = FeatureStore(settings.dataset_dir(dataset))
    when = pd.Timestamp(as_of) if as_of else default_as_of(store)
    values = store.features_for(customer_id, when, store.every_category(when))
    console.print_json(json.dumps(values, default=str))


# --- tune ------------------------------------------------------------------------------------------------------
def _one_of(what: str, *values: str) -> Callable[[str | None], str | None]:
    """An option callback accepting only ``values`` (and no value), naming them when it refuses one."""
    def check(value: str | None) -> str | None:
        if value is not None and value not in values:
            raise typer.BadParameter(f"{value!r} is not {what}: choose {', '.join(values[:-1])} or {values[-1]}")
        return value
    return check


Selection = Annotated[str, typer.Option(
    callback=_one_of("a selection rule", "one_se", "best"), metavar="one_se|best",
    help="Which trial wins: one_se, the simplest within one standard error of the best score; best, the highest.")]


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
    selection: Selection = "one_se",
) -> None:
    """Tune LightGBM/XGBoost on a labeled table with Optuna (pruning, early stopping, persistent study), tracked in
    MLflow as one parent run with a baseline and a nested run per trial."""
    from training.registry import connect
    from training.tracking import tracked_tune
    from training.tune import TuneConfig, split_labeled_table

    settings: Settings = ctx.obj
    connect(settings.tracking_uri)  # reachable, and its tables created by one worker of several starting at once
    split = split_labeled_table(settings.dataset_dir(dataset), valid_fraction, seed)
    try:
        config = TuneConfig(trials=trials, timeout_s=timeout, seed=seed, selection=selection,
                            **({"families": tuple(family)} if family else {}))
    except ValueError as exc:
        raise option_error(exc, {"timeout_s": "--timeout", "families": "--family"}) from None
    name = study or f"{dataset}-seed{seed}"
    storage = settings.optuna_storage_url
    settings.home.mkdir(parents=True, exist_ok=True)
    progress, on_trial = _trial_progress(trials)
    with progress:
        result, run_id = tracked_tune(split, config, storage, name, settings.tracking_uri, f"tune-{dataset}",
                                      settings.artifact_root, on_trial, tags={"dataset": dataset})
    table = Table(title=f"study {name}")
    scored = f"{config.cv_folds}-fold CV ROC-AUC" if config.cv_folds else "valid ROC-AUC"
    for col in ("chosen family", scored, "holdout ROC-AUC", "baseline ROC-AUC", "boosting rounds", "trials (pruned)"):
        table.add_column(col, justify="right")
    pruned = sum(t.state.name == "PRUNED" for t in result.study.trials)
    holdout = "-" if result.holdout_auc is None else f"{result.holdout_auc:.4f}"
    table.add_row(result.family, f"{result.valid_auc:.4f}", holdout, f"{result.baseline_auc:.4f}", str(result.rounds),
                  f"{_trials_run(result.study)} ({pruned})")
    console.print(table)
    if note := _one_se_note(result):
        console.print(f"trial {result.trial} chosen ({note}); --selection best takes the highest", highlight=False)
    console.print(f"study stored in {redact(storage)}; MLflow parent run {run_id} in "
                  f"{redact(settings.tracking_uri)} (experiment tune-{dataset})", highlight=False, soft_wrap=True)


# --- train, promote, roll back ------------------------------------------------------------------------------------
def _threshold_policy(text: str):
    """f1 | fbeta:B | fixed:P | value:TP_VALUE,FP_COST[,FN_COST]."""
    from training.evaluate import ExpectedValueThreshold, FBetaThreshold, FixedThreshold

    kind, _, arg = text.partition(":")
    try:
        if kind == "f1" and not arg:
            return FBetaThreshold(beta=1.0)
        if kind == "fbeta":
            return FBetaThreshold(beta=float(arg))
        if kind == "fixed":
            return FixedThreshold(value=float(arg))
        if kind == "value":
            parts = [float(x) for x in arg.split(",")]
            return ExpectedValueThreshold(value_tp=parts[0], cost_fp=parts[1],
                                          cost_fn=parts[2] if len(parts) > 2 else 0.0)
    except (ValueError, IndexError):
        pass
    raise PersonalizeError(f"--threshold {text!r}: use f1, fbeta:B, fixed:P (e.g. fixed:0.7) or "
                           "value:TP_VALUE,FP_COST[,FN_COST]")


def _dataset_from_table(settings: Settings, dataset: str, label: str | None, positive: str | None,
                        id_column: str | None, time_column: str | None, drop: list[str] | None = None,
                        sep: str | None = None, time_format: str | None = None,
                        dataset_name: str | None = None) -> str:
    """A data set name; a CSV/Parquet file or a YAML ingest config is ingested first (bring your own data), as
    ``dataset_name`` or the file's stem."""
    from features.definitions import slug
    from features.labeled import LabeledTableSpec, load_labeled
    from features.pipeline import ingest_config, ingest_labeled, load_ingest_config, stored_source

    path = Path(dataset)
    if looks_like_file(dataset) and not path.exists():
        raise PersonalizeError(f"no such file: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        report = ingest_config(settings, load_ingest_config(path), _now())
        console.print(ingest_table([report]))
        print_columns(report)
        return report.dataset
    if not path.is_file():
        return dataset
    if not (label and positive):
        raise PersonalizeError(f"{path}: a table trains with --label COLUMN and --positive VALUE (the label value "
                               "that means a positive)")
    from features.loaders import CsvOptions

    spec = LabeledTableSpec(path=path, label_column=label, positive=positive, id_column=id_column,
                            time_column=time_column, timestamp_format=time_format, drop_columns=tuple(drop or ()),
                            csv=CsvOptions(sep=sep) if sep else CsvOptions())
    name = dataset_name or slug(path.name.split(".")[0])
    table = load_labeled(spec)
    before = stored_source(settings, name)
    if settings.dataset_dir(name).exists() and before != str(path.resolve()):
        held = f"held {before}" if before else "was ingested before"
        console.print(f"[yellow]data set {name!r} {held}[/]: this file replaces it, and models trained on the "
                      "earlier table will read this one's rows when scored without --table (--dataset-name NAME "
                      "keeps both)", highlight=False, soft_wrap=True)
    report = ingest_labeled(settings, name, table)
    console.print(ingest_table([report]))
    print_columns(report)
    return name


def _trial_progress(total: int | None):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("trial {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("best trial ROC-AUC {task.fields[best]}"), TimeElapsedColumn(), console=console)
    task = progress.add_task("tune", total=total, best="-")

    def on_trial(study, trial) -> None:
        best = f"{study.best_value:.4f}" if any(t.value is not None for t in study.trials) else "-"
        progress.update(task, advance=1, best=best)

    return progress, on_trial


Trials = Annotated[int | None, typer.Option(min=1, help="Tuning trials (with --timeout: whichever ends first).")]
Timeout = Annotated[float | None, typer.Option(min=1, help="Tuning wall-time budget in seconds.")]
Seed = Annotated[int, typer.Option(help="Seed of the sampler and the boosters.")]
TrainDataset = Annotated[str, typer.Argument(
    help="An ingested data set, or a CSV/Parquet labeled table (with --label/--positive), or a YAML ingest config.")]


def _trials_run(study: Any) -> int:
    """The study's trials that ran (complete or pruned): not those queued and never run, nor failed ones."""
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)


def _one_se_note(tuned: Any) -> str | None:
    """Why a simpler trial than the best-scoring one was chosen (the one_se rule); None when the best was."""
    if tuned.top_auc is not None and tuned.top_auc > tuned.valid_auc:
        return f"one_se: the simplest within one standard error of the best, {tuned.top_auc:.4f}"
    return None


def _train_classifier(ctx: typer.Context, task: str, dataset: str, trials: int | None, timeout: float | None,
                      family: list[str] | None, selection: str, seed: int, threshold: str, calibration: str,
                      horizon: int, fairness_attribute: str | None, study: str | None, label: str | None,
                      positive: str | None, id_column: str | None, time_column: str | None, name: str | None,
                      drop: list[str] | None = None, sep: str | None = None,
                      time_format: str | None = None, dataset_name: str | None = None) -> None:
    from features.definitions import slug
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    settings: Settings = ctx.obj
    try:
        config = TrainConfig(
            tune=TuneConfig(trials=trials, timeout_s=timeout, seed=seed, selection=selection,
                            **({"families": tuple(family)} if family else {})),
            threshold=_threshold_policy(threshold), calibration=calibration, horizon_days=horizon,
            fairness_attribute=fairness_attribute)
    except ValueError as exc:
        raise option_error(exc, {"timeout_s": "--timeout", "families": "--family", "horizon_days": "--horizon"}) \
            from None
    from training.registry import connect

    connect(settings.tracking_uri)  # an unreachable store fails before anything is read or tuned
    from features.pipeline import kept_unless_done

    if dataset_name is not None and dataset_name != slug(dataset_name):
        raise PersonalizeError(f"--dataset-name {dataset_name!r}: use lower-case letters, digits and _ (e.g. "
                               f"{slug(dataset_name)!r})")
    given = Path(dataset)
    yaml_config = given.suffix.lower() in (".yaml", ".yml") and given.is_file()
    if dataset_name is not None and not (given.is_file() and not yaml_config):
        raise PersonalizeError("--dataset-name names the data set a CSV/Parquet table file is stored as; "
                               + ("a YAML config names it with `dataset:`" if yaml_config else
                                  f"{dataset!r} is not a table file"))
    if yaml_config:
        from features.pipeline import load_ingest_config

        stored_as: str | None = load_ingest_config(given).dataset
    else:
        stored_as = (dataset_name or slug(given.name.split(".")[0])) if given.is_file() else None
    # a table file replaces the data set of its name only if the model trains: a failure puts the old one back
    with kept_unless_done(settings, stored_as) if stored_as else contextlib.nullcontext():
        dataset = _dataset_from_table(settings, dataset, label, positive, id_column, time_column, drop, sep,
                                      time_format, dataset_name)
        progress, on_trial = _trial_progress(trials)
        started = time.perf_counter()
        with progress:
            outcome = train_and_register(settings, task, dataset, config, study, on_trial, name)
    t = outcome.trained
    table = Table(title=f"{task} on {dataset}: held-out test ({len(t.prepared.test):,} rows)")
    for col in ("metric", "model", "constant baseline"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for k in ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "lift_top_decile", "precision_at_k", "recall_at_k"):
        table.add_row(k, f"{t.test_metrics[k]:.4f}", f"{t.baseline_metrics[k]:.4f}")
    console.print(table)
    d = t.test_decision
    console.print(
        f"split: {t.prepared.split}\nmodel: {t.tuned.family}, {t.model.rounds} rounds, trial-{t.tuned.trial} "
        f"(of {_trials_run(t.tuned.study)}), validation AUC {t.tuned.valid_auc:.4f} "
        f"({_one_se_note(t.tuned) or 'the best'}), "
        f"trained on {t.trained_on}; "
        f"calibration {calibration} on {t.calibrated_on}: test ECE {t.test_raw_metrics['ece']:.4f} -> "
        f"{t.test_metrics['ece']:.4f}\n"
        f"decision: act when probability >= {d['threshold']:.4f} ({_policy_label(config.threshold)}); on test: "
        f"precision {d['precision']:.3f}, recall {d['recall']:.3f}, action rate {d['action_rate']:.3f}\n"
        f"top features (mean |TreeSHAP|): {', '.join(t.importance['feature'].head(5))}\n"
        + (f"test ROC-AUC by category: {', '.join(f'{c} {v:.3f}' for c, v in t.by_category_auc.items())}\n"
           if t.by_category_auc else "") +
        f"registered [bold]{outcome.model_name}[/] version {outcome.version} as challenger (run {outcome.run_id}, "
        f"{time.perf_counter() - started:.0f}s); next: personalize promote {outcome.model_name}",
        highlight=False, soft_wrap=True)


def _policy_label(policy: Any) -> str:
    """A threshold policy as `--threshold` spells it: f1, fbeta:2, fixed:0.7, value:…"""
    if policy.kind == "f_beta":
        return "f1" if policy.beta == 1 else f"fbeta:{policy.beta:g}"
    if policy.kind == "fixed":
        return f"fixed:{policy.value:g}"
    return f"value:{policy.value_tp:g},{policy.cost_fp:g},{policy.cost_fn:g}"


def _classifier_command(task: str, doc: str):
    def command(
        ctx: typer.Context,
        dataset: TrainDataset,
        trials: Trials = 30,
        timeout: Timeout = None,
        family: Annotated[list[str] | None, typer.Option(help="Model families: lightgbm, xgboost (default both).")] = None,
        selection: Selection = "one_se",
        seed: Seed = 42,
        threshold: Annotated[str, typer.Option(help="Decision threshold policy: f1, fbeta:B, fixed:P (e.g. fixed:0.7 "
                                                    "= act when probability >= 0.7), value:TP_VALUE,FP_COST[,FN_COST].")] = "f1",
        calibration: Annotated[str, typer.Option(
            help="sigmoid (Platt) or isotonic, fitted on held-out scores.")] = "sigmoid",
        horizon: Annotated[int, typer.Option(min=1, help="Label horizon in days (transaction data sets).")] = 90,
        fairness_attribute: Annotated[str | None, typer.Option(
            help="A column (labeled tables) or customer attribute reported per group and checked by the gate.")] = None,
        study: Annotated[str | None, typer.Option(help="Optuna study name (shared by processes giving the same).")] = None,
        label: Annotated[str | None, typer.Option(help="Label column of a table file.")] = None,
        positive: Annotated[str | None, typer.Option(help="The label value meaning positive (e.g. Yes).")] = None,
        id_column: Annotated[str | None, typer.Option("--id", help="Id column of a table file.")] = None,
        time_column: Annotated[str | None, typer.Option("--time", help="Time column: split out of time.")] = None,
        time_format: Annotated[str | None, typer.Option(help="strftime format of the time column (e.g. %m/%d/%Y; "
                                                             "default: ISO 8601 only).")] = None,
        drop: Annotated[list[str] | None, typer.Option(
            help="A column of a table file that must not be a feature (a leak, say); repeatable.")] = None,
        sep: Annotated[str | None, typer.Option(help="Separator of a CSV table file (default ','; '\\t' or tab for "
                                                     "tabs).")] = None,
        name: Annotated[str | None, typer.Option(help="Registered model name (default: the task, churn or propensity).")] = None,
        dataset_name: Annotated[str | None, typer.Option(
            help="The data set a table file is stored as (default: the file's name without its extension).")] = None,
    ) -> None:
        _train_classifier(ctx, task, dataset, trials, timeout, family, selection, seed, threshold, calibration, horizon,
                          fairness_attribute, study, label, positive, id_column, time_column, name, drop, sep,
                          time_format, dataset_name)

    command.__doc__ = doc
    return user_errors(command)


train_app.command("churn")(_classifier_command(
    "churn", "Churn: will the customer stop buying within the horizon? Tuned, calibrated, thresholded, registered."))
train_app.command("propensity")(_classifier_command(
    "propensity", "Propensity: will the customer buy within the horizon? Tuned, calibrated, thresholded, registered."))
train_app.command("category-propensity")(_classifier_command(
    "category_propensity", "Per-category propensity: will the customer buy in each top category within the horizon? "
    "One model, the category a feature; test ROC-AUC reported per category."))


@train_app.command("forecast")
@user_errors
def train_forecast(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="An ingested transaction data set (e.g. online_retail).")],
    measure: Annotated[str, typer.Option(help="orders, spend or units per day.")] = "orders",
    holdout_days: Annotated[int, typer.Option(min=7, help="Days held out to score the forecast.")] = 28,
    horizon_days: Annotated[int, typer.Option(min=1, help="Days to forecast after the data.")] = 28,
    holidays: Annotated[str | None, typer.Option(help="Country code of the holidays (none: no holidays).")] = "GB",
    max_series: Annotated[int, typer.Option(min=1, help="Series per grouping column, by volume.")] = 10,
) -> None:
    """Prophet forecasts of daily purchase volume per category and in total (weekly/yearly seasonality, holidays),
    scored out of time beside a seasonal-naive baseline, logged with MLflow's prophet flavor and registered."""
    from training.forecast import ForecastConfig, train_and_register

    try:
        config = ForecastConfig(measure=measure, holdout_days=holdout_days, horizon_days=horizon_days,
                                holidays_country=None if (holidays or "").lower() in ("", "none") else holidays,
                                max_series=max_series)
    except ValueError as exc:
        raise option_error(exc, {"holidays_country": "--holidays"}) from None
    with console.status(f"forecasting {dataset}"):
        result, run_id, version = train_and_register(ctx.obj, dataset, config)
    table = Table(title=f"purchase forecast of {dataset}: last {holdout_days} days held out")
    for col in ("series", "MAE", "seasonal-naive MAE", "MAPE", "seasonal-naive MAPE"):
        table.add_column(col, justify="right" if col != "series" else "left")
    for series, m in result.metrics.items():
        table.add_row(series, f"{m['mae']:.2f}", f"{m['baseline_mae']:.2f}", f"{m['mape']:.3f}",
                      f"{m['baseline_mape']:.3f}")
    o = result.overall
    table.add_row("[bold]overall", f"{o['mae']:.2f}", f"{o['baseline_mae']:.2f}", f"{o['mape']:.3f}",
                  f"{o['baseline_mape']:.3f}")
    console.print(table)
    for note in result.notes:
        log.info(note)
    console.print(f"registered [bold]purchase_forecast[/] version {version} as challenger (run {run_id}); next: "
                  "personalize promote purchase_forecast", highlight=False, soft_wrap=True)


@train_app.command("purchase-cycle")
@user_errors
def train_purchase_cycle(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="An ingested transaction data set (e.g. cdnow, online_retail).")],
    horizon: Annotated[int, typer.Option(min=7, help="Horizon H in days: purchases within H, P(purchase in H).")] = 90,
    candidates: Annotated[str, typer.Option(help="Comma-separated: bgnbd, pareto_nbd, aft, hybrid.")] = "bgnbd,aft,hybrid",
    calibration_end: Annotated[datetime | None, typer.Option(
        help="Where calibration ends (default: one horizon before the data ends; the rest is held out).")] = None,
) -> None:
    """Per-customer purchase cycle: BG/NBD (+ Gamma-Gamma), XGBoost survival:aft and a hybrid compared out of
    time; the best is registered as purchase_cycle (expected purchases, days to next, P(purchase), P(alive))."""
    from training.cycle import CycleConfig, train_and_register

    try:
        config = CycleConfig(horizon_days=horizon, candidates=tuple(c.strip() for c in candidates.split(",") if c.strip()))
    except ValueError as exc:
        raise option_error(exc, {"horizon_days": "--horizon"}) from None
    with console.status(f"purchase cycle of {dataset}: fitting candidates"):
        selection, metrics, run_id, version = train_and_register(ctx.obj, dataset, config, calibration_end)
    table = Table(title=f"purchase cycle of {dataset}: candidates on the inner validation window "
                        f"[{selection.inner_cutoff.date()}, {selection.calibration_end.date()})")
    for col in ("candidate", "RMSE", "MAE", "total ratio", "days MAE", "concordance"):
        table.add_column(col, justify="right" if col != "candidate" else "left")
    for name, m in selection.scores.items():
        table.add_row(name + (" [bold](selected)" if name == selection.winner else ""),
                      *(f"{m.get(k, float('nan')):.4f}" for k in ("rmse", "mae", "total_ratio", "days_mae", "concordance")))
    for name, why in selection.failures.items():
        table.add_row(name, "-", "-", "-", "-", f"not fitted: {why}"[:60])
    console.print(table)
    console.print(f"held out (last {horizon} days, never seen): RMSE {metrics['rmse']:.4f} (each customer's rate to "
                  f"date carried forward: {metrics['baseline_rmse']:.4f}), MAE {metrics['mae']:.4f}, "
                  f"total predicted/actual {metrics['total_ratio']:.3f}\nregistered [bold]purchase_cycle[/] version "
                  f"{version} as challenger (run {run_id}); next: personalize promote purchase_cycle",
                  highlight=False, soft_wrap=True)


ModelName = Annotated[str, typer.Argument(help="A registered model: churn, propensity, purchase_cycle, "
                                               "purchase_forecast or a name given with --name.")]


Tolerance = Annotated[float, typer.Option(min=0, help="ROC-AUC the challenger may lose (interval's low end).")]
RelativeTolerance = Annotated[float, typer.Option(min=0, help="Regressors: share of the champion's error.")]
MaxEce = Annotated[float, typer.Option(min=0, help="Largest expected calibration error allowed.")]
FairnessAttribute = Annotated[str | None, typer.Option(help="Column whose groups are compared (default: the one the "
                                                            "model was trained with).")]
MaxTprGap = Annotated[float, typer.Option(min=0, help="Largest true-positive-rate gap between groups.")]
MaxPositiveRateGap = Annotated[float, typer.Option(min=0, help="Largest positive-rate gap.")]


GateMetric = Annotated[str | None, typer.Option(
    "--metric", callback=_one_of("a gate metric", "roc_auc", "log_loss", "brier"), metavar="roc_auc|log_loss|brier",
    help="Classifiers: compare by this instead of ROC-AUC (log_loss and brier also reward calibration; "
         "--relative-tolerance and --min-gain are then shares of the champion's loss).")]
MinGain = Annotated[float | None, typer.Option(
    min=0, help="Ask for a real gain, not 'not worse': the interval's low end above this (what retraining asks).")]


def gate_config(tolerance: float, relative_tolerance: float, max_ece: float, fairness_attribute: str | None,
                max_tpr_gap: float, max_positive_rate_gap: float, metric: str | None, min_gain: float | None) -> Any:
    from training.registry import GateConfig

    return GateConfig(tolerance=tolerance, relative_tolerance=relative_tolerance, max_ece=max_ece,
                      fairness_attribute=fairness_attribute, max_tpr_gap=max_tpr_gap,
                      max_positive_rate_gap=max_positive_rate_gap, metric=metric, min_gain=min_gain)


def gate_table(model: str, report: Any) -> Table:
    table = Table(title=f"{model}: challenger v{report.challenger} vs "
                        f"{'champion v' + report.champion if report.champion else 'a constant (first version)'} "
                        f"on {report.heldout_rows:,} held-out rows")
    for col in ("check", "result", "value", "bound", "detail"):
        table.add_column(col, justify="right" if col in ("value", "bound") else "left")
    for c in report.checks:
        table.add_row(c.name, "[green]pass" if c.passed else "[red]FAIL", "-" if c.value is None else f"{c.value:.4f}",
                      "-" if c.bound is None else f"{c.bound:.4f}", c.detail)
    return table


@app.command()
@user_errors
def promote(
    ctx: typer.Context,
    model: ModelName,
    tolerance: Tolerance = 0.01,
    relative_tolerance: RelativeTolerance = 0.02,
    max_ece: MaxEce = 0.05,
    fairness_attribute: FairnessAttribute = None,
    max_tpr_gap: MaxTprGap = 0.10,
    max_positive_rate_gap: MaxPositiveRateGap = 0.10,
    metric: GateMetric = None,
    min_gain: MinGain = None,
    force: Annotated[bool, typer.Option(help="Promote even if the gate fails (needs --reason; audited).")] = False,
    reason: Annotated[str, typer.Option(help="Why: written to the audit trail.")] = "",
) -> None:
    """Run the promotion gate on the challenger and, if it passes, move `champion` to it."""
    from training.registry import connect, promote as run_gate

    settings: Settings = ctx.obj
    gate = gate_config(tolerance, relative_tolerance, max_ece, fairness_attribute, max_tpr_gap, max_positive_rate_gap,
                       metric, min_gain)
    client = connect(settings.tracking_uri)
    report = run_gate(client, model, gate, reason, force)
    console.print(gate_table(model, report))
    if report.passed or force:
        console.print(f"[bold]{model}@champion[/] -> version {report.challenger}"
                      + (" (forced)" if not report.passed else ""), highlight=False)
    else:
        console.print(f"[red]refused[/]: {model}@champion " + (f"stays at version {report.champion}"
                                                                 if report.champion else "is not set: no version "
                                                                 "has passed the gate yet"),
                      highlight=False)
        raise typer.Exit(1)


@app.command()
@user_errors
def evaluate(
    ctx: typer.Context,
    model: ModelName,
    tolerance: Tolerance = 0.01,
    relative_tolerance: RelativeTolerance = 0.02,
    max_ece: MaxEce = 0.05,
    fairness_attribute: FairnessAttribute = None,
    max_tpr_gap: MaxTprGap = 0.10,
    max_positive_rate_gap: MaxPositiveRateGap = 0.10,
    metric: GateMetric = None,
    min_gain: MinGain = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """The promotion gate's verdict on the challenger against the champion, without promoting: no alias moves and
    nothing is written to the registry (`promote` runs the same gate and acts on it)."""
    from training.registry import connect, evaluate_gate, report_dict

    settings: Settings = ctx.obj
    gate = gate_config(tolerance, relative_tolerance, max_ece, fairness_attribute, max_tpr_gap, max_positive_rate_gap,
                       metric, min_gain)
    report = evaluate_gate(connect(settings.tracking_uri), model, gate)
    if as_json:
        console.print_json(json.dumps(report_dict(report), default=str))
        return
    console.print(gate_table(model, report))
    console.print(f"verdict: {report.verdict}; `personalize promote {model}` would "
                  + (f"move {model}@champion to version {report.challenger}" if report.passed
                     else f"keep {model}@champion at version {report.champion or '(none)'}"), highlight=False)


@app.command()
@user_errors
def rollback(
    ctx: typer.Context,
    model: ModelName,
    reason: Annotated[str, typer.Option(help="Why (required): written to the audit trail.")] = "",
) -> None:
    """Return `champion` to the previous champion."""
    from training.registry import connect, rollback as run_rollback

    if not reason.strip():  # checked here too, before connecting, naming the option
        raise PersonalizeError("rollback needs --reason TEXT: why the champion goes back, for the audit trail")
    old, new = run_rollback(connect(ctx.obj.tracking_uri), model, reason)
    console.print(f"[bold]{model}@champion[/]: version {old} -> version {new}", highlight=False)


@app.command()
@user_errors
def history(ctx: typer.Context, model: ModelName) -> None:
    """The registry's audit trail of a model: registrations, gate verdicts, promotions and rollbacks."""
    from training.registry import aliases, connect, history as audit

    client = connect(ctx.obj.tracking_uri)
    entries = audit(client, model)
    table = Table(title=f"{model}: " + ", ".join(f"{a} = v{v}" if v else f"{a} = -"
                                                for a, v in aliases(client, model).items()))
    for col in ("#", "when (UTC)", "who", "action", "version", "verdict / gate", "reason"):
        table.add_column(col)
    for e in entries:
        moved = f"{e['from'] or '-'} -> {e['to']}" if "to" in e else e.get("version", "")
        gate = e.get("verdict", "")
        if e.get("gate"):
            gate += " (" + ", ".join(f"{k} {v:.3f}" for k, v in e["gate"].items()
                                     if k in ("delta", "ci_low", "ece", "tpr_gap")) + ")"
        table.add_row(str(e["seq"]), e["when"].replace("+00:00", ""), e["who"], e["action"], moved, gate,
                      e.get("reason", ""))
    console.print(table)


def require_free_port(host: str, port: int) -> None:
    """A port already taken is one line here, before a server starts only to log the clash (and, for `mlflow ui`,
    exit with 0)."""
    import socket

    from personalize.errors import ConfigError

    try:
        family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: {exc.strerror}") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: a TIME_WAIT port is free
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror} (another server? choose "
                              f"another --port)") from None


@app.command("mlflow-ui")
@user_errors
def mlflow_ui(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
) -> None:
    """Start the MLflow UI on the platform's tracking store and registry (runs, models, aliases)."""
    import os
    import sys

    settings: Settings = ctx.obj
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://", "databricks")):
        console.print(f"the tracking store is a server already: open {uri}")
        return
    require_free_port(host, port)
    args = ["mlflow", "ui", "--backend-store-uri", uri, "--default-artifact-root", settings.artifact_root,
            "--host", host, "--port", str(port), "--workers", "1"]
    console.print(" ".join(map(redact, args)), highlight=False, soft_wrap=True)
    os.execv(str(Path(sys.executable).parent / "mlflow"), args)


# --- serving ---------------------------------------------------------------------------------------------------
ClustersOption = Annotated[str, typer.Option(
    "--clusters", envvar="PERSONALIZE_CLUSTERS", help="The registered clustering model (`segments cluster --name`) "
                                                      "whose champion gives each customer's cluster.")]
SegmentsOption = Annotated[Path | None, typer.Option("--segments", envvar="PERSONALIZE_SEGMENTS", exists=True,
                                                     dir_okay=False, help="Rule segments YAML (default: the "
                                                                          "built-in features/segments.yaml).")]
CatalogOption = Annotated[Path | None, typer.Option("--catalog", envvar="PERSONALIZE_CATALOG", exists=True,
                                                    dir_okay=False, help="Placements, variants and experiments YAML "
                                                                         "(default: serving/catalog.yaml).")]


@app.command()
@user_errors
def materialize(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Ingested transaction data set whose customers are served.")],
    as_of: Annotated[datetime | None, typer.Option(help="Features as of this time (default: the day after the "
                                                         "data's last row).")] = None,
    store: Annotated[str | None, typer.Option(envvar="PERSONALIZE_ONLINE_STORE",
                                              help="Online store URL: sqlite:///path or redis://host:port/db "
                                                   "(default: SQLite under home).")] = None,
    segments: SegmentsOption = None,
    engine: EngineOption = "duckdb",
    clusters: ClustersOption = "customer_segments",
) -> None:
    """Write every customer's latest features, purchase summary and profile (consent, segments, cluster) to the
    online store the API reads."""
    from features.segments import load_segments
    from serving.online import default_url, materialize as run
    from training.registry import check_name

    settings: Settings = ctx.obj
    url = store or default_url(settings.home, dataset)
    report = run(settings.dataset_dir(dataset), url, as_of, segments=load_segments(segments),
                 tracking_uri=settings.tracking_uri, engine=engine, clusters_model=check_name(clusters))
    console.print(f"materialized [bold]{report.customers:,}[/] customers of {report.dataset} as of "
                  f"{report.as_of} ({report.feature_columns} features, {report.with_cycle:,} with a purchase "
                  f"summary) into {url} in {report.seconds:.1f}s", highlight=False, soft_wrap=True)
    console.print(f"clusters: {report.clusters}" if report.clustered else f"[yellow]no clusters:[/] {report.clusters}",
                  highlight=False, soft_wrap=True)


@app.command()
@user_errors
def score(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered model: churn, propensity (or a classifier of another name), "
                                              "or purchase_cycle.")],
    dataset: Annotated[str | None, typer.Option(help="Ingested transaction data set to score (default: the one the "
                                                     "model version was trained on).")] = None,
    as_of: Annotated[datetime | None, typer.Option(help="Features as of this time (default: after the data's "
                                                         "last row).")] = None,
    alias: Annotated[str, typer.Option(help="Which version: the alias to score with.")] = "champion",
    engine: EngineOption = "duckdb",
    table: Annotated[Path | None, typer.Option(help="A CSV/Parquet table to score instead, with the columns of the "
                                                    "labeled table the model was trained on (no label needed).")]
    = None,
    id_column: Annotated[str | None, typer.Option(
        "--id", help="Id column of --table, copied to the scores (default: the training table's, if there).")] = None,
    sep: Annotated[str, typer.Option(help="Separator of a CSV --table ('\\t' or tab for tabs).")] = ",",
    log: Annotated[bool | None, typer.Option("--log/--no-log", help="Write every score to the prediction log too, as "
                                             "the API does, so `monitor` sees batch scoring (default: yes, but not "
                                             "for a labeled table's stored training rows).")] = None,
    horizon: Annotated[int | None, typer.Option(min=1, max=730, help="purchase_cycle only: the horizon in days, "
                                                "at most 730 as /next_purchase (default: the one it was trained "
                                                "for).")] = None,
) -> None:
    """Score every customer of a data set (or every row of a table file) with a model's champion and write the
    scores to Parquet (and to the prediction log); purchase_cycle writes every customer's next-purchase answers."""
    from serving.batch import score_dataset, score_table
    from serving.predlog import load_salt
    from training.registry import check_name, connect

    settings: Settings = ctx.obj
    client = connect(settings.tracking_uri)
    version = _model_version(client, check_name(model), alias)
    kind = _version_kind(client, version)
    if kind == "forecast":
        raise PersonalizeError(f"{model} is a forecaster: `/forecast` answers its series (its held-out forecasts are "
                               "in its training run); `score` covers classifiers and the purchase cycle")
    if kind == "cycle":
        return _score_cycle(settings, client, model, dataset or _trained_on(client, version), as_of, alias, horizon,
                            table, engine, log)
    if horizon is not None:
        raise PersonalizeError("--horizon is for a purchase-cycle model; a classifier's horizon is the one it was "
                               "trained for")
    if table is None:
        trained_on = _trained_on(client, version)
        if dataset is None:
            if trained_on is None:
                raise PersonalizeError(f"{model}@{alias} does not record the data set it was trained on; give "
                                       "--dataset")
            dataset = trained_on
            console.print(f"scoring {dataset}, the data set {model}@{alias} was trained on (--dataset scores "
                          "another)", highlight=False)
        stored = settings.dataset_dir(dataset) / "table.parquet"
        if stored.exists():  # a labeled table has no transactions to build features from: its rows are the input
            if engine != "duckdb" or as_of is not None:
                raise PersonalizeError(f"{dataset} is a labeled table: its rows are scored as they are, without "
                                       "--engine or --as-of")
            console.print(f"{dataset} is a labeled table: scoring its stored rows (--table FILE scores a file of "
                          "new ones)" + ("" if log else "; not logged: they are not traffic (--log logs them)"),
                          highlight=False)
            table, log = stored, bool(log)
    log_root, salt = (settings.log_root, load_salt(settings.home)) if log is not False else (None, None)
    if table is not None:
        t = score_table(client, check_name(model), table, settings.home / "scores", alias, id_column, sep,
                        log_root, salt)
        reasons = ", ".join(f"{k} {v:,}" for k, v in t.reasons.items())
        bad = f"; quarantined {t.quarantined:,} ({reasons}) -> {t.quarantine_path}" if t.quarantined else ""
        if t.rows == 0 and t.rows_in > 0:  # a batch job must notice: an empty scores file is no success
            t.path.unlink(missing_ok=True)  # nor left for the next step of a pipeline to read
            raise PersonalizeError(f"no row of {table} was scored: all {t.rows_in:,} quarantined ({reasons}) -> "
                                   f"{t.quarantine_path}")
        console.print(f"scored [bold]{t.rows:,}[/] of {t.rows_in:,} rows with {t.model} v{t.version} in "
                      f"{t.score_s:.2f}s -> {t.path}{bad}", highlight=False, soft_wrap=True)
        if t.unseen:
            console.print("[yellow]categories the model never saw[/] (scored as missing): "
                          + ", ".join(f"{c} {n:,} row(s)" for c, n in t.unseen.items()), highlight=False,
                          soft_wrap=True)
        if t.id_column is None:
            console.print("[yellow]no id column[/] (--id COLUMN): the scores and the log cannot be matched to "
                          "outcomes or erased by customer", highlight=False)
        elif t.missing_ids or t.repeated_ids:
            console.print(f"[yellow]id column {t.id_column!r}:[/] {t.missing_ids:,} row(s) without an id, "
                          f"{t.repeated_ids:,} sharing theirs with another row: outcomes (`monitor --labels`) and "
                          "erasure treat a shared id as one customer", highlight=False, soft_wrap=True)
        _print_logged(t.logged, t.request_id, settings)
        return
    try:
        report = score_dataset(client, check_name(model), settings.dataset_dir(dataset), settings.home / "scores",
                               as_of, alias, engine, log_root=log_root, salt=salt)
    except PersonalizeError as exc:  # name the data set scored: the cause is often scoring the wrong one
        hint = (f"; {model}@{alias} was trained on {trained_on}: try --dataset {trained_on}"
                if trained_on and trained_on != dataset else "")
        raise PersonalizeError(f"scoring data set {dataset!r} with {model}@{alias}: {exc}{hint}") from None
    console.print(f"scored [bold]{report.rows:,}[/] customers with {report.model} v{report.version} (as of "
                  f"{report.as_of}): features {report.features_s:.1f}s, scoring {report.score_s:.2f}s "
                  f"({report.rows_per_s:,.0f} rows/s) -> {report.path}", highlight=False, soft_wrap=True)
    _print_logged(report.logged, report.request_id, settings)


def _refuse_per_category(client: Any, endpoint: str, name: str, alias: str) -> bool:
    """Refuse ``name@alias`` on ``endpoint`` when it is a per-category propensity model (its run's task), which the
    API does not serve; False when ``name`` has no such version."""
    try:
        version = client.get_model_version_by_alias(name, alias)
    except Exception:
        return False
    try:
        task = client.get_run(version.run_id).data.params.get("task")
    except Exception:  # a run deleted from the tracking store: loading the model will tell
        return True
    if task == "category_propensity":
        raise PersonalizeError(f"--model {endpoint}={name}: {name} is a per-category propensity model (one row per "
                               "customer and category), which the API does not serve")
    return True


def _version_kind(client: Any, version: Any) -> str:
    """classifier, cycle or forecast, from the version's training run's tags (before loading anything)."""
    try:
        tags = client.get_run(version.run_id).data.tags
    except Exception:  # a run deleted from the tracking store: loading the model will tell
        return "classifier"
    return "forecast" if tags.get("kind") == "forecast" else "cycle" if "cycle_winner" in tags else "classifier"


def _score_cycle(settings: Settings, client: Any, model: str, dataset: str | None, as_of: datetime | None,
                 alias: str, horizon: int | None, table: Path | None, engine: str, log: bool | None) -> None:
    """``score purchase_cycle``: every customer's next-purchase answers, from the summary of their purchases."""
    import pandas as pd

    from serving.batch import score_cycle

    if table is not None or engine != "duckdb" or log:
        raise PersonalizeError(f"{model} is a purchase-cycle model: it scores an ingested data set's customers "
                               "(--dataset, --as-of, --horizon), without --table, --engine spark or --log")
    if dataset is None:
        raise PersonalizeError(f"{model}@{alias} does not record the data set it was trained on; give --dataset")
    if not (settings.dataset_dir(dataset) / "transactions.parquet").exists():
        raise PersonalizeError(f"{dataset!r} has no ingested transactions to summarize (`personalize ingest`)")
    r = score_cycle(client, model, settings.dataset_dir(dataset), settings.home / "scores",
                    pd.Timestamp(as_of) if as_of is not None else None, alias, horizon)
    unscored = (f"; {r.without_history:,} customers without a purchase before then are not scored (the API answers "
                "them with its cold-start prior)" if r.without_history else "")
    console.print(f"scored [bold]{r.rows:,}[/] customers of {dataset} with {r.model} v{r.version} (as of "
                  f"{r.as_of.date()}, horizon {r.horizon_days} days) in {r.score_s:.2f}s -> {r.path}{unscored}",
                  highlight=False, soft_wrap=True)


def _model_version(client: Any, model: str, alias: str) -> Any:
    """``model@alias`` as the registry has it; no such model or alias is an error in the words scoring uses."""
    try:
        return client.get_model_version_by_alias(model, alias)
    except Exception as exc:
        raise PersonalizeError(f"no {model}@{alias} in the registry: {first_line(exc)}") from None


def _trained_on(client: Any, version: Any) -> str | None:
    """The data set a model version was trained on, as its registration recorded it (the version's ``dataset`` tag,
    else its run's ``dataset`` parameter); None when nothing records it."""
    try:
        return version.tags.get("dataset") or client.get_run(version.run_id).data.params.get("dataset") or None
    except Exception:  # a run deleted from the tracking store
        return None


def _print_logged(rows: int, request_id: str | None, settings: Settings) -> None:
    if request_id is not None:
        console.print(f"logged {rows:,} rows (endpoint batch, request {request_id}) -> {settings.log_root}",
                      highlight=False, soft_wrap=True)


ModelsOption = Annotated[list[str] | None, typer.Option(
    "--model", help="ENDPOINT=MODEL: the registered model an endpoint serves, when not its default (repeatable), "
                    "e.g. churn=churn_telco for a model trained with --name churn_telco.")]


def serve_environment(settings: Settings, dataset: str, workers: int, shadow: bool, api_key: str | None,
                      reload_s: float, store: str | None, models: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``bentoml serve serving.service:Personalization`` reads its configuration from."""
    import os

    env = dict(os.environ)
    env.update({"PERSONALIZE_HOME": str(settings.home.resolve()), "MLFLOW_TRACKING_URI": settings.tracking_uri,
                "PERSONALIZE_SERVE_DATASET": dataset, "PERSONALIZE_WORKERS": str(workers),
                "PERSONALIZE_SHADOW": "1" if shadow else "0", "PERSONALIZE_RELOAD_S": str(reload_s),
                "BENTOML_DO_NOT_TRACK": "True"})
    if api_key:
        env["PERSONALIZE_API_KEY"] = api_key
    if store:
        env["PERSONALIZE_ONLINE_STORE"] = store
    if models:
        env["PERSONALIZE_MODELS"] = ",".join(f"{k}={v}" for k, v in models.items())
    return env


@app.command()
@user_errors
def serve(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help="Customer base whose online store answers customer_id requests.")]
    = "synthetic",
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 3000,
    workers: Annotated[int, typer.Option(min=1, help="Server worker processes.")] = 1,
    shadow: Annotated[bool, typer.Option(help="Let the challenger score the same requests (logged only).")] = False,
    api_key: Annotated[str | None, typer.Option(envvar="PERSONALIZE_API_KEY",
                                                help="Require this key on scoring requests.")] = None,
    reload_s: Annotated[float, typer.Option(min=0.1, help="Seconds between registry checks (hot reload).")] = 10.0,
    store: Annotated[str | None, typer.Option(envvar="PERSONALIZE_ONLINE_STORE", help="Online store URL.")] = None,
    catalog: CatalogOption = None,
    segments: SegmentsOption = None,
    model: ModelsOption = None,
) -> None:
    """Start the BentoML personalization API on the registry's champions (Ctrl-C stops it and flushes the log)."""
    import os
    import sys

    from features.segments import check_columns
    from personalize.errors import ConfigError
    from serving.config import ENDPOINT_KINDS, endpoint_models
    from serving.api import served_segments, store_meta, unknown_rule_names
    from serving.decisions import load_catalog
    from serving.online import default_url
    from training.registry import connect, kind_of

    settings: Settings = ctx.obj
    require_free_port(host, port)
    # a bad file is a clear error here, not a server that won't start; so is a rule name that is nowhere
    url = store or default_url(settings.home, dataset)
    meta = store_meta(url, dataset)
    rules, (segment_config, _) = load_catalog(catalog), served_segments(segments, meta)
    if meta and meta.get("feature_columns"):  # a segment rule reading no stored feature would never hold
        check_columns(segment_config, meta["feature_columns"])
    unknown = unknown_rule_names(rules, segment_config, url, dataset, meta)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(f"the catalog's {unknown[0]}{more}")
    models = endpoint_models(model or [])
    client = connect(settings.tracking_uri)
    for endpoint, name in models.items():
        kind, wanted = kind_of(client, name), "classifier" if ENDPOINT_KINDS[endpoint] == "classifier" else "regressor"
        if kind != wanted:
            raise ConfigError(f"--model {endpoint}={name}: {name} is a {kind}, and /{endpoint} answers with a {wanted}")
        if not _refuse_per_category(client, endpoint, name, "champion"):
            console.print(f"[yellow]{name} has no champion[/]: /{endpoint} (and /readyz) answer 503 until one is "
                          "promoted", highlight=False)
    env = serve_environment(settings, dataset, workers, shadow, api_key, reload_s, store, models)
    for name, path in (("PERSONALIZE_CATALOG", catalog), ("PERSONALIZE_SEGMENTS", segments)):
        if path is not None:
            env[name] = str(path.resolve())
    args = ["bentoml", "serve", "serving.service:Personalization", "--host", host, "--port", str(port)]
    console.print(f"serving on http://{host}:{port} (API docs: /, readiness: /readyz, status: /status)",
                  highlight=False)
    os.execve(str(Path(sys.executable).parent / "bentoml"), args, env)


# --- bento -------------------------------------------------------------------------------------------------------
bento_app = typer.Typer(help="Package the API with its champions as a Bento (then `bentoml containerize`).",
                        no_args_is_help=True)
app.add_typer(bento_app, name="bento")


@bento_app.command("build")
@user_errors
def bento_build(
    ctx: typer.Context,
    models: Annotated[str | None, typer.Option(help="Comma-separated registered models to carry (default: every "
                                                    "model the API serves that has the alias).")] = None,
    alias: Annotated[str, typer.Option(help="Which version of each model: the alias to carry.")] = "champion",
    out: Annotated[Path | None, typer.Option(help="Where to write bentofile.yaml (default: <home>/bento).")] = None,
    requirements: Annotated[Path | None, typer.Option(exists=True, dir_okay=False,
                                                      help="A requirements file to use instead of pinning this "
                                                           "environment (e.g. `uv export --frozen --no-dev "
                                                           "--no-emit-project --no-hashes`).")] = None,
    build: Annotated[bool, typer.Option(help="Run `bentoml build` (--no-build: import and write the files "
                                             "only).")] = True,
    model: ModelsOption = None,
) -> None:
    """Import the champions into the BentoML model store and build a Bento that serves them without the registry
    (BENTOML_HOME chooses the store)."""
    import os

    from serving.bento import build as build_bento
    from serving.config import ENDPOINT_MODELS, endpoint_models
    from training.registry import check_name, connect

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    settings: Settings = ctx.obj
    served = endpoint_models(model or [])
    asked = [check_name(n.strip()) for n in models.split(",") if n.strip()] if models is not None else None
    if asked == []:
        raise PersonalizeError(f"--models {models!r}: name at least one registered model")
    names = list(dict.fromkeys([*(asked or {**ENDPOINT_MODELS, **served}.values()), *served.values()]))
    endpoints = {**ENDPOINT_MODELS, **served}
    unserved = [n for n in names if n not in endpoints.values()]
    if unserved and len(unserved) == len(names):
        raise PersonalizeError(f"no endpoint would serve {', '.join(unserved)}: give --model ENDPOINT=NAME (e.g. "
                               f"--model churn={unserved[0]})")
    for name in unserved:
        console.print(f"[yellow]{name} is carried but no endpoint serves it[/] (--model ENDPOINT={name} would)",
                      highlight=False)
    client = connect(settings.tracking_uri)
    for endpoint, name in served.items():
        _refuse_per_category(client, endpoint, name, alias)  # a version missing is the build's to say
    report = build_bento(client, names, out or settings.home / "bento", alias, required=models is not None,
                         requirements=requirements, run_build=build, endpoints=served)
    table = Table(title=f"models carried ({alias})")
    for col in ("model", "version", "BentoML tag", ""):
        table.add_column(col)
    for m in report.models:
        table.add_row(m.name, m.version, m.tag, "already imported" if m.reused else "imported")
    for name, why in report.missing.items():
        table.add_row(name, "-", "-", f"[yellow]left out[/]: {why}")
    console.print(table)
    console.print(f"build file: {report.bentofile}", highlight=False, soft_wrap=True)
    if report.tag:
        console.print(f"built [bold]{report.tag}[/]\n  serve:        bentoml serve {report.tag}\n"
                      f"  containerize: {report.containerize}", highlight=False, soft_wrap=True)


# --- monitoring --------------------------------------------------------------------------------------------------
MonitorConfigOption = Annotated[Path | None, typer.Option("--config", exists=True, dir_okay=False,
                                                          help="Monitoring policy YAML (thresholds, alerts, "
                                                               "webhook, retrain); default: the built-in policy.")]


def _pass_table(out: Any) -> Table:
    r = out.result
    m = r.metrics
    table = Table(title=f"{r.model} v{r.version}: {r.window['start'][:16]} .. {r.window['end'][:16]}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("reference", justify="right")
    table.add_row("predictions (warm / logged / cold start)",
                  f"{m['rows']:,} / {m['logged_rows']:,} / {m['cold_start_rows']:,}", "")
    if not m.get("judged", True):
        table.add_row("[yellow]alert rules: none could judge this window[/]", "too few rows",
                      "min_rows / min_labeled")
    drifted = m["drifted_features"]
    names = f"\n  {', '.join(drifted[:6])}{', ...' if len(drifted) > 6 else ''}" if drifted else ""
    table.add_row(f"drifted features (of {m.get('tested_features', '?')} tested){names}", f"{m['drift_share']:.0%}",
                  "")
    table.add_row("prediction drift (score)", f"{m['prediction_drift']:.3f}", "")
    table.add_row("mean probability", f"{m['mean_probability']:.3f}", f"{m['reference_mean_probability']:.3f}")
    table.add_row("estimated ROC-AUC (CBPE)", f"{m['estimated_roc_auc']:.3f}", f"{m['reference_estimated_roc_auc']:.3f}")
    if "outcomes" in m:
        o = m["outcomes"]
        skipped = ", ".join(f"{k} {v:,}" for k, v in o["skipped"].items())
        table.add_row(f"outcomes file ({o['rows_in']:,} rows{'; skipped ' + skipped if skipped else ''})",
                      f"{o['evaluated_customers']:,} customers ({o['matched_predictions']:,} predictions)", "")
    if "realized_roc_auc" in m:
        table.add_row(f"realized ROC-AUC ({m['labeled_rows']:,} labeled)", f"{m['realized_roc_auc']:.3f}",
                      f"{m['reference_roc_auc']:.3f}")
    elif m.get("labeled_rows"):
        table.add_row(f"realized ROC-AUC ({m['labeled_rows']:,} labeled)", "too few (or one class)", "")
    for a in r.alerts:
        table.add_row(f"[red]ALERT {a.severity}[/] {a.rule}{' (suppressed: cooldown)' if a.suppressed else ''}",
                      f"{a.value:.3f}", f"{a.bound:.3f}")
    return table


@app.command()
@user_errors
def monitor(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered classifier to monitor: churn or propensity.")],
    window: Annotated[float | None, typer.Option(help="Window length in days (default: the policy's).")] = None,
    end: Annotated[datetime | None, typer.Option(help="Window end, UTC (default: now).")] = None,
    version: Annotated[str | None, typer.Option(help="Monitor this version (default: the champion).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Data set the delayed labels come from (default: the "
                                                     "model's training data set).")] = None,
    config: MonitorConfigOption = None,
    retrain: Annotated[bool, typer.Option("--retrain/--no-retrain",
                                          help="Retrain when the policy says it is due.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the pass as JSON.")] = False,
    labels: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="A CSV/Parquet file of known outcomes (an id and a label column) that "
                                          "labels the window's predictions: realized performance of a model "
                                          "trained on a labeled table.")] = None,
    labels_id: Annotated[str | None, typer.Option(help="Id column of --labels (default: the training table's, "
                                                       "else customer_id).")] = None,
    labels_column: Annotated[str | None, typer.Option(help="Label column of --labels (default: the training "
                                                           "table's).")] = None,
    positive: Annotated[str | None, typer.Option(help="The label value that means positive (default: the "
                                                      "training table's).")] = None,
    sep: Annotated[str, typer.Option(help="Separator of a CSV --labels file.")] = ",",
) -> None:
    """Compare a window of the prediction log with the model's reference (Evidently), estimate performance before
    labels arrive (CBPE), measure it where they have (or from --labels), raise alerts and, with --retrain, retrain
    when due."""
    from monitoring.config import load_config
    from monitoring.data import OutcomesFile
    from monitoring.schedule import step
    from training.registry import check_name, connect

    settings: Settings = ctx.obj
    policy = load_config(config)
    if window is not None:
        if not window > 0:  # also NaN
            raise PersonalizeError(f"--window {window:g}: a window is a positive number of days")
        policy = policy.model_copy(update={"window_days": window})
    if labels is None and (labels_id or labels_column or positive):
        raise PersonalizeError("--labels-id, --labels-column and --positive describe a --labels file: give it too")
    outcomes = None if labels is None else OutcomesFile(labels, labels_id, labels_column, positive, sep)
    client = connect(settings.tracking_uri)
    if version:
        from monitoring.job import run_pass, window_bounds

        start, stop = window_bounds(end, policy.window_days)
        result = run_pass(settings, client, check_name(model), start, stop, policy, version=version, dataset=dataset,
                          outcomes=outcomes)
        from monitoring.schedule import StepResult

        out = StepResult(model, result, False, "a version other than the champion is never retrained")
    else:
        out = step(settings, client, check_name(model), end, policy, allow_retrain=retrain, dataset=dataset,
                   outcomes=outcomes)
    if as_json:
        console.print_json(json.dumps(out.to_dict(), default=str))
        return
    console.print(_pass_table(out))
    skipped = out.result.window["skipped_segments"]
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable log segment(s):[/] " + "; ".join(skipped),
                      highlight=False, soft_wrap=True)
    if out.result.window["extra_columns"]:
        console.print("[yellow]logged columns the reference lacks (not compared):[/] "
                      + ", ".join(out.result.window["extra_columns"]), highlight=False, soft_wrap=True)
    m = out.result.metrics
    outcomes = m.get("outcomes")
    if outcomes and outcomes["rows_in"] and not outcomes["matched_predictions"]:
        console.print("[yellow]no id of the outcomes file matches a prediction in the window:[/] check that "
                      "--labels-id is the file's id column and that the window holds the scored customers",
                      highlight=False, soft_wrap=True)
    if m.get("skipped_features"):
        console.print("[yellow]features not tested for drift:[/] "
                      + ", ".join(f"{c} ({why})" for c, why in m["skipped_features"].items()),
                      highlight=False, soft_wrap=True)
    if m.get("clipped_values"):
        console.print("[yellow]values beyond ±1e150 clipped before the drift report:[/] "
                      + ", ".join(f"{c} {n:,}" for c, n in m["clipped_values"].items()),
                      highlight=False, soft_wrap=True)
    html = out.result.persisted.get("html", {})
    console.print("reports: " + ", ".join(html.values()) + f"; MLflow run {out.result.persisted.get('mlflow_run_id')}",
                  highlight=False, soft_wrap=True)
    console.print(f"retrain: {'due' if out.due else 'not due'} ({out.why})", highlight=False)
    if out.retrained:
        r = out.retrained
        console.print(f"retrained: challenger v{r.challenger}, gate {r.verdict}; champion v{r.champion_before} -> "
                      f"v{r.champion_after}", highlight=False)


log_app = typer.Typer(help="Upkeep of the prediction log: what it holds, compaction, retention.", no_args_is_help=True)
app.add_typer(log_app, name="log")


@log_app.command("status")
@user_errors
def log_status_command(ctx: typer.Context) -> None:
    """Segments, rows and size of the prediction log per day (from the Parquet footers)."""
    from serving.predlog import log_status

    settings: Settings = ctx.obj
    days = log_status(settings.log_root)
    table = Table(title=f"prediction log: {settings.log_root}")
    for col in ("day", "segments", "rows", "MB"):
        table.add_column(col, justify="right" if col != "day" else "left")
    for d in days:
        table.add_row(d["day"], f"{d['segments']:,}" + (f" ({d['unreadable']} unreadable)" if d["unreadable"] else ""),
                      f"{d['rows']:,}", f"{d['bytes'] / 1e6:.1f}")
    table.add_row("total", f"{sum(d['segments'] for d in days):,}", f"{sum(d['rows'] for d in days):,}",
                  f"{sum(d['bytes'] for d in days) / 1e6:.1f}", style="bold")
    console.print(table)


@log_app.command("compact")
@user_errors
def log_compact_command(
    ctx: typer.Context,
    before: Annotated[datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Compact the days before this one "
                                                    "(default: today, UTC, which is still being written).")] = None,
    max_rows: Annotated[int, typer.Option(min=1, help="Rows per merged file.")] = 1_000_000,
) -> None:
    """Merge each past day's segments into one file (per --max-rows rows): the same rows, far fewer files to open.
    Safe beside a running server; run it between monitoring passes (`schedule` does, before each round)."""
    from serving.predlog import compact

    settings: Settings = ctx.obj
    done = compact(settings.log_root, before.strftime("%Y-%m-%d") if before else None, max_rows)
    console.print(f"compacted {done['days']} day(s): {done['segments_in']:,} segments -> {done['files_out']:,} "
                  f"file(s), {done['rows']:,} rows" + (f"; {done['unreadable']} unreadable segment(s) left as they "
                                                       "are" if done["unreadable"] else ""), highlight=False)


@log_app.command("prune")
@user_errors
def log_prune_command(
    ctx: typer.Context,
    keep_days: Annotated[float, typer.Option(help="Keep this many days (> 0); remove the days wholly older.")],
    dry_run: Annotated[bool, typer.Option(help="Say what would be removed, remove nothing.")] = False,
) -> None:
    """Retention: remove the prediction log's days older than --keep-days. Keep at least a monitoring window plus
    the longest label horizon, or realized performance has nothing to join."""
    from serving.predlog import prune

    settings: Settings = ctx.obj
    if not keep_days > 0:  # as the policy's log.keep_days: any positive length, 0.5 is half a day (NaN is none)
        raise PersonalizeError(f"--keep-days {keep_days:g}: keep a positive number of days")
    done = prune(settings.log_root, keep_days, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {done['days']} day(s) through {done['through']}: {done['segments']:,} segments, "
                  f"{done['rows']:,} rows", highlight=False)


@app.command("replay")
@user_errors
def replay_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered classifier whose champion scores the traffic.")],
    dataset: Annotated[str | None, typer.Option(help="Data set whose customers are replayed (default: the "
                                                     "champion's training data set).")] = None,
    sample: Annotated[int, typer.Option(min=1, help="Customers replayed (a seeded sample).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
) -> None:
    """Simulated traffic: a seeded sample of a data set's customers, with their features at the champion's reference
    moment (a stationary stream), scored by the champion and written to the prediction log as the API logs requests,
    stamped now, so `monitor` has a window to read where no API serves."""
    from monitoring.data import load_reference
    from monitoring.replay import replay
    from serving.predlog import load_salt
    from training.registry import check_name, connect

    settings: Settings = ctx.obj
    client = connect(settings.tracking_uri)
    name = check_name(model)
    try:
        version = str(client.get_model_version_by_alias(name, "champion").version)
    except Exception:
        raise PersonalizeError(f"{name} has no champion to replay traffic through (promote one first)") from None
    reference = load_reference(client, name, version)
    source, stamp = dataset or reference.dataset, _now()
    written = replay(client, name, settings.dataset_dir(source), settings.log_root, [stamp], load_salt(settings.home),
                     sample=sample, seed=seed, as_of=reference.moment)
    console.print(f"replayed {sum(written.values()):,} predictions of {name} v{version} on {source} (features as of "
                  f"{reference.moment}) into {settings.log_root}, stamped {stamp}", highlight=False, soft_wrap=True)


@app.command("retrain")
@user_errors
def retrain_command(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Registered classifier to retrain like its champion.")],
    reason: Annotated[str, typer.Option(help="Why (written to the audit trail).")] = "by hand",
    trials: Annotated[int | None, typer.Option(min=1, help="Tuning budget (default: the policy's).")] = None,
    config: MonitorConfigOption = None,
) -> None:
    """Fresh features on the data as it is now, a warm-started study, register as challenger, then the gate (which
    asks for a real gain): champion moves only if it passes."""
    from monitoring.config import load_config
    from monitoring.retrain import retrain
    from training.registry import check_name, connect

    settings: Settings = ctx.obj
    policy = load_config(config).retrain
    if trials:
        policy = policy.model_copy(update={"trials": trials})
    out = retrain(settings, connect(settings.tracking_uri), check_name(model), policy, reason)
    console.print(f"{model}: challenger v{out.challenger}, gate {out.verdict}; champion v{out.champion_before} -> "
                  f"v{out.champion_after}", highlight=False, soft_wrap=True)
    if not out.promoted:
        raise typer.Exit(1)


@app.command("schedule")
@user_errors
def schedule_command(
    ctx: typer.Context,
    models: Annotated[list[str], typer.Argument(help="Models to watch.")] = None,  # type: ignore[assignment]
    every: Annotated[float, typer.Option(min=1, help="Seconds between two passes.")] = 3600.0,
    iterations: Annotated[int | None, typer.Option(min=1, help="Stop after this many rounds (default: never).")] = None,
    retrain: Annotated[bool, typer.Option("--retrain/--no-retrain", help="Retrain when due.")] = True,
    config: MonitorConfigOption = None,
) -> None:
    """Monitor (and retrain when due) every interval, for people without an orchestrator. Ctrl-C (or SIGTERM) stops
    it after the pass under way; a second one at once."""
    import os
    import signal
    import sys
    import threading

    from monitoring.config import load_config
    from monitoring.schedule import monitored_models, schedule
    from training.registry import check_name, connect

    settings: Settings = ctx.obj
    client = connect(settings.tracking_uri)
    names = [check_name(m) for m in models] if models else monitored_models(client)
    if not names:
        raise PersonalizeError("no registered classifier has a champion yet: promote one, or name the models")

    def report(out: Any) -> None:
        if not out.error:  # a failed pass is logged as an error by the loop
            console.print(_pass_table(out))
            console.print(f"retrain: {'due' if out.due else 'not due'} ({out.why})", highlight=False)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            console.print("stopped at once", highlight=False)
            sys.stdout.flush()
            os._exit(130)
        stop.set()
        console.print(f"{signal.Signals(signum).name}: stopping (after the pass under way, if one is; again to stop "
                      "at once)", highlight=False)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    console.print(f"watching {', '.join(names)} every {every:,.0f} s (Ctrl-C stops after the pass under way)",
                  highlight=False)
    try:
        done = schedule(settings, client, names, load_config(config), every, iterations, retrain, on_step=report,
                        stop=stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    console.print(f"{'stopped' if done.stopped else 'done'} after {done.rounds} round(s): {done.passes} pass(es), "
                  f"{done.failed} failed, {done.retrained} retrain(s)", highlight=False)
    if done.failed and iterations:
        raise typer.Exit(1)


@app.command()
def ui(
    ctx: typer.Context,
    evidently_port: Annotated[int, typer.Option(help="Port of the Evidently UI.")] = 8000,
    mlflow_port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
) -> None:
    """Start the Evidently UI (the monitoring workspace) and the MLflow UI on loopback; Ctrl-C stops both."""
    import signal
    import subprocess
    import sys

    settings: Settings = ctx.obj
    bin_dir = Path(sys.executable).parent
    settings.evidently_workspace.mkdir(parents=True, exist_ok=True)
    # each UI in its own session: the terminal's Ctrl-C reaches this process only, which stops them with SIGTERM
    # (a Ctrl-C of their own made MLflow's workers print their KeyboardInterrupt tracebacks)
    procs = [subprocess.Popen([str(bin_dir / "evidently"), "ui", "--workspace", str(settings.evidently_workspace),
                               "--host", "127.0.0.1", "--port", str(evidently_port)], start_new_session=True)]
    if not settings.tracking_uri.startswith(("http://", "https://", "databricks")):
        procs.append(subprocess.Popen([str(bin_dir / "mlflow"), "ui", "--backend-store-uri", settings.tracking_uri,
                                       "--default-artifact-root", settings.artifact_root, "--host", "127.0.0.1",
                                       "--port", str(mlflow_port), "--workers", "1"], start_new_session=True))
        mlflow_at = f"http://127.0.0.1:{mlflow_port}"
    else:
        mlflow_at = settings.tracking_uri
    console.print(f"Evidently UI: http://127.0.0.1:{evidently_port}   MLflow UI: {mlflow_at}   (Ctrl-C stops)",
                  highlight=False)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM (a service manager's stop) or SIGHUP (the terminal closed): as Ctrl-C

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_term)
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # stopping already: another signal must not cut it
            signal.signal(s, signal.SIG_IGN)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


# --- demo ------------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def demo(
    ctx: typer.Context,
    data_root: DataRoot = Path("../shared/data"),
    customers: Annotated[int, typer.Option(min=100, help="Synthetic customers.")] = 3_000,
    trials: Annotated[int, typer.Option(min=1, help="Tuning trials per model.")] = 10,
    spark: Annotated[bool, typer.Option(help="Also batch-score on Spark (local mode) and compare with DuckDB.")] = True,
) -> None:
    """Run everything that exists end to end on the embedded defaults and print a summary."""
    from personalize.demo import run_demo

    run_demo(ctx.obj, data_root, customers, console, trials, spark)


# --- segments, experiments, erasure ------------------------------------------------------------------------------
def _segment_frame(settings: Settings, dataset: str, as_of: datetime | None):
    """Every customer's features at ``as_of`` (default: after the data's last row), as the online store has them."""
    import pandas as pd

    from features.store import FeatureStore
    from serving.online import default_as_of

    store = FeatureStore(settings.dataset_dir(dataset))
    when = pd.Timestamp(as_of) if as_of is not None else default_as_of(store)
    return store.offline([when], store.every_category(when)), when


@segments_app.command("rules")
@user_errors
def segments_rules(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Ingested transaction data set.")],
    as_of: Annotated[datetime | None, typer.Option(help="Features as of this time (default: after the data's "
                                                         "last row).")] = None,
    segments: SegmentsOption = None,
) -> None:
    """How many customers each rule segment holds (members overlap; primary segments partition the base)."""
    from features.segments import assign, check_columns, counts, load_segments

    settings: Settings = ctx.obj
    config = load_segments(segments)
    frame, when = _segment_frame(settings, dataset, as_of)
    check_columns(config, frame.columns)
    out = counts(assign(frame, config), config)
    table = Table(title=f"rule segments of {dataset} as of {when} ({out['rows']:,} customers)")
    for column in ("segment", "rule", "members", "primary"):
        table.add_column(column, justify="right" if column in ("members", "primary") else "left")
    for seg in config.segments:
        table.add_row(seg.name, seg.rule, f"{out['members'][seg.name]:,}", f"{out['primary'].get(seg.name, 0):,}")
    table.add_row(config.fallback, "(none of the above)", "-", f"{out['primary'].get(config.fallback, 0):,}")
    console.print(table)


@segments_app.command("cluster")
@user_errors
def segments_cluster(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="Ingested transaction data set.")],
    method: Annotated[str, typer.Option(help="kmeans (k by silhouette) or gmm (k by BIC).")] = "kmeans",
    k: Annotated[int | None, typer.Option(min=2, help="Number of clusters (default: chosen).")] = None,
    k_min: Annotated[int, typer.Option(min=2, help="Smallest k tried.")] = 2,
    k_max: Annotated[int, typer.Option(min=2, help="Largest k tried.")] = 8,
    as_of: Annotated[datetime | None, typer.Option(help="Features as of this time (default: after the data's "
                                                         "last row).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    promote: Annotated[bool, typer.Option("--promote", help="Also make the new version the champion (clustering "
                                                            "has no gate); the online store uses the champion.")]
    = False,
    name: Annotated[str, typer.Option(help="Registered model name: one per data set or purpose (`materialize "
                                           "--clusters NAME` reads it).")] = "customer_segments",
) -> None:
    """Cluster customers on their behaviour, describe each cluster, and register the model (customer_segments)."""
    from features.clustering import CustomerClusters, cluster_frame, log_clusters
    from training.registry import check_name

    settings: Settings = ctx.obj
    check_name(name)  # before the fit, not after it
    frame = cluster_frame(settings.dataset_dir(dataset), as_of)
    model = CustomerClusters(method=method, k=k, k_range=(k_min, k_max), seed=seed).fit(frame)
    run_id, version = log_clusters(model, frame, settings.tracking_uri, name=name, dataset=dataset,
                                   artifact_root=settings.artifact_root, promote=promote)
    scores = ", ".join(f"k={kk}: {v:.3f}" for kk, v in sorted(model.scores_.items()))
    table = Table(title=f"{model.k_} {method} clusters of {len(frame):,} customers of {dataset} "
                        f"({'silhouette' if method == 'kmeans' else 'BIC'}: {scores})")
    for column in ("cluster", "share", "suggested name", "sets it apart (z vs all)"):
        table.add_column(column)
    for c in model.describe():
        apart = ", ".join(f"{f['feature']} {f['z']:+.1f}" for f in c["features"][:3])
        table.add_row(str(c["cluster"]), f"{100 * c['share']:.1f}%", c["name"], apart)
    console.print(table)
    alias = "champion and challenger" if promote else "challenger"
    then = (f"run personalize materialize{'' if name == 'customer_segments' else f' --clusters {name}'} to put "
            "clusters in the online store" if promote else "promote with --promote")
    console.print(f"registered {name} v{version} ({alias}; MLflow run {run_id}); {then}",
                  highlight=False, soft_wrap=True)


@experiment_app.command("report")
@user_errors
def experiment_report(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Experiment name (from the catalog).")],
    catalog: CatalogOption = None,
    control: Annotated[str, typer.Option(help="The arm the others are compared with.")] = "holdout",
    alpha: Annotated[float, typer.Option(min=0.0001, max=0.5, help="Significance level.")] = 0.05,
    plot_to: Annotated[Path | None, typer.Option("--plot", help="Also write the plot here (a .png file; a folder, "
                                                                 "or a path without a suffix: NAME.png in it).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    log: Annotated[bool, typer.Option("--log/--no-log", help="Log the report to MLflow as a new run (--no-log: only "
                                      "print it, e.g. to look while the test runs).")] = True,
) -> None:
    """Per arm: exposed customers, conversions, uplift over the control with its confidence interval and p-value, a
    sample-ratio check; logged to MLflow (experiment ``ab-<name>``) with a plot."""
    from monitoring.experiments import analyze, log_report, plot, table_rows
    from serving.decision_store import DecisionStore
    from serving.decisions import load_catalog

    settings: Settings = ctx.obj
    rules = load_catalog(catalog)
    experiment = rules.experiment(name)
    if experiment is None:
        known = ", ".join(e.name for e in rules.experiments) or "none"
        which = str(catalog) if catalog else "the embedded catalog (serving/catalog.yaml; --catalog for yours)"
        raise PersonalizeError(f"no experiment {name!r} in {which}; it has: {known}")
    store = DecisionStore(settings.decisions_path)
    report = analyze(store.experiment_frame(name), experiment, control=control, alpha=alpha)
    if plot_to is not None:  # first: a path it cannot write is an error before anything is logged
        if plot_to.is_dir() or not plot_to.suffix:  # a folder, there or not yet
            plot_to = plot_to / f"{name}.png"
        try:
            plot(report, plot_to)
        except OSError as exc:
            raise PersonalizeError(f"--plot {plot_to}: {exc.strerror or exc}") from None
    run_id = log_report(report, settings.tracking_uri, settings.artifact_root) if log else None
    if as_json:
        console.print_json(json.dumps({**report.to_dict(), "mlflow_run_id": run_id}))
        return
    rows = table_rows(report)
    table = Table(title=f"experiment {name} on {report.placement}: {report.customers:,} customers")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    srm = "MISMATCH" if report.srm_flag else "ok"
    srm_p = "-" if report.srm_p_value is None else f"{report.srm_p_value:.3g}"
    console.print(f"sample ratio: {srm} (p = {srm_p}); {report.test}; {report.interval}", highlight=False,
                  soft_wrap=True)
    for line in [*report.warnings, *report.notes]:
        console.print(f"- {line}", highlight=False, soft_wrap=True)
    if run_id is not None:
        console.print(f"logged to MLflow run {run_id} (experiment ab-{name})", highlight=False)
    if plot_to is not None:
        console.print(f"plot -> {plot_to}", highlight=False)


@app.command()
@user_errors
def forget(
    ctx: typer.Context,
    customer_id: Annotated[str, typer.Argument(help="The customer to erase.")],
    store: Annotated[str | None, typer.Option(envvar="PERSONALIZE_ONLINE_STORE",
                                              help="Online store URL besides the SQLite ones under home.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report what would be removed; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Erase a customer from every store the platform owns (raw tables, quarantine, feature frames, online store,
    prediction log, decisions, feedback and bandit history, local MLflow held-out frames), then search them all
    again. Exit code 1 when something remains or could not be erased."""
    from personalize.erasure import forget as run

    settings: Settings = ctx.obj
    report = run(settings, customer_id, online_url=store, dry_run=dry_run)
    if as_json:
        console.print_json(json.dumps(report.to_dict(), default=str))
    else:
        table = Table(title=f"{'would remove' if dry_run else 'removed'}: {report.total:,} rows "
                            f"({report.seconds:.1f}s)")
        table.add_column("where")
        table.add_column("store")
        table.add_column("rows", justify="right")
        for where, rows in sorted(report.removed.items()):
            table.add_row(where, report.stores.get(where, ""), f"{rows:,}")
        console.print(table)
        if report.bandit_trials:
            console.print(f"{report.bandit_trials:,} impressions taken out of the bandits' posteriors")
        for item in report.not_erased:
            console.print(f"[yellow]not erased[/]: {item['store']} {item['where']}: {item['why']}", soft_wrap=True)
        for model in report.trained_models:
            console.print(f"trained on data with the customer (retrain to remove their influence): {model}",
                          highlight=False)
        if not dry_run:
            left = ", ".join(f"{k} ({v})" for k, v in report.remaining.items()) or "nothing"
            console.print(f"searched every store again: {left} remains", highlight=False)
    if not dry_run and not report.clean:
        raise typer.Exit(1)


@app.command()
def info(ctx: typer.Context) -> None:
    """Show where the platform keeps its data and which stores it uses."""
    settings: Settings = ctx.obj
    table = Table(show_header=False)
    table.add_row("home", str(settings.home.resolve()))
    table.add_row("MLflow tracking URI", redact(settings.tracking_uri))
    table.add_row("Optuna storage", redact(settings.optuna_storage_url))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
