"""Quality of the purchase-cycle models against a BG/NBD peer fitted with ``lifetimes`` in the same run.

    python bench/quality_cycle.py            # candidates bgnbd, pareto_nbd, aft, hybrid
    python bench/quality_cycle.py --quick    # candidates bgnbd, aft, hybrid (no Pareto/NBD): a few minutes

Two data sets, each with a fixed protocol; the model is chosen by :func:`training.cycle.select_cycle_model`, which
only sees transactions before the calibration end (its own validation is inside the calibration period):

- CDNOW master file (23,570 customers, all first bought in Q1 1997): calibration up to 1997-12-31 inclusive,
  holdout 1998-01-01 .. 1998-06-30 (the weeks 52-78); target = distinct purchase days in the holdout.
- Online Retail (UCI): the last 90 days of the data as the holdout.

The peer is ``lifetimes.BetaGeoFitter`` fitted on the same calibration summary (cross-checked against
``lifetimes.utils.summary_data_from_transaction_data`` on the same transactions) and scored against the same
actuals. When it does not converge unpenalised (Online Retail: the dropout parameter runs to 0), the smallest
penalizer that converges is used and reported. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/, whose features.py would shadow the features package

log = logging.getLogger("bench.quality_cycle")

CDNOW_END = pd.Timestamp("1998-01-01")  # calibration: purchases up to 1997-12-31 inclusive
CDNOW_HOLDOUT_END = pd.Timestamp("1998-07-01")  # holdout: 1998-01-01 .. 1998-06-30
RETAIL_HORIZON = 90
PENALIZERS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)


def _load(data_root: Path, name: str) -> pd.DataFrame:
    from features.datasets import load_transactions, transaction_sources

    result, _ = load_transactions(transaction_sources(data_root)[name], now=None)
    return result.valid


def _peer(transactions: pd.DataFrame, end: pd.Timestamp, summary: pd.DataFrame,
          horizon_days: int) -> tuple[np.ndarray, float]:
    """lifetimes BG/NBD on the calibration summary; its expected purchases over the horizon and the penalizer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lifetimes import BetaGeoFitter
        from lifetimes.utils import summary_data_from_transaction_data

        calibration = transactions[(transactions["timestamp"] < end) & ~transactions["is_return"]]
        theirs = summary_data_from_transaction_data(calibration, "customer_id", "timestamp",
                                                    monetary_value_col="amount", observation_period_end=end,
                                                    freq="D").sort_index()
        ours = summary.set_index("customer_id").sort_index()
        for column in ("frequency", "recency", "T"):
            if not np.allclose(theirs[column].to_numpy(float), ours[column].to_numpy(float)):
                raise SystemExit(f"our calibration summary and lifetimes' disagree on {column}")
        for penalizer in PENALIZERS:
            fitter = BetaGeoFitter(penalizer_coef=penalizer)
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # lifetimes prints the optimiser's report
                    fitter.fit(ours["frequency"], ours["recency"], ours["T"])
            except Exception as exc:  # lifetimes raises its own ConvergenceError
                log.info("lifetimes BG/NBD with penalizer %g did not converge: %s", penalizer, type(exc).__name__)
                continue
            expected = fitter.conditional_expected_number_of_purchases_up_to_time(
                horizon_days, ours["frequency"], ours["recency"], ours["T"])
            expected = pd.Series(np.asarray(expected, dtype=float), index=ours.index)
            return expected.reindex(summary["customer_id"]).to_numpy(float), penalizer
    raise SystemExit("the lifetimes BG/NBD peer did not converge with any penalizer")


def _one(transactions: pd.DataFrame, end: pd.Timestamp, horizon_days: int,
         candidates: tuple[str, ...]) -> dict[str, Any]:
    from training.cycle import CycleConfig, customer_summary, cycle_metrics, select_cycle_model

    started = time.perf_counter()
    result = select_cycle_model(transactions, end, CycleConfig(horizon_days=horizon_days, candidates=candidates))
    seconds = time.perf_counter() - started
    holdout = customer_summary(transactions, end, horizon_days)
    ours = cycle_metrics(holdout, result.model.predict(holdout, horizon_days))
    peer_expected, penalizer = _peer(transactions, end, holdout, horizon_days)
    actual = holdout["actual_purchases"].to_numpy(float)
    return {
        "selected": result.winner,
        "rmse": ours["rmse"], "mae": ours["mae"], "total_ratio": ours["total_ratio"],
        "concordance": ours.get("concordance", float("nan")), "days_mae": ours.get("days_mae", float("nan")),
        "rmse_bgnbd": float(np.sqrt(np.mean((peer_expected - actual) ** 2))),
        "mae_bgnbd": float(np.mean(np.abs(peer_expected - actual))),
        "total_ratio_bgnbd": float(peer_expected.sum() / actual.sum()),
        "peer_penalizer": penalizer,
        "customers": len(holdout), "actual_total": float(actual.sum()),
        "predicted_total": float(ours["total_ratio"] * actual.sum()),
        "validation": {name: {k: round(v, 4) for k, v in m.items()} for name, m in result.scores.items()},
        "failures": result.failures,
        "select_s": seconds,
    }


def cycle_figures(data_root: Path, quick: bool) -> dict[str, Any]:
    """The purchase-cycle quality figures on CDNOW and Online Retail (see the module docstring)."""
    candidates = ("bgnbd", "aft", "hybrid") if quick else ("bgnbd", "pareto_nbd", "aft", "hybrid")
    cdnow_tx = _load(data_root, "cdnow")
    cdnow = _one(cdnow_tx, CDNOW_END, (CDNOW_HOLDOUT_END - CDNOW_END).days, candidates)
    retail_tx = _load(data_root, "online_retail")
    data_end = retail_tx["timestamp"].max().floor("D") + pd.Timedelta(days=1)
    retail = _one(retail_tx, data_end - pd.Timedelta(days=RETAIL_HORIZON), RETAIL_HORIZON, candidates)
    out: dict[str, Any] = {}
    for prefix, figures in (("cdnow", cdnow), ("retail_cycle", retail)):
        for key, value in figures.items():
            out[f"{prefix}_{key}"] = value
    out["cdnow_rmse_vs_bgnbd"] = cdnow["rmse"] / cdnow["rmse_bgnbd"]
    out["retail_cycle_rmse_vs_bgnbd"] = retail["rmse"] / retail["rmse_bgnbd"]
    out["cdnow_target_met"] = bool(out["cdnow_rmse_vs_bgnbd"] <= 1.02 and abs(cdnow["total_ratio"] - 1) <= 0.05)
    out["retail_cycle_target_met"] = bool(retail["rmse"] < retail["rmse_bgnbd"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="no Pareto/NBD candidate")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from rich.console import Console
    from rich.table import Table

    figures = cycle_figures(args.data, args.quick)
    table = Table(title="purchase-cycle quality: selected model vs lifetimes BG/NBD peer (holdout)")
    for column in ("data set", "selected", "RMSE", "RMSE BG/NBD", "ratio", "MAE", "MAE BG/NBD", "total pred/act",
                   "C-index", "target"):
        table.add_column(column, justify="left" if column in ("data set", "selected") else "right")
    for prefix, label, rule in (("cdnow", "CDNOW", "RMSE <= 1.02 x peer, total +-5 %"),
                                ("retail_cycle", "Online Retail", "RMSE < peer")):
        f = {k[len(prefix) + 1:]: v for k, v in figures.items() if k.startswith(prefix + "_")}
        table.add_row(label, f["selected"], f"{f['rmse']:.4f}", f"{f['rmse_bgnbd']:.4f}", f"{f['rmse_vs_bgnbd']:.3f}",
                      f"{f['mae']:.4f}", f"{f['mae_bgnbd']:.4f}", f"{f['total_ratio']:.3f}",
                      f"{f['concordance']:.3f}", ("met: " if f["target_met"] else "MISSED: ") + rule)
    console = Console(width=160)
    console.print(table)
    for prefix, label in (("cdnow", "CDNOW"), ("retail_cycle", "Online Retail")):
        console.print(f"{label} inner validation (inside the calibration period): {figures[prefix + '_validation']}"
                      + (f"; skipped: {figures[prefix + '_failures']}" if figures[prefix + "_failures"] else ""))
    summary = {"bench": "quality_cycle", "quick": args.quick}
    for key, value in figures.items():
        if key.endswith(("_validation", "_failures")):
            continue
        summary[key] = round(value, 4) if isinstance(value, float) and not key.endswith("_penalizer") else value
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
