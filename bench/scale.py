"""Features and batch scoring for N synthetic customers on DuckDB and on Spark local mode, side by side.

    python bench/scale.py                    # 1,000,000 customers (~20M transactions), one repeat: ~20 minutes
    python bench/scale.py --quick            # 100,000 customers: 5-15 minutes (Spark's fixed costs dominate)
    python bench/scale.py --customers 300000 --repeats 3 --spark-conf spark.driver.memory=8g

Set-up, in a temporary ``PERSONALIZE_HOME`` with its own SQLite MLflow registry: ``--customers`` seeded synthetic
customers without events (:func:`features.synthetic.generate`, as ``bench/features.py``) are written as the
offline store's Parquet files; a small shop with the same options (``--train-customers``, another seed) is ingested,
a churn model is trained on it with a one-trial LightGBM study (:func:`training.train.train_and_register`) and
force-promoted to ``churn@champion``. Every measurement uses those files and one cutoff, the end of the window
(every customer known, ``rows = customers``), and runs in a fresh subprocess, so each has its own peak memory:

- ``duckdb_features``: every column of the feature set for every customer, :meth:`FeatureStore.offline` on an
  in-memory DuckDB, from registering the files to the pandas frame;
- ``spark_features``: the same call on the Spark engine (:func:`features.engines.connect`), collected to pandas
  through Arrow: the like-for-like figure. The Spark session's start-up (JVM, context) is timed apart and
  reported as ``spark_startup_s``; it is not in the feature time;
- ``spark_write``: the same expression compiled for Spark (:func:`features.engines.to_spark`) and written as
  Parquet by Spark, nothing collected: what a Spark user does at a scale where the result does not fit one
  machine;
- ``duckdb_score`` and ``spark_score``: :func:`serving.batch.score_dataset` end to end (model load, features,
  scoring, write). Its own figures are reported as they are: ``features_s``; ``score_s`` (DuckDB: the booster's
  predict on the pandas frame, the Parquet write excluded; Spark: ``mlflow.pyfunc.spark_udf`` set-up, predict
  in the Python workers and Spark's Parquet write, the only place Spark executes the plan); score rows/s is
  ``rows / score_s``. The comparable figure is end-to-end rows/s, ``rows /`` the whole call's wall time (the
  Spark session already started).

Peak memory: a thread in each worker samples the worker's process tree every 0.25 s with psutil (the worker, and
on Spark the JVM it launched and the JVM's Python daemon and UDF workers; Spark's short-lived launcher JVM is left
out). Each process's peak is its kernel high-water mark (``VmHWM``, exact up to that process's last sample), and
``peak_rss_gib`` is the sum of those peaks over the tree: an upper bound, since the processes need not peak at the
same moment. The largest sampled sum of simultaneous RSS is reported beside it (``..._concurrent``, a lower bound
between samples). For DuckDB the tree is the one process, and both figures are its own peak. A JVM's RSS follows
the heap it has touched, so Spark's figure grows with ``spark.driver.memory`` (the JVM collects garbage late).

Before any figure is reported, the DuckDB and Spark feature frames are compared value by value and the two
engines' scores for the same customers must agree to 1e-9: the bench fails otherwise. Figures are medians over
``--repeats`` (peaks the largest); the host's load average is printed, since on a small shared machine the
absolute figures move with whatever else runs. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "churn"
KINDS = ("duckdb_features", "spark_features", "spark_write", "duckdb_score", "spark_score")
DEFAULT_SPARK_CONF = "spark.driver.memory=6g,spark.driver.maxResultSize=4g"
GIB = 2**30


# --- peak memory of a process tree -------------------------------------------------------------------------------
def vmhwm(pid: int) -> int:
    """A process's peak resident set in bytes (``VmHWM``, the kernel's high-water mark)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def process_kind(proc: Any, me: int) -> str:
    if proc.pid == me:
        return "driver"
    cmdline = " ".join(proc.cmdline())
    if "org.apache.spark.launcher.Main" in cmdline:
        return "launcher"  # spark-class's command builder: gone before the real JVM starts
    if proc.name() == "java":
        return "jvm"
    if "python" in proc.name() or "pyspark" in cmdline:
        return "python_workers"
    return "other"


class TreeMemory:
    """Samples this process and its descendants: each one's peak (VmHWM) and the peak of their summed RSS."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peaks: dict[int, tuple[str, int]] = {}
        self.concurrent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                kind = process_kind(proc, me.pid)
                rss = proc.memory_info().rss
                hwm = vmhwm(proc.pid)
            except (psutil.Error, OSError):  # exited between the listing and the read
                continue
            if kind == "launcher":
                continue
            total += rss
            self.peaks[proc.pid] = (kind, max(hwm, self.peaks.get(proc.pid, ("", 0))[1]))
        self.concurrent = max(self.concurrent, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def summary(self) -> dict[str, Any]:
        by_kind: dict[str, float] = {}
        for kind, peak in self.peaks.values():
            by_kind[kind] = by_kind.get(kind, 0.0) + peak / GIB
        return {"peak_rss_gib": sum(by_kind.values()), "peak_rss_gib_concurrent": self.concurrent / GIB,
                "peak_by_process_gib": by_kind,
                "processes": sum(1 for kind, _ in self.peaks.values())}


# --- the measured paths (run in a worker subprocess) -----------------------------------------------------------
def run_features(engine: str, data: Path, cutoff: pd.Timestamp, spec: Any) -> pd.DataFrame:
    from features.engines import connect
    from features.store import FeatureStore

    store = FeatureStore(data, connect(engine) if engine != "duckdb" else None)  # registers the files: measured
    return store.offline([cutoff], spec)


def run_spark_write(data: Path, cutoff: pd.Timestamp, spec: Any, out: Path) -> float:
    """Write the features with Spark; return the seconds spent before any data moved (Ibis compiling the
    expression to Spark SQL, Spark parsing and analysing it)."""
    from features.engines import connect, to_spark
    from features.store import FeatureStore

    started = time.perf_counter()
    store = FeatureStore(data, connect("spark"))
    frame = to_spark(store.con, store.features(store.entities([cutoff]), spec))
    plan_s = time.perf_counter() - started
    frame.write.mode("overwrite").parquet(str(out))
    return plan_s


def worker(args: argparse.Namespace) -> None:
    quiet()
    cutoff = pd.Timestamp(args.cutoff)
    engine = args.worker.split("_")[0]
    # imports are not part of the measured work
    from features.definitions import FeatureSpec
    from features.engines import spark_session
    from serving.batch import score_dataset
    from training.registry import connect as registry

    spec = FeatureSpec(categories=tuple(args.categories))
    result: dict[str, Any] = {"kind": args.worker}
    with TreeMemory() as memory:
        if engine == "spark":
            started = time.perf_counter()
            session = spark_session()
            result["startup_s"] = time.perf_counter() - started
            result["spark_master"] = session.sparkContext.master
        started = time.perf_counter()
        if args.worker.endswith("_features"):
            frame = run_features(engine, args.data, cutoff, spec)
            result.update(seconds=time.perf_counter() - started, rows=len(frame), columns=frame.shape[1])
        elif args.worker == "spark_write":
            result["plan_s"] = run_spark_write(args.data, cutoff, spec, args.out)
            result["seconds"] = time.perf_counter() - started
            result["rows"] = session.read.parquet(str(args.out)).count()  # after the clock: file metadata
        else:
            client = registry(os.environ["MLFLOW_TRACKING_URI"])
            started = time.perf_counter()
            report = score_dataset(client, MODEL, args.data, args.out, as_of=cutoff, engine=engine)
            result.update(seconds=time.perf_counter() - started, rows=report.rows, features_s=report.features_s,
                          score_s=report.score_s, path=str(report.path), version=report.version)
    result.update(memory.summary())
    if args.worker.endswith("_features") and args.out:
        frame.to_parquet(args.out, index=False)  # for the parity check, after the clock
    if engine == "spark":
        session.stop()
    print(json.dumps(result, default=str))


def quiet() -> None:
    """MLflow, Optuna, Spark and the training code talk a lot; the table says what matters."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING)
    import mlflow  # noqa: F401  (it sets its loggers up on import: set ours after)
    for name in ("mlflow", "alembic", "training", "features", "serving", "lightgbm", "py4j", "pyspark"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- the driver ------------------------------------------------------------------------------------------------
def measure(kind: str, data: Path, cutoff: pd.Timestamp, categories: tuple[str, ...], out: Path | None,
            env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--cutoff", str(cutoff),
           "--categories", *categories]
    if out:
        cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_champion(home: Path, customers: int) -> dict[str, Any]:
    """A churn champion from a small shop with the big one's options (so its feature columns all exist there)."""
    from features.pipeline import ingest_synthetic
    from features.synthetic import SyntheticConfig, generate
    from personalize.settings import Settings
    from training.registry import GateConfig, connect, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    started = time.perf_counter()
    settings = Settings(home=home, mlflow_tracking_uri=f"sqlite:///{(home / 'mlflow.db').resolve()}",
                        optuna_storage=f"sqlite:///{(home / 'optuna.db').resolve()}")
    ingest_synthetic(settings, "shop", generate(SyntheticConfig(customers=customers, events=False, seed=7)))
    fast = TuneConfig(trials=1, families=("lightgbm",), max_rounds=150, early_stopping_rounds=20, cv_folds=None)
    outcome = train_and_register(settings, "churn", "shop", TrainConfig(tune=fast), model_name=MODEL)
    promote(connect(settings.tracking_uri), MODEL, GateConfig(bootstrap_rounds=100), reason="bench", force=True)
    return {"seconds": time.perf_counter() - started, "auc": outcome.trained.test_metrics["roc_auc"]}


def compare_features(duck: pd.DataFrame, spark: pd.DataFrame) -> float:
    """Largest relative difference over every column; raise if the engines do not compute the same frame."""
    a = duck.set_index("customer_id").sort_index()
    b = spark.set_index("customer_id").sort_index()
    if not a.index.equals(b.index) or sorted(a.columns) != sorted(b.columns):
        raise SystemExit(f"duckdb and spark disagree on the frame's shape: {a.shape} vs {b.shape}")
    worst = 0.0
    for col in a.columns:
        x, y = a[col], b[col]
        if not (x.isna() == y.isna()).all():
            raise SystemExit(f"duckdb and spark disagree on which {col} values are missing")
        if pd.api.types.is_numeric_dtype(x) and not pd.api.types.is_bool_dtype(x):
            diff = float(np.nanmax(np.abs(x.astype(float) - y.astype(float)), initial=0.0))
            rel = diff / max(1.0, float(np.nanmax(np.abs(y.astype(float)), initial=0.0)))
            if rel > 1e-9:
                raise SystemExit(f"duckdb and spark disagree on {col}: max abs difference {diff}")
            worst = max(worst, rel)
        elif not (x[x.notna()] == y[y.notna()]).all():
            raise SystemExit(f"duckdb and spark disagree on {col}")
    return worst


def compare_scores(duck_path: Path, spark_path: Path) -> float:
    """The largest absolute difference of probability over the same customers; raise above 1e-9."""
    a = pd.read_parquet(duck_path).set_index("customer_id").sort_index()
    b = pd.read_parquet(spark_path).set_index("customer_id").sort_index()
    if not a.index.equals(b.index):
        raise SystemExit(f"duckdb and spark scored different customers: {len(a)} vs {len(b)}")
    diff = float(np.abs(a["probability"].to_numpy() - b["probability"].to_numpy()).max())
    if not diff < 1e-9 or not (a["decision"] == b["decision"]).all():
        raise SystemExit(f"duckdb and spark scores disagree: max abs difference {diff}")
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 customers")
    parser.add_argument("--customers", type=int, default=None)
    parser.add_argument("--train-customers", type=int, default=None, help="size of the shop the model learns on")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--spark-conf", default=os.environ.get("PERSONALIZE_SPARK_CONF") or DEFAULT_SPARK_CONF,
                        help="PERSONALIZE_SPARK_CONF for the Spark workers (the driver memory must be set before "
                             f"the JVM starts); default {DEFAULT_SPARK_CONF}")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cutoff", help=argparse.SUPPRESS)
    parser.add_argument("--categories", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    quiet()
    from features.synthetic import SyntheticConfig, generate, write

    wall = time.perf_counter()
    customers = args.customers or (100_000 if args.quick else 1_000_000)
    train_customers = args.train_customers or (5_000 if args.quick else 20_000)
    config = SyntheticConfig(customers=customers, events=False, seed=42)
    cutoff = pd.Timestamp(config.end)
    load_before = os.getloadavg()
    print(f"host: {os.cpu_count()} cores, load average {load_before[0]:.1f} (1 min); Spark conf {args.spark_conf}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as name:
        tmp = Path(name)
        home = tmp / "home"
        data = tmp / "data"
        t0 = time.perf_counter()
        synthetic = generate(config)
        write(synthetic, data)
        transactions = len(synthetic.transactions)
        del synthetic
        print(f"generated {customers:,} customers, {transactions:,} transactions in {time.perf_counter() - t0:.0f}s",
              flush=True)
        model = train_champion(home, train_customers)
        print(f"churn champion trained on {train_customers:,} customers in {model['seconds']:.0f}s "
              f"(test ROC-AUC {model['auc']:.3f})", flush=True)

        env = {**os.environ, "PERSONALIZE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
               "PERSONALIZE_SPARK_CONF": args.spark_conf}
        env.pop("MLFLOW_REGISTRY_URI", None)
        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        for r in range(args.repeats):
            for kind in KINDS:
                out = None
                if kind.endswith("_features") and r == 0:
                    out = tmp / f"{kind}.parquet"
                elif kind == "spark_write":
                    out = tmp / "spark_write"
                elif kind.endswith("_score"):
                    out = tmp / f"scores_{kind}"
                result = measure(kind, data, cutoff, config.categories, out, env)
                runs[kind].append(result)
                extra = f" (+ {result['startup_s']:.1f}s Spark start-up)" if "startup_s" in result else ""
                print(f"  repeat {r + 1}/{args.repeats} {kind:16s} {result['seconds']:8.2f}s{extra}  "
                      f"{result['rows']:,} rows  peak {result['peak_rss_gib']:.2f} GiB "
                      f"({', '.join(f'{k} {v:.2f}' for k, v in result['peak_by_process_gib'].items())})", flush=True)
        feature_diff = compare_features(pd.read_parquet(tmp / "duckdb_features.parquet"),
                                        pd.read_parquet(tmp / "spark_features.parquet"))
        score_diff = compare_scores(Path(runs["duckdb_score"][-1]["path"]), Path(runs["spark_score"][-1]["path"]))
    load_after = os.getloadavg()

    def med(kind: str, key: str = "seconds") -> float:
        return statistics.median(x[key] for x in runs[kind])

    def peak(kind: str, key: str = "peak_rss_gib") -> float:
        return max(x[key] for x in runs[kind])

    rows = runs["duckdb_features"][0]["rows"]
    scored = runs["duckdb_score"][0]["rows"]
    if not rows == scored == runs["spark_features"][0]["rows"] == runs["spark_score"][0]["rows"] == \
            runs["spark_write"][0]["rows"]:
        raise SystemExit("the paths computed different numbers of rows")
    columns = runs["duckdb_features"][0]["columns"]
    startup = statistics.median(x["startup_s"] for k in KINDS if k.startswith("spark") for x in runs[k])
    fs = {"duckdb": med("duckdb_features"), "spark": med("spark_features")}
    score = {e: {"features_s": med(f"{e}_score", "features_s"), "score_s": med(f"{e}_score", "score_s"),
                 "total_s": med(f"{e}_score")} for e in ("duckdb", "spark")}
    pk = {"duckdb": max(peak("duckdb_features"), peak("duckdb_score")),
          "spark": max(peak(k) for k in KINDS if k.startswith("spark"))}
    pk_concurrent = max(peak(k, "peak_rss_gib_concurrent") for k in KINDS if k.startswith("spark"))
    master = runs["spark_features"][0]["spark_master"]

    print()
    print(f"{customers:,} customers / {transactions:,} transactions, cutoff {cutoff.date()}, {columns - 2} features, "
          f"median of {args.repeats}; {os.cpu_count()} cores (load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after: a shared host), Spark {master} with {args.spark_conf}")
    print(f"{'':46s} {'DuckDB':>12s} {'Spark local':>12s}")
    na = "-"

    def line(label: str, duck: str, spark: str) -> None:
        print(f"{label:46s} {duck:>12s} {spark:>12s}")

    line("Spark session start-up s (not in the rows below)", na, f"{startup:.1f}")
    line("features, all columns, to pandas: s", f"{fs['duckdb']:.2f}", f"{fs['spark']:.2f}")
    line("  customers/s", f"{rows / fs['duckdb']:,.0f}", f"{rows / fs['spark']:,.0f}")
    line("  peak RSS GiB", f"{peak('duckdb_features'):.2f}", f"{peak('spark_features'):.2f}")
    line("features, Spark writes Parquet (no collect): s", na, f"{med('spark_write'):.2f}")
    line("  of which compiling and analysing the plan s", na, f"{med('spark_write', 'plan_s'):.2f}")
    line("  customers/s", na, f"{rows / med('spark_write'):,.0f}")
    line("  peak RSS GiB", na, f"{peak('spark_write'):.2f}")
    line("batch scoring: features_s", f"{score['duckdb']['features_s']:.2f}", f"{score['spark']['features_s']:.2f}")
    line("  score_s", f"{score['duckdb']['score_s']:.2f}", f"{score['spark']['score_s']:.2f}")
    line("  score rows/s (rows / score_s)", f"{scored / score['duckdb']['score_s']:,.0f}",
         f"{scored / score['spark']['score_s']:,.0f}")
    line("  end to end s (load, features, score, write)", f"{score['duckdb']['total_s']:.2f}",
         f"{score['spark']['total_s']:.2f}")
    line("  end-to-end rows/s", f"{scored / score['duckdb']['total_s']:,.0f}",
         f"{scored / score['spark']['total_s']:,.0f}")
    line("  peak RSS GiB", f"{peak('duckdb_score'):.2f}", f"{peak('spark_score'):.2f}")
    line("peak RSS GiB, any path (Spark: sum of process peaks)", f"{pk['duckdb']:.2f}", f"{pk['spark']:.2f}")
    line("  Spark: largest simultaneous sum sampled", na, f"{pk_concurrent:.2f}")
    print(f"parity: features equal to a relative {feature_diff:.1e}, probabilities to {score_diff:.1e} "
          f"(max abs diff)")
    e2e = score["spark"]["total_s"] / score["duckdb"]["total_s"]
    print(f"verdict: on one {os.cpu_count()}-core machine DuckDB computes the features {fs['spark'] / fs['duckdb']:.1f}x "
          f"faster than Spark local ({(fs['spark'] + startup) / fs['duckdb']:.1f}x "
          f"with Spark's start-up) and scores {e2e:.1f}x faster end to end, in {pk['duckdb']:.1f} GiB against "
          f"Spark's {pk['spark']:.1f} GiB; Spark earns its overhead only past what one machine holds (data or "
          f"memory), or where a cluster is already at hand.")
    print(f"wall time {time.perf_counter() - wall:.0f}s")
    print(json.dumps({
        "bench": "scale",
        "customers": customers,
        "transactions": transactions,
        "features": columns - 2,
        "features_s_duckdb": round(fs["duckdb"], 3),
        "features_s_spark": round(fs["spark"], 3),
        "features_write_s_spark": round(med("spark_write"), 3),
        "spark_startup_s": round(startup, 3),
        "spark_plan_s": round(med("spark_write", "plan_s"), 3),
        "score_features_s_duckdb": round(score["duckdb"]["features_s"], 3),
        "score_features_s_spark": round(score["spark"]["features_s"], 3),
        "score_s_duckdb": round(score["duckdb"]["score_s"], 3),
        "score_s_spark": round(score["spark"]["score_s"], 3),
        "score_rows_per_s_duckdb": round(scored / score["duckdb"]["score_s"]),
        "score_rows_per_s_spark": round(scored / score["spark"]["score_s"]),
        "end_to_end_rows_per_s_duckdb": round(scored / score["duckdb"]["total_s"]),
        "end_to_end_rows_per_s_spark": round(scored / score["spark"]["total_s"]),
        "peak_rss_gib_duckdb": round(pk["duckdb"], 2),
        "peak_rss_gib_spark": round(pk["spark"], 2),
        "peak_rss_gib_spark_concurrent": round(pk_concurrent, 2),
        "max_abs_diff_probability": score_diff,
        "spark_master": master,
        "spark_conf": args.spark_conf,
        "repeats": args.repeats,
        "cores": os.cpu_count(),
        "load_avg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
    }))


if __name__ == "__main__":
    main()
