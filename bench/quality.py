"""Model quality on the real labeled tables: our tuned boosters beside a logistic-regression peer, same folds.

    python bench/quality.py            # 5 folds, default tuning budget: about 10 minutes on 2 cores
    python bench/quality.py --quick    # the first 2 of the 5 folds, fewer trials, quick cycle/retail: about 4 minutes

For each labeled data set (Telco churn, Online Shoppers) the rows are split by ``StratifiedKFold(5, shuffle=True,
random_state=42)``. In each outer fold, the hyperparameters are chosen without seeing the test fold: the training
part is split 80/20 like ``split_labeled_table`` does (``stratified_split``), :func:`training.tune.tune` runs its
default study on it (trials scored by cross-validation on the 80%), then the trial the study's selection rule
chooses (the simplest within one standard error of the best score: :func:`training.tune.ranked_trials`) is refitted
on the whole training part by :func:`training.tune.final_booster`, the function ``personalize train`` ships its
booster from, and scored on the test fold (calibration, fitted on out-of-fold predictions, is monotone and leaves
the AUC as it is). Beside it, not shipped: the mean prediction of the first three trials, each refitted the same
way (``*_auc_top3``, :func:`training.tune.refit_best`). The peer is
a standard scikit-learn pipeline (median imputation and standard scaling for numerics and booleans, one-hot for
categoricals, ``LogisticRegression``) on the same folds.

``tune_s`` is the wall time of one :func:`training.tune.tune` call with the default ``TuneConfig`` on the Telco
table's stratified 80/20 split, the split the product tunes on. Figures are per-fold ROC-AUCs with their mean and
median; the last line is one JSON object. Sections are functions returning dicts (``labeled_cv_figures``,
``tune_seconds``; ``cycle_figures`` from ``bench/quality_cycle.py`` and ``retail_classifier_figures`` from
``bench/quality_retail.py``), merged into the JSON.
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
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FOLDS = 5
SEED = 42
QUICK_FOLDS = 2  # --quick scores the first 2 of the 5 folds
QUICK_TRIALS = 6
TOP = 3  # trials averaged in the side figure (the shipped model is the first alone)
SHORT = {"telco_churn": "telco", "online_shoppers": "shoppers"}
TARGETS = {"telco_churn": 0.850, "online_shoppers": 0.936}  # the targets for our model (mean of 5 folds)


def logreg_auc(frame, numeric: list[str], categorical: list[str], boolean: list[str], train: np.ndarray,
               test: np.ndarray) -> float:
    """The peer: one-hot categoricals, scaled numerics, plain logistic regression."""
    from sklearn.compose import make_column_transformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    columns = numeric + boolean
    x = frame[columns + categorical].copy()
    x[boolean] = x[boolean].astype(float)
    prepare = make_column_transformer(
        (make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), columns),
        (make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")),
         categorical))
    model = make_pipeline(prepare, LogisticRegression(max_iter=5000))
    y = frame["label"].to_numpy()
    model.fit(x.iloc[train], y[train])
    return float(roc_auc_score(y[test], model.predict_proba(x.iloc[test])[:, 1]))


def tuned_auc(frame, numeric: list[str], categorical: list[str], boolean: list[str], train: np.ndarray,
              test: np.ndarray, config, study: str) -> tuple[float, dict[str, Any]]:
    """Ours: tune on the training part only, refit the chosen trial on it as `personalize train` does, score the
    test fold."""
    from sklearn.metrics import roc_auc_score

    from training.tune import final_booster, model_matrix, predict, predict_mean, refit_best, stratified_split, tune

    y = frame["label"].to_numpy()
    x_train, vocabulary = model_matrix(frame.iloc[train], numeric, categorical, boolean)
    x_test, _ = model_matrix(frame.iloc[test], numeric, categorical, boolean, vocabulary)
    split = stratified_split(x_train, y[train], 0.2, SEED)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        started = time.perf_counter()
        result = tune(split, config, f"sqlite:///{Path(tmp) / 'optuna.db'}", study)
        seconds = time.perf_counter() - started
        booster, rounds = final_booster(result, split, config)
        top = refit_best(result, split, TOP, config.selection)
    auc = float(roc_auc_score(y[test], predict(booster, x_test, rounds)))
    pruned = sum(t.state.name == "PRUNED" for t in result.study.trials)
    return auc, {"family": result.family, "inner_cv_auc": result.valid_auc, "inner_cv_top": result.top_auc,
                 "top_auc": float(roc_auc_score(y[test], predict_mean(top, x_test))),
                 "tune_s": seconds, "pruned": pruned,
                 "trials": len(result.study.trials)}


def labeled_cv_figures(name: str, data_root: Path, quick: bool, trials: int | None = None,
                       selection: str = "one_se") -> dict[str, Any]:
    """Per-fold ROC-AUCs of our tuned model and of the logistic-regression peer on one labeled data set."""
    from sklearn.model_selection import StratifiedKFold

    from features.datasets import load_labeled_source
    from training.tune import TuneConfig

    table = load_labeled_source(name, data_root)
    frame = table.frame.reset_index(drop=True)
    y = frame["label"].to_numpy()
    folds = list(StratifiedKFold(FOLDS, shuffle=True, random_state=SEED).split(np.zeros(len(y)), y))
    folds = folds[:QUICK_FOLDS] if quick else folds
    config = TuneConfig(selection=selection,
                        **({"trials": trials or QUICK_TRIALS} if quick else ({"trials": trials} if trials else {})))
    ours, peer, details = [], [], []
    for k, (train, test) in enumerate(folds):
        peer.append(logreg_auc(frame, table.numeric, table.categorical, table.boolean, train, test))
        auc, info = tuned_auc(frame, table.numeric, table.categorical, table.boolean, train, test, config,
                              f"{name}-fold{k}")
        ours.append(auc)
        details.append(info)
        print(f"  {name} fold {k + 1}/{len(folds)}: ours {auc:.4f} (top {TOP} averaged {info['top_auc']:.4f}; "
              f"{info['family']} chosen, inner CV "
              f"{info['inner_cv_auc']:.4f}, {info['trials']} trials, {info['pruned']} pruned, "
              f"{info['tune_s']:.0f}s)  logistic regression {peer[-1]:.4f}", flush=True)
    return {"name": name, "rows": len(frame), "positive_rate": float(y.mean()), "folds": len(folds),
            "trials": config.trials, "selection": selection, "ours": ours, "logreg": peer, "details": details}


def tune_seconds(data_root: Path) -> float:
    """Wall seconds of one default tune() on the Telco table's stratified 80/20 split."""
    from features.datasets import load_labeled_source
    from training.tune import TuneConfig, model_matrix, stratified_split, tune

    table = load_labeled_source("telco_churn", data_root)
    x, _ = model_matrix(table.frame, table.numeric, table.categorical, table.boolean)
    split = stratified_split(x, table.frame["label"].to_numpy(), 0.2, SEED)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        started = time.perf_counter()
        result = tune(split, TuneConfig(), f"sqlite:///{Path(tmp) / 'optuna.db'}", "telco-default")
        seconds = time.perf_counter() - started
    print(f"  default tune() on Telco 80/20: {seconds:.1f}s, {len(result.study.trials)} trials, best "
          f"{result.family}, CV {result.valid_auc:.4f}, holdout {result.holdout_auc:.4f}", flush=True)
    return seconds


def cycle_and_retail_figures(data_root: Path, quick: bool) -> dict[str, Any]:
    """The purchase-cycle section (bench/quality_cycle.py) and Online Retail churn/propensity
    (bench/quality_retail.py), each with its peer fitted in the same run."""
    from quality_cycle import cycle_figures
    from quality_retail import retail_classifier_figures

    return {**cycle_figures(data_root, quick), **retail_classifier_figures(data_root, quick)}


def print_peer_table(figures: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Purchase cycle and Online Retail classifiers: ours beside the peer of the same run")
    for col in ("figure", "ours", "peer", "ratio", "target"):
        table.add_column(col, justify="left" if col in ("figure", "target") else "right")
    rows = [("CDNOW per-customer RMSE (weeks 52-78)", "cdnow_rmse", "cdnow_rmse_bgnbd", "<= 1.02x BG/NBD"),
            ("Online Retail cycle RMSE (last 90 days)", "retail_cycle_rmse", "retail_cycle_rmse_bgnbd", "< BG/NBD"),
            ("Online Retail churn test ROC-AUC (out of time)", "retail_churn_auc", "retail_churn_auc_logreg", "reported"),
            ("Online Retail propensity test ROC-AUC", "retail_propensity_auc", "retail_propensity_auc_logreg",
             "reported")]
    for label, ours, peer, target in rows:
        if ours in figures and peer in figures:
            table.add_row(label, f"{figures[ours]:.4f}", f"{figures[peer]:.4f}", f"{figures[ours] / figures[peer]:.3f}",
                          target)
    if "cdnow_total_ratio" in figures:
        table.add_row("CDNOW total predicted / actual", f"{figures['cdnow_total_ratio']:.3f}", "", "", "within 5%")
    Console(width=max(Console().width, 150)).print(table)


def print_table(sections: list[dict[str, Any]], quick: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (f"ROC-AUC, stratified {FOLDS}-fold CV (shuffled, seed {SEED})"
             + (f": QUICK, first {QUICK_FOLDS} folds only, {QUICK_TRIALS} trials" if quick else ""))
    table = Table(title=title)
    for col in ("data set", "model", "per fold", "mean", "median", "vs peer", "target"):
        table.add_column(col, justify="left" if col in ("data set", "model", "per fold") else "right")
    for s in sections:
        ours, peer = np.mean(s["ours"]), np.mean(s["logreg"])
        target = TARGETS.get(s["name"])
        met = "" if target is None else f"{target:.3f} {'met' if ours >= target else 'NOT met'}"
        table.add_row(s["name"], f"ours (tuned, {s['trials']} trials, chosen by {s['selection']})",
                      " ".join(f"{a:.4f}" for a in s["ours"]), f"{ours:.4f}", f"{statistics.median(s['ours']):.4f}",
                      f"{ours - peer:+.4f} ({ours / peer:.3f}x)", met)
        top = [d["top_auc"] for d in s["details"]]
        table.add_row("", f"first {TOP} trials averaged (not shipped)", " ".join(f"{a:.4f}" for a in top),
                      f"{np.mean(top):.4f}", f"{statistics.median(top):.4f}", f"{np.mean(top) - peer:+.4f}", "")
        table.add_row("", "logistic regression (peer)", " ".join(f"{a:.4f}" for a in s["logreg"]), f"{peer:.4f}",
                      f"{statistics.median(s['logreg']):.4f}", "", "")
    Console(width=max(Console().width, 150)).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_FOLDS} folds, {QUICK_TRIALS} trials")
    parser.add_argument("--trials", type=int, default=None, help="trials per study (default: TuneConfig's)")
    parser.add_argument("--selection", choices=["one_se", "best"], default="one_se",
                        help="which trial the Telco/Shoppers models ship (training.tune.ranked_trials)")
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("PERSONALIZE_DATA_ROOT", REPO.parent / "shared" / "data")))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)  # lightgbm/xgboost chatter about categorical input
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    started = time.perf_counter()
    sections = []
    for name in ("telco_churn", "online_shoppers"):
        print(f"{name}:", flush=True)
        sections.append(labeled_cv_figures(name, args.data_root, args.quick, args.trials, args.selection))
    figures: dict[str, Any] = {"bench": "quality", "quick": args.quick, "selection": args.selection}
    for s in sections:
        figures[f"{SHORT[s['name']]}_auc"] = round(float(np.mean(s["ours"])), 4)
        figures[f"{SHORT[s['name']]}_auc_logreg"] = round(float(np.mean(s["logreg"])), 4)
        figures[f"{SHORT[s['name']]}_auc_folds"] = [round(a, 4) for a in s["ours"]]
        figures[f"{SHORT[s['name']]}_auc_logreg_folds"] = [round(a, 4) for a in s["logreg"]]
        figures[f"{SHORT[s['name']]}_auc_top{TOP}"] = round(float(np.mean([d["top_auc"] for d in s["details"]])), 4)
    figures["tune_s"] = round(tune_seconds(args.data_root), 1)
    figures.update(cycle_and_retail_figures(args.data_root, args.quick))
    figures["bench_s"] = round(time.perf_counter() - started, 1)
    print()
    print_table(sections, args.quick)
    print_peer_table(figures)
    print(f"{os.cpu_count()} cores, {figures['bench_s']:.0f}s in all")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
