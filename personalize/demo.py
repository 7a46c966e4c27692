"""``make demo``: everything that exists, end to end, on the embedded defaults.

Today: ingest the shared public data sets (quarantining bad rows), generate a synthetic shop with events, planted
truth and a planted change on 2025-07-01 (known, at first, only up to the change), build point-in-time features and
labels, then train and register the models and run each through
the promotion gate: churn and propensity on the synthetic data (out of time), a bring-your-own-table churn model on
Telco (checked for fairness by gender; its champion then scores Telco's CSV file as a table of new customers,
into the prediction log, and that batch is monitored against the model's reference),
Prophet purchase forecasts on Online Retail, and the purchase-cycle model on CDNOW. A rerun trains new challengers and gates them against the champions. Then the online store is
materialized, the BentoML API starts in the background, answers example requests (scores with reason codes, a
cold start, a forecast, a bad request), segments and personalization decisions (rules, a bandit, consent
withdrawn, a new visitor) with feedback, and simulated traffic on the email experiment. While it still runs, the
shop's customers before the change and six months after it are replayed through it and monitored; the alerts call
for a retrain, the gate judges it, and the server is asked until it answers with the new champion
(:mod:`personalize.demo_monitoring`). Then it stops; its prediction log must hold every scored item. The experiment
is reported (uplift, interval, p-value; into MLflow) and one customer is erased from every store. Finally every
customer is batch-scored on DuckDB and
on Spark (local mode, when pyspark and Java are there) and the two are compared. The last line printed is one JSON
object.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from personalize.settings import Settings

log = logging.getLogger(__name__)
FRAME_DATASETS = ("online_retail", "cdnow", "synthetic")
# (registered model, task, data set, fairness attribute) trained and gated by the demo
# churn and propensity learn from the synthetic data set (the shop before its change, with planted truth, as serving
# and monitoring use it); on Online Retail they are reported by bench/quality.py: a year of data starting in December
# 2010 makes tenure-like features grow past their training range by the test cutoff, and its calibration fails the
# gate.
CLASSIFIERS = (("churn", "churn", "synthetic", "age_band"), ("propensity", "propensity", "synthetic", "age_band"),
               ("churn_telco", "churn", "telco_churn", "gender"))


class TimedProgress(Progress):
    """Rich's progress bar that also times each stage of the demo: the span between two descriptions, named by the
    description up to its first " (" or ", " (``stages_s`` of the demo's JSON)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stages: dict[str, float] = {}
        self._stage: tuple[str, float] | None = None

    def update(self, task_id: Any, *, description: str | None = None, **kwargs: Any) -> None:
        if description is not None:
            now = time.perf_counter()
            if self._stage is not None:
                name, since = self._stage
                self.stages[name] = round(self.stages.get(name, 0.0) + now - since, 1)
            self._stage = (description.split(" (")[0].split(", ")[0], now) if description != "done" else None
        super().update(task_id, description=description, **kwargs)


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


@dataclass
class ModelLine:
    name: str
    dataset: str
    version: str
    metric: str
    value: float
    baseline: float
    verdict: str = ""
    champion: str | None = None


def train_models(settings: Settings, trials: int, progress: Progress, task: Any) -> list[ModelLine]:
    """Train, register and gate every demo model; a refused challenger is an outcome, not an error."""
    from training.evaluate import FixedThreshold
    from training.forecast import ForecastConfig
    from training.forecast import train_and_register as train_forecast
    from training.registry import GateConfig, aliases, connect, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    client = connect(settings.tracking_uri)
    lines = []
    for name, kind, dataset, attribute in CLASSIFIERS:
        progress.update(task, description=f"train {name} on {dataset} ({trials} trials)")
        policy = {"threshold": FixedThreshold(value=0.7)} if name == "churn" else {}  # the retention campaign rule
        config = TrainConfig(tune=TuneConfig(trials=trials), fairness_attribute=attribute, **policy)
        out = train_and_register(settings, kind, dataset, config, model_name=name)
        lines.append(ModelLine(name, dataset, out.version, "test ROC-AUC", out.trained.test_metrics["roc_auc"],
                               out.trained.baseline_metrics["roc_auc"]))
        progress.advance(task)
    progress.update(task, description="forecast online_retail purchases (Prophet)")
    result, _, version = train_forecast(settings, "online_retail", ForecastConfig())
    lines.append(ModelLine("purchase_forecast", "online_retail", version, "holdout MAE", result.overall["mae"],
                           result.overall["baseline_mae"]))
    progress.advance(task)
    progress.update(task, description="purchase cycle of cdnow (BG/NBD, survival:aft, hybrid)")
    from training.cycle import CycleConfig
    from training.cycle import train_and_register as train_cycle

    _, metrics, _, version = train_cycle(settings, "cdnow", CycleConfig())
    lines.append(ModelLine("purchase_cycle", "cdnow", version, "holdout RMSE", metrics["rmse"],
                           metrics["baseline_rmse"]))
    progress.advance(task)
    progress.update(task, description="promotion gates")
    for line in lines:
        report = promote(client, line.name, GateConfig())
        line.verdict, line.champion = report.verdict, aliases(client, line.name)["champion"]
    progress.advance(task)
    return lines


def models_table(lines: list[ModelLine]) -> Table:
    table = Table(title="personalize demo: models (registered as challenger, then gated)")
    for col in ("model", "data set", "version", "metric", "value", "baseline", "gate", "champion"):
        table.add_column(col, justify="right" if col in ("version", "value", "baseline", "champion") else "left")
    for m in lines:
        table.add_row(m.name, m.dataset, m.version, m.metric, f"{m.value:.4f}", f"{m.baseline:.4f}",
                      "[green]pass" if m.verdict == "pass" else f"[red]{m.verdict}", m.champion or "-")
    return table


def spark_parity(settings: Settings, dataset: str = "synthetic") -> dict[str, Any]:
    """Score every customer with the churn champion on DuckDB, then on Spark (local mode: the features from the
    same definitions, the model in ``mlflow.pyfunc.spark_udf``), and compare the two sets of scores."""
    import shutil

    import pandas as pd

    try:
        import pyspark  # noqa: F401
    except ImportError:
        return {"skipped": "pyspark is not installed (pip install 'personalize[spark]')"}
    if shutil.which("java") is None:
        return {"skipped": "no Java runtime on PATH"}
    from features.engines import spark_session
    from serving.batch import score_dataset
    from training.registry import connect

    client, out = connect(settings.tracking_uri), settings.home / "scores"
    try:
        client.get_model_version_by_alias("churn", "champion")
    except Exception:  # the gate refused every version: nothing to score with
        return {"skipped": "churn has no champion (the gate refused it)"}
    local = score_dataset(client, "churn", settings.dataset_dir(dataset), out)
    on_duckdb = pd.read_parquet(local.path).set_index("customer_id")["probability"]
    started = time.perf_counter()
    session = spark_session()
    try:
        spark = score_dataset(client, "churn", settings.dataset_dir(dataset), out, engine="spark")
    finally:
        session.stop()
    on_spark = pd.read_parquet(spark.path).set_index("customer_id")["probability"]
    same = on_duckdb.index.sort_values().equals(on_spark.index.sort_values())
    return {"rows": spark.rows, "same_customers": bool(same),
            "max_abs_diff": float((on_spark - on_duckdb.reindex(on_spark.index)).abs().max()) if same else None,
            "duckdb_rows_per_s": round(local.rows_per_s), "spark_rows_per_s": round(spark.rows_per_s),
            "spark_s": round(time.perf_counter() - started, 1), "scores": str(spark.path)}


def table_scoring(settings: Settings, data_root: Path) -> dict[str, Any]:
    """The bring-your-own-table model scoring a table file: Telco's CSV as shipped (its label is ignored)."""
    import pandas as pd

    from features.datasets import labeled_sources
    from monitoring.job import run_pass
    from serving.batch import score_table
    from serving.predlog import load_salt
    from training.registry import connect

    client = connect(settings.tracking_uri)
    try:
        client.get_model_version_by_alias("churn_telco", "champion")
    except Exception:  # the gate refused it: nothing to score with
        return {"skipped": "churn_telco has no champion (the gate refused it)"}
    spec, _ = labeled_sources(data_root)["telco_churn"]
    start = pd.Timestamp.now(tz="UTC")
    t = score_table(client, "churn_telco", spec.path, settings.home / "scores",  # the id: the training table's
                    log_root=settings.log_root, salt=load_salt(settings.home))
    decisions = pd.read_parquet(t.path)["decision"]
    # the window of this batch alone (a rerun's earlier batch is before it), against the model's held-out reference
    watched = run_pass(settings, client, "churn_telco", start, pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=1))
    return {"rows_in": t.rows_in, "scored": t.rows, "quarantined": t.quarantined, "version": t.version,
            "action_rate": round(float(decisions.mean()), 4), "score_s": round(t.score_s, 2), "scores": str(t.path),
            "logged": t.logged, "monitored_rows": watched.window["rows"],
            "drift_share": round(watched.metrics["drift_share"], 4),
            "prediction_drift_detected": watched.metrics["prediction_drift_detected"],
            "alerts": [a.rule for a in watched.alerts]}


def cycle_scoring(settings: Settings, dataset: str = "cdnow") -> dict[str, Any]:
    """Every customer's next-purchase answers by the purchase-cycle champion (`personalize score purchase_cycle`)."""
    import pandas as pd

    from serving.batch import score_cycle
    from training.registry import connect

    client = connect(settings.tracking_uri)
    try:
        client.get_model_version_by_alias("purchase_cycle", "champion")
    except Exception:  # the gate refused it: nothing to score with
        return {"skipped": "purchase_cycle has no champion (the gate refused it)"}
    r = score_cycle(client, "purchase_cycle", settings.dataset_dir(dataset), settings.home / "scores")
    scores = pd.read_parquet(r.path)
    return {"dataset": dataset, "version": r.version, "customers": r.rows, "horizon_days": r.horizon_days,
            "as_of": str(r.as_of.date()), "likely_buyers": int((scores["p_purchase"] >= 0.5).sum()),
            "expected_purchases": round(float(scores["expected_purchases"].sum()), 1),
            "score_s": round(r.score_s, 2), "scores": str(r.path)}


def run_demo(settings: Settings, data_root: Path, customers: int, console: Console,
             trials: int = 10, spark: bool = True) -> dict[str, Any]:
    from features.pipeline import build_training_frame, builtin_names, ingest_builtin, ingest_synthetic
    from features.synthetic import SyntheticConfig, generate, until
    from personalize.demo_monitoring import CHANGE, drift_spec, loop_lines, monitor_loop, monitoring_table

    started = time.perf_counter()
    now = __import__("pandas").Timestamp.now(tz="UTC").tz_localize(None)
    builtins = builtin_names()
    steps = len(builtins) + 1 + len(FRAME_DATASETS) + len(CLASSIFIERS) + 7
    reports, frames = [], {}
    progress = TimedProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                             TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
                             transient=False)
    with progress:
        task = progress.add_task("demo", total=steps)
        for name in builtins:
            progress.update(task, description=f"ingest {name}")
            reports.append(ingest_builtin(settings, name, now, data_root))
            progress.advance(task)
        progress.update(task, description=f"synthesize {customers:,} customers (known until {CHANGE.date()})")
        world = generate(SyntheticConfig(customers=customers, drift=drift_spec()))
        reports.append(ingest_synthetic(settings, "synthetic", until(world, CHANGE)))
        progress.advance(task)
        for name in FRAME_DATASETS:
            progress.update(task, description=f"features + labels {name}")
            frames[name] = build_training_frame(settings, name)
            progress.advance(task)
        models = train_models(settings, trials, progress, task)
        progress.update(task, description="score the Telco table file with churn_telco, monitor the batch; score "
                                          "every CDNOW customer's next purchase")
        telco = table_scoring(settings, data_root)
        cycle = cycle_scoring(settings)
        progress.advance(task)
        progress.update(task, description="the API loop: cluster customers, materialize the online store, start "
                                          "the API, send requests and decisions, run the experiment; replay traffic "
                                          "before and after the change through it, monitor (Evidently), alert, "
                                          "retrain, gate, hot-reload; stop it, forget a customer")
        from personalize.demo_serving import decisions_lines, serve_and_query, serving_table

        serving = serve_and_query(settings, lambda http, probe: monitor_loop(settings, http, world, min(trials, 5),
                                                                              probe))
        loop = serving.loop
        progress.advance(task, 2)
        progress.update(task, description="batch-score every customer on DuckDB and on Spark, compare")
        scale = spark_parity(settings) if spark else {"skipped": "--no-spark"}
        progress.update(task, description="done")

    console.print(summary_table(reports, frames))
    for line in quarantine_lines(reports):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(models_table(models))
    if "skipped" in telco:
        console.print(f"table scoring skipped: {telco['skipped']}", highlight=False)
    else:
        console.print(f"churn_telco v{telco['version']} scored {telco['scored']:,} of {telco['rows_in']:,} rows of "
                      f"Telco's CSV file (`personalize score churn_telco --table FILE`) in "
                      f"{telco['score_s']}s; {telco['action_rate']:.1%} to act on -> {telco['scores']}",
                      soft_wrap=True, highlight=False)
        console.print(f"  logged {telco['logged']:,} rows; `personalize monitor churn_telco` over them: drift share "
                      f"{telco['drift_share']:.0%}, prediction drift "
                      f"{'detected' if telco['prediction_drift_detected'] else 'none'}, alerts "
                      f"{', '.join(telco['alerts']) or 'none'}", soft_wrap=True, highlight=False)
    if "skipped" in cycle:
        console.print(f"purchase-cycle scoring skipped: {cycle['skipped']}", highlight=False)
    else:
        console.print(f"purchase_cycle v{cycle['version']} scored {cycle['customers']:,} {cycle['dataset']} customers "
                      f"(`personalize score purchase_cycle`) as of {cycle['as_of']}: "
                      f"{cycle['expected_purchases']:,.0f} purchases expected in {cycle['horizon_days']} days, "
                      f"{cycle['likely_buyers']:,} customers more likely than not to buy -> {cycle['scores']}",
                      soft_wrap=True, highlight=False)
    console.print(serving_table(serving))
    console.print(f"the API answered {serving.requests_ok} of {len(serving.answers)} requests; {serving.served_items} "
                  f"scored items, {serving.logged_rows} rows in the prediction log ({settings.home / 'predictions'}); "
                  "purchase_cycle is the CDNOW model answering for synthetic customers", soft_wrap=True,
                  highlight=False)
    for line in decisions_lines(serving):
        console.print(line, soft_wrap=True, highlight=False)
    if loop.windows:
        console.print(monitoring_table(loop))
    for line in loop_lines(loop):
        console.print(line, soft_wrap=True, highlight=False)
    if "skipped" in scale:
        console.print(f"Spark batch scoring skipped: {scale['skipped']}", highlight=False)
    else:
        console.print(f"batch scores of {scale['rows']:,} customers on Spark (local mode, mlflow.pyfunc.spark_udf) "
                      f"equal DuckDB's to {scale['max_abs_diff']:.1e} -> {scale['scores']} ({scale['spark_s']}s "
                      "with the JVM start)", soft_wrap=True, highlight=False)
    console.print(f"Evidently reports: {loop.reports}; alerts: {loop.alert_log}; dashboards: "
                  "[bold]personalize ui[/]", soft_wrap=True, highlight=False)
    console.print("serve it yourself: [bold]personalize serve[/] (API docs at http://127.0.0.1:3000/)",
                  soft_wrap=True)
    console.print("MLflow runs and registry: [bold]personalize mlflow-ui[/]; audit trail: [bold]personalize history "
                  "churn[/]", soft_wrap=True)
    console.print(f"data: [bold]{settings.home / 'data'}[/]  quarantine: [bold]{settings.home / 'quarantine'}[/]  "
                  f"features: [bold]{settings.home / 'features'}[/]")
    result = {
        "demo": "ok",
        "wall_s": round(time.perf_counter() - started, 1),
        "stages_s": progress.stages,
        "datasets": {r.dataset: {"rows_in": r.rows_in, "quarantined": r.quarantined} for r in reports},
        "frames": {k: {"rows": f.rows, "feature_version": f.feature_version} for k, f in frames.items()},
        # before / after: the champion before and after the monitoring loop's retrain
        "models": {m.name: {"before": m.champion, "after": loop.champion_after if m.name == "churn" else m.champion,
                            "dataset": m.dataset, "version": m.version, "metric": m.metric,
                            "value": round(m.value, 4), "baseline": round(m.baseline, 4), "gate": m.verdict,
                            "champion": m.champion} for m in models},
        "served_versions": serving.versions,
        "requests_served": serving.requests_served,
        "alerts": loop.alerts,
        "retrained": loop.retrain is not None,
        "served_version_changed": loop.served_version_changed,
        "retrain": loop.retrain,
        "served_items": serving.served_items,
        "logged_rows": serving.logged_rows,
        "clusters": serving.clusters,
        "experiment": serving.experiment,
        "erasure": serving.erasure,
        "monitoring": loop.windows,
        "spark": scale,
        "table_scoring": telco,
        "cycle_scoring": cycle,
    }
    console.print(json.dumps(result), soft_wrap=True, highlight=False)
    return result
