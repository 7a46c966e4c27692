"""Monitoring: CBPE, alert rules and delivery, the retrain policy, bad input, and the closed loop on synthetic
streams with planted drift (stationary → no alert; harmful drift → alert, retrain, promotion, a new served version;
harmless drift → the gate keeps the champion)."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import numpy as np
import pandas as pd
import pytest

from monitoring.alerts import Alert, AlertSink, evaluate, read_alerts
from monitoring.cbpe import estimate
from monitoring.config import AlertPolicy, MonitorConfig, RetrainPolicy, load_config
from monitoring.data import MonitorError
from monitoring.retrain import RetrainState, decide
from personalize.errors import ConfigError


# --- pure parts --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.5, 1.0, 2.5])
def test_cbpe_estimates_the_roc_auc_of_calibrated_scores_before_labels(slope):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(int(slope * 10))
    p = 1 / (1 + np.exp(-slope * rng.normal(size=20_000)))
    y = rng.uniform(size=p.size) < p  # labels drawn from the probabilities: calibrated by construction
    est = estimate(p, 0.5)
    assert est["roc_auc"] == pytest.approx(roc_auc_score(y, p), abs=0.01)
    assert est["recall"] == pytest.approx(((p >= 0.5) & y).sum() / y.sum(), abs=0.02)


def _alert(rule="prediction_drift", severity="warning", end="2025-01-08"):
    return Alert("churn", "1", rule, severity, "m", 0.2, 0.1, "2025-01-01", end)


def test_rules_raise_nothing_on_a_small_window_and_each_rule_on_its_own_number():
    config = MonitorConfig()
    quiet = {"rows": 50, "drift_share": 0.9, "prediction_drift_detected": True, "prediction_drift": 0.5}
    assert evaluate(quiet, config, "churn", "1", pd.Timestamp(0), pd.Timestamp(1)) == []
    loud = {"rows": 5000, "drift_share": 0.6, "drifted_features": ["a"], "prediction_drift_detected": True,
            "prediction_drift": 0.3, "estimated_roc_auc": 0.70, "reference_estimated_roc_auc": 0.80,
            "labeled_rows": 500, "realized_roc_auc": 0.7, "reference_roc_auc": 0.8}
    rules = {a.rule: a.severity for a in evaluate(loud, config, "churn", "1", pd.Timestamp(0), pd.Timestamp(1))}
    assert rules == {"dataset_drift": "warning", "prediction_drift": "warning",
                     "estimated_performance_drop": "critical", "realized_performance_drop": "critical"}


def test_repeated_alerts_are_suppressed_within_the_cooldown_and_sent_again_after(tmp_path):
    sent = []
    sink = AlertSink(tmp_path / "alerts.jsonl", AlertPolicy(webhook_url="http://hook.invalid", cooldown_hours=48),
                     post=lambda url, body, timeout: sent.append(body["rule"]) or 200)
    sink.emit([_alert(end="2025-01-08")])
    sink.emit([_alert(end="2025-01-09")])  # a day later: within 48 h
    sink.emit([_alert(end="2025-01-11")])  # three days after the first sent one
    assert sink.wait(5)
    alerts = [r for r in read_alerts(tmp_path / "alerts.jsonl") if r["type"] == "alert"]
    assert [a["suppressed"] for a in alerts] == [False, True, False]
    assert sent == ["prediction_drift", "prediction_drift"]


def test_a_failing_webhook_is_retried_never_blocks_and_its_outcome_is_logged(tmp_path):
    calls = []

    def flaky(url, body, timeout):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("refused")
        return 204

    sink = AlertSink(tmp_path / "a.jsonl", AlertPolicy(webhook_url="http://x.invalid", webhook_retries=3), post=flaky,
                     backoff_s=0.05)
    began = time.monotonic()
    sink.emit([_alert()])
    assert time.monotonic() - began < 0.05  # the job goes on while the hook is retried
    assert sink.wait(5)
    delivery = [r for r in read_alerts(tmp_path / "a.jsonl") if r["type"] == "delivery"]
    assert delivery[0]["delivered"] and delivery[0]["attempts"] == 3

    hung = threading.Event()
    slow = AlertSink(tmp_path / "b.jsonl", AlertPolicy(webhook_url="http://x.invalid", webhook_retries=0),
                     post=lambda *a: hung.wait(10) or 200)
    began = time.monotonic()
    slow.emit([_alert()])
    assert not slow.wait(0.2) and time.monotonic() - began < 1.0
    hung.set()


def test_the_retrain_policy_needs_a_streak_waits_for_labels_and_cools_down():
    policy = RetrainPolicy(consecutive=2, cooldown_days=30)
    week = pd.Timedelta(days=7)
    t0 = pd.Timestamp("2025-07-01")
    state, due, why = decide(RetrainState(), [_alert()], t0, t0 + week, policy, horizon_days=30)
    assert not due and "1/2" in why
    state, due, _ = decide(state, [], t0 + week, t0 + 2 * week, policy, 30)  # a quiet window resets the streak
    assert not due and state.streak == 0
    for k in range(2, 8):
        state, due, why = decide(state, [_alert()], t0 + k * week, t0 + (k + 1) * week, policy, 30)
        if due:
            break
    assert due and k == 6  # the streak began at t0 + 2 weeks; its labels are known 30 days later
    state.last_retrain = str(t0 + 7 * week)
    state, due, why = decide(state, [_alert()], t0 + 7 * week, t0 + 8 * week, policy, 30)
    assert not due and "cooldown" in why
    info_only = decide(RetrainState(streak=5, first_window=str(t0)), [_alert(severity="info")], t0, t0 + week * 9,
                       policy, 30)
    assert not info_only[1] and info_only[0].streak == 0
    empty = decide(RetrainState(streak=5, first_window=str(t0)), [_alert(rule="empty_feature")], t0, t0 + week * 9,
                   policy, 30)  # a broken pipeline is fixed upstream, not retrained on
    assert not empty[1] and empty[0].streak == 0
    counted = decide(RetrainState(), [_alert(rule="empty_feature")], t0, t0 + week, RetrainPolicy(not_on=[]), 30)
    assert counted[0].streak == 1


def test_windows_in_a_row_are_distinct_windows_with_enough_rows():
    policy = RetrainPolicy(consecutive=2, wait_for_labels=False, cooldown_days=0)
    week, hour = pd.Timedelta(days=7), pd.Timedelta(hours=1)
    t0 = pd.Timestamp("2025-07-01")
    state, due, _ = decide(RetrainState(), [_alert()], t0, t0 + week, policy, 30)
    assert state.streak == 1 and not due
    # an hourly pass over the week that ends an hour later overlaps it: not a second window in a row
    again, due, why = decide(state, [_alert()], t0 + hour, t0 + week + hour, policy, 30)
    assert again.streak == 1 and not due and "overlaps the last one counted" in why
    # nor does a quiet look at a past window reset the streak
    look, due, _ = decide(state, [], t0 - week, t0, policy, 30)
    assert look.streak == 1
    # a window too small for the rules says nothing either way
    small, due, why = decide(state, [], t0 + week, t0 + week + hour, policy, 30, judged=False)
    assert small.streak == 1 and "too small for the alert rules to judge" in why
    # but a small window's alert counts: the realized-performance rule judges the labeled rows, not the window's
    labeled, due, _ = decide(state, [_alert()], t0 + week, t0 + week + hour, policy, 30, judged=False)
    assert labeled.streak == 2
    # the next distinct week does count
    state, due, why = decide(state, [_alert()], t0 + week, t0 + 2 * week, policy, 30)
    assert state.streak == 2 and due and "2 window(s) in a row" in why


def test_an_outcomes_file_labels_by_pseudonymized_id_and_counts_what_it_skips(tmp_path):
    from monitoring.data import read_outcomes
    from personalize.errors import DataFileError
    from serving.predlog import pseudonymize

    frame = pd.DataFrame({"id": ["a", "b", "b", None, "c", "d", "e"], "y": [1.0, 0, 1, 1, None, 0, 0]})
    frame.to_parquet(tmp_path / "outcomes.parquet")  # a float label with a null: 1.0 is the positive "1"
    out = read_outcomes(tmp_path / "outcomes.parquet", "id", "y", "1", b"salt")
    key = {c: pseudonymize(c, b"salt") for c in "abde"}
    assert out.labels.to_dict() == {key["a"]: 1, key["b"]: 1, key["d"]: 0, key["e"]: 0}  # b's last row counts
    assert out.skipped == {"missing_id": 1, "missing_label": 1, "duplicate_id": 1}
    assert out.rows_in == len(out.labels) + sum(out.skipped.values()) == 7
    frame.assign(y=frame["y"].map({1.0: "churned", 0.0: "stayed"})).to_csv(tmp_path / "o.csv", index=False)
    with pytest.raises(DataFileError, match="'yes'"):  # a positive value that is not one of the two
        read_outcomes(tmp_path / "o.csv", "id", "y", "yes", b"salt")
    with pytest.raises(DataFileError, match=r"no id column \(--labels-id names another\); the file has \['id', 'y'\]"):
        read_outcomes(tmp_path / "o.csv", "customer", "y", "churned", b"salt")
    with pytest.raises(DataFileError, match=r"no label column \(--labels-column names another\)"):
        read_outcomes(tmp_path / "o.csv", "id", "Churn", "churned", b"salt")
    assert read_outcomes(tmp_path / "o.csv", "id", "y", "Churned", b"salt").labels.sum() == 2  # any case
    # against the training table's values, a file coded otherwise is an error, not a file of negatives
    pd.DataFrame({"id": ["a", "b"], "y": [1, 1]}).to_csv(tmp_path / "coded.csv", index=False)
    with pytest.raises(DataFileError, match=r"label values \(no, yes; in any case\) are expected; the file has 1$"):
        read_outcomes(tmp_path / "coded.csv", "id", "y", "Yes", b"salt", values=["no", "yes"])
    frame.to_csv(tmp_path / "semicolons.csv", index=False, sep=";")
    with pytest.raises(DataFileError, match="--sep ';'"):
        read_outcomes(tmp_path / "semicolons.csv", "id", "y", "1", b"salt")


def test_a_bad_policy_file_names_the_field(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("drift:\n  num_threshold: -1\n")
    with pytest.raises(ConfigError, match="drift.num_threshold"):
        load_config(path)
    path.write_text("alerts:\n  cooldown_hours: 2\n  webhook_url: http://h\n")
    assert load_config(path).alerts.cooldown_hours == 2


# --- the closed loop ---------------------------------------------------------------------------------------------
T0 = datetime(2025, 7, 1)  # the champion is trained on the world as known then
HORIZON = 30
WEEK = pd.Timedelta(days=7)
CUSTOMERS = 1200
SAMPLE = 500


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """A churn champion trained on a synthetic shop up to T0 (30-day horizon), and the helpers to replay streams."""
    from features.pipeline import ingest_synthetic
    from features.synthetic import SyntheticConfig, generate, until
    from personalize.settings import Settings
    from serving.predlog import load_salt
    from training.registry import GateConfig, connect, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    home = tmp_path_factory.mktemp("monitoring")
    settings = Settings(home=home)
    world = generate(SyntheticConfig(customers=CUSTOMERS))
    ingest_synthetic(settings, "shop", until(world, T0))
    train_and_register(settings, "churn", "shop", TrainConfig(tune=TuneConfig(trials=3), horizon_days=HORIZON,
                                                              train_cutoffs=2, step_days=14))
    client = connect(settings.tracking_uri)
    assert promote(client, "churn", GateConfig(max_ece=0.1)).passed
    from monitoring.data import load_reference

    reference = load_reference(client, "churn", "1")
    moment = reference.moment  # the reference's own point in time (its test cutoff)
    assert moment is not None and moment < pd.Timestamp(T0) - pd.Timedelta(days=HORIZON - 1)
    return {"settings": settings, "client": client, "salt": load_salt(home), "moment": moment,
            "reference": reference, "ingest": ingest_synthetic, "until": until}


def _stream(loop, name, drift, stamps, seed):
    """Customers of the generator's shop ``seed``, with ``drift`` from four weeks before the reference's moment,
    scored at that moment and logged at ``stamps``."""
    from features.synthetic import DriftSpec, SyntheticConfig, generate
    from monitoring.replay import replay

    spec = DriftSpec(start=loop["moment"] - pd.Timedelta(days=28), **drift) if drift else DriftSpec()
    data = generate(SyntheticConfig(customers=CUSTOMERS, seed=seed, drift=spec))
    loop["ingest"](loop["settings"], name, data)
    replay(loop["client"], "churn", loop["settings"].dataset_dir(name), loop["settings"].log_root, stamps,
           loop["salt"], sample=SAMPLE, seed=seed, as_of=loop["moment"])
    return data


def _pass(loop, stamp, **options):
    from monitoring.job import run_pass

    end = stamp + pd.Timedelta(hours=1)
    return run_pass(loop["settings"], loop["client"], "churn", end - WEEK, end, MonitorConfig(),
                    reference=loop["reference"], persist_reports=False, summary=False, **options)


@pytest.mark.slow
def test_a_stationary_stream_raises_no_alert_in_twenty_windows(loop):
    from monitoring.replay import replay

    base = pd.Timestamp("2026-01-05")
    stamps = [base + k * WEEK for k in range(20)]
    # The champion's own shop at the reference's moment, a fresh sample of customers per window. (Other seeds of the
    # generator are other shops, with their own category popularity, which the monitor rightly calls drift.)
    for k, stamp in enumerate(stamps):
        replay(loop["client"], "churn", loop["settings"].dataset_dir("shop"), loop["settings"].log_root, [stamp],
               loop["salt"], sample=SAMPLE, seed=100 + k, as_of=loop["moment"])
    results = [_pass(loop, s) for s in stamps]
    assert [len(r.alerts) for r in results] == [0] * 20, [(r.window["end"], [a.message for a in r.alerts])
                                                         for r in results if r.alerts]
    assert all(r.metrics["rows"] == SAMPLE for r in results)


@pytest.mark.slow
def test_a_drift_that_does_not_hurt_the_model_does_not_replace_the_champion(loop):
    """The category mix moves (an unimportant feature for churn): a retrain is not better, so the gate refuses it
    and the audit trail says why."""
    from features.synthetic import DriftSpec, SyntheticConfig, generate
    from monitoring.retrain import retrain
    from training.registry import aliases, history

    settings, client = loop["settings"], loop["client"]
    before = aliases(client, "churn")["champion"]
    world = generate(SyntheticConfig(customers=CUSTOMERS, drift=DriftSpec(
        start=loop["moment"] - pd.Timedelta(days=28), mix=0.9)))
    loop["ingest"](settings, "shop", loop["until"](world, loop["moment"] + pd.Timedelta(days=75)))
    out = retrain(settings, client, "churn", RetrainPolicy(trials=3), reason="category mix drift")
    assert not out.promoted and "better_than_champion" in out.verdict
    assert aliases(client, "churn")["champion"] == before
    refusal = history(client, "churn")[-1]
    assert refusal["action"] == "refuse" and refusal["to"] == out.challenger
    assert "better_than_champion" in refusal["verdict"] and "ci_low" in refusal["gate"]


@pytest.mark.slow
def test_harmful_drift_alerts_in_its_first_window_and_the_policy_retrains_through_the_gate(loop, tmp_path):
    from monitoring.schedule import step
    from serving.scoring import ModelSet
    from training.registry import history

    settings, client = loop["settings"], loop["client"]
    served = ModelSet(client, {"churn": "churn"})
    served.refresh()
    assert served.get("churn").version == "1"
    base = pd.Timestamp("2026-06-01")
    calm = [base + k * WEEK for k in range(3)]
    drifted = [base + (3 + k) * WEEK for k in range(6)]
    _stream(loop, "calm", None, calm, seed=42)
    world = _stream(loop, "drifted", {"activity": -0.7}, drifted, seed=42)  # the champion's own shop, changed
    assert [_pass(loop, s).alerts for s in calm] == [[], [], []]
    first = _pass(loop, drifted[0])
    assert first.alerts, first.metrics
    # Time passes: the shop's data now runs well past the change, and the policy's label wait is over.
    loop["ingest"](settings, "shop", loop["until"](world, loop["moment"] + pd.Timedelta(days=75)))
    config = MonitorConfig(retrain=RetrainPolicy(consecutive=2, trials=3, wait_for_labels=False))
    outs = [step(settings, client, "churn", s + pd.Timedelta(hours=1), config, dataset="shop") for s in drifted[:2]]
    assert not outs[0].due and outs[1].due and outs[1].retrained is not None
    retrained = outs[1].retrained
    # The champion's probabilities no longer fit the changed shop; the retrained model's log-loss is significantly
    # lower on the new held-out cutoff (measured: 0.436 vs 0.543, interval [+0.066, +0.147]), so the gate promotes
    # it, the audit trail says so, and a server polling the registry now serves it.
    assert retrained.promoted, retrained.gate
    assert retrained.gate["ci_low"] > 0 and retrained.gate["challenger_log_loss"] < retrained.gate["champion_log_loss"]
    entries = history(client, "churn")
    assert [e["action"] for e in entries][-3:] == ["retrain", "register", "promote"]
    assert entries[-1]["to"] == retrained.challenger and "ci_low" in entries[-1]["gate"]
    served.refresh()
    assert served.get("churn").version == retrained.challenger != "1"


@pytest.mark.slow
def test_bad_input_is_a_clear_error_or_is_skipped_and_reported(loop, tmp_path):
    from monitoring.data import load_reference, read_window
    from serving.predlog import PredictionLog, make_row

    with pytest.raises(MonitorError, match="no logged predictions of churn"):
        _pass(loop, pd.Timestamp("2040-01-01"))  # an empty window
    with pytest.raises(MonitorError, match="no nope"):
        load_reference(loop["client"], "nope", "1")  # no such model: no reference
    reference = loop["reference"]
    root = tmp_path / "log"
    log = PredictionLog(root, flush_s=3600)
    record = {**reference.frame[reference.features].iloc[0].to_dict(), "shoe_size": 44.0}
    ts = pd.Timestamp("2026-01-05 12:00", tz="UTC")
    log.append([make_row(f"r{i}", "churn", {"name": "churn", "version": reference.version, "alias": "champion"},
                         f"k{i}", False, record, {"probability": 0.5, "decision": False}, None, ts=ts)
                for i in range(3)])
    log.close()
    (root / "date=2026-01-05" / "part-0-0-999999.parquet").write_bytes(b"not parquet")  # a corrupted segment
    window = read_window(root, reference, ts - WEEK, ts + WEEK)
    assert len(window.frame) == 3 and window.extra_columns == ["shoe_size"]
    assert len(window.skipped_segments) == 1 and "part-0-0-999999" in window.skipped_segments[0][0].name


def test_the_schedule_watches_the_classifiers_that_have_a_champion():
    from types import SimpleNamespace

    from monitoring.schedule import monitored_models

    registered = [SimpleNamespace(name="churn", aliases={"champion": "3"}, tags={"kind": "classifier"}),
                  SimpleNamespace(name="churn_telco", aliases={"champion": "1", "challenger": "2"}, tags={}),
                  SimpleNamespace(name="propensity", aliases={"challenger": "1"}, tags={"kind": "classifier"}),
                  SimpleNamespace(name="purchase_cycle", aliases={"champion": "1"}, tags={"kind": "regressor"}),
                  SimpleNamespace(name="purchase_forecast", aliases={"champion": "1"}, tags=None)]
    client = SimpleNamespace(search_registered_models=lambda max_results: registered)
    assert monitored_models(client) == ["churn", "churn_telco"]
