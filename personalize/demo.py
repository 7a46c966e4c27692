"""``make demo``: everything that exists, end to end, on the embedded defaults.

Today: ingest the shared public data sets (quarantining bad rows), generate a synthetic data set with events and
planted truth, build point-in-time features and labels, tune a churn classifier on the Telco table with Optuna,
and print what came out. Later stages (registry, serving, monitoring) join the demo as they land. The last line
printed is one JSON object.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from personalize.settings import Settings

log = logging.getLogger(__name__)
FRAME_DATASETS = ("online_retail", "cdnow", "synthetic")
TUNE_DATASET, TUNE_TRIALS = "telco_churn", 10


def summary_table(reports: list[Any], frames: dict[str, Any]) -> Table:
    """One row per data set. Labeled tables show their label's rate under the task it stands for."""
    table = Table(title="personalize demo: data layer")
    for col in ("data set", "rows in", "quarantined", "customers", "features", "frame rows", "churn",
                "propensity", "purchases/H"):
        table.add_column(col, justify="left" if col == "data set" else "right")
    for report in reports:
        frame = frames.get(report.dataset)
        if report.kind == "labeled":
            extra = report.extra
            customers = report.tables["table"]["valid"]
            features = len(extra["numeric"]) + len(extra["categorical"]) + len(extra["boolean"])
            rate = f"{extra['label_rate']:.3f} ({extra['label']})"
            churn, propensity = (rate, "") if "churn" in extra["label"].lower() else ("", rate)
            table.add_row(report.dataset, f"{report.rows_in:,}", f"{report.quarantined:,}", f"{customers:,}",
                          str(features), f"{customers:,}", churn, propensity, "")
            continue
        r = frame.label_rates if frame else {}
        table.add_row(report.dataset, f"{report.rows_in:,}", f"{report.quarantined:,}",
                      f"{report.extra['customers']:,}", str(frame.feature_columns if frame else "-"),
                      f"{frame.rows:,}" if frame else "-", f"{r['churn']:.3f}" if frame else "",
                      f"{r['propensity']:.3f}" if frame else "", f"{r['purchases_in_h']:.2f}" if frame else "")
    return table


def quarantine_lines(reports: list[Any]) -> list[str]:
    lines = []
    for report in reports:
        for name, t in report.tables.items():
            if t["quarantined"]:
                reasons = ", ".join(f"{k} {v:,}" for k, v in t["reasons"].items())
                lines.append(f"{report.dataset}.{name}: {t['quarantined']:,} of {t['rows_in']:,} rows quarantined "
                             f"({reasons}) -> {t['quarantine_file']}")
    return lines


def tune_labeled(settings: Settings, dataset: str, trials: int, seed: int = 42) -> Any:
    """A fresh seeded study on an ingested labeled table (a rerun of the demo replaces it)."""
    import optuna

    from training.tracking import tracked_tune
    from training.tune import TuneConfig, split_labeled_table

    split = split_labeled_table(settings.dataset_dir(dataset), 0.2, seed)
    name = f"demo-{dataset}"
    settings.home.mkdir(parents=True, exist_ok=True)
    try:
        optuna.delete_study(study_name=name, storage=settings.optuna_storage_url)
    except KeyError:
        pass
    result, _ = tracked_tune(split, TuneConfig(trials=trials, seed=seed), settings.optuna_storage_url, name,
                             settings.tracking_uri, f"tune-{dataset}", settings.artifact_root, tags={"dataset": dataset})
    return result


def run_demo(settings: Settings, data_root: Path, customers: int, console: Console) -> dict[str, Any]:
    from features.pipeline import build_training_frame, builtin_names, ingest_builtin, ingest_synthetic
    from features.synthetic import SyntheticConfig, generate

    started = time.perf_counter()
    now = __import__("pandas").Timestamp.now(tz="UTC").tz_localize(None)
    builtins = builtin_names()
    steps = len(builtins) + 1 + len(FRAME_DATASETS) + 1
    reports, frames = [], {}
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), console=console, transient=False)
    with progress:
        task = progress.add_task("demo", total=steps)
        for name in builtins:
            progress.update(task, description=f"ingest {name}")
            reports.append(ingest_builtin(settings, name, now, data_root))
            progress.advance(task)
        progress.update(task, description=f"synthesize {customers:,} customers")
        reports.append(ingest_synthetic(settings, "synthetic", generate(SyntheticConfig(customers=customers))))
        progress.advance(task)
        for name in FRAME_DATASETS:
            progress.update(task, description=f"features + labels {name}")
            frames[name] = build_training_frame(settings, name)
            progress.advance(task)
        progress.update(task, description=f"tune {TUNE_DATASET} ({TUNE_TRIALS} trials)")
        tuned = tune_labeled(settings, TUNE_DATASET, TUNE_TRIALS)
        progress.advance(task)
        progress.update(task, description="done")

    console.print(summary_table(reports, frames))
    for line in quarantine_lines(reports):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"tuned {TUNE_DATASET}: best {tuned.family} validation ROC-AUC {tuned.valid_auc:.4f} "
                  f"(constant-score baseline {tuned.baseline_auc:.4f}) over {len(tuned.study.trials)} trials",
                  highlight=False)
    console.print(f"MLflow runs: [bold]mlflow ui --backend-store-uri {settings.tracking_uri}[/]", soft_wrap=True)
    console.print(f"data: [bold]{settings.home / 'data'}[/]  quarantine: [bold]{settings.home / 'quarantine'}[/]  "
                  f"features: [bold]{settings.home / 'features'}[/]")
    result = {
        "demo": "ok",
        "wall_s": round(time.perf_counter() - started, 1),
        "datasets": {r.dataset: {"rows_in": r.rows_in, "quarantined": r.quarantined} for r in reports},
        "frames": {k: {"rows": f.rows, "feature_version": f.feature_version} for k, f in frames.items()},
        "tuned": {TUNE_DATASET: {"family": tuned.family, "valid_auc": round(tuned.valid_auc, 4)}},
    }
    console.print(json.dumps(result), soft_wrap=True, highlight=False)
    return result
