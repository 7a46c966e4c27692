"""Confidence-based performance estimation (CBPE, as NannyML defines it) for a calibrated binary classifier.

If the probabilities are calibrated, a row scored ``p`` is a positive with probability ``p``, so the expected
confusion matrix at any threshold, and so the expected ROC curve, follow from the scores alone, before a single label
arrives. The estimate is only as good as the calibration: it sees covariate shift (the scores move), not a change in
how the features relate to the label (concept drift), which needs the realized labels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["estimate"]


def expected_roc_auc(p: np.ndarray) -> float:
    """The ROC-AUC expected when each row is a positive with its own probability: the expected true- and
    false-positive counts above every threshold, integrated by the trapezoid rule (ties count as one step)."""
    p = np.asarray(p, dtype=float)
    p = p[np.isfinite(p)]
    if len(p) < 2:
        return float("nan")
    order = np.argsort(-p, kind="stable")
    q = p[order]
    last = np.r_[np.diff(q) != 0, True]  # the last row of each run of equal scores
    tp = np.cumsum(q)[last]
    fp = np.cumsum(1.0 - q)[last]
    pos, neg = tp[-1], fp[-1]
    if pos <= 0 or neg <= 0:
        return float("nan")
    tpr = np.r_[0.0, tp / pos]
    fpr = np.r_[0.0, fp / neg]
    return float(np.trapezoid(tpr, fpr))


def estimate(p: np.ndarray, threshold: float) -> dict[str, float]:
    """Expected ROC-AUC and, at ``threshold``, expected precision, recall, F1 and accuracy, with the expected
    positive rate; ``rows`` is how many finite scores went in."""
    p = np.asarray(p, dtype=float)
    p = p[np.isfinite(p)]
    n = len(p)
    act = p >= threshold
    tp, fp = float(p[act].sum()), float((1 - p[act]).sum())
    fn, tn = float(p[~act].sum()), float((1 - p[~act]).sum())
    precision = tp / (tp + fp) if tp + fp > 0 else float("nan")
    recall = tp / (tp + fn) if tp + fn > 0 else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
    return {"rows": float(n), "roc_auc": expected_roc_auc(p), "precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / n if n else float("nan"), "positive_rate": float(p.mean()) if n else float("nan")}
