"""Monitoring passes over inputs Evidently cannot take as they are: a feature empty (all null) in the reference or
the window, as the engagement features are on every data set without events (Online Retail, CDNOW), and extreme
finite values the API accepted (``1e308``). The pass completes, leaves the empty features out of the drift tests
and says why, alerts on a feature only the window lacks, and clips and counts the extreme values, which show as
drift."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest

from monitoring.alerts import AlertSink
from monitoring.config import AlertPolicy, MonitorConfig
from monitoring.data import Reference
from monitoring.drift import LIMIT, drift_inputs

NUMERIC = ["recency_days", "monetary", "pages_per_session"]
ENGAGEMENT = "pages_per_session"
END = pd.Timestamp("2026-01-12", tz="UTC")
CONFIG = MonitorConfig(alerts=AlertPolicy(min_rows=100))


def _reference(empty: tuple[str, ...] = (), rows: int = 400) -> Reference:
    """A churn model's reference of ``rows`` seeded customers, the ``empty`` features null on every row."""
    rng = np.random.default_rng(7)
    frame = pd.DataFrame({"recency_days": rng.exponential(40, rows).round(), "monetary": rng.lognormal(4, 1, rows),
                          ENGAGEMENT: rng.gamma(3, 2, rows), "top_category": rng.choice(["a", "b", "c"], rows),
                          "label": rng.integers(0, 2, rows), "probability": rng.uniform(0.05, 0.95, rows)})
    for c in empty:
        frame[c] = np.nan
    return Reference("churn", "1", "run", "churn", None, None, 0.5, NUMERIC, ["top_category"], frame)


def _log(settings, reference: Reference, records: list[dict]) -> None:
    """``records`` logged as warm predictions of ``reference``'s version a day before ``END``."""
    from serving.predlog import PredictionLog, make_row

    log = PredictionLog(settings.log_root, flush_s=3600)
    ts = END - pd.Timedelta(days=1)
    log.append([make_row(f"r{i}", "churn", {"name": "churn", "version": reference.version, "alias": "champion"},
                         f"k{i}", False, r, {"probability": p, "decision": p >= 0.5}, None, ts=ts)
                for i, (r, p) in enumerate(zip(records, reference.frame["probability"]))])
    log.close()


def _records(reference: Reference, rows: int = 300, **set_values) -> list[dict]:
    """The reference's first ``rows`` feature records as the API logs them (JSON: a null is None), with
    ``set_values`` (column → value for every row) replacing their values."""
    frame = reference.frame[reference.features].head(rows).astype(object)
    records = frame.where(frame.notna(), None).to_dict("records")
    return [{**r, **set_values} for r in records]


def _pass(settings, reference: Reference, summary: bool = False, persist_reports: bool = False):
    from monitoring.job import run_pass

    return run_pass(settings, None, "churn", END - pd.Timedelta(days=7), END, CONFIG, reference=reference,
                    persist_reports=persist_reports, summary=summary,
                    sink=AlertSink(settings.monitoring_dir / "alerts.jsonl", CONFIG.alerts))


@pytest.fixture
def settings(isolated_home):
    from personalize.settings import Settings

    return Settings(home=isolated_home)


@pytest.mark.parametrize(("empty_in_reference", "reason", "rules"), [
    (True, "empty in the reference", set()),  # a data set without events: the model never had the feature
    (False, "empty in the current window", {"empty_feature"}),  # the feature stopped arriving: a broken input
])
def test_a_feature_empty_on_every_row_is_left_out_of_the_drift_tests_and_reported(settings, empty_in_reference,
                                                                                    reason, rules):
    reference = _reference(empty=(ENGAGEMENT,) if empty_in_reference else ())
    _log(settings, reference, _records(reference, **{ENGAGEMENT: None}))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _pass(settings, reference, summary=True)  # the data-quality summary keeps the column: its nulls show

    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]  # no numpy noise on the terminal
    m = result.metrics
    assert m["skipped_features"] == {ENGAGEMENT: reason}
    assert m["empty_features"] == ([] if empty_in_reference else [ENGAGEMENT])
    assert m["tested_features"] == len(reference.features) - 1 and ENGAGEMENT not in m["drifted_features"]
    assert m["drift_share"] == len(m["drifted_features"]) / m["tested_features"]
    assert {a.rule for a in result.alerts} == rules
    assert all(ENGAGEMENT in a.message for a in result.alerts)
    assert result.to_dict()["metrics"]["skipped_features"] == {ENGAGEMENT: reason}  # the pass's JSON says so


def test_a_window_with_every_feature_empty_still_measures_the_score(settings):
    reference = _reference()
    _log(settings, reference, _records(reference, **{c: None for c in reference.features}))

    result = _pass(settings, reference)

    assert result.metrics["tested_features"] == 0 and result.metrics["drift_share"] == 0.0
    assert set(result.metrics["empty_features"]) == set(reference.features)
    assert math.isfinite(result.metrics["prediction_drift"])


def test_extreme_values_are_clipped_counted_and_show_as_drift_in_a_persisted_pass(settings):
    reference = _reference()
    records = _records(reference)
    for r, extreme in zip(records, [1e308, -1e308, math.inf]):  # finite values the API accepted, and an infinity
        r["recency_days"] = extreme
    _log(settings, reference, records)

    result = _pass(settings, reference, summary=True, persist_reports=True)

    m = result.metrics
    assert m["clipped_values"] == {"recency_days": 3} and m["reference_clipped_values"] == {}
    assert "recency_days" in m["drifted_features"] and m["skipped_features"] == {}
    assert math.isfinite(m["evidently.ValueDrift.recency_days"])
    assert result.persisted["html"]["drift"].endswith(".html")  # the report's histograms drew too


def test_passes_add_snapshots_the_evidently_ui_reads_without_parsing_the_ones_before(settings):
    from evidently.ui.workspace import Workspace

    reference = _reference()
    _log(settings, reference, _records(reference))
    first = _pass(settings, reference, persist_reports=True)
    project = first.persisted["project_id"]
    # a snapshot file no JSON parser reads: Evidently's Workspace() parses every snapshot on opening and fails
    (settings.evidently_workspace / project / "snapshots" / "00000000-0000-0000-0000-000000000000.json").write_text(
        "{not json")
    second = _pass(settings, reference, persist_reports=True)  # so this pass did not open the workspace that way
    assert second.persisted["project_id"] == project
    (settings.evidently_workspace / project / "snapshots" / "00000000-0000-0000-0000-000000000000.json").unlink()
    ui = Workspace(str(settings.evidently_workspace))  # as the Evidently UI opens it
    [listed] = ui.search_project("personalize: churn")
    assert str(listed.id) == project and len(ui.list_runs(listed.id)) == 2  # a drift snapshot per pass
    board = listed.dashboard.model()
    assert {t.title: len(t.panels) for t in board.tabs} == {"Drift": 2, "Performance": 1}  # each panel drawn once
    assert sorted(p.title for p in board.panels) == [
        "Prediction drift (score)", "ROC-AUC on labeled predictions", "Share of drifted features"]
    # a project made before the fix (a panel listed twice in its tab) is repaired by the next pass
    board.tabs[0].panels.append(board.tabs[0].panels[0])
    ui.save_dashboard(listed.id, board)
    _pass(settings, reference, persist_reports=True)
    repaired = Workspace(str(settings.evidently_workspace)).get_project(listed.id).dashboard.model()
    assert {t.title: len(t.panels) for t in repaired.tabs} == {"Drift": 2, "Performance": 1}


@pytest.mark.parametrize(("value", "clipped"), [
    (1e308, LIMIT), (-1e308, -LIMIT), (math.inf, LIMIT), (-math.inf, -LIMIT), (1e150, 1e150), (42.0, 42.0),
])
def test_drift_inputs_clip_to_the_limit_and_count_only_what_they_clip(value, clipped):
    from monitoring.data import Window

    reference = _reference(rows=4)
    window = reference.frame.copy()
    window.loc[0, "monetary"] = value
    window.loc[1, "monetary"] = np.nan

    inputs = drift_inputs(reference, Window(END - pd.Timedelta(days=7), END, window, 4, 0, {}))

    assert inputs.current.loc[0, "monetary"] == clipped and math.isnan(inputs.current.loc[1, "monetary"])
    assert inputs.clipped == ({"monetary": 1} if clipped != value else {})
    assert inputs.tested == reference.features and inputs.skipped == {}


def test_an_all_null_feature_read_as_objects_is_left_out_and_handed_to_evidently_as_numbers():
    from monitoring.data import Window

    reference = _reference(rows=4)
    reference.frame[ENGAGEMENT] = pd.Series([None] * 4, dtype=object)  # how a column of nulls can come back
    window = Window(END - pd.Timedelta(days=7), END, reference.frame.copy(), 4, 0, {})

    inputs = drift_inputs(reference, window)

    assert inputs.skipped == {ENGAGEMENT: "empty in the reference"} and ENGAGEMENT not in inputs.tested
    assert inputs.reference[ENGAGEMENT].dtype.kind == inputs.current[ENGAGEMENT].dtype.kind == "f"


def test_a_one_shot_pass_sees_its_webhook_deliveries_out_and_records_the_status(settings):
    """cron's `personalize monitor` exits right after the pass: the delivery threads must not die with it."""
    import http.server
    import threading

    from monitoring.alerts import read_alerts
    from monitoring.job import run_pass

    posts = []

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reference = _reference()
        _log(settings, reference, _records(reference, **{ENGAGEMENT: None}))  # an empty feature: one alert
        hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
        config = CONFIG.model_copy(update={"alerts": CONFIG.alerts.model_copy(update={
            "webhook_url": hook, "webhook_retries": 1, "webhook_timeout_s": 2.0})})
        result = run_pass(settings, None, "churn", END - pd.Timedelta(days=7), END, config, reference=reference,
                          persist_reports=False, summary=False)  # no sink given: the pass's own
    finally:
        server.shutdown()
    assert [a.rule for a in result.alerts] == ["empty_feature"] and len(posts) == 2  # the first try and one retry
    delivery = [r for r in read_alerts(settings.monitoring_dir / "alerts.jsonl") if r["type"] == "delivery"]
    assert len(delivery) == 1 and not delivery[0]["delivered"] and delivery[0]["attempts"] == 2
    assert delivery[0]["status"] == 500 and delivery[0]["error"] == "HTTP 500"
