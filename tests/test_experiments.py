"""A/B experiment reports: counts per customer, uplift with its interval and test, sample-ratio mismatch, verdicts,
the plot and the MLflow run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitoring.experiments import (
    ExperimentError,
    analyze,
    log_report,
    metrics,
    newcombe_interval,
    plot,
    table_rows,
    two_proportion_ztest,
    wilson_interval,
)
from personalize.errors import ConfigError
from serving.decision_store import DecisionStore
from serving.decisions import Experiment, assign_arm

statsmodels_proportion = pytest.importorskip("statsmodels.stats.proportion")
scipy_stats = pytest.importorskip("scipy.stats")


def experiment(holdout: float = 0.5, arms: tuple[tuple[str, float], ...] = (("treatment", 1.0),),
               name: str = "banner_test") -> Experiment:
    return Experiment(name=name, placement="homepage_banner", holdout=holdout,
                      arms=[{"name": a, "weight": w, "variant": "discount"} for a, w in arms])


def frame_of(plan: dict[str, tuple[int, float]], seed: int = 0, visits: int = 1) -> pd.DataFrame:
    """``plan``: arm → (customers, conversion probability); each customer has ``visits`` exposed decisions and
    converts on at most one of them, with probability as planted (so the per-customer rate is the planted one)."""
    rng = np.random.default_rng(seed)
    rows = []
    for arm, (n, p) in plan.items():
        converts = rng.random(n) < p
        for i in range(n):
            for v in range(visits):
                conversion = bool(converts[i] and v == visits - 1)
                rows.append({"decision_id": f"{arm}-{i}-{v}", "ts": f"2025-01-01T00:00:{v:02d}",
                             "customer_key": f"{arm}-c{i}", "arm": arm, "variant": "x", "policy": "fixed",
                             "segment": "all", "impression": True, "click": conversion or bool(rng.random() < 0.2),
                             "conversion": conversion, "value": 10.0 if conversion else math.nan})
    return pd.DataFrame(rows)


# --- the statistics against statsmodels and scipy -----------------------------------------------------------------
@pytest.mark.parametrize("x, n", [(0, 10), (10, 10), (3, 40), (412, 4000), (1, 1)])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_wilson_interval_matches_statsmodels(x: int, n: int, alpha: float) -> None:
    expected = statsmodels_proportion.proportion_confint(x, n, alpha=alpha, method="wilson")
    assert wilson_interval(x, n, alpha) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("x1, n1, x2, n2", [(560, 4000, 410, 4000), (0, 50, 3, 60), (7, 31, 7, 33), (30, 30, 1, 40)])
def test_newcombe_interval_and_pooled_z_test_match_statsmodels(x1: int, n1: int, x2: int, n2: int) -> None:
    # given two proportions; when the interval and the test are computed; then they equal statsmodels' own
    low, high = newcombe_interval(x1, n1, x2, n2, 0.05)
    expected = statsmodels_proportion.confint_proportions_2indep(x1, n1, x2, n2, method="newcomb", compare="diff",
                                                                 alpha=0.05)
    assert (low, high) == pytest.approx(expected, abs=1e-9)
    z, p = two_proportion_ztest(x1, n1, x2, n2)
    sm_z, sm_p = statsmodels_proportion.proportions_ztest([x1, x2], [n1, n2])
    assert z == pytest.approx(sm_z, abs=1e-9) and p == pytest.approx(sm_p, abs=1e-9)


def test_z_test_without_variance_says_no_difference() -> None:
    assert two_proportion_ztest(0, 100, 0, 80) == (0.0, 1.0)


# --- counts -------------------------------------------------------------------------------------------------------
def test_counts_reconcile_with_the_input() -> None:
    # given customers with several decisions, some never seen, some clicking, some converting
    frame = frame_of({"holdout": (300, 0.1), "treatment": (300, 0.2)}, seed=1, visits=3)
    rng = np.random.default_rng(2)
    frame.loc[rng.random(len(frame)) < 0.3, ["impression", "click", "conversion"]] = False
    # when
    report = analyze(frame, experiment())
    # then the raw counts are the input's, and the unit counts are distinct customers
    assert report.decisions == len(frame) == sum(a.decisions for a in report.arms)
    for arm in ("holdout", "treatment"):
        rows, stats = frame.loc[frame["arm"] == arm], report.arm(arm)
        seen = rows.loc[rows["impression"]]
        assert (stats.decisions, stats.impressions, stats.clicks, stats.conversions) == (
            len(rows), rows["impression"].sum(), rows["click"].sum(), rows["conversion"].sum())
        assert stats.exposed == seen["customer_key"].nunique()
        assert stats.converted == seen.loc[seen["conversion"], "customer_key"].nunique()
        assert stats.conversion_rate == pytest.approx(stats.converted / stats.exposed)
        assert stats.ctr == pytest.approx(stats.clicks / stats.impressions)
        assert stats.revenue_per_exposed == pytest.approx(10.0 * seen["conversion"].sum() / stats.exposed)
    assert sum(a.observed_share for a in report.arms) == pytest.approx(1.0)


def test_a_customer_counts_once_whatever_their_decisions() -> None:
    # given one customer with three exposed decisions, two of them converting
    frame = pd.DataFrame({"decision_id": ["d1", "d2", "d3", "d4"], "ts": ["t1", "t2", "t3", "t4"],
                          "customer_key": ["k1", "k1", "k1", "k2"], "arm": ["treatment"] * 3 + ["holdout"],
                          "impression": [True, True, True, True], "click": [True, False, True, False],
                          "conversion": [True, False, True, False], "value": [5.0, math.nan, 7.0, math.nan]})
    # when
    stats = analyze(frame, experiment()).arm("treatment")
    # then
    assert (stats.decisions, stats.conversions, stats.exposed, stats.converted) == (3, 2, 1, 1)
    assert stats.conversion_rate == 1.0 and stats.revenue_per_exposed == 12.0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(extra=st.lists(st.integers(min_value=0, max_value=199), max_size=40))
def test_extra_unconverted_visits_never_change_the_customer_counts(extra: list[int]) -> None:
    # given a frame and extra exposed, unconverted decisions of customers already in it
    base = frame_of({"holdout": (100, 0.2), "treatment": (100, 0.3)}, seed=3)
    more = base.iloc[extra].assign(decision_id=[f"extra-{i}" for i in range(len(extra))], conversion=False,
                                   click=False, value=math.nan)
    # when
    before, after = analyze(base, experiment()), analyze(pd.concat([base, more]), experiment())
    # then exposures and conversions per customer are the same, only the raw decision counts grew
    assert [(a.exposed, a.converted) for a in before.arms] == [(a.exposed, a.converted) for a in after.arms]
    assert after.decisions == before.decisions + len(extra)


def test_unit_decision_counts_impressions() -> None:
    frame = frame_of({"holdout": (50, 0.2), "treatment": (50, 0.3)}, seed=4, visits=2)
    report = analyze(frame, experiment(), unit="decision")
    assert all(a.exposed == a.impressions == 100 for a in report.arms)


# --- uplift and verdicts ------------------------------------------------------------------------------------------
def test_a_large_planted_lift_is_found_and_matches_statsmodels() -> None:
    # given 4,000 customers per arm converting at 10% (control) and 14% (treatment)
    frame = frame_of({"holdout": (4000, 0.10), "treatment": (4000, 0.14)}, seed=6)
    # when
    report = analyze(frame, experiment())
    # then the interval covers the planted lift and excludes 0, and the numbers are statsmodels'
    c, t, comparison = report.arm("holdout"), report.arm("treatment"), report.comparison("treatment")
    low, high = comparison.uplift_ci
    assert low <= 0.04 <= high and low > 0
    assert comparison.verdict == "significant lift"
    assert comparison.uplift == pytest.approx(t.conversion_rate - c.conversion_rate, abs=1e-12)
    assert comparison.relative_uplift == pytest.approx(comparison.uplift / c.conversion_rate)
    _, sm_p = statsmodels_proportion.proportions_ztest([t.converted, c.converted], [t.exposed, c.exposed])
    assert comparison.p_value == pytest.approx(sm_p, abs=1e-9)
    pooled = (t.converted + c.converted) / (t.exposed + c.exposed)
    z = comparison.uplift / math.sqrt(pooled * (1 - pooled) * (1 / t.exposed + 1 / c.exposed))
    assert comparison.p_value == pytest.approx(2 * scipy_stats.norm.sf(abs(z)), abs=1e-9)
    assert comparison.uplift_ci == pytest.approx(statsmodels_proportion.confint_proportions_2indep(
        t.converted, t.exposed, c.converted, c.exposed, method="newcomb", compare="diff"), abs=1e-9)


def test_a_planted_loss_is_a_significant_loss() -> None:
    frame = frame_of({"holdout": (3000, 0.15), "treatment": (3000, 0.10)}, seed=17)
    comparison = analyze(frame, experiment()).comparison("treatment")
    assert comparison.verdict == "significant loss" and comparison.uplift_ci[1] < 0


def test_an_a_a_split_shows_no_significant_difference() -> None:
    # given both arms converting at 10% (fixed seed); when; then
    frame = frame_of({"holdout": (2000, 0.10), "treatment": (2000, 0.10)}, seed=7)
    comparison = analyze(frame, experiment()).comparison("treatment")
    assert comparison.verdict == "no significant difference"
    assert comparison.p_value >= 0.05 and comparison.uplift_ci[0] <= 0 <= comparison.uplift_ci[1]


@pytest.mark.parametrize("plan, why", [
    ({"holdout": (20, 0.5), "treatment": (20, 0.9)}, "fewer than 30"),
    ({"holdout": (200, 0.0), "treatment": (200, 0.0)}, "no conversions"),
])
def test_too_little_data_gives_no_verdict(plan: dict[str, tuple[int, float]], why: str) -> None:
    comparison = analyze(frame_of(plan, seed=8), experiment()).comparison("treatment")
    assert comparison.verdict == "not enough data" and why in comparison.reason


def test_arms_without_exposures_and_a_missing_control_do_not_crash() -> None:
    # given a three-way experiment where only one arm was ever seen
    config = experiment(holdout=0.2, arms=(("a", 1.0), ("b", 1.0)))
    frame = frame_of({"a": (100, 0.2), "b": (10, 0.2)}, seed=9)
    frame.loc[frame["arm"] == "b", "impression"] = False
    frame.loc[frame["arm"] == "b", "conversion"] = False
    # when
    report = analyze(frame, config)
    # then every arm is reported, without uplifts, and the warnings say why
    assert [a.arm for a in report.arms] == ["holdout", "a", "b"]
    assert report.arm("holdout").exposed == 0 and report.arm("holdout").conversion_rate is None
    assert report.arm("b").decisions == 10 and report.arm("b").exposed == 0
    assert all(c.verdict == "not enough data" and c.uplift is None for c in report.comparisons)
    assert any("control arm 'holdout' has no exposed" in w for w in report.warnings)
    assert any("arm 'b' has no exposed" in w for w in report.warnings)
    json.dumps(report.to_dict(), allow_nan=False)


def test_a_control_the_experiment_does_not_have_is_a_config_error() -> None:
    config = experiment(holdout=0.0, arms=(("a", 1.0), ("b", 1.0)))
    frame = frame_of({"a": (100, 0.2), "b": (100, 0.3)}, seed=10)
    with pytest.raises(ConfigError, match="no arm 'holdout'.*holdout share is 0"):
        analyze(frame, config)
    assert analyze(frame, config, control="a").comparison("b").control == "a"


def test_a_customer_in_two_arms_is_a_warning_not_a_crash() -> None:
    # given a customer whose decisions landed in both arms
    frame = frame_of({"holdout": (100, 0.2), "treatment": (100, 0.3)}, seed=11)
    stray = frame.iloc[[0]].assign(decision_id="stray", arm="treatment")
    # when
    report = analyze(pd.concat([frame, stray]), experiment())
    # then the customer is counted in neither arm and reported
    assert report.customers_in_several_arms == 1
    assert report.arm("holdout").exposed == 99 and report.arm("treatment").exposed == 100
    assert report.arm("treatment").decisions == 101
    assert any("more than one arm" in w for w in report.warnings)


def test_an_empty_experiment_is_a_clear_error(tmp_path: Path) -> None:
    frame = DecisionStore(tmp_path / "d.sqlite").experiment_frame("banner_test")
    with pytest.raises(ExperimentError, match="experiment 'banner_test': no decisions logged"):
        analyze(frame, experiment())


# --- sample-ratio mismatch ----------------------------------------------------------------------------------------
def test_a_60_40_split_configured_as_50_50_is_a_sample_ratio_mismatch() -> None:
    frame = frame_of({"holdout": (3000, 0.1), "treatment": (2000, 0.1)}, seed=12)
    report = analyze(frame, experiment(holdout=0.5))
    expected = scipy_stats.chisquare([3000, 2000], [2500, 2500])
    assert report.srm_flag and report.srm_p_value == pytest.approx(expected.pvalue, rel=1e-9)
    assert report.srm_chi2 == pytest.approx(expected.statistic)
    assert any("sample-ratio mismatch" in w for w in report.warnings)


def test_the_hash_assignment_passes_the_sample_ratio_check() -> None:
    # given 5,000 customers assigned by the serving hash to a 10% holdout and two arms weighted 2:1
    config = experiment(holdout=0.1, arms=(("a", 2.0), ("b", 1.0)))
    arms = [assign_arm(config, f"customer-{i}") for i in range(5000)]
    frame = pd.DataFrame({"decision_id": [f"d{i}" for i in range(5000)], "ts": "t",
                          "customer_key": [f"k{i}" for i in range(5000)], "arm": arms, "impression": True,
                          "click": False, "conversion": False, "value": math.nan})
    # when
    report = analyze(frame, config)
    # then the observed shares fit the configured ones
    assert not report.srm_flag and report.srm_p_value > 0.001
    assert {a.arm: a.expected_share for a in report.arms} == pytest.approx({"holdout": 0.1, "a": 0.6, "b": 0.3})


# --- through the decision store -----------------------------------------------------------------------------------
def test_a_report_from_the_decision_store(tmp_path: Path) -> None:
    # given decisions logged for 200 customers by the serving assignment, with their feedback
    config = experiment(holdout=0.5)
    store = DecisionStore(tmp_path / "d.sqlite")
    rng = np.random.default_rng(13)
    expected: dict[str, dict[str, int]] = {}
    for i in range(200):
        customer = f"customer-{i}"
        arm = assign_arm(config, customer)
        counts = expected.setdefault(arm, {"decisions": 0, "exposed": 0, "converted": 0})
        seen = converted = False
        for v in range(1 + i % 3):
            decision_id = f"{i}-{v}"
            decision = {"placement": config.placement, "variant": "discount", "policy": "fixed",
                        "experiment": config.name, "arm": arm}
            store.record_decision(decision_id, f"2025-01-01T00:{i % 60:02d}:{v:02d}", decision, f"key-{i}", "all",
                                  False, True, None)
            counts["decisions"] += 1
            draw = rng.random()
            if draw < 0.3:  # a conversion implies the impression
                store.record_feedback(decision_id, "conversion", "2025-01-02", 20.0, "conversion")
                seen = converted = True
            elif draw < 0.8:
                store.record_feedback(decision_id, "impression", "2025-01-02", None, "conversion")
                seen = True
        counts["exposed"] += seen
        counts["converted"] += converted
    # when
    report = analyze(store.experiment_frame(config.name), config)
    store.close()
    # then
    assert report.decisions == sum(c["decisions"] for c in expected.values())
    assert report.customers == 200 and report.customers_in_several_arms == 0
    for arm, counts in expected.items():
        stats = report.arm(arm)
        assert (stats.decisions, stats.exposed, stats.converted) == (counts["decisions"], counts["exposed"],
                                                                     counts["converted"])
        assert stats.revenue == pytest.approx(20.0 * stats.conversions)


# --- extract and persist ------------------------------------------------------------------------------------------
def test_table_rows_and_metrics() -> None:
    report = analyze(frame_of({"holdout": (500, 0.1), "treatment": (500, 0.2)}, seed=14), experiment())
    rows = table_rows(report)
    assert [r["arm"] for r in rows] == ["holdout (control)", "treatment"]
    assert len({tuple(r) for r in rows}) == 1 and rows[0]["verdict"] == "control"
    assert rows[1]["verdict"] == report.comparison("treatment").verdict
    flat = metrics(report)
    assert flat["treatment.exposed"] == 500 and flat["srm_p_value"] == pytest.approx(report.srm_p_value)
    assert "holdout.uplift" not in flat and "treatment.uplift" in flat
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["comparisons"][0]["arm"] == "treatment"


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    config = experiment(holdout=0.2, arms=(("a", 1.0), ("b", 1.0)))
    report = analyze(frame_of({"holdout": (200, 0.1), "a": (200, 0.2)}, seed=15), config)  # b: no exposures
    path = plot(report, tmp_path / "plots" / "conversion.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # creating the MLflow SQLite schema takes seconds
def test_the_report_is_logged_to_mlflow() -> None:
    import mlflow

    from personalize.settings import Settings

    # given a report and the test's tracking store
    report = analyze(frame_of({"holdout": (400, 0.1), "treatment": (400, 0.2)}, seed=16), experiment())
    s = Settings.from_env()
    # when
    run_id = log_report(report, s.tracking_uri, s.artifact_root)
    # then the run sits in ab-<name> with the metrics, parameters and artifacts
    client = mlflow.MlflowClient(s.tracking_uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "ab-banner_test"
    assert run.data.metrics["treatment.exposed"] == 400
    assert run.data.metrics["treatment.uplift"] == pytest.approx(report.comparison("treatment").uplift)
    assert run.data.metrics["treatment.p_value"] == pytest.approx(report.comparison("treatment").p_value)
    assert run.data.metrics["holdout.conversion_rate"] == pytest.approx(report.arm("holdout").conversion_rate)
    assert "srm_p_value" in run.data.metrics
    assert run.data.params["control"] == "holdout" and run.data.params["placement"] == "homepage_banner"
    artifacts = {f.path for f in client.list_artifacts(run_id)} | {f.path for f in client.list_artifacts(run_id, "plots")}
    assert {"report.json", "plots/conversion.png"} <= artifacts


def test_the_report_command_logs_a_run_unless_told_not_to(isolated_home: Path) -> None:
    import mlflow
    from typer.testing import CliRunner

    from personalize.cli import app
    from personalize.settings import Settings
    from serving.decisions import load_catalog

    # given the catalog's email experiment with a few decisions and conversions in the platform's decision store
    settings = Settings.from_env()
    config = load_catalog(None).experiment("email_rules")
    store = DecisionStore(settings.decisions_path)
    for i in range(40):
        arm = assign_arm(config, f"c{i}")
        store.record_decision(f"d{i}", "2025-01-01T00:00:00", {"placement": config.placement, "variant": "x",
                              "policy": "fixed", "experiment": config.name, "arm": arm}, f"k{i}", "all", False, True,
                              None)
        store.record_feedback(f"d{i}", "conversion" if i % 4 == 0 else "impression", "2025-01-02", None, "conversion")
    store.close()
    runner = CliRunner()

    def runs() -> int:
        experiment = mlflow.MlflowClient(settings.tracking_uri).get_experiment_by_name("ab-email_rules")
        return 0 if experiment is None else len(mlflow.MlflowClient(settings.tracking_uri).search_runs(
            [experiment.experiment_id]))

    # when it is read with --no-log, then printed only; read again without it, then one run logged
    quiet = runner.invoke(app, ["experiment", "report", "email_rules", "--no-log", "--json"])
    assert quiet.exit_code == 0 and json.loads(quiet.output)["mlflow_run_id"] is None, quiet.output
    assert runs() == 0
    logged = runner.invoke(app, ["experiment", "report", "email_rules"])
    assert logged.exit_code == 0 and "logged to MLflow run" in logged.output, logged.output
    assert runs() == 1
    # --plot into a folder writes NAME.png there; a path it cannot write is one line, and nothing is logged
    folder = settings.home / "plots"
    folder.mkdir()
    plotted = runner.invoke(app, ["experiment", "report", "email_rules", "--no-log", "--json", "--plot", str(folder)])
    assert plotted.exit_code == 0 and json.loads(plotted.output)["experiment"] == "email_rules", plotted.output
    assert (folder / "email_rules.png").read_bytes()[:4] == b"\x89PNG"
    fresh = settings.home / "new-plots"  # a folder that is not there yet, given without a suffix
    assert runner.invoke(app, ["experiment", "report", "email_rules", "--no-log", "--plot", str(fresh)]).exit_code == 0
    assert (fresh / "email_rules.png").is_file()
    (folder / "taken").write_text("a file where a folder goes")
    refused = runner.invoke(app, ["experiment", "report", "email_rules", "--plot", str(folder / "taken" / "x.png")])
    assert refused.exit_code == 2 and "--plot" in refused.output and "Traceback" not in refused.output, refused.output
    assert runs() == 1
    unknown = runner.invoke(app, ["experiment", "report", "newsletter_test"])
    assert unknown.exit_code == 2 and "no experiment 'newsletter_test' in the embedded catalog" in " ".join(
        unknown.output.split()) and "it has: email_rules" in " ".join(unknown.output.split()), unknown.output
