"""Decisions: planted segments recovered by clustering, bandit regret on simulated impressions, /personalize latency.

    python bench/decisions.py             # 5,000-customer shop, 50,000 impressions x 3 seeds, 10 s per load level
    python bench/decisions.py --quick     # 2,000 customers, 10,000 impressions x 1 seed, 4 s per load level
    python bench/decisions.py --sweep     # also Thompson keyed by finer K-Means partitions (k = 8 to 32)
    python bench/decisions.py --segment-spread 0.5   # a shop whose planted segments show more in behaviour

Set-up, in a temporary ``PERSONALIZE_HOME`` with its own SQLite MLflow registry: the seed-42 synthetic shop
(``--customers`` customers, 730 days; :func:`features.synthetic.generate`) is ingested
(:func:`features.pipeline.ingest_synthetic`). The generator plants a segment per customer (``truth.segment``) and a
conversion probability per segment and banner variant (:data:`features.synthetic.PLANTED_RESPONSE`); nothing below
reads the truth except to score against it.

- **Clustering**: :func:`features.clustering.cluster_frame` at the default cutoff (the day after the last
  transaction or event: every customer known then, with the online store's features), joined to the planted segment
  on ``customer_id``. Adjusted Rand index (ARI, 1 = the planted partition, about 0 = chance) of
  :class:`~features.clustering.CustomerClusters` with K-Means, k chosen by silhouette in 2..8 (``ari_kmeans``: the
  product's default), K-Means with k=5 (the planted count), a Gaussian mixture with k chosen by BIC, and the mixture
  with k=5. Peer in the same run, the supervised ceiling: a ``HistGradientBoostingClassifier`` that *is* told the
  planted segment, on the same frame's numeric feature columns, 5-fold ``cross_val_predict``; the ARI of its
  out-of-fold predictions is about how much of the partition these features carry at all.
- **Bandit regret**: :func:`serving.simulation.simulate` over the same customers, ``--impressions`` impressions
  (median over 3 seeds, ``--quick``: 1). Each impression draws a customer; the policy sees only the customer's *key*
  and the customer converts with the planted probability of their true segment and the chosen variant. Regret =
  expected conversions lost to the oracle. Policies: oracle (0 by construction), uniform random, Thompson sampling
  (the serving code's :func:`serving.decisions.thompson`, one Beta posterior per variant and key) keyed by the K-Means
  cluster (the product's ``bandit_by: cluster``; ``regret_thompson``), keyed by a finer K-Means partition (k=8,
  ``regret_thompson_k8``), keyed by the rule segments' primary segment
  (``bandit_by: segment``, the catalog's default), keyed by the planted segment (perfect keys: the floor any keying
  can reach) and one posterior for everyone (``thompson_global``). The cluster and rule-segment keys are computed from
  the features only, never from the truth. ``regret_ratio`` = regret_thompson / regret_random. Beside each Thompson
  row, its keys' floor (:func:`serving.simulation.key_floor` x impressions; ``regret_floor``, ``regret_floor_k8``,
  ``regret_floor_segment``, ``regret_floor_global``): the regret of always showing each key its best variant, the
  least any policy that sees only those keys can lose. And the floor of the features themselves
  (``regret_floor_features``): each customer shown the variant with the highest expected conversion under the
  supervised ceiling's out-of-fold P(planted segment | features), keyed by that variant: about the least any policy
  that sees only these features can lose, bandit or not (a better classifier would move it a little).
- **Latency**: churn and propensity (one-trial LightGBM studies) and the purchase cycle (AFT) are trained on the shop
  and force-promoted, the online store is materialized (:func:`serving.online.materialize`), and
  ``personalize serve --dataset shop`` is started (one server, ``--workers`` workers; stopped with its whole process
  group at the end). Bodies: ``--ids`` consenting known customers (``profile.consent`` in the online store), cycled in
  the same order. ``/personalize`` with ``placement: homepage_banner`` (the bandit path: the stored profile's
  segments, Thompson sampling over the posteriors in the decision store, one decision row written; its rules read no
  score, so none is computed), ``placement: email`` (rules behind the ``email_rules`` experiment: churn and the
  purchase cycle are scored), and ``/churn`` by id beside them. Each is
  checked (200, a variant / a probability), warmed up, then loaded at concurrency 1 and 32 for ``--duration`` seconds
  by ``wrk`` or, without ``/usr/bin/wrk``, by the asyncio load generator of ``bench/serving.py`` in its own process.
  Load generator and server share the machine: absolute figures move with the host, the ratio to ``/churn``
  measured minutes apart in one run is the comparable part.

Tables first; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEED = 42
DATASET = "shop"
DAYS = 730
BIN = Path(sys.executable).parent
CONCURRENCY = (1, 32)


def _bench_serving() -> Any:
    """bench/serving.py (its Server, load, free_port and post helpers) under the name ``bench_serving``: the plain
    name ``serving`` is the repo's package."""
    import importlib.util

    if "bench_serving" in sys.modules:
        return sys.modules["bench_serving"]
    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = module
    spec.loader.exec_module(module)
    return module


def quiet() -> None:
    """MLflow, Optuna, BentoML and the training code talk a lot; the tables below say what matters."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING)
    import mlflow  # noqa: F401  (it sets its loggers up on import: set ours after)
    for name in ("mlflow", "alembic", "training", "features", "serving", "lightgbm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def counts(values: np.ndarray) -> dict[str, int]:
    return {str(k): int(v) for k, v in pd.Series(values).value_counts().items()}


# --- clustering ----------------------------------------------------------------------------------------------------
def clustering_figures(frame: pd.DataFrame, truth: np.ndarray) -> dict[str, Any]:
    from features.clustering import CustomerClusters, adjusted_rand

    out: dict[str, Any] = {}
    for label, method, k in (("kmeans", "kmeans", None), ("kmeans_k5", "kmeans", 5), ("kmeans_k8", "kmeans", 8),
                             ("gmm", "gmm", None), ("gmm_k5", "gmm", 5)):
        t = time.perf_counter()
        model = CustomerClusters(method=method, k=k, seed=0).fit(frame)
        labels = model.predict(frame)
        out[label] = {"ari": adjusted_rand(labels, truth), "k": int(model.k_), "labels": labels,
                      "seconds": time.perf_counter() - t, "features": len(model.features_),
                      "silhouette": float(model.silhouette_)}
        print(f"  {label:10s} k={model.k_}  ARI {out[label]['ari']:.3f}  ({out[label]['seconds']:.1f}s)", flush=True)
    out["supervised"] = supervised_ceiling(frame, truth)
    print(f"  supervised (HistGradientBoosting, 5-fold) ARI {out['supervised']['ari']:.3f}  "
          f"accuracy {out['supervised']['accuracy']:.3f}", flush=True)
    return out


def supervised_ceiling(frame: pd.DataFrame, truth: np.ndarray) -> dict[str, Any]:
    """Out-of-fold predictions of a classifier told the planted segment: how much the features allow."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import accuracy_score, adjusted_rand_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    numeric = frame.drop(columns=["customer_id"], errors="ignore").select_dtypes(include=["number", "bool"])
    x = numeric.astype(float).to_numpy()
    t = time.perf_counter()
    proba = cross_val_predict(HistGradientBoostingClassifier(random_state=SEED), x, truth,
                              cv=StratifiedKFold(5, shuffle=True, random_state=SEED), method="predict_proba")
    classes = np.unique(truth)  # cross_val_predict's column order
    predicted = classes[proba.argmax(axis=1)]
    return {"ari": float(adjusted_rand_score(truth, predicted)), "accuracy": float(accuracy_score(truth, predicted)),
            "features": x.shape[1], "seconds": time.perf_counter() - t, "proba": proba, "classes": classes}


def feature_policy(proba: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per customer, the banner variant with the highest expected conversion under the classifier's out-of-fold
    P(planted segment | features): what a policy that knew how the features relate to the segments would show."""
    from features.synthetic import PLANTED_RESPONSE

    variants = list(next(iter(PLANTED_RESPONSE.values())))
    rates = np.array([[PLANTED_RESPONSE[str(c)][v] for v in variants] for c in classes])  # segment x variant
    return np.asarray(variants)[(proba @ rates).argmax(axis=1)]


# --- bandit regret -------------------------------------------------------------------------------------------------
def regret_figures(keys: dict[str, np.ndarray], truth: np.ndarray, impressions: int,
                   seeds: list[int]) -> dict[str, dict[str, Any]]:
    from features.synthetic import PLANTED_RESPONSE
    from serving.simulation import key_floor, simulate

    runs = {"oracle": ("oracle", keys["planted"]), "random": ("random", keys["planted"]),
            "thompson": ("thompson", keys["cluster"]), "thompson_k8": ("thompson", keys["cluster_k8"]),
            "thompson_segment": ("thompson", keys["segment"]),
            "thompson_planted": ("thompson", keys["planted"]), "thompson_global": ("thompson_global", keys["planted"])}
    out = {}
    for label, (policy, k) in runs.items():
        t = time.perf_counter()
        results = [simulate(k, truth, PLANTED_RESPONSE, impressions, policy, seed=s) for s in seeds]
        out[label] = {"regret": statistics.median(r.regret for r in results),
                      "best_share": statistics.median(r.best_share for r in results),
                      "conversion_rate": statistics.median(r.conversions / r.impressions for r in results),
                      "regrets": [r.regret for r in results], "keys": len(set(map(str, k))),
                      "seconds": time.perf_counter() - t}
        if policy.startswith("thompson"):  # what the keys allow at best: each key's best variant, always
            seen = np.zeros(len(truth)) if policy == "thompson_global" else k
            out[label]["floor"] = key_floor(seen, truth, PLANTED_RESPONSE) * impressions
        floor = f"  keys' floor {out[label]['floor']:8.1f}" if "floor" in out[label] else ""
        print(f"  {label:17s} regret {out[label]['regret']:8.1f}{floor}  best variant {out[label]['best_share']:.1%}  "
              f"({out[label]['seconds']:.1f}s)", flush=True)
    # no policy that sees only the features does much better than the classifier's choice per customer
    out["features"] = {"floor": key_floor(keys["features"], truth, PLANTED_RESPONSE) * impressions}
    print(f"  {'features':17s} keys' floor {out['features']['floor']:8.1f}  (each customer the variant best for "
          f"P(segment | features))", flush=True)
    return out


def sweep_figures(frame: pd.DataFrame, truth: np.ndarray, impressions: int, seeds: list[int],
                  ks: tuple[int, ...] = (8, 12, 16, 24, 32)) -> dict[str, dict[str, float]]:
    """``--sweep``: Thompson keyed by K-Means with each k of ``ks``: its floor and its regret, both / random."""
    from features.clustering import CustomerClusters, adjusted_rand
    from features.synthetic import PLANTED_RESPONSE
    from serving.simulation import key_floor, simulate

    random = statistics.median(simulate(truth, truth, PLANTED_RESPONSE, impressions, "random", seed=s).regret
                               for s in seeds)
    out = {}
    for k in ks:
        labels = CustomerClusters(method="kmeans", k=k, seed=0).fit(frame).predict(frame)
        keys = np.array([f"cluster_{c}" for c in labels])
        regret = statistics.median(simulate(keys, truth, PLANTED_RESPONSE, impressions, "thompson", seed=s).regret
                                   for s in seeds)
        out[str(k)] = {"ari": round(adjusted_rand(labels, truth), 4),
                       "floor_vs_random": round(key_floor(keys, truth, PLANTED_RESPONSE) * impressions / random, 4),
                       "thompson_vs_random": round(regret / random, 4)}
        print(f"  k={k:<3d} ARI {out[str(k)]['ari']:.3f}  floor {out[str(k)]['floor_vs_random']:.3f}x random  "
              f"Thompson {out[str(k)]['thompson_vs_random']:.3f}x random", flush=True)
    return out


# --- latency -------------------------------------------------------------------------------------------------------
def build_models(settings: Any) -> dict[str, Any]:
    """Churn and propensity (one-trial LightGBM), the purchase cycle (AFT), force-promoted; the online store."""
    from features.pipeline import build_training_frame
    from serving.online import default_url, materialize
    from training.cycle import CycleConfig
    from training.cycle import train_and_register as train_cycle
    from training.registry import GateConfig, connect, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    started = time.perf_counter()
    build_training_frame(settings, DATASET)
    fast = TuneConfig(trials=1, families=("lightgbm",), max_rounds=150, early_stopping_rounds=20, seed=SEED)
    client = connect(settings.tracking_uri)
    auc = {}
    for name in ("churn", "propensity"):
        outcome = train_and_register(settings, name, DATASET, TrainConfig(tune=fast), model_name=name)
        auc[name] = outcome.trained.test_metrics["roc_auc"]
        promote(client, name, GateConfig(bootstrap_rounds=100), reason="bench", force=True)
    train_cycle(settings, DATASET, CycleConfig(candidates=("aft",), horizon_days=60))
    promote(client, "purchase_cycle", GateConfig(bootstrap_rounds=100), reason="bench", force=True)
    report = materialize(settings.dataset_dir(DATASET), default_url(settings.home, DATASET),
                         tracking_uri=settings.tracking_uri)
    return {"auc": auc, "materialized": report.customers if hasattr(report, "customers") else None,
            "setup_s": time.perf_counter() - started}


def consenting_ids(home: Path, n: int) -> list[str]:
    con = sqlite3.connect(home / "online" / f"{DATASET}.sqlite")
    try:
        rows = con.execute("SELECT customer_id, profile FROM customers ORDER BY customer_id").fetchall()
    finally:
        con.close()
    ids = [cid for cid, profile in rows if (json.loads(profile or "{}") or {}).get("consent") is True]
    return ids[:n]


def check(sb: Any, url: str, bodies: list[bytes], what: str, ok) -> None:
    for body in bodies[:20]:
        status, answer = sb.post(url, body)
        if status != 200 or not ok(answer):
            raise RuntimeError(f"{what} answered {status}: {answer!r}")


def latency_figures(settings: Any, workers: int, ids: list[str], duration: float, tmp: Path,
                    loader: str) -> dict[str, dict[str, Any]]:
    from personalize.cli import serve_environment

    sb = _bench_serving()
    env = serve_environment(settings, DATASET, workers, False, None, 10.0, None)
    env.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "BENTOML_HOME": str(tmp / "bentoml"),
                "PERSONALIZE_OPTUNA_STORAGE": settings.optuna_storage_url,
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "PYTHONUNBUFFERED": "1"})
    port = sb.free_port()
    base = f"http://127.0.0.1:{port}"
    loads = {
        "personalize_banner": (f"{base}/personalize",
                               [json.dumps({"customer_id": c, "placement": "homepage_banner"}).encode() for c in ids]),
        "personalize_email": (f"{base}/personalize",
                              [json.dumps({"customer_id": c, "placement": "email"}).encode() for c in ids]),
        "churn": (f"{base}/churn", [json.dumps({"customer_id": c}).encode() for c in ids]),
    }
    server = sb.Server("service", [str(BIN / "personalize"), "serve", "--dataset", DATASET, "--port", str(port),
                                   "--workers", str(workers)], env, tmp / "service.log", port, "/churn", "/readyz")
    out: dict[str, dict[str, Any]] = {}
    with server:
        ready_s = server.wait_ready(loads["churn"][1][0])
        print(f"  server ready in {ready_s:.1f}s", flush=True)
        check(sb, *loads["personalize_banner"], "/personalize homepage_banner",
              lambda a: isinstance(a, dict) and a.get("variant") and a.get("placement") == "homepage_banner")
        check(sb, *loads["personalize_email"], "/personalize email",
              lambda a: isinstance(a, dict) and a.get("variant") and a.get("placement") == "email")
        check(sb, *loads["churn"], "/churn", lambda a: isinstance(a, dict) and "probability" in json.dumps(a))
        _, sample = sb.post(loads["personalize_banner"][0], loads["personalize_banner"][1][0])
        print(f"  sample banner answer: variant {sample.get('variant')!r}, segment {sample.get('segment')!r}, "
              f"scores {sorted((sample.get('scores') or {}))}", flush=True)
        for label, (url, bodies) in loads.items():
            sb.load(url, bodies, 32, 1.0, tmp, loader)  # warm-up, discarded
            out[label] = {}
            for c in CONCURRENCY:
                out[label][f"c{c}"] = r = sb.load(url, bodies, c, duration, tmp, loader)
                print(f"  {label:19s} c{c:<3d} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                      f"p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}", flush=True)
        out["ready_s"] = {"value": ready_s}
    return out


# --- output --------------------------------------------------------------------------------------------------------
def print_tables(clusters: dict[str, Any], regret: dict[str, Any], http: dict[str, Any], f: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    t = Table(title=f"Planted segments recovered: {f['clustered']:,} customers of the seed-{SEED} shop at "
                    f"{f['as_of'][:10]}, adjusted Rand index vs the planted segment (5 planted)")
    for col in ("method", "k", "ARI", "seconds"):
        t.add_column(col, justify="left" if col == "method" else "right")
    names = {"kmeans": "K-Means, k by silhouette (product default)", "kmeans_k5": "K-Means, k=5",
             "kmeans_k8": "K-Means, k=8", "gmm": "Gaussian mixture, k by BIC", "gmm_k5": "Gaussian mixture, k=5"}
    for key, label in names.items():
        c = clusters[key]
        t.add_row(label, str(c["k"]), f"{c['ari']:.3f}", f"{c['seconds']:.1f}")
    s = clusters["supervised"]
    t.add_row(f"supervised ceiling: HistGradientBoosting told the truth, 5-fold CV "
              f"(accuracy {s['accuracy']:.1%}, {s['features']} columns)", "5", f"{s['ari']:.3f}", f"{s['seconds']:.1f}")
    console.print(t)

    t = Table(title=f"Banner bandit over {f['impressions']:,} simulated impressions (planted response), median of "
                    f"{f['seeds']} seed(s); keys from the features only")
    for col in ("policy", "keys", "regret", "vs random", "keys' floor", "floor vs random", "best variant",
                "conversion"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    labels = {"oracle": "oracle (true segment's best variant)", "random": "uniform random",
              "thompson": "Thompson by K-Means cluster (bandit_by: cluster)",
              "thompson_k8": "Thompson by K-Means cluster, k=8",
              "thompson_segment": "Thompson by rule segment (bandit_by: segment)",
              "thompson_planted": "Thompson by planted segment (perfect keys)",
              "thompson_global": "Thompson, one posterior (no segments)"}
    rnd = regret["random"]["regret"]
    for key, label in labels.items():
        r = regret[key]
        keys = "-" if key in ("oracle", "random") else "1" if key == "thompson_global" else str(r["keys"])
        floor = r.get("floor")
        t.add_row(label, keys, f"{r['regret']:,.1f}", f"{r['regret'] / rnd:.3f}" if rnd else "-",
                  "-" if floor is None else f"{floor:,.1f}", "-" if floor is None or not rnd else f"{floor / rnd:.3f}",
                  f"{r['best_share']:.1%}", f"{r['conversion_rate']:.2%}")
    floor = regret["features"]["floor"]
    t.add_row("any policy on the features (the variant best for a classifier's P(segment | features))", "-", "-",
              "-", f"{floor:,.1f}", f"{floor / rnd:.3f}" if rnd else "-", "-", "-")
    console.print(t)

    t = Table(title=f"personalize serve on loopback, {f['workers']} worker(s), {f['ids']} consenting customers, "
                    f"{f['duration_s']:g} s per level, load by {f['loader']}")
    for col in ("endpoint", "c1 req/s", "c1 p50 ms", "c1 p99 ms", "c32 req/s", "c32 p50 ms", "c32 p99 ms", "errors"):
        t.add_column(col, justify="left" if col == "endpoint" else "right")
    labels = {"personalize_banner": "/personalize homepage_banner (bandit)",
              "personalize_email": "/personalize email (rules + experiment)", "churn": "/churn by id"}
    for key, label in labels.items():
        h = http[key]
        t.add_row(label, f"{h['c1']['rps']:,.0f}", f"{h['c1']['p50_ms']:.2f}", f"{h['c1']['p99_ms']:.2f}",
                  f"{h['c32']['rps']:,.0f}", f"{h['c32']['p50_ms']:.2f}", f"{h['c32']['p99_ms']:.2f}",
                  str(h["c1"]["errors"] + h["c32"]["errors"]))
    console.print(t)
    print(f"personalize p99 / churn p99 at c32: {f['p99_ratio']:.2f}x; regret thompson / random: "
          f"{f['regret_ratio']:.3f}")


# --- the driver ----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 customers, 10,000 impressions x 1 seed, 4 s")
    parser.add_argument("--customers", type=int, default=None, help="customers of the shop (default 5,000)")
    parser.add_argument("--impressions", type=int, default=None, help="simulated impressions (default 50,000)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load level (default 10, quick 4)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--ids", type=int, default=300, help="consenting customers cycled by the load generator")
    parser.add_argument("--loader", choices=["wrk", "python"], default=None,
                        help="load generator (default: wrk when /usr/bin/wrk exists)")
    parser.add_argument("--segment-spread", type=float, default=1.0,
                        help="the generator's within-segment spread (SyntheticConfig.segment_spread; default 1: the "
                             "default shop; below 1 the planted segments show more in behaviour)")
    parser.add_argument("--sweep", action="store_true",
                        help="also Thompson keyed by K-Means with k = 8, 12, 16, 24, 32 (floor and regret vs random)")
    args = parser.parse_args()
    customers = args.customers or (2_000 if args.quick else 5_000)
    impressions = args.impressions or (10_000 if args.quick else 50_000)
    duration = args.duration or (4.0 if args.quick else 10.0)
    seeds = [0] if args.quick else [0, 1, 2]
    sb = _bench_serving()
    loader = args.loader or ("wrk" if sb.WRK.exists() else "python")

    quiet()
    from features.clustering import cluster_frame
    from features.pipeline import ingest_synthetic
    from features.segments import assign, load_segments
    from features.synthetic import SyntheticConfig, generate
    from personalize.settings import Settings

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-decisions-") as name:
        tmp = Path(name)
        home = tmp / "home"
        settings = Settings(home=home, optuna_storage=f"sqlite:///{(home / 'optuna.db').resolve()}")
        os.environ.pop("MLFLOW_REGISTRY_URI", None)  # this process's registry is the temporary one only
        os.environ.update({"PERSONALIZE_HOME": str(home), "MLFLOW_TRACKING_URI": settings.tracking_uri})
        data = generate(SyntheticConfig(customers=customers, days=DAYS, seed=SEED, segment_spread=args.segment_spread))
        ingest_synthetic(settings, DATASET, data)
        frame = cluster_frame(settings.dataset_dir(DATASET))
        planted = data.truth.set_index("customer_id")["segment"]
        frame = frame[frame["customer_id"].isin(planted.index)].reset_index(drop=True)
        truth = planted.loc[frame["customer_id"]].astype(str).to_numpy()
        print(f"shop: {customers:,} customers, {DAYS} days, segment spread {args.segment_spread:g}; {len(frame):,} "
              f"known at {frame.attrs.get('as_of')}; "
              f"planted: {counts(truth)}", flush=True)

        print("clustering:", flush=True)
        clusters = clustering_figures(frame, truth)
        rule = assign(frame, load_segments())["segment"].astype(str).to_numpy()
        keys = {"cluster": np.array([f"cluster_{c}" for c in clusters["kmeans"]["labels"]]), "segment": rule,
                "cluster_k8": np.array([f"cluster_{c}" for c in clusters["kmeans_k8"]["labels"]]), "planted": truth,
                "features": feature_policy(clusters["supervised"]["proba"], clusters["supervised"]["classes"])}
        print(f"rule segments (primary): {counts(rule)}", flush=True)
        print(f"bandit regret ({impressions:,} impressions, seeds {seeds}):", flush=True)
        regret = regret_figures(keys, truth, impressions, seeds)
        sweep = None
        if args.sweep:
            print("finer keys (K-Means, k fixed):", flush=True)
            sweep = sweep_figures(frame, truth, impressions, seeds)

        print("latency set-up: churn, propensity, purchase_cycle champions and the online store...", flush=True)
        setup = build_models(settings)
        print(f"  trained in {setup['setup_s']:.0f}s (test ROC-AUC churn {setup['auc']['churn']:.3f}, propensity "
              f"{setup['auc']['propensity']:.3f})", flush=True)
        ids = consenting_ids(home, args.ids)
        if not ids:
            raise SystemExit("no consenting customer in the online store")
        http = latency_figures(settings, args.workers, ids, duration, tmp, loader)

    banner, email, churn = http["personalize_banner"], http["personalize_email"], http["churn"]
    out = {
        "bench": "decisions",
        "ari_kmeans": round(clusters["kmeans"]["ari"], 4),
        "k_kmeans": clusters["kmeans"]["k"],
        "ari_kmeans_k5": round(clusters["kmeans_k5"]["ari"], 4),
        "ari_gmm": round(clusters["gmm"]["ari"], 4),
        "k_gmm": clusters["gmm"]["k"],
        "ari_gmm_k5": round(clusters["gmm_k5"]["ari"], 4),
        "ari_supervised": round(clusters["supervised"]["ari"], 4),
        "regret_thompson": round(regret["thompson"]["regret"], 1),
        "regret_thompson_segment": round(regret["thompson_segment"]["regret"], 1),
        "regret_thompson_k8": round(regret["thompson_k8"]["regret"], 1),
        "ari_kmeans_k8": round(clusters["kmeans_k8"]["ari"], 4),
        "regret_thompson_planted": round(regret["thompson_planted"]["regret"], 1),
        "regret_thompson_global": round(regret["thompson_global"]["regret"], 1),
        "regret_random": round(regret["random"]["regret"], 1),
        "regret_floor": round(regret["thompson"]["floor"], 1),
        "regret_floor_k8": round(regret["thompson_k8"]["floor"], 1),
        "regret_floor_segment": round(regret["thompson_segment"]["floor"], 1),
        "regret_floor_global": round(regret["thompson_global"]["floor"], 1),
        "regret_floor_features": round(regret["features"]["floor"], 1),
        "regret_oracle": round(regret["oracle"]["regret"], 1),
        "regret_ratio": round(regret["thompson"]["regret"] / regret["random"]["regret"], 4),
        "best_share_thompson": regret["thompson"]["best_share"],
        "best_share_random": regret["random"]["best_share"],
        "impressions": impressions,
        "seeds": len(seeds),
        "personalize_p50_ms": round(banner["c32"]["p50_ms"], 2),
        "personalize_p99_ms": round(banner["c32"]["p99_ms"], 2),
        "personalize_rps_c32": round(banner["c32"]["rps"], 1),
        "personalize_p50_c1_ms": round(banner["c1"]["p50_ms"], 3),
        "personalize_email_p50_ms": round(email["c32"]["p50_ms"], 2),
        "personalize_email_p99_ms": round(email["c32"]["p99_ms"], 2),
        "churn_p50_ms": round(churn["c32"]["p50_ms"], 2),
        "churn_p99_ms": round(churn["c32"]["p99_ms"], 2),
        "churn_rps_c32": round(churn["c32"]["rps"], 1),
        "churn_p50_c1_ms": round(churn["c1"]["p50_ms"], 3),
        "p99_ratio": round(banner["c32"]["p99_ms"] / churn["c32"]["p99_ms"], 3),
        "errors": sum(h[c]["errors"] for h in (banner, email, churn) for c in ("c1", "c32")),
        "customers": customers,
        "segment_spread": args.segment_spread,
        "clustered": len(frame),
        "quick": args.quick,
        "duration_s": duration,
        "workers": args.workers,
        "loader": loader,
        "cores": os.cpu_count(),
        "bench_s": round(time.perf_counter() - started, 1),
    }
    if sweep is not None:
        out["sweep_kmeans"] = sweep
    print()
    print_tables(clusters, regret, http, {**out, "as_of": str(frame.attrs.get("as_of", "")), "ids": len(ids)})
    print(f"{os.cpu_count()} cores (load generator and server share them), {out['bench_s']:.0f}s in all")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
