"""The report of an A/B experiment on a placement, as build → extract → persist.

- :func:`analyze` (pure): the decision log of one experiment (:meth:`serving.decision_store.DecisionStore.
  experiment_frame`) and its configuration (:class:`serving.decisions.Experiment`) in, an :class:`ExperimentReport`
  out: per arm the exposures, clicks and conversions, each non-control arm's uplift in conversion rate over the
  control with a confidence interval and a significance test, a sample-ratio-mismatch check and a verdict.
- :func:`metrics` flattens a report to ``{name: float}``, :func:`table_rows` to display rows for the CLI, and
  :func:`plot` draws the conversion rate per arm.
- :func:`log_report`: one MLflow run in the experiment ``ab-<name>`` with the parameters, the metrics, the report as
  JSON and the plot.

The randomization unit is the customer (assignment hashes the experiment and the customer), so the statistics are
per customer: a customer is *exposed* when at least one of their decisions was seen (an impression) and *converted*
when any of their exposed decisions converted. Counting decisions instead would treat a customer's repeated visits as
independent trials and make every interval too narrow (``unit="decision"`` is there as a diagnostic only).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from personalize.errors import ConfigError, PersonalizeError
from serving.decisions import HOLDOUT

if TYPE_CHECKING:
    from serving.decisions import Experiment

log = logging.getLogger(__name__)

__all__ = ["ArmStats", "Comparison", "ExperimentError", "ExperimentReport", "analyze", "log_report", "metrics",
           "plot", "table_rows", "wilson_interval", "newcombe_interval", "two_proportion_ztest"]

COLUMNS = ("decision_id", "arm", "customer_key", "impression", "click", "conversion", "value")
MIN_EXPOSED = 30
SRM_ALPHA = 0.001
INTERVAL = "Newcombe hybrid score (method 10), from Wilson score intervals of each arm"
TEST = "two-sided two-proportion z-test, pooled variance"
PEEKING = ("Each look at a running experiment is another chance of a false positive: checking the p-value "
           "repeatedly and stopping at the first significant one inflates the false-positive rate well above "
           "alpha. Fix the sample size (or the end date) up front and read the verdict once, then.")
Verdict = Literal["control", "significant lift", "no significant difference", "significant loss", "not enough data"]


class ExperimentError(PersonalizeError):
    """An experiment's decision log cannot be analysed (nothing logged, or not the expected columns)."""


# --- the statistics ------------------------------------------------------------------------------------------------
def wilson_interval(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float]:
    """The Wilson score interval of a proportion (``(nan, nan)`` without trials)."""
    if trials <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(x1: int, n1: int, x2: int, n2: int, alpha: float = 0.05) -> tuple[float, float]:
    """Newcombe's hybrid score interval of ``x1/n1 - x2/n2`` (his method 10): each side combines the Wilson
    intervals of the two proportions. Unlike the Wald interval it stays inside [-1, 1], does not collapse to a point
    when a rate is 0 or 1, and keeps close to its nominal coverage with small counts and rare conversions."""
    if n1 <= 0 or n2 <= 0:
        return math.nan, math.nan
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson_interval(x1, n1, alpha)
    l2, u2 = wilson_interval(x2, n2, alpha)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def two_proportion_ztest(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """The z statistic and two-sided p-value of ``H0: p1 = p2`` with the pooled variance. When the pooled rate is
    0 or 1 the two observed rates are equal and there is no evidence of a difference: ``(0.0, 1.0)``."""
    if n1 <= 0 or n2 <= 0:
        return math.nan, math.nan
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (x1 / n1 - x2 / n2) / se
    return z, min(1.0, math.erfc(abs(z) / math.sqrt(2)))  # 2 * (1 - Phi(|z|)), without the cancellation


def _srm(observed: dict[str, int], weights: dict[str, float]) -> tuple[float, float]:
    """Chi-square goodness of fit of the observed counts per arm against the configured shares."""
    from scipy.stats import chisquare

    arms = [a for a in weights if weights[a] > 0]
    counts = np.array([observed.get(a, 0) for a in arms], dtype=float)
    total = counts.sum()
    if len(arms) < 2 or total <= 0:
        return math.nan, math.nan
    shares = np.array([weights[a] for a in arms], dtype=float)
    result = chisquare(counts, total * shares / shares.sum())
    return float(result.statistic), float(result.pvalue)


# --- the report ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmStats:
    """One arm's counts. ``decisions`` … ``conversions`` count decisions (every row of the log); ``exposed``,
    ``converted`` and the revenue count units (customers), the customers in several arms left out."""

    arm: str
    expected_share: float | None  # the configured share of customers; None for an arm the configuration lacks
    decisions: int
    impressions: int
    clicks: int
    conversions: int
    exposed: int
    converted: int
    observed_share: float | None  # this arm's share of all exposed units
    ctr: float | None  # clicks per impression
    conversion_rate: float | None  # converted / exposed units
    conversion_ci: tuple[float | None, float | None]  # Wilson, at 1 - alpha
    revenue: float
    revenue_per_exposed: float | None


@dataclass(frozen=True)
class Comparison:
    """A non-control arm against the control: the uplift of the conversion rate, its interval and test."""

    arm: str
    control: str
    uplift: float | None  # absolute: rate(arm) - rate(control)
    uplift_ci: tuple[float | None, float | None]
    relative_uplift: float | None  # uplift / rate(control); None when the control never converted
    z: float | None
    p_value: float | None
    verdict: Verdict
    reason: str


@dataclass(frozen=True)
class ExperimentReport:
    experiment: str
    placement: str
    control: str
    alpha: float
    unit: str
    holdout: float
    weights: dict[str, float]
    arms: tuple[ArmStats, ...]
    comparisons: tuple[Comparison, ...]
    srm_chi2: float | None
    srm_p_value: float | None
    srm_flag: bool
    decisions: int
    customers: int
    customers_in_several_arms: int
    first_ts: str | None
    last_ts: str | None
    min_exposed: int = MIN_EXPOSED
    interval: str = INTERVAL
    test: str = TEST
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=(PEEKING,))

    def arm(self, name: str) -> ArmStats:
        return next(a for a in self.arms if a.arm == name)

    def comparison(self, name: str) -> Comparison:
        return next(c for c in self.comparisons if c.arm == name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: tuples as lists, NaN and infinities as None."""
        return _clean(asdict(self))


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _num(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _validate(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ExperimentError(f"experiment {name!r}: the decision frame lacks the column(s) {', '.join(missing)}")
    if frame.empty:
        raise ExperimentError(f"experiment {name!r}: no decisions logged (is it active, on the placement the "
                              f"server decides, and do its customers consent to personalization?)")
    out = frame.copy()
    for c in ("impression", "click", "conversion"):
        out[c] = out[c].fillna(False).astype(bool)
    out["value"] = pd.to_numeric(out["value"], errors="coerce")
    return out


def analyze(frame: pd.DataFrame, experiment: Experiment, control: str = HOLDOUT, alpha: float = 0.05,
            unit: Literal["customer", "decision"] = "customer", *, min_exposed: int = MIN_EXPOSED,
            srm_alpha: float = SRM_ALPHA) -> ExperimentReport:
    """The report of ``experiment`` (a :class:`serving.decisions.Experiment`) from its decision ``frame``.

    Per arm: decisions, impressions, clicks and conversions (raw counts), exposed and converted units, click-through
    rate (clicks per impression), conversion rate (converted / exposed units, with a Wilson interval) and revenue per
    exposed unit (the conversions' values; a conversion without a value counts 0).

    Per non-control arm: the absolute uplift of the conversion rate over ``control`` with a ``1 - alpha`` *Newcombe
    hybrid score interval* (chosen over Wald, which collapses to a point and under-covers when conversions are rare
    or counts small, the usual case early in an experiment), the relative uplift, and the two-sided p-value of the
    pooled two-proportion z-test. The verdict follows the test: ``significant lift`` / ``significant loss`` when
    ``p < alpha`` (by the sign of the uplift), else ``no significant difference``; ``not enough data`` when the arm or
    the control has fewer than ``min_exposed`` exposed units, or neither converted. (The interval and the test are
    different procedures and can disagree right at the boundary.)

    Sample-ratio mismatch: a chi-square goodness-of-fit test of the exposed units per configured arm against
    ``experiment.weights``, flagged when ``p < srm_alpha``; a flagged experiment's verdicts are not to be trusted.

    Decisions without a customer key (no consent) are left out of the unit counts, and so are customers found in
    more than one arm (hashing makes that impossible unless the configuration changed mid-flight): both are reported
    as warnings. Raises :class:`ExperimentError` for an empty frame, :class:`~personalize.errors.ConfigError` when
    ``control`` is neither a configured arm nor in the data.
    """
    name = str(experiment.name)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), not {alpha}")
    if unit not in ("customer", "decision"):
        raise ValueError(f"unit must be 'customer' or 'decision', not {unit!r}")
    df = _validate(frame, name)
    weights = {str(k): float(v) for k, v in experiment.weights.items()}
    warnings: list[str] = []

    if df["arm"].isna().any():
        n = int(df["arm"].isna().sum())
        warnings.append(f"{n} decision(s) without an arm left out")
        df = df.loc[df["arm"].notna()]
    df = df.assign(arm=df["arm"].astype(str))
    seen = list(dict.fromkeys(df["arm"]))
    unknown = [a for a in seen if a not in weights]
    if unknown:
        warnings.append(f"arm(s) {', '.join(map(repr, unknown))} are in the log but not in the experiment's "
                        f"configuration: reported, but left out of the sample-ratio check")
    if control not in weights and control not in seen:
        raise ConfigError(f"experiment {name!r} has no arm {control!r}"
                          + (" (its holdout share is 0)" if control == HOLDOUT else "")
                          + f": choose the control among {', '.join(weights)}")
    order = [control] + [a for a in weights if a != control] + [a for a in unknown if a != control]

    # the units: a customer, or a decision (diagnostic)
    keyed = df.loc[df["customer_key"].notna()]
    if len(keyed) < len(df):
        warnings.append(f"{len(df) - len(keyed)} decision(s) without a customer key (no consent) left out of the "
                        f"unit counts")
    arms_per_customer = keyed.groupby("customer_key")["arm"].nunique()
    crossed = arms_per_customer.index[arms_per_customer > 1]
    if len(crossed):
        warnings.append(f"{len(crossed)} customer(s) appear in more than one arm (assignment hashes the customer, so "
                        f"this means the experiment's configuration changed while it ran); they are left out of the "
                        f"exposure and conversion counts")
    clean = keyed.loc[~keyed["customer_key"].isin(crossed)]
    exposed_rows = clean.loc[clean["impression"]]
    exposed_rows = exposed_rows.assign(revenue=exposed_rows["value"].where(exposed_rows["conversion"]).fillna(0.0))
    key = "customer_key" if unit == "customer" else "decision_id"
    per_unit = exposed_rows.groupby(["arm", key]).agg(converted=("conversion", "any"), revenue=("revenue", "sum"))
    per_arm_units = per_unit.groupby(level="arm").agg(exposed=("converted", "size"), converted=("converted", "sum"),
                                                      revenue=("revenue", "sum"))
    raw = df.groupby("arm").agg(decisions=("decision_id", "size"), impressions=("impression", "sum"),
                                clicks=("click", "sum"), conversions=("conversion", "sum"))
    total_exposed = int(per_arm_units["exposed"].sum()) if len(per_arm_units) else 0

    arms: list[ArmStats] = []
    for arm in order:
        r = raw.loc[arm] if arm in raw.index else None
        u = per_arm_units.loc[arm] if arm in per_arm_units.index else None
        exposed, converted = (int(u["exposed"]), int(u["converted"])) if u is not None else (0, 0)
        revenue = float(u["revenue"]) if u is not None else 0.0
        impressions = int(r["impressions"]) if r is not None else 0
        clicks = int(r["clicks"]) if r is not None else 0
        lo, hi = wilson_interval(converted, exposed, alpha)
        arms.append(ArmStats(
            arm=arm, expected_share=weights.get(arm), decisions=int(r["decisions"]) if r is not None else 0,
            impressions=impressions, clicks=clicks, conversions=int(r["conversions"]) if r is not None else 0,
            exposed=exposed, converted=converted, observed_share=_ratio(exposed, total_exposed),
            ctr=_ratio(clicks, impressions), conversion_rate=_ratio(converted, exposed),
            conversion_ci=(_num(lo), _num(hi)), revenue=revenue, revenue_per_exposed=_ratio(revenue, exposed)))
        if exposed == 0:
            warnings.append(f"arm {arm!r} has no exposed {unit}s")
    by_arm = {a.arm: a for a in arms}
    c = by_arm[control]
    if c.exposed == 0:
        warnings.append(f"the control arm {control!r} has no exposed {unit}s: no uplift can be estimated")

    comparisons: list[Comparison] = []
    for arm in order[1:]:
        t = by_arm[arm]
        if t.exposed == 0 or c.exposed == 0:
            comparisons.append(Comparison(arm, control, None, (None, None), None, None, None, "not enough data",
                                          f"no exposed {unit}s in {(arm if t.exposed == 0 else control)!r}"))
            continue
        uplift = t.converted / t.exposed - c.converted / c.exposed
        lo, hi = newcombe_interval(t.converted, t.exposed, c.converted, c.exposed, alpha)
        z, p = two_proportion_ztest(t.converted, t.exposed, c.converted, c.exposed)
        verdict: Verdict
        if min(t.exposed, c.exposed) < min_exposed:
            verdict, reason = "not enough data", f"fewer than {min_exposed} exposed {unit}s in an arm"
        elif t.converted == 0 and c.converted == 0:
            verdict, reason = "not enough data", "no conversions in either arm"
        elif p < alpha:
            verdict = "significant lift" if uplift > 0 else "significant loss"
            reason = f"p = {p:.3g} < alpha = {alpha:g}"
        else:
            verdict, reason = "no significant difference", f"p = {p:.3g} >= alpha = {alpha:g}"
        comparisons.append(Comparison(arm, control, uplift, (_num(lo), _num(hi)),
                                      _ratio(uplift, c.converted / c.exposed), _num(z), _num(p), verdict, reason))

    chi2, srm_p = _srm({a.arm: a.exposed for a in arms}, weights)
    srm_flag = bool(math.isfinite(srm_p) and srm_p < srm_alpha)
    if srm_flag:
        warnings.append(f"sample-ratio mismatch: the exposed {unit}s per arm do not match the configured shares "
                        f"(chi-square p = {srm_p:.2g} < {srm_alpha:g}); find the cause (an arm failing to render, "
                        f"bots, a configuration change) before trusting any verdict")
    notes = [PEEKING]
    positive = [w for a, w in weights.items() if w > 0]
    if math.isfinite(srm_p) and total_exposed * min(positive) / sum(positive) < 5:
        notes.append("fewer than 5 exposed units expected in some arm: the sample-ratio check is approximate")
    for w in warnings:
        log.warning("experiment %s: %s", name, w)
    ts = df["ts"].dropna().astype(str) if "ts" in df.columns else pd.Series(dtype=str)
    return ExperimentReport(
        experiment=name, placement=str(experiment.placement), control=control, alpha=alpha, unit=unit,
        holdout=float(experiment.holdout), weights=weights, arms=tuple(arms), comparisons=tuple(comparisons),
        srm_chi2=_num(chi2), srm_p_value=_num(srm_p), srm_flag=srm_flag, decisions=len(frame),
        customers=int(keyed["customer_key"].nunique()), customers_in_several_arms=len(crossed),
        first_ts=ts.min() if len(ts) else None, last_ts=ts.max() if len(ts) else None, min_exposed=min_exposed,
        warnings=tuple(warnings), notes=tuple(notes))


# --- extract -------------------------------------------------------------------------------------------------------
def metrics(report: ExperimentReport) -> dict[str, float]:
    """The report's numbers as flat, MLflow-safe ``{name: float}`` (undefined values left out)."""
    out: dict[str, float] = {}
    for a in report.arms:
        out |= {f"{a.arm}.decisions": a.decisions, f"{a.arm}.impressions": a.impressions, f"{a.arm}.clicks": a.clicks,
                f"{a.arm}.conversions": a.conversions, f"{a.arm}.exposed": a.exposed,
                f"{a.arm}.converted": a.converted, f"{a.arm}.conversion_rate": a.conversion_rate,
                f"{a.arm}.ctr": a.ctr, f"{a.arm}.revenue_per_exposed": a.revenue_per_exposed}
    for c in report.comparisons:
        out |= {f"{c.arm}.uplift": c.uplift, f"{c.arm}.uplift_ci_low": c.uplift_ci[0],
                f"{c.arm}.uplift_ci_high": c.uplift_ci[1], f"{c.arm}.relative_uplift": c.relative_uplift,
                f"{c.arm}.p_value": c.p_value}
    out |= {"srm_chi2": report.srm_chi2, "srm_p_value": report.srm_p_value, "srm_flag": float(report.srm_flag),
            "customers_in_several_arms": report.customers_in_several_arms, "decisions": report.decisions}
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def table_rows(report: ExperimentReport) -> list[dict[str, str]]:
    """One row per arm, the control first, as display strings (the raw numbers are in :meth:`ExperimentReport.
    to_dict`); every row has the same keys, in column order."""
    rows = []
    level = f"{100 * (1 - report.alpha):g}%"
    for a in report.arms:
        c = next((x for x in report.comparisons if x.arm == a.arm), None)
        lo, hi = c.uplift_ci if c else (None, None)
        rows.append({
            "arm": a.arm + (" (control)" if a.arm == report.control else ""),
            "share (planned)": f"{_pct(a.observed_share, 1)} ({_pct(a.expected_share, 1)})",
            "decisions": f"{a.decisions:,}",
            "exposed": f"{a.exposed:,}",
            "converted": f"{a.converted:,}",
            "ctr": _pct(a.ctr),
            "conversion": _pct(a.conversion_rate),
            "revenue/exposed": "-" if a.revenue_per_exposed is None else f"{a.revenue_per_exposed:,.2f}",
            "uplift": "" if c is None else _pct(c.uplift) if c.uplift is not None else "-",
            f"{level} CI": "" if c is None else "-" if lo is None else f"[{_pct(lo)}, {_pct(hi)}]",
            "relative": "" if c is None else _pct(c.relative_uplift, 1),
            "p-value": "" if c is None else "-" if c.p_value is None else f"{c.p_value:.3g}",
            "verdict": "control" if c is None else c.verdict,
        })
    return rows


# --- persist -------------------------------------------------------------------------------------------------------
def plot(report: ExperimentReport, path: Path | str) -> Path:
    """A PNG of the conversion rate per arm with its Wilson interval, the control's rate as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    path = Path(path)
    figure = Figure(figsize=(max(4.0, 1.3 * len(report.arms) + 2), 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    xs = np.arange(len(report.arms))
    for x, a in zip(xs, report.arms):
        color = "grey" if a.arm == report.control else "C0"
        verdict = next((c.verdict for c in report.comparisons if c.arm == a.arm), "control")
        if verdict == "significant lift":
            color = "C2"
        elif verdict == "significant loss":
            color = "C3"
        if a.conversion_rate is None:
            axes.annotate("no exposures", (x, 0), ha="center", va="bottom", fontsize=8)
            continue
        lo, hi = a.conversion_ci  # finite whenever the rate is
        axes.errorbar([x], [a.conversion_rate], yerr=[[a.conversion_rate - lo], [hi - a.conversion_rate]],
                      fmt="o", color=color, capsize=6, markersize=7)
        axes.annotate(f"{100 * a.conversion_rate:.2f}%\nn={a.exposed:,}", (x, hi),
                      textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    control = next(a for a in report.arms if a.arm == report.control)
    if control.conversion_rate is not None:
        axes.axhline(control.conversion_rate, color="grey", linestyle="--", linewidth=1,
                     label=f"control ({report.control})")
    tops = [a.conversion_ci[1] for a in report.arms if a.conversion_ci[1] is not None]
    axes.set_ylim(0, max(tops, default=0.0) * 1.3 or 1.0)  # room above the bars for their labels
    axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    if control.conversion_rate is not None:
        axes.legend(loc="best", fontsize=8)
    axes.set_xticks(xs, [a.arm for a in report.arms])
    axes.set_xlim(-0.6, len(report.arms) - 0.4)
    axes.set_ylabel(f"conversion rate per exposed {report.unit} ({100 * (1 - report.alpha):g}% CI)")
    title = f"{report.experiment} on {report.placement}"
    if report.srm_flag:
        title += "  [sample-ratio mismatch]"
    axes.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, format="png")
    return path


def log_report(report: ExperimentReport, tracking_uri: str, artifact_root: str | None = None) -> str:
    """One MLflow run in the experiment ``ab-<name>``: the configuration as parameters, :func:`metrics`, the report
    as ``report.json`` and the plot as ``plots/conversion.png``; returns the run id."""
    import mlflow

    from training.tracking import use_experiment

    use_experiment(tracking_uri, f"ab-{report.experiment}", artifact_root)
    run_name = f"{report.experiment} {report.first_ts or ''}..{report.last_ts or ''}"
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"kind": "ab_test", "experiment": report.experiment, "placement": report.placement,
                         "srm": "mismatch" if report.srm_flag else "ok",
                         **{f"verdict.{c.arm}": c.verdict for c in report.comparisons}})
        mlflow.log_params({"placement": report.placement, "arms": ",".join(a.arm for a in report.arms),
                           "weights": json.dumps(report.weights, sort_keys=True), "holdout": report.holdout,
                           "control": report.control, "alpha": report.alpha, "unit": report.unit,
                           "min_exposed": report.min_exposed, "interval": "newcombe", "test": "pooled z"})
        mlflow.log_metrics(metrics(report))
        mlflow.log_dict(report.to_dict(), "report.json")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(plot(report, Path(tmp) / "conversion.png")), artifact_path="plots")
    log.info("experiment %s: report logged to MLflow run %s", report.experiment, run.info.run_id)
    return run.info.run_id
