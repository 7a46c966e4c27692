"""Replay a data set's customers as traffic into the prediction log, on a simulated clock.

At each time stamp, every customer known then (or a seeded sample of them) is scored with the point-in-time features
of that moment by the champion, through the serving scorer, and logged exactly as the server logs a request, stamped
with that time. Replaying a synthetic data set with a drift knob gives a stream whose ground truth is
known; the tests, the demo and ``bench/monitoring.py`` monitor such streams.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["replay"]


def replay(client: Any, model: str, dataset_dir: Path, log_root: Path, stamps: Iterable[pd.Timestamp],
           salt: bytes, sample: int | None = None, seed: int = 0, endpoint: str | None = None,
           as_of: pd.Timestamp | None = None, buyers_only: bool = True) -> dict[str, int]:
    """Score and log every (sampled) customer at each of ``stamps`` with the model's champion at that moment (a new
    champion is picked up between two stamps, as the server's hot reload would); returns rows per version.

    The features are those of each stamp's moment, or, with ``as_of``, all of that one moment (the same population
    drawn again and again: a stream with no change in it, whatever the data set does over time). ``buyers_only``
    keeps the customers a churn model is defined for (who have bought before), as its training frame does."""
    from features.definitions import FeatureSpec
    from features.store import FeatureStore
    from serving.batch import check_batchable, score_matrix
    from serving.predlog import PredictionLog, make_row, pseudonymize, utc
    from serving.scoring import load

    store = FeatureStore(Path(dataset_dir))
    rng = np.random.default_rng(seed)
    written: dict[str, int] = {}
    predictions = PredictionLog(Path(log_root), flush_s=3600)
    loaded = None
    frames: dict[pd.Timestamp, pd.DataFrame] = {}
    try:
        for stamp in stamps:
            stamp = pd.Timestamp(stamp)
            moment = pd.Timestamp(as_of) if as_of is not None else stamp
            version = str(client.get_model_version_by_alias(model, "champion").version)
            if loaded is None or loaded.version != version:
                loaded = load(client, model, "champion", threads=2)
                check_batchable(loaded, model)  # one row per customer: not a cycle or per-category model
            scorer = loaded.scorer
            if moment not in frames:
                frames = {moment: store.offline([moment], FeatureSpec(categories=store.top_categories(moment,
                                                                                                    k=10_000)))}
            frame = frames[moment]
            if buyers_only and "frequency" in frame.columns:
                frame = frame[frame["frequency"] > 0]
            if sample is not None and len(frame) > sample:
                frame = frame.iloc[np.sort(rng.choice(len(frame), size=sample, replace=False))]
            for c in scorer.features:
                if c not in frame.columns:
                    frame[c] = 0.0  # a category share the model knows but nobody had bought yet
            p = score_matrix(scorer, frame)
            records = frame[scorer.features].astype(float).replace({np.nan: None}).to_dict("records")
            ts = utc(stamp)
            rows = [make_row(uuid.uuid4().hex, endpoint or model, loaded.ref, pseudonymize(str(cid), salt), False,
                             rec, {"probability": round(float(q), 6), "decision": bool(q >= scorer.threshold)}, None,
                             ts=ts)
                    for cid, rec, q in zip(frame["customer_id"], records, p)]
            predictions.append(rows)
            predictions.flush()
            written[loaded.version] = written.get(loaded.version, 0) + len(rows)
    finally:
        predictions.close()
    log.info("replayed %s into %s", written, log_root)
    return written
