"""Simulated impressions against a planted response: how much a decision policy loses to the oracle (regret).

Each impression draws a customer at random; the policy picks a variant knowing only the customer's *key* (the
segment or cluster the platform assigned); the customer converts with the planted probability of their *true*
segment and that variant (:data:`features.synthetic.PLANTED_RESPONSE`). Regret is the expected conversions lost
to the oracle, which always shows the true segment's best variant: ``sum(best(true) - p(true, chosen))``.

:func:`key_floor` is the other yardstick: the regret of the best any policy can do that sees only the key, i.e.
always showing each key's best variant for the mix of true segments behind it. A bandit converges to it, never
below it; how far it sits above random says how much the keys themselves carry.

Policies: ``thompson`` (the serving code's :func:`serving.decisions.thompson`, one posterior per key, updated after
every impression), ``thompson_global`` (one posterior for everyone: what a bandit without segments learns),
``random`` (uniform over the variants) and ``oracle``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from serving.decisions import thompson

SimPolicy = Literal["thompson", "thompson_global", "random", "oracle"]


@dataclass(frozen=True)
class SimResult:
    policy: str
    impressions: int
    conversions: int
    regret: float  # expected conversions lost to the oracle
    best_share: float  # impressions that got the true segment's best variant

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate(keys: np.ndarray, truth: np.ndarray, response: dict[str, dict[str, float]], impressions: int,
             policy: SimPolicy, seed: int = 0) -> SimResult:
    """Run ``impressions`` simulated impressions of ``policy`` over the customers (``keys[i]`` is what the policy
    sees of customer i, ``truth[i]`` their planted segment)."""
    if len(keys) != len(truth) or len(keys) == 0:
        raise ValueError("keys and truth must be non-empty and of the same length")
    variants = list(next(iter(response.values())))
    p = {seg: np.array([response[seg][v] for v in variants]) for seg in response}
    best = {seg: float(values.max()) for seg, values in p.items()}
    best_index = {seg: int(values.argmax()) for seg, values in p.items()}
    rng = np.random.default_rng(seed)
    who = rng.integers(0, len(keys), size=impressions)
    coins = rng.random(impressions)
    stats: dict[str, dict[str, tuple[int, int]]] = {}
    regret, conversions, hits = 0.0, 0, 0
    for t in range(impressions):
        i = who[t]
        seg = truth[i]
        if policy == "oracle":
            j = best_index[seg]
        elif policy == "random":
            j = int(rng.integers(0, len(variants)))
        else:
            key = "all" if policy == "thompson_global" else str(keys[i])
            table = stats.setdefault(key, {})
            chosen, _ = thompson(variants, table, rng)
            j = variants.index(chosen)
        converted = coins[t] < p[seg][j]
        if policy in ("thompson", "thompson_global"):
            n, s = table.get(variants[j], (0, 0))
            table[variants[j]] = (n + 1, s + int(converted))
        conversions += int(converted)
        regret += best[seg] - p[seg][j]
        hits += int(j == best_index[seg])
    return SimResult(policy, impressions, conversions, round(float(regret), 3), round(hits / impressions, 4))


def key_floor(keys: np.ndarray, truth: np.ndarray, response: dict[str, dict[str, float]]) -> float:
    """Expected regret per impression of the best policy that sees only the key: each key always shows the variant
    with the highest mean conversion over its customers' true segments (customers drawn uniformly, as in
    :func:`simulate`). 0 when every key holds one true segment; with a single key, the global best variant's."""
    if len(keys) != len(truth) or len(keys) == 0:
        raise ValueError("keys and truth must be non-empty and of the same length")
    variants = list(next(iter(response.values())))
    p = np.array([[response[str(seg)][v] for v in variants] for seg in truth])  # customer x variant
    best = p.max(axis=1)
    keys = np.asarray(keys).astype(str)
    lost = 0.0
    for key in np.unique(keys):
        rows = keys == key
        chosen = int(p[rows].mean(axis=0).argmax())
        lost += float((best[rows] - p[rows, chosen]).sum())
    return lost / len(keys)
