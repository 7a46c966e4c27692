"""Personalization decisions: from a customer's scores and segments to one variant of a placement, and why.

The catalog (YAML; the embedded default is ``serving/catalog.yaml``) declares, per placement (a homepage banner, an
email, a product page), its variants, each with an eligibility rule in the segment rule language
(:mod:`features.segments`) over the decision's *context*:

- the scores: ``churn`` and ``propensity`` (probabilities), ``days_to_next`` (expected days to the next purchase),
  ``p_next`` (chance of a purchase within the cycle model's horizon); missing when a model is not served;
- the segments: one boolean per rule segment (``cart_abandoner``, ``high_value``, ...), ``segment`` (the primary
  one) and ``cluster`` (the behavioural cluster, when one is materialized);
- the features of the online store, by name, and ``cold_start``.

A placement chooses among its eligible variants by a *policy*:

- ``rules``: the first eligible variant in the catalog's order, else the default (a rule engine: "cart abandoner →
  discount", "churn risk ≥ 0.7 → retention offer", "purchase due within 7 days → reminder");
- ``bandit``: Thompson sampling over the eligible variants with a Beta posterior per (placement, segment, variant),
  learned from feedback.

An experiment on a placement splits customers deterministically, by a hash of (experiment, customer): a holdout
share always gets the default (the control), the rest is divided among the arms by weight; an arm runs a policy or
serves one fixed variant. Everything here is pure; the stores and the clock are the caller's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.segments import NAME, Rule, RuleError, closest_name, compiled
from personalize.errors import load_yaml_model

DEFAULT_CATALOG = Path(__file__).with_name("catalog.yaml")
HOLDOUT = "holdout"
Policy = Literal["rules", "bandit"]
CYCLE_SCORES = frozenset({"days_to_next", "p_next"})
SCORES = frozenset({"churn", "propensity"}) | CYCLE_SCORES
BUILTIN_NAMES = SCORES | {"segment", "cluster", "cold_start"}  # what every decision's context has (besides features)


class Variant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    description: str = ""
    eligible: str | None = None  # a rule over the context; none: always eligible

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"{value!r}: a variant id is lower-case letters, digits and _, starting with a letter")
        return value

    @field_validator("eligible")
    @classmethod
    def _rule(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Rule(value)
            except RuleError as exc:
                raise ValueError(str(exc)) from None
        return value


class Placement(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    default: str
    policy: Policy = "rules"
    bandit_by: Literal["segment", "cluster"] = "segment"  # what a bandit keeps one posterior per
    variants: list[Variant] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_is_a_variant(self) -> Placement:
        ids = [v.id for v in self.variants]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"placement {self.name!r}: variant {dup[0]!r} is declared twice")
        if self.default not in ids:
            raise ValueError(f"placement {self.name!r}: the default {self.default!r} is not one of its variants")
        return self

    def variant(self, vid: str) -> Variant:
        return next(v for v in self.variants if v.id == vid)


class Arm(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    policy: Policy | None = None
    variant: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Arm:
        if (self.policy is None) == (self.variant is None):
            raise ValueError(f"arm {self.name!r}: give exactly one of policy (rules|bandit) or variant")
        if self.name == HOLDOUT:
            raise ValueError(f"arm name {HOLDOUT!r} is reserved for the holdout control group")
        return self


class Experiment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    placement: str
    holdout: float = Field(default=0.1, ge=0.0, lt=1.0, allow_inf_nan=False)
    arms: list[Arm] = Field(min_length=1)
    active: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"{value!r}: an experiment name is lower-case letters, digits and _")
        return value

    @property
    def weights(self) -> dict[str, float]:
        """Each arm's expected share of customers, the holdout included."""
        total = sum(a.weight for a in self.arms)
        out = {HOLDOUT: self.holdout} if self.holdout > 0 else {}
        out.update({a.name: (1 - self.holdout) * a.weight / total for a in self.arms})
        return out


class Catalog(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    placements: list[Placement] = Field(min_length=1)
    experiments: list[Experiment] = Field(default_factory=list)
    reward: Literal["click", "conversion"] = "conversion"  # the feedback event a bandit learns from
    context: list[str] = Field(default_factory=list)  # names the application sends in a request's `context`

    @field_validator("context")
    @classmethod
    def _context_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not NAME.match(name):
                raise ValueError(f"{name!r}: a context name is lower-case letters, digits and _, starting with a "
                                 "letter")
            if name in BUILTIN_NAMES:
                raise ValueError(f"{name!r} is a name every decision has (the scores, segment, cluster, "
                                 "cold_start): a request cannot set it; give the context name another name")
        return value

    @model_validator(mode="after")
    def _references(self) -> Catalog:
        names = [p.name for p in self.placements]
        if len(set(names)) != len(names):
            raise ValueError("a placement is declared twice")
        seen: dict[str, str] = {}
        for e in self.experiments:
            if e.placement not in names:
                raise ValueError(f"experiment {e.name!r}: unknown placement {e.placement!r}")
            placement = self.placement(e.placement)
            for arm in e.arms:
                if arm.variant is not None and arm.variant not in [v.id for v in placement.variants]:
                    raise ValueError(f"experiment {e.name!r}, arm {arm.name!r}: {arm.variant!r} is not a variant of "
                                     f"{e.placement!r}")
            arms = [a.name for a in e.arms]
            if len(set(arms)) != len(arms):
                raise ValueError(f"experiment {e.name!r}: an arm is declared twice")
            if e.active:
                if e.placement in seen:
                    raise ValueError(f"placement {e.placement!r} has two active experiments: {seen[e.placement]!r} "
                                     f"and {e.name!r}")
                seen[e.placement] = e.name
        if len({e.name for e in self.experiments}) != len(self.experiments):
            raise ValueError("an experiment is declared twice")
        for p in self.placements:  # a variant the rules never choose, and no bandit arm serves, is a silent dead end
            bandit = p.policy == "bandit" or any(a.policy == "bandit" for e in self.experiments
                                                 if e.placement == p.name for a in e.arms)
            fixed = {a.variant for e in self.experiments if e.placement == p.name for a in e.arms}
            dead = [v.id for v in p.variants if not v.eligible and v.id != p.default and v.id not in fixed]
            if dead and not bandit:
                raise ValueError(f"placement {p.name!r}: variant {dead[0]!r} has no rule, and the rules policy "
                                 "chooses the first variant whose rule holds, else the default: give it a rule "
                                 "(eligible: 'True' for everyone), or make it the default")
        return self

    def placement(self, name: str) -> Placement:
        for p in self.placements:
            if p.name == name:
                return p
        raise KeyError(name)

    def experiment_on(self, placement: str) -> Experiment | None:
        return next((e for e in self.experiments if e.active and e.placement == placement), None)

    def experiment(self, name: str) -> Experiment | None:
        return next((e for e in self.experiments if e.name == name), None)

    def rule_names(self, placement: str | None = None) -> set[str]:
        """The names the eligibility rules read (of one placement, or all)."""
        return set().union(*(compiled(v.eligible).names for p in self.placements for v in p.variants
                             if v.eligible and placement in (None, p.name)))

    def unknown_names(self, known: set[str]) -> list[str]:
        """One line per name a rule reads that is neither in ``known`` (segments, features) nor in the decision's
        context (:data:`BUILTIN_NAMES`, the declared ``context``): a typo, which would make the rule never hold;
        and one per declared context name that is also a feature or segment (the stored value would win for a known
        customer and the request's for a new one)."""
        lines = [f"context name {name!r}, which is also a feature or segment of every customer: the stored value "
                 "would win for a known customer and the request's for a new one; give it another name"
                 for name in self.context if name in known]
        known = set(known) | BUILTIN_NAMES | set(self.context)
        for p in self.placements:
            for v in p.variants:
                for name in sorted(compiled(v.eligible).names - known if v.eligible else ()):
                    close = closest_name(name, known)
                    lines.append(f"placement {p.name!r}, variant {v.id!r} reads {name!r}, which is no score, segment, "
                                 f"feature or declared context name" + (f" (did you mean {close!r}?)" if close
                                                                        else "")
                                 + ": that rule would never hold (a name the application sends in each request's "
                                   "context is declared under `context:` in the catalog)")
        return lines


def load_catalog(path: Path | str | None = None) -> Catalog:
    path = Path(path) if path is not None else DEFAULT_CATALOG
    return load_yaml_model(path, Catalog, f"no catalog file at {path}")


# --- assignment ---------------------------------------------------------------------------------------------------
def unit_hash(*parts: str) -> float:
    """A uniform number in [0, 1) fixed by ``parts``: the same customer and experiment always give the same one."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_arm(experiment: Experiment, customer_id: str) -> str:
    """The arm of ``customer_id`` in ``experiment``: the holdout below ``holdout``, then the arms by weight."""
    u = unit_hash("experiment", experiment.name, str(customer_id))
    if u < experiment.holdout:
        return HOLDOUT
    u = (u - experiment.holdout) / (1.0 - experiment.holdout)
    total = sum(a.weight for a in experiment.arms)
    edge = 0.0
    for arm in experiment.arms:
        edge += arm.weight / total
        if u < edge:
            return arm.name
    return experiment.arms[-1].name


# --- policies -----------------------------------------------------------------------------------------------------
def eligible(placement: Placement, context: dict[str, Any]) -> list[Variant]:
    """The variants whose rule holds for ``context`` (names a rule reads but the context lacks count as missing)."""
    return [v for v in placement.variants if not v.eligible or compiled(v.eligible).holds(context)]


def by_rules(placement: Placement, candidates: list[Variant]) -> tuple[str, str]:
    """The first eligible variant with a rule, in catalog order; else the default (a catalog refuses any other
    variant without a rule on a rules placement: the rules would never choose it)."""
    for v in candidates:
        if v.eligible:
            return v.id, f"rule: {v.eligible}"
    return placement.default, "no rule matched: the placement's default"


def thompson(candidates: list[str], stats: dict[str, tuple[int, int]], rng: np.random.Generator) -> tuple[str, dict]:
    """One Thompson draw: each candidate's conversion rate from Beta(1 + successes, 1 + trials - successes); the
    highest wins. ``stats`` maps a variant to (trials, successes); an unseen variant has the flat prior."""
    draws = {}
    for vid in candidates:
        n, s = stats.get(vid, (0, 0))
        draws[vid] = float(rng.beta(1 + s, 1 + max(n - s, 0)))
    best = max(draws, key=draws.__getitem__)
    posterior = {vid: {"trials": stats.get(vid, (0, 0))[0], "successes": stats.get(vid, (0, 0))[1],
                       "mean": round((1 + stats.get(vid, (0, 0))[1]) / (2 + stats.get(vid, (0, 0))[0]), 4)}
                 for vid in candidates}
    return best, posterior


def decide(catalog: Catalog, placement_name: str, customer_id: str | None, context: dict[str, Any],
           consent: bool, bandit_stats: Any, rng: np.random.Generator) -> dict[str, Any]:
    """The decision for one customer and placement (pure but for ``bandit_stats(placement, segment) -> {variant:
    (trials, successes)}`` and the random draw).

    No consent: the default, no experiment, no policy. Otherwise the active experiment's arm (holdout: the default),
    then the arm's or placement's policy over the eligible variants. A cold-start customer takes the bandit's
    exploration over the cold-start segment unless an experiment arm says otherwise."""
    placement = catalog.placement(placement_name)
    out: dict[str, Any] = {"placement": placement.name, "experiment": None, "arm": None}
    if not consent:
        return {**out, "variant": placement.default, "policy": "default",
                "reason": "no personalization consent: the non-personalized default"}
    experiment = catalog.experiment_on(placement.name)
    policy: str = placement.policy
    fixed: str | None = None
    if experiment is not None and customer_id is not None:
        arm_name = assign_arm(experiment, customer_id)
        out.update(experiment=experiment.name, arm=arm_name)
        if arm_name == HOLDOUT:
            return {**out, "variant": placement.default, "policy": "holdout",
                    "reason": f"holdout control group of experiment {experiment.name!r}: the default"}
        arm = next(a for a in experiment.arms if a.name == arm_name)
        policy, fixed = (arm.policy or "fixed"), arm.variant
    elif context.get("cold_start"):
        policy = "bandit"
    candidates = eligible(placement, context)
    if fixed is not None:
        if any(v.id == fixed for v in candidates):
            return {**out, "variant": fixed, "policy": "fixed", "reason": f"experiment arm {out['arm']!r} serves {fixed}"}
        return {**out, "variant": placement.default, "policy": "fixed",
                "reason": f"experiment arm {out['arm']!r} serves {fixed}, which is not eligible here: the default"}
    if policy == "bandit":
        cluster = context.get("cluster")
        if placement.bandit_by == "cluster" and cluster is not None and not context.get("cold_start"):
            segment = f"cluster_{cluster}"
        else:
            segment = str(context.get("segment") or "all")
        ids = [v.id for v in candidates]
        if not ids:  # nothing to sample from: the default, and nothing for the bandit to learn
            return {**out, "variant": placement.default, "policy": "default",
                    "reason": "no variant is eligible here: the placement's default"}
        vid, posterior = thompson(ids, bandit_stats(placement.name, segment), rng)
        explore = " (cold start: exploring)" if context.get("cold_start") else ""
        return {**out, "variant": vid, "policy": "bandit", "bandit_segment": segment, "posterior": posterior,
                "reason": f"Thompson sampling over {len(ids)} eligible variant{'s' * (len(ids) != 1)} in segment "
                          f"{segment!r}{explore}"}
    vid, why = by_rules(placement, candidates)
    return {**out, "variant": vid, "policy": "rules", "reason": why}
