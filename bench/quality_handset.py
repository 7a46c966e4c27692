"""How high hand-set gradient boosting goes on the labeled tables' folds: a ceiling for the quality targets.

    python bench/quality_handset.py            # 81 LightGBM settings x 5 folds per table, extra trees: ~12 minutes
    python bench/quality_handset.py --quick    # 8 settings: about a minute

The folds are bench/quality.py's (``StratifiedKFold(5, shuffle=True, random_state=42)``). Each setting of a grid of
LightGBM hyperparameters (learning rate x rounds x leaves x minimum leaf size, with row and column subsampling) is
fitted on each training part and scored on its test fold, the categoricals as LightGBM's own categorical features.
The best setting is then picked *by its mean test-fold AUC*: it has seen the test folds, so its score is an
optimistic ceiling for any model tuned without them, such as ours in bench/quality.py. Beside it, on the same
folds, the best setting's mean prediction over 5 seeds, and its average with an XGBoost of the same depth
(``xgb_blend``): whether bagging or mixing the two libraries adds anything.

Last, a model of another kind: scikit-learn's extra-randomized trees (``ExtraTreesClassifier``, numerics on a signed
log scale, categoricals one-hot), averaged with the best setting's prediction. The trees' setting and the blend's
weight (0 allowed) are chosen blind, by a 4-fold cross-validation inside each training part, then refitted on it and
scored on the test fold (``et_blend``; ``et`` is the trees alone, their setting chosen the same way). Only that part
is blind: the boosted half is the best setting, picked on the test folds like the rest. The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before bench/, whose features.py would shadow the features package

SEED = 42
FOLDS = 5
TABLES = {"telco_churn": "telco", "online_shoppers": "shoppers"}
TARGETS = {"telco_churn": 0.850, "online_shoppers": 0.936}  # the targets (bench/quality.py)
GRID = {"learning_rate": (0.01, 0.02, 0.05), "n_estimators": (200, 400, 800), "num_leaves": (7, 15, 31),
        "min_child_samples": (20, 50, 100)}
QUICK_GRID = {"learning_rate": (0.02,), "n_estimators": (200, 400), "num_leaves": (7, 31),
              "min_child_samples": (20, 100)}
FIXED = {"subsample": 0.8, "subsample_freq": 1, "colsample_bytree": 0.7, "verbose": -1}
ET_GRID = ((0.5, 5), (0.7, 5), (0.7, 10), (0.7, 20))  # (max_features, min_samples_leaf) of the extra trees
ET_WEIGHTS = (0.0, 0.25, 0.5, 0.75)  # the extra trees' share of the blend
INNER = 4  # folds of the cross-validation that picks the extra trees' setting and weight


def table(name: str, data_root: Path) -> tuple[Any, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The labeled table as a frame LightGBM and XGBoost take as is (categoricals as ``category``), its labels and
    bench/quality.py's folds."""
    from sklearn.model_selection import StratifiedKFold

    from features.datasets import load_labeled_source

    loaded = load_labeled_source(name, data_root)
    frame = loaded.frame.reset_index(drop=True)
    x = frame[loaded.numeric + loaded.boolean + loaded.categorical].copy()
    x[loaded.boolean] = x[loaded.boolean].astype(float)
    for c in loaded.categorical:
        x[c] = x[c].astype("category")
    y = frame["label"].to_numpy().astype(int)
    folds = list(StratifiedKFold(FOLDS, shuffle=True, random_state=SEED).split(np.zeros(len(y)), y))
    return x, y, folds


def lgb_fold_auc(x: Any, y: np.ndarray, train: np.ndarray, test: np.ndarray, params: dict[str, Any],
                 seed: int = 0) -> tuple[float, np.ndarray]:
    import lightgbm as lgb
    from sklearn.metrics import roc_auc_score

    model = lgb.LGBMClassifier(**params, **FIXED, random_state=seed).fit(x.iloc[train], y[train])
    p = model.predict_proba(x.iloc[test])[:, 1]
    return float(roc_auc_score(y[test], p)), p


def extra_trees(max_features: float, min_leaf: int, numeric: list[str], categorical: list[str]) -> Any:
    """Extra-randomized trees on signed-log numerics (their cut points are drawn uniformly over a feature's range,
    so a long-tailed count would otherwise be cut almost only in its tail) and one-hot categoricals."""
    from sklearn.compose import make_column_transformer
    from sklearn.ensemble import ExtraTreesClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

    prepare = make_column_transformer((FunctionTransformer(lambda a: np.sign(a) * np.log1p(np.abs(a))), numeric),
                                      (OneHotEncoder(handle_unknown="ignore"), categorical))
    return make_pipeline(prepare, ExtraTreesClassifier(300, max_features=max_features, min_samples_leaf=min_leaf,
                                                       n_jobs=os.cpu_count(), random_state=0))


def et_blend_figures(x: Any, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]], best: dict[str, Any],
                     settings: tuple[tuple[float, int], ...] = ET_GRID) -> dict[str, Any]:
    """Per outer fold: the extra trees' setting and blend weight picked by an inner cross-validation on the training
    part, then the refitted blend (and the trees alone) scored on the test fold."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    categorical = [c for c in x.columns if str(x[c].dtype) == "category"]
    numeric = [c for c in x.columns if c not in categorical]
    xs = x.astype({c: str for c in categorical})

    def et_proba(setting: tuple[float, int], train: np.ndarray, test: np.ndarray) -> np.ndarray:
        model = extra_trees(*setting, numeric, categorical).fit(xs.iloc[train], y[train])
        return model.predict_proba(xs.iloc[test])[:, 1]

    alone, blend, chosen = [], [], []
    for train, test in folds:
        inner = StratifiedKFold(INNER, shuffle=True, random_state=SEED).split(np.zeros(len(train)), y[train])
        boosted = np.zeros(len(train))
        trees = {s: np.zeros(len(train)) for s in settings}
        for fit_on, score_on in inner:
            boosted[score_on] = lgb_fold_auc(x, y, train[fit_on], train[score_on], best)[1]
            for s in settings:
                trees[s][score_on] = et_proba(s, train[fit_on], train[score_on])
        cv = {(s, w): roc_auc_score(y[train], (1 - w) * boosted + w * trees[s]) for s in settings for w in ET_WEIGHTS}
        setting, weight = max(cv, key=cv.get)
        alone_setting = max(settings, key=lambda s: roc_auc_score(y[train], trees[s]))
        p_boosted = lgb_fold_auc(x, y, train, test, best)[1]
        p_trees = et_proba(setting, train, test)
        blend.append(roc_auc_score(y[test], (1 - weight) * p_boosted + weight * p_trees))
        alone.append(roc_auc_score(y[test], p_trees if alone_setting == setting else
                                   et_proba(alone_setting, train, test)))
        chosen.append({"max_features": setting[0], "min_samples_leaf": setting[1], "weight": weight})
    return {"et_auc": float(np.mean(alone)), "et_blend_auc": float(np.mean(blend)), "et_chosen": chosen,
            "et_folds": len(folds)}


def grid_figures(name: str, data_root: Path, grid: dict[str, tuple], quick: bool = False) -> dict[str, Any]:
    import xgboost as xgb
    from sklearn.metrics import roc_auc_score

    x, y, folds = table(name, data_root)
    scores = []
    started = time.perf_counter()
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        scores.append((float(np.mean([lgb_fold_auc(x, y, tr, te, params)[0] for tr, te in folds])), params))
    scores.sort(key=lambda s: -s[0])
    best_auc, best = scores[0]
    bagged, blended = [], []
    depth = max(2, int(np.log2(best["num_leaves"] + 1)))
    for train, test in folds:
        p = np.mean([lgb_fold_auc(x, y, train, test, best, seed)[1] for seed in range(5)], axis=0)
        bagged.append(roc_auc_score(y[test], p))
        booster = xgb.XGBClassifier(n_estimators=best["n_estimators"], learning_rate=best["learning_rate"],
                                    max_depth=depth, subsample=0.8, colsample_bytree=0.7, enable_categorical=True,
                                    tree_method="hist", random_state=0).fit(x.iloc[train], y[train])
        blended.append(roc_auc_score(y[test], (p + booster.predict_proba(x.iloc[test])[:, 1]) / 2))
    trees = et_blend_figures(x, y, folds[:1], best, ET_GRID[2:3]) if quick else et_blend_figures(x, y, folds, best)
    return {"name": name, "settings": len(scores), "best": best, "best_auc": best_auc,
            "median_auc": float(np.median([s[0] for s in scores])), "worst_auc": scores[-1][0],
            "bagged_auc": float(np.mean(bagged)), "blend_auc": float(np.mean(blended)), "xgb_depth": depth,
            **trees, "top": scores[:5], "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="8 settings instead of 81; the extra trees in one setting, on the first fold")
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("PERSONALIZE_DATA_ROOT", REPO.parent / "shared" / "data")))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from rich.console import Console
    from rich.table import Table

    started = time.perf_counter()
    grid = QUICK_GRID if args.quick else GRID
    sections = []
    for name in TABLES:
        print(f"{name}:", flush=True)
        sections.append(s := grid_figures(name, args.data_root, grid, args.quick))
        for auc, params in s["top"]:
            print(f"  {auc:.4f}  {params}", flush=True)

    t = Table(title=f"Hand-set LightGBM on bench/quality.py's folds: {sections[0]['settings']} settings, the best "
                    "chosen on the test folds (an optimistic ceiling)")
    for col in ("table", "target", "best setting", "best", "median", "worst", "best x 5 seeds", "+ XGBoost",
                "extra trees", "+ extra trees"):
        t.add_column(col, justify="left" if col in ("table", "best setting") else "right")
    for s in sections:
        b = s["best"]
        t.add_row(s["name"], f"{TARGETS[s['name']]:.3f}",
                  f"lr {b['learning_rate']}, {b['n_estimators']} rounds, {b['num_leaves']} leaves, "
                  f"min leaf {b['min_child_samples']}", f"{s['best_auc']:.4f}", f"{s['median_auc']:.4f}",
                  f"{s['worst_auc']:.4f}", f"{s['bagged_auc']:.4f}", f"{s['blend_auc']:.4f}", f"{s['et_auc']:.4f}",
                  f"{s['et_blend_auc']:.4f}")
    if args.quick:
        t.caption = "--quick: the extra trees' columns are the first fold's alone, not comparable with the others"
    Console(width=160).print(t)
    out: dict[str, Any] = {"bench": "quality_handset", "quick": args.quick, "settings": sections[0]["settings"]}
    for s in sections:
        short = TABLES[s["name"]]
        out.update({f"{short}_grid_best_auc": round(s["best_auc"], 4), f"{short}_grid_median_auc":
                    round(s["median_auc"], 4), f"{short}_grid_bagged_auc": round(s["bagged_auc"], 4),
                    f"{short}_grid_blend_auc": round(s["blend_auc"], 4), f"{short}_grid_best": s["best"],
                    f"{short}_et_auc": round(s["et_auc"], 4), f"{short}_et_blend_auc": round(s["et_blend_auc"], 4),
                    f"{short}_et_chosen": s["et_chosen"], f"{short}_et_folds": s["et_folds"]})
    out["bench_s"] = round(time.perf_counter() - started, 1)
    print(f"{os.cpu_count()} cores, {out['bench_s']:.0f}s in all")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
