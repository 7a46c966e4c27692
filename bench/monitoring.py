"""Monitoring: false alarms and detection delay on replayed synthetic streams, and the time of one pass.

    python bench/monitoring.py             # 2,000-customer shops, 40 stationary windows, 5 drift sizes: ~6 minutes
    python bench/monitoring.py --quick     # 1,200-customer shops, 20 stationary windows, 3 drift sizes: ~2 minutes
    python bench/monitoring.py --everyone  # replay every known customer, not only those who had bought

Set-up, in a temporary ``PERSONALIZE_HOME`` with its own SQLite MLflow registry: a churn model (30-day horizon, a
3-trial study) is trained on a synthetic shop (seed 42) as known at T0 = 2025-07-01
(:func:`features.synthetic.until`), registered and promoted to ``churn@champion`` (the gate with ``max_ece=0.1``,
forced with a reason if it refuses). Its reference is its held-out frame, the shop's customers at the test cutoff
M = (last transaction - 30 days) floored to the day, 2025-05-31 (:func:`monitoring.data.load_reference`).

The synthetic shop ages (no signups after 60% of its window, churned customers pile up), so consecutive dates of one
shop are not a stationary stream. Every window below is therefore scored at the reference's own moment M
(``replay(..., as_of=M)``: a seeded sample of ``--sample`` customers, their point-in-time features at M, scored by the
champion and written to the prediction log stamped at the window's time); only the shop they come from changes.
Stamps are 7 days apart and a window is ``[stamp + 1 h - 7 days, stamp + 1 h)``, so each holds one stamp's rows. Each
stream logs into its own folder, and runs as one task on ``--workers`` spawned processes (2 by default: a 600-row pass
is about 2 s of Evidently, mostly building its plotly widgets). A pass is :func:`monitoring.job.run_pass` with the
default ``MonitorConfig`` (the reference passed in, no report persisted, no data summary: the alert rules do not read
it); an alert is any rule that fired, suppressed by the cooldown or not.

- **False alarms**: windows scored from independent shops of the same process (seeds 1000, 1001, ..., no drift;
  several windows per shop, each a fresh sample). False-alarm rate = share of these windows with an alert. Each
  shop's realized ROC-AUC at M is printed beside, to show how much independent shops of one process differ.
- **Detection delay**, per drift size (a ``DriftSpec`` from M - 28 days: activity, price, category mix, or every
  customer's dropout hazard tripled): the
  champion's own shop without drift for 3 windows (``--quick``: 2), then the same shop (same seed, same customers)
  with the drift for 4 windows (``--quick``: 3). Delay = windows from the first drifted one to the first that alerts
  (0: caught at once), "not detected" when none does. The drift *hurts the model* when the champion's realized
  ROC-AUC at M on the drifted shop is at least 0.01 below its ROC-AUC on the same shop without drift (the labels of
  the 30 days after M, from the transactions). ``detection_delay_windows`` is the median over the sizes that hurt,
  a size that was not detected counting as longer than any detected one (null when that median is not detected, or
  no size hurt;
  ``detection_delay_detected_median`` is the median over the detected ones, ``undetected_hurting`` counts the rest).
- **Pass time**: a hand-made reference (``--ref-rows`` rows x 40 numeric features, a label and a probability) and
  ``--rows`` logged predictions of that fake model spread over 7 days, written through
  :class:`serving.predlog.PredictionLog` in segments of 1,000 rows. Ours = :func:`monitoring.data.read_window`
  (read the Parquet segments, parse the JSON features and outputs) + :func:`monitoring.job.compare` (the drift report
  with the data summary, prediction drift, CBPE) + the alert rules: a whole pass without the registry. The peer is a
  bare Evidently ``Report([DataDriftPreset(...)])`` (same method and threshold) on the already-parsed frames; the
  ratio is what our pass adds. Median of 3, and once more without the data summary (``--quick``: 1, no breakdown).
  The timed pass runs after the streams, alone.

Replay keeps, by default, the customers who had bought before M: the reference (the churn model's held-out frame)
holds only them, since churn is undefined for a customer who never bought. The server scores every known customer;
``--everyone`` replays those too and shows what the mismatch does to the false-alarm rate.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEED = 42
MODEL = "churn"
HORIZON = 30
T0 = datetime(2025, 7, 1)  # the champion is trained on the shop as known then
WEEK = pd.Timedelta(days=7)
BASE = pd.Timestamp("2026-01-05")  # the first window's stamp of every stream (each stream has its own log folder)
DRIFT_LEAD = pd.Timedelta(days=28)  # a drift starts this long before M
HURT = 0.01  # ROC-AUC points lost on the drifted shop for the drift to count as hurting the model
PREFIX, DRIFTED = 3, 4  # windows before and after the change in a drifted stream
FEATURES = 40  # pass-time section
SEGMENT_ROWS = 1_000
# (label, DriftSpec fields)
# "dropout x3": every customer's dropout hazard tripled (a concept drift: who churns changes, not only the features)
EVERYONE_X3 = {"dropout": {c: 3.0 for c in ("electronics", "fashion", "home", "beauty", "sports", "books", "toys",
                                             "grocery")}}  # SyntheticConfig's categories
SIZES = [("activity -0.2", {"activity": -0.2}), ("activity -0.4", {"activity": -0.4}),
         ("activity -0.6", {"activity": -0.6}), ("price +0.5", {"price": 0.5}), ("mix 0.8", {"mix": 0.8}),
         ("dropout x3", EVERYONE_X3)]
QUICK_SIZES = [("activity -0.3", {"activity": -0.3}), ("activity -0.6", {"activity": -0.6}), ("mix 0.8", {"mix": 0.8}),
               ("dropout x3", EVERYONE_X3)]
RULES = {"dataset_drift": "D", "prediction_drift": "P", "estimated_performance_drop": "E",
         "realized_performance_drop": "R"}


def quiet() -> None:
    """MLflow, Optuna and the alert sink talk a lot; the tables below say what matters."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING)
    import mlflow  # noqa: F401  (it sets its loggers up on import: set ours after)
    for name in ("mlflow", "alembic", "monitoring", "training", "features", "serving", "evidently"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


# --- set-up ------------------------------------------------------------------------------------------------------
def build_champion(settings: Any, customers: int) -> dict[str, Any]:
    """Train the churn model on the seed-42 shop as known at T0, promote it, load its reference."""
    from features.pipeline import ingest_synthetic
    from features.store import FeatureStore
    from features.synthetic import SyntheticConfig, generate, until
    from monitoring.data import load_reference
    from serving.predlog import load_salt
    from serving.scoring import load
    from training.registry import GateConfig, connect, promote
    from training.train import TrainConfig, oot_cutoffs, train_and_register
    from training.tune import TuneConfig

    started = time.perf_counter()
    ingest_synthetic(settings, "shop", until(generate(SyntheticConfig(customers=customers, seed=SEED)), T0))
    config = TrainConfig(tune=TuneConfig(trials=3), horizon_days=HORIZON, train_cutoffs=2, step_days=14)
    outcome = train_and_register(settings, "churn", "shop", config)
    client = connect(settings.tracking_uri)
    gate = promote(client, MODEL, GateConfig(max_ece=0.1))
    if not gate.passed:
        promote(client, MODEL, GateConfig(max_ece=0.1), reason="bench: small synthetic shop", force=True)
    reference = load_reference(client, MODEL, outcome.version)
    moment = oot_cutoffs(FeatureStore(settings.dataset_dir("shop")).observed_until(), HORIZON, config.train_cutoffs,
                         config.step_days)[2]  # the test cutoff: the reference's point in time
    if getattr(reference, "moment", None) is not None and pd.Timestamp(reference.moment) != moment:
        raise SystemExit(f"the reference's moment {reference.moment} is not the test cutoff {moment}")
    return {"client": client, "reference": reference, "moment": moment, "salt": load_salt(settings.home),
            "scorer": load(client, MODEL, "champion").scorer, "gate_passed": gate.passed,
            "test_auc": outcome.trained.test_metrics["roc_auc"], "setup_s": time.perf_counter() - started}


def make_shop(settings: Any, name: str, seed: int, customers: int, drift: dict[str, float] | None,
              moment: pd.Timestamp) -> Path:
    """Generate and ingest one whole shop (2024-01-01 + 730 days), with ``drift`` from ``moment - 28 days``."""
    from features.pipeline import ingest_synthetic
    from features.synthetic import DriftSpec, SyntheticConfig, generate

    spec = DriftSpec(start=(moment - DRIFT_LEAD).to_pydatetime(), **drift) if drift else DriftSpec()
    ingest_synthetic(settings, name, generate(SyntheticConfig(customers=customers, seed=seed, drift=spec)))
    return settings.dataset_dir(name)


def realized_auc(scorer: Any, dataset_dir: Path, moment: pd.Timestamp) -> float:
    """The champion's ROC-AUC on every customer of the shop with a churn label at ``moment``."""
    from sklearn.metrics import roc_auc_score

    from features.store import FeatureStore
    from serving.batch import score_matrix

    store = FeatureStore(dataset_dir)
    frame = store.training_frame([moment], HORIZON, store.every_category(moment))
    frame = frame[frame["churn"].notna()].copy()
    for c in scorer.features:
        if c not in frame.columns:
            frame[c] = 0.0  # a category nobody had bought yet
    return float(roc_auc_score(frame["churn"].astype(int), score_matrix(scorer, frame)))


# --- streams (run in worker processes: each stream is one task) -------------------------------------------------
_STATE: dict[str, Any] = {}  # per process: settings, client, reference, moment, salt, scorer and the stream options


def init_worker(settings: Any, reference: Any, moment: pd.Timestamp, customers: int, sample: int,
                everyone: bool) -> None:
    """A worker's own registry connection and champion (a spawned process shares nothing with the parent)."""
    quiet()
    from serving.predlog import load_salt
    from serving.scoring import load
    from training.registry import connect

    client = connect(settings.tracking_uri)
    _STATE.update(settings=settings, client=client, reference=reference, moment=moment, customers=customers,
                  sample=sample, everyone=everyone, salt=load_salt(settings.home),
                  scorer=load(client, MODEL, "champion").scorer)


def stream_settings(name: str) -> Any:
    """The same home (registry, data sets, salt), a prediction log of the stream's own."""
    settings = _STATE["settings"]
    return settings.model_copy(update={"prediction_log": settings.home / "logs" / name})


def replay_into(stream: Any, dataset_dir: Path, stamps: list[pd.Timestamp], seed: int) -> None:
    from monitoring.replay import replay

    options = {"buyers_only": False} if _STATE["everyone"] else {}
    replay(_STATE["client"], MODEL, dataset_dir, stream.log_root, stamps, _STATE["salt"], sample=_STATE["sample"],
           seed=seed, as_of=_STATE["moment"], **options)


def monitor(stream: Any, stamp: pd.Timestamp, dataset: str) -> dict[str, Any]:
    """One pass over the window ending an hour after ``stamp``; the figures the tables need."""
    from monitoring.config import MonitorConfig
    from monitoring.job import run_pass

    end = (stamp + pd.Timedelta(hours=1)).tz_localize("UTC")
    started = time.perf_counter()
    result = run_pass(stream, _STATE["client"], MODEL, end - WEEK, end, MonitorConfig(), dataset=dataset,
                      reference=_STATE["reference"], persist_reports=False, summary=False)
    m = result.metrics
    return {"alerts": sorted({a.rule for a in result.alerts}), "rows": m["rows"], "drift_share": m["drift_share"],
            "prediction_drift": m["prediction_drift"], "drifted": m["drifted_features"][:3],
            "estimated_drop": m["reference_estimated_roc_auc"] - m["estimated_roc_auc"],
            "seconds": time.perf_counter() - started}


def stationary_task(k: int, per_shop: int) -> dict[str, Any]:
    """``per_shop`` windows, each a fresh sample of the undrifted shop of seed 1000 + k, scored at M."""
    name = f"stationary{k:02d}"
    shop_dir = make_shop(_STATE["settings"], name, 1000 + k, _STATE["customers"], None, _STATE["moment"])
    stream = stream_settings(name)
    stamps = [BASE + j * WEEK for j in range(per_shop)]
    replay_into(stream, shop_dir, stamps, seed=k)
    windows = [monitor(stream, s, name) for s in stamps]
    return {"shop": name, "seed": 1000 + k, "auc": realized_auc(_STATE["scorer"], shop_dir, _STATE["moment"]),
            "windows": windows}


def drift_task(i: int, label: str, drift: dict[str, float], base_dir: Path, prefix: int,
               drifted: int) -> dict[str, Any]:
    """The champion's own shop (seed 42) unchanged for ``prefix`` windows, then the same shop with ``drift``."""
    name = f"drift{i}"
    shop_dir = make_shop(_STATE["settings"], name, SEED, _STATE["customers"], drift, _STATE["moment"])
    stream = stream_settings(name)
    stamps = [BASE + j * WEEK for j in range(prefix + drifted)]
    replay_into(stream, base_dir, stamps[:prefix], seed=100 + i)
    replay_into(stream, shop_dir, stamps[prefix:], seed=200 + i)
    windows = [monitor(stream, s, base_dir.name if j < prefix else name) for j, s in enumerate(stamps)]
    after = windows[prefix:]
    return {"size": label, "drift": drift, "auc": realized_auc(_STATE["scorer"], shop_dir, _STATE["moment"]),
            "delay": next((j for j, w in enumerate(after) if w["alerts"]), None), "windows": windows,
            "prefix": prefix, "prefix_alerts": sum(bool(w["alerts"]) for w in windows[:prefix]),
            "detected_windows": sum(bool(w["alerts"]) for w in after)}


def pattern(window: dict[str, Any]) -> str:
    return "".join(RULES[r] for r in window["alerts"]) or "."


def simulate(settings: Any, setup: dict[str, Any], customers: int, sample: int, everyone: bool, shops: int,
             per_shop: int, sizes: list[tuple[str, dict[str, float]]], prefix: int, drifted: int,
             workers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every stream as one task on ``workers`` processes (1: in this process), results in a fixed order."""
    import multiprocessing

    init = (settings, setup["reference"], setup["moment"], customers, sample, everyone)
    pool = multiprocessing.get_context("spawn").Pool(workers, init_worker, init) if workers > 1 else None
    if pool is None:
        init_worker(*init)
    try:
        # the workers start (imports, registry) while this process builds the drifted streams' unchanged shop
        base_dir = make_shop(settings, "calm", SEED, customers, None, setup["moment"])
        base_auc = realized_auc(setup["scorer"], base_dir, setup["moment"])
        jobs = [(stationary_task, (k, per_shop)) for k in range(shops)]
        jobs += [(drift_task, (i, label, drift, base_dir, prefix, drifted)) for i, (label, drift) in enumerate(sizes)]
        pending = [pool.apply_async(fn, args) if pool else None for fn, args in jobs]
        stationary, sizes_out = [], []
        for (fn, args), handle in zip(jobs, pending):
            out = handle.get() if handle else fn(*args)
            if fn is stationary_task:
                stationary.append(out)
                w = out["windows"]
                print(f"  stationary shop {len(stationary)}/{shops} (seed {out['seed']}, ROC-AUC at M "
                      f"{out['auc']:.4f}): {' '.join(pattern(x) for x in w)}  prediction drift "
                      + " ".join(f"{x['prediction_drift']:.3f}" for x in w), flush=True)
            else:
                out.update(auc_drop=base_auc - out["auc"], hurts=base_auc - out["auc"] >= HURT)
                sizes_out.append(out)
                w = out["windows"]
                print(f"  {out['size']}: ROC-AUC at M {base_auc:.4f} -> {out['auc']:.4f} "
                      f"(drop {out['auc_drop']:+.4f}), windows {' '.join(pattern(x) for x in w[:prefix])} | "
                      f"{' '.join(pattern(x) for x in w[prefix:])}, delay "
                      f"{'not detected' if out['delay'] is None else out['delay']}", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return {"shops": stationary}, {"base_auc": base_auc, "sizes": sizes_out, "prefix": prefix, "drifted": drifted}


def median_delay(sizes: list[dict[str, Any]]) -> float | None:
    """Median delay over the sizes that hurt; an undetected size counts as longer than any window."""
    delays = sorted(float("inf") if s["delay"] is None else s["delay"] for s in sizes if s["hurts"])
    if not delays:
        return None
    value = statistics.median(delays)
    return None if value == float("inf") else float(value)


# --- pass time ---------------------------------------------------------------------------------------------------
def fake_frame(rng: np.random.Generator, rows: int, shift: float = 0.0) -> pd.DataFrame:
    """``rows`` rows x 40 numeric features (normals, amounts, counts, a few with 2% missing), a calibrated
    probability from a planted logistic truth and a label drawn from it; ``shift`` moves three features."""
    cols: dict[str, np.ndarray] = {}
    for k in range(FEATURES):
        kind = k % 3
        if kind == 0:
            cols[f"x{k:02d}"] = rng.normal(k % 7, 1 + k % 3, rows)
        elif kind == 1:
            cols[f"x{k:02d}"] = np.round(rng.lognormal(3, 0.8, rows), 2)
        else:
            cols[f"x{k:02d}"] = rng.poisson(1 + k % 5, rows).astype(float)
    frame = pd.DataFrame(cols)
    for c in ("x00", "x01", "x02"):
        frame[c] = frame[c] + shift * frame[c].std()
    z = ((frame - frame.mean()) / frame.std()).to_numpy()
    beta = np.random.default_rng(SEED).normal(0, 0.4, FEATURES)
    frame["probability"] = np.round(1 / (1 + np.exp(-(z @ beta - 0.5))), 6)
    frame["label"] = (rng.random(rows) < frame["probability"]).astype(int)
    for c in ("x37", "x38", "x39"):
        frame.loc[rng.random(rows) < 0.02, c] = np.nan
    return frame


def write_log(root: Path, frame: pd.DataFrame, features: list[str], start: pd.Timestamp, end: pd.Timestamp) -> float:
    """The frame as logged predictions of ``bench@champion`` version 1, spread evenly over ``[start, end)``."""
    from serving.predlog import PredictionLog, make_row

    started = time.perf_counter()
    step = (end - start) / len(frame)
    records = frame[features].astype(object).where(frame[features].notna(), None).to_dict("records")
    model = {"name": "bench", "version": "1", "alias": "champion"}
    log = PredictionLog(root, flush_s=3600)
    try:
        for first in range(0, len(frame), SEGMENT_ROWS):
            rows = [make_row(uuid.uuid4().hex, "bench", model, f"k{i:08d}", False, records[i],
                             {"probability": float(frame["probability"].iat[i]),
                              "decision": bool(frame["probability"].iat[i] >= 0.5)}, None, ts=start + i * step)
                    for i in range(first, min(first + SEGMENT_ROWS, len(frame)))]
            log.append(rows)
            log.flush()
    finally:
        log.close()
    return time.perf_counter() - started


def pass_time_figures(tmp: Path, rows: int, ref_rows: int, repeats: int, breakdown: bool) -> dict[str, Any]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    from monitoring.alerts import evaluate
    from monitoring.config import MonitorConfig
    from monitoring.data import Reference, read_window
    from monitoring.job import compare

    rng = np.random.default_rng(SEED)
    features = [f"x{k:02d}" for k in range(FEATURES)]
    reference = Reference("bench", "1", "bench-run", "churn", None, None, 0.5, features, [],
                          fake_frame(rng, ref_rows))
    start = pd.Timestamp("2026-03-02", tz="UTC")
    end = start + WEEK
    root = tmp / "pass-log"
    write_s = write_log(root, fake_frame(rng, rows, shift=0.3), features, start, end)
    segments = len(list(root.glob("date=*/part-*.parquet")))
    config = MonitorConfig()
    policy = config.drift
    definition = DataDefinition(numerical_columns=features)

    def ours() -> tuple[float, float, Any, dict[str, Any]]:
        t = time.perf_counter()
        window = read_window(root, reference, start, end)
        read = time.perf_counter() - t
        metrics, _ = compare(reference, window, config, summary=True)
        alerts = evaluate(metrics, config, "bench", "1", start, end)
        return read, time.perf_counter() - t, window, {"metrics": metrics, "alerts": alerts}

    def peer(window: Any) -> float:
        t = time.perf_counter()
        Report([DataDriftPreset(columns=features, num_method=policy.num_method, num_threshold=policy.num_threshold,
                                drift_share=policy.share_threshold)]).run(
            Dataset.from_pandas(window.frame[features], data_definition=definition),
            Dataset.from_pandas(reference.frame[features], data_definition=definition))
        return time.perf_counter() - t

    reads, totals, peers = [], [], []
    for k in range(repeats):
        read, total, window, result = ours()
        reads.append(read)
        totals.append(total)
        peers.append(peer(window))
        print(f"  pass {k + 1}/{repeats}: ours {total:.2f}s (read and parse {read:.2f}s), bare DataDriftPreset "
              f"{peers[-1]:.2f}s", flush=True)
    if len(window.frame) != rows:
        raise SystemExit(f"the window holds {len(window.frame)} rows, {rows} were logged")
    no_summary = None
    if breakdown:  # the same pass without the data summary: what DataSummaryPreset costs
        t = time.perf_counter()
        compare(reference, window, config, summary=False)
        no_summary = statistics.median(reads) + time.perf_counter() - t
    ours_s, peer_s = statistics.median(totals), statistics.median(peers)
    return {"rows": rows, "ref_rows": ref_rows, "features": FEATURES, "segments": segments, "write_s": write_s,
            "read_s": statistics.median(reads), "pass_s": ours_s, "peer_s": peer_s, "ratio": ours_s / peer_s,
            "no_summary_s": no_summary, "repeats": repeats,
            "drift_share": result["metrics"]["drift_share"], "alerts": [a.rule for a in result["alerts"]]}


# --- output ------------------------------------------------------------------------------------------------------
def print_tables(stationary: dict[str, Any], drifts: dict[str, Any], timing: dict[str, Any], f: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    who = "all known customers" if f["everyone"] else "the customers who had bought"
    table = Table(title=f"Stationary windows: independent shops of the same process, scored at M ({f['customers']:,} "
                        f"customers, {f['sample']} sampled from {who} per window). Alerts: D dataset drift, "
                        "P prediction drift, E estimated (CBPE) drop, . none")
    for col in ("shop", "ROC-AUC at M", "alerts", "prediction drift", "drift share", "CBPE drop",
                "top drifted features (first window)"):
        table.add_column(col, justify="left" if col in ("shop", "alerts") or col.startswith("top") else "right")
    for s in stationary["shops"]:
        w = s["windows"]
        table.add_row(f"seed {s['seed']}", f"{s['auc']:.4f}", " ".join(pattern(x) for x in w),
                      " ".join(f"{x['prediction_drift']:.3f}" for x in w),
                      " ".join(f"{x['drift_share']:.2f}" for x in w),
                      " ".join(f"{x['estimated_drop']:+.3f}" for x in w), ", ".join(w[0]["drifted"]))
    console.print(table)
    aucs = [s["auc"] for s in stationary["shops"]]
    print(f"false alarms: {f['false_alarms']}/{f['stationary_windows']} windows ({f['false_alarm_rate']:.1%}), by rule "
          f"{f['false_alarms_by_rule'] or 'none'}; prediction drift median "
          f"{f['stationary_prediction_drift_median']:.3f}, max {f['stationary_prediction_drift_max']:.3f} (alerts at "
          f"{f['prediction_threshold']}); drift share max {f['stationary_drift_share_max']:.2f} (alerts at "
          f"{f['share_threshold']}). Realized ROC-AUC across the "
          f"shops {min(aucs):.4f} .. {max(aucs):.4f} (sd {statistics.pstdev(aucs):.4f})")

    prefix = drifts["prefix"]
    table = Table(title=f"Drifted streams: the champion's own shop (seed {SEED}) for {prefix} windows, then the same "
                        f"shop with the drift from M - 28 days for {drifts['drifted']}; hurts = realized ROC-AUC drop "
                        f">= {HURT}")
    for col in ("drift", "ROC-AUC at M", "drop", "hurts", "alerts before | after", "delay (windows)",
                "prediction drift after", "drift share after", "CBPE drop after"):
        table.add_column(col, justify="left" if col in ("drift", "alerts before | after") else "right")
    for s in drifts["sizes"]:
        after = s["windows"][prefix:]
        table.add_row(s["size"], f"{s['auc']:.4f}", f"{s['auc_drop']:+.4f}", "yes" if s["hurts"] else "no",
                      " ".join(pattern(w) for w in s["windows"][:prefix]) + " | "
                      + " ".join(pattern(w) for w in after),
                      "not detected" if s["delay"] is None else str(s["delay"]),
                      " ".join(f"{w['prediction_drift']:.3f}" for w in after),
                      " ".join(f"{w['drift_share']:.2f}" for w in after),
                      " ".join(f"{w['estimated_drop']:+.3f}" for w in after))
    table.add_row("none (same shop)", f"{drifts['base_auc']:.4f}", "", "", "", "", "", "", "")
    console.print(table)
    delay = f["detection_delay_windows"]
    print(f"detection delay, median over the sizes that hurt: {'n/a' if delay is None else f'{delay:g}'} windows "
          f"({f['hurting_sizes']} size(s) hurt, {f['undetected_hurting']} of them not detected); false alarms in the "
          f"windows before the change: {f['prefix_false_alarms']}/{f['prefix_windows']}")

    table = Table(title=f"One monitoring pass: {timing['rows']:,} logged predictions x {timing['features']} features "
                        f"({timing['segments']} Parquet segments) against {timing['ref_rows']:,} reference rows, "
                        f"median of {timing['repeats']}")
    for col in ("what", "seconds", "vs peer"):
        table.add_column(col, justify="left" if col == "what" else "right")
    table.add_row("ours: read_window (read the Parquet log, parse the JSON)", f"{timing['read_s']:.2f}",
                  f"{timing['read_s'] / timing['peer_s']:.2f}x")
    table.add_row("ours: the whole pass (read, drift + data summary + prediction drift, CBPE, rules)",
                  f"{timing['pass_s']:.2f}", f"{timing['ratio']:.2f}x")
    if timing["no_summary_s"] is not None:
        table.add_row("ours without the data summary (summary=False, once)", f"{timing['no_summary_s']:.2f}",
                      f"{timing['no_summary_s'] / timing['peer_s']:.2f}x")
    table.add_row("peer: bare Evidently DataDriftPreset on the parsed frames", f"{timing['peer_s']:.2f}", "1.00x")
    table.add_row("(writing the log through PredictionLog: not part of a pass)", f"{timing['write_s']:.2f}", "")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="1,200-customer shops, 5 shops x 4 stationary windows, 3 drift sizes with 2 + 3 windows, "
                             "1 timed pass")
    parser.add_argument("--customers", type=int, default=None, help="customers per shop (default 2,000; quick 1,200)")
    parser.add_argument("--sample", type=int, default=600, help="customers scored per window")
    parser.add_argument("--rows", type=int, default=100_000, help="logged predictions in the timed pass")
    parser.add_argument("--ref-rows", type=int, default=20_000, help="reference rows in the timed pass")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes running the streams (the timed pass always runs alone)")
    parser.add_argument("--everyone", action="store_true",
                        help="replay every known customer, as the server scores them, not only those who had bought "
                             "(the reference's population)")
    args = parser.parse_args()
    quiet()
    from monitoring.config import MonitorConfig
    from personalize.settings import Settings

    started = time.perf_counter()
    customers = args.customers or (1_200 if args.quick else 2_000)
    shops, per_shop = (5, 4) if args.quick else (20, 2)
    sizes = QUICK_SIZES if args.quick else SIZES
    prefix, drifted = (2, 3) if args.quick else (PREFIX, DRIFTED)
    with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as tmpdir:
        tmp = Path(tmpdir)
        settings = Settings(home=tmp / "home")
        setup = build_champion(settings, customers)
        print(f"champion: test ROC-AUC {setup['test_auc']:.4f}, gate {'passed' if setup['gate_passed'] else 'forced'}, "
              f"reference {len(setup['reference'].frame):,} rows x {len(setup['reference'].features)} features at "
              f"M = {setup['moment'].date()} ({setup['setup_s']:.0f}s)", flush=True)
        t = time.perf_counter()
        stationary, drifts = simulate(settings, setup, customers, args.sample, args.everyone, shops, per_shop, sizes,
                                      prefix, drifted, args.workers)
        simulate_s = time.perf_counter() - t
        t = time.perf_counter()
        timing = pass_time_figures(tmp, args.rows, args.ref_rows, 1 if args.quick else 3, not args.quick)
        timing_s = time.perf_counter() - t

    policy = MonitorConfig()
    windows = [w for s in stationary["shops"] for w in s["windows"]]
    by_rule: dict[str, int] = {}
    for w in windows:
        for r in w["alerts"]:
            by_rule[r] = by_rule.get(r, 0) + 1
    hurting = [s for s in drifts["sizes"] if s["hurts"]]
    detected = [s["delay"] for s in hurting if s["delay"] is not None]
    key = {s["size"]: s["size"].replace(" ", "") for s in drifts["sizes"]}
    out: dict[str, Any] = {
        "bench": "monitoring",
        "false_alarm_rate": round(sum(bool(w["alerts"]) for w in windows) / len(windows), 4),
        "detection_delay_windows": median_delay(drifts["sizes"]),
        "monitor_pass_s": round(timing["pass_s"], 3),
        "peer_pass_s": round(timing["peer_s"], 3),
        "pass_vs_peer": round(timing["ratio"], 2),
        "read_window_s": round(timing["read_s"], 3),
        "pass_no_summary_s": None if timing["no_summary_s"] is None else round(timing["no_summary_s"], 3),
        "stationary_windows": len(windows),
        "false_alarms": sum(bool(w["alerts"]) for w in windows),
        "false_alarms_by_rule": by_rule,
        "stationary_prediction_drift_median": round(statistics.median(w["prediction_drift"] for w in windows), 4),
        "stationary_prediction_drift_max": round(max(w["prediction_drift"] for w in windows), 4),
        "stationary_drift_share_max": round(max(w["drift_share"] for w in windows), 4),
        "prediction_threshold": policy.drift.prediction_threshold,
        "share_threshold": policy.drift.share_threshold,
        "delays": {key[s["size"]]: s["delay"] for s in drifts["sizes"]},
        "auc_drops": {key[s["size"]]: round(s["auc_drop"], 4) for s in drifts["sizes"]},
        "hurting_sizes": len(hurting),
        "undetected_hurting": len(hurting) - len(detected),
        "detection_delay_detected_median": float(statistics.median(detected)) if detected else None,
        "prefix_false_alarms": sum(s["prefix_alerts"] for s in drifts["sizes"]),
        "prefix_windows": prefix * len(drifts["sizes"]),
        "drifted_windows": drifted,
        "window_pass_s": round(statistics.median(w["seconds"] for s in drifts["sizes"] for w in s["windows"]), 3),
        "champion_test_auc": round(setup["test_auc"], 4),
        "quick": args.quick,
        "everyone": args.everyone,
        "customers": customers,
        "sample": args.sample,
        "rows": args.rows,
        "ref_rows": args.ref_rows,
        "features": FEATURES,
        "workers": args.workers,
        "cores": os.cpu_count(),
        "setup_s": round(setup["setup_s"], 1),
        "simulate_s": round(simulate_s, 1),
        "timing_s": round(timing_s, 1),
        "bench_s": round(time.perf_counter() - started, 1),
    }
    print()
    print_tables(stationary, drifts, timing, out)
    print(f"{os.cpu_count()} cores, {out['bench_s']:.0f}s in all (set-up {out['setup_s']:.0f}s, streams on "
          f"{args.workers} process(es) {out['simulate_s']:.0f}s, timed pass {out['timing_s']:.0f}s)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
