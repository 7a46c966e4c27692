"""Batch scoring: every customer of a data set with a model's champion, from the offline store, to Parquet.

    personalize score churn --dataset synthetic      # -> <home>/scores/churn/v<version>/scores.parquet

The features come from the same definitions as training (:meth:`features.store.FeatureStore.offline` at
``as_of``); the model is the served one (:func:`serving.scoring.load`), scored in chunks straight on the booster
(:func:`score_matrix`), so batch and online answers agree to the last digit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)
CHUNK = 200_000


@dataclass(frozen=True)
class ScoreReport:
    model: str
    version: str
    rows: int
    as_of: pd.Timestamp
    path: Path
    features_s: float
    score_s: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.score_s if self.score_s > 0 else float("inf")


def score_matrix(scorer: Any, frame: pd.DataFrame, chunk: int = CHUNK) -> np.ndarray:
    """Calibrated probabilities of a classifier for every row of ``frame`` (its feature columns, any order)."""
    missing = [c for c in scorer.features if c not in frame.columns]
    if missing:
        raise PersonalizeError(f"the frame lacks the model's feature(s) {', '.join(missing[:5])}")
    out = np.empty(len(frame))
    for start in range(0, len(frame), chunk):
        part = frame.iloc[start:start + chunk]
        if scorer.numeric_only:
            x = part[scorer.features].to_numpy(dtype=float, na_value=np.nan)
        else:
            x = scorer._matrix(part[scorer.features].to_dict("records"))
        out[start:start + len(part)] = scorer.calibrator.transform(scorer._raw(x))
    return out


def score_dataset(client: Any, name: str, dataset_dir: Path, out_dir: Path, as_of: pd.Timestamp | None = None,
                  alias: str = "champion") -> ScoreReport:
    from features.definitions import FeatureSpec
    from features.store import FeatureStore
    from serving.online import default_as_of
    from serving.scoring import load

    import os

    loaded = load(client, name, alias, threads=os.cpu_count() or 1)
    if loaded.kind != "classifier":
        raise PersonalizeError(f"{name} is a {loaded.kind} model; batch scoring covers churn and propensity")
    started = time.perf_counter()
    store = FeatureStore(dataset_dir)
    as_of = pd.Timestamp(as_of) if as_of is not None else default_as_of(store)
    spec = FeatureSpec(categories=store.top_categories(as_of, k=10_000))
    frame = store.offline([as_of], spec)
    features_s = time.perf_counter() - started
    started = time.perf_counter()
    p = score_matrix(loaded.scorer, frame)
    score_s = time.perf_counter() - started
    threshold = loaded.scorer.threshold
    out = pd.DataFrame({"customer_id": frame["customer_id"].astype(str), "as_of": as_of, "probability": p,
                        "decision": p >= threshold, "model": name, "version": loaded.version})
    path = out_dir / name / f"v{loaded.version}" / "scores.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    out.to_parquet(tmp, index=False)
    tmp.replace(path)
    log.info("scored %d customers with %s v%s in %.2fs (%.0f rows/s)", len(out), name, loaded.version, score_s,
             len(out) / max(score_s, 1e-9))
    return ScoreReport(name, loaded.version, len(out), as_of, path, features_s, score_s)
