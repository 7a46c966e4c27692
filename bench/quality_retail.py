"""Churn and propensity on Online Retail, trained from its transactions with the out-of-time split of
``personalize train`` (train cutoffs, then a validation cutoff one horizon before the test cutoff).

    python bench/quality_retail.py            # the default tuning budget (30 trials)
    python bench/quality_retail.py --quick    # 8 trials

The figures are the held-out test ROC-AUC of the calibrated model and, beside it, a peer in the same run: a
logistic regression on the same features and the same split (standardized, missing values at the training
median). No MLflow: the job is the same as ``train_and_register`` without logging and registering. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/, whose features.py would shadow the features package


def _logreg_auc(prepared: Any) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import StandardScaler

    cols = prepared.columns.numeric
    model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(prepared.train[cols].astype(float), prepared.train["label"])
    return float(roc_auc_score(prepared.test["label"], model.predict_proba(prepared.test[cols].astype(float))[:, 1]))


def retail_classifier_figures(data_root: Path, quick: bool) -> dict[str, Any]:
    """Ingest Online Retail into a temporary home, then train churn and propensity out of time."""
    import optuna

    from features.pipeline import ingest_builtin
    from personalize.settings import Settings
    from training.train import TrainConfig, fit_classifier, prepare
    from training.tune import TuneConfig, tune

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-retail-") as tmp:
        settings = Settings(home=Path(tmp))
        ingest_builtin(settings, "online_retail", None, data_root)
        config = TrainConfig(tune=TuneConfig(trials=8 if quick else 30))
        for task in ("churn", "propensity"):
            started = time.perf_counter()
            prepared = prepare(settings.dataset_dir("online_retail"), task, config)
            storage = f"sqlite:///{tmp}/optuna.db"
            trained = fit_classifier(prepared, config,
                                     lambda split, search: tune(split, search, storage, f"bench-{task}"))
            optuna.delete_study(study_name=f"bench-{task}", storage=storage)
            m = trained.test_metrics
            out[f"retail_{task}_auc"] = round(m["roc_auc"], 4)
            out[f"retail_{task}_auc_logreg"] = round(_logreg_auc(prepared), 4)
            out[f"retail_{task}_valid_auc"] = round(trained.tuned.valid_auc, 4)
            out[f"retail_{task}_ece"] = round(m["ece"], 4)
            out[f"retail_{task}_test_rows"] = len(prepared.test)
            out[f"retail_{task}_s"] = round(time.perf_counter() - started, 1)
            out[f"retail_{task}_split"] = prepared.split
    return out


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 tuning trials instead of 30")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    figures = retail_classifier_figures(args.data_root, args.quick)
    table = Table(title="Online Retail, out of time: held-out test ROC-AUC")
    for col in ("task", "ours (tuned, calibrated)", "logistic regression (peer)", "validation AUC", "test ECE",
                "test rows", "seconds"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task in ("churn", "propensity"):
        f = {k.removeprefix(f"retail_{task}_"): v for k, v in figures.items() if k.startswith(f"retail_{task}_")}
        table.add_row(task, f"{f['auc']:.4f}", f"{f['auc_logreg']:.4f}", f"{f['valid_auc']:.4f}", f"{f['ece']:.4f}",
                      f"{f['test_rows']:,}", f"{f['s']:.0f}")
    Console(width=160).print(table)
    print(figures["retail_churn_split"])
    print(json.dumps({"bench": "quality_retail", **{k: v for k, v in figures.items()
                                                    if isinstance(v, (int, float)) and not np.isnan(v)}}))


if __name__ == "__main__":
    main()
