"""Erasure (``personalize forget``): one customer in every store, erased, and nothing of them left anywhere.

One home is built once for the module (a synthetic data set, its training frame, a materialized online store, a
prediction log, decisions with feedback and bandit counts, quarantined rows, an MLflow run with a held-out frame and
an input example, batch scores); then a dry run, an erasure and a second erasure run on it, and each test checks one
property of what they did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from personalize.erasure import AUDIT_LOG, find, forget
from personalize.settings import Settings

ENV: dict[str, str] = {}  # no salt, online store or decision path from the developer's shell
DAY1, DAY2, DAY3 = (pd.Timestamp(f"2024-07-0{d} 10:00", tz="UTC") for d in (1, 2, 3))
MODEL = {"name": "churn", "version": "1", "alias": "champion"}


def _rows(path: Path) -> int:
    if path.suffix == ".json":
        return len(json.loads(path.read_text())["data"])
    return pq.read_metadata(path).num_rows if path.exists() else 0


def totals(settings: Settings) -> dict[str, int]:
    """Every row of every store, customer or not: what an erasure may only reduce by what it removed."""
    from serving.decision_store import DecisionStore
    from serving.online import SQLiteOnlineStore

    home = settings.home.resolve()
    out = {p.relative_to(home).as_posix(): _rows(p)
           for p in home.rglob("*") if (p.suffix == ".parquet" or p.name == "input_example.json") and p.is_file()
           and not p.is_relative_to(settings.log_root.resolve()) and "erasure" not in p.parts}
    out["predictions"] = sum(_rows(p) for p in settings.log_root.rglob("part-*.parquet"))
    online = SQLiteOnlineStore(home / "online" / "s.sqlite")
    out["online:s"] = online.count()
    online.close()
    store = DecisionStore(settings.decisions_path)
    counts = store.counts()
    out["decisions"] = counts["decisions"]
    out["feedback"] = sum(v for k, v in counts.items() if k != "decisions")
    out["bandit.trials"] = int(store.bandits()["trials"].sum())
    store.close()
    return out


def _build(home: Path) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from features.pipeline import build_training_frame, ingest_synthetic
    from features.store import read_frame
    from features.synthetic import SyntheticConfig, generate
    from serving.decision_store import DecisionStore
    from serving.online import default_url, materialize
    from serving.predlog import PredictionLog, load_salt, make_row, pseudonymize
    from training.registry import log_heldout

    settings = Settings.from_env({"PERSONALIZE_HOME": str(home)})
    ingest_synthetic(settings, "s", generate(SyntheticConfig(customers=150, days=200)))
    build_training_frame(settings, "s", horizon_days=30, cutoffs=2)
    materialize(settings.dataset_dir("s"), default_url(home, "s"))
    frame = read_frame(settings.features_dir("s") / "training_frame.parquet")
    tx = pd.read_parquet(settings.dataset_dir("s") / "transactions.parquet")
    events = pd.read_parquet(settings.dataset_dir("s") / "events.parquet")
    cid, other, third = sorted(set(frame["customer_id"]) & set(tx["customer_id"]) & set(events["customer_id"]))[:3]
    salt = load_salt(home, ENV)
    key = {c: pseudonymize(c, salt) for c in (cid, other, third)}

    # the prediction log: day 1 mixed, day 2 only the customer (a segment that must go), day 3 without them
    plog = PredictionLog(settings.log_root, flush_s=3600)
    plog.append([make_row(f"r{i}-{c}", "churn", MODEL, key[c], False, {"recency_days": 3.0 + i},
                          {"probability": 0.4, "decision": False}, None, ts=DAY1)
                 for i in range(3) for c in (cid, other, third)])
    plog.append([make_row(f"q{i}", "churn", MODEL, key[cid], False, {"recency_days": 1.0},
                          {"probability": 0.7, "decision": True}, None, ts=DAY2) for i in range(2)])
    plog.append([make_row("n1", "churn", MODEL, key[other], True, None, {"probability": 0.1, "decision": False},
                          None, ts=DAY3), make_row("n2", "forecast", MODEL, None, False, {}, {}, None, ts=DAY3)])
    plog.close()

    # decisions with feedback: the bandit learns from consenting customers' impressions and conversions
    store = DecisionStore(settings.decisions_path)
    for i, c in enumerate([cid, cid, other, other, third, cid]):
        decision = {"placement": "home", "variant": "AB"[i % 2], "policy": "bandit", "bandit_segment": "all"}
        store.record_decision(f"d{i}", str(DAY1), decision, key[c], "loyal", False, True, {"churn": 0.3})
        store.record_feedback(f"d{i}", "click" if i % 3 else "impression", str(DAY1), None, "conversion")
        if i % 2 == 0:
            store.record_feedback(f"d{i}", "conversion", str(DAY1), 12.5, "conversion")
    store.record_decision("anon", str(DAY1), {"placement": "home", "variant": "A", "policy": "default"}, None, None,
                          True, False, None)
    store.close()

    # quarantined rows as read: the id as text, once padded, once inside a line no mapping could read
    q = settings.quarantine_dir("s")
    q.mkdir(parents=True)
    bookkeeping = {"_source_file": "tx.csv", "_reason": "negative_amount", "_detail": "negative_amount"}
    pd.DataFrame([
        {"_source_row": 1, "customer_id": cid, "order_id": "o1", "amount": "-3", **bookkeeping},
        {"_source_row": 2, "customer_id": other, "order_id": "o2", "amount": "-1", **bookkeeping},
        {"_source_row": 3, "customer_id": f" {cid} ", "order_id": "o3", "amount": "-2", **bookkeeping},
        {"_source_row": 4, "_raw_line": f"o4,{cid},2024-01-01,9,extra", **bookkeeping},
    ]).astype("string").to_parquet(q / "transactions.parquet", index=False)
    pd.DataFrame([{"_source_row": 7, "customer_id": cid, "event_type": "warp", **bookkeeping}]).astype(
        "string").to_parquet(q / "events.parquet", index=False)

    # batch scores, and an Evidently snapshot (row-level values, no ids)
    scores = home / "scores" / "churn" / "v1" / "scores.parquet"
    scores.parent.mkdir(parents=True)
    pd.DataFrame({"customer_id": sorted(set(frame["customer_id"])), "probability": 0.5}).to_parquet(scores,
                                                                                                    index=False)
    snapshot = home / "evidently" / "p1" / "snapshots" / "s1.json"
    snapshot.parent.mkdir(parents=True)
    snapshot.write_text(json.dumps({"metric_results": {"x": [0.1, 0.2]}}))

    # an MLflow training run: its held-out frame and a model input example name the customer
    with _use_tracking_uri(settings.tracking_uri):
        experiment = mlflow.create_experiment("train-churn", artifact_location=f"{settings.artifact_root}/train-churn")
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.set_tags({"kind": "training", "heldout_target": "label", "dataset": "s"})
            log_heldout(frame.assign(label=frame["churn"].fillna(0).astype(int)))
            mlflow.log_text(json.dumps({"columns": ["customer_id", "frequency"],
                                        "data": [[cid, 1.0], [other, 2.0], [third, 0.0]]}), "model/input_example.json")
        remote = mlflow.create_experiment("train-remote", artifact_location="s3://bucket/train-remote")
        with mlflow.start_run(experiment_id=remote) as remote_run:  # nothing is uploaded: tags only
            mlflow.set_tags({"kind": "training", "heldout_target": "label"})
        client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
        client.create_registered_model("churn")
        client.create_model_version("churn", f"{run.info.artifact_uri}/model", run.info.run_id, tags={"dataset": "s"})
    return {"settings": settings, "cid": cid, "other": other, "key": key[cid], "run_id": run.info.run_id,
            "remote_heldout": f"s3://bucket/train-remote/{remote_run.info.run_id}/artifacts/heldout/heldout.parquet"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from features.store import read_frame

    home = tmp_path_factory.mktemp("erasure") / "home"
    with pytest.MonkeyPatch.context() as mp:
        home.mkdir()
        mp.chdir(home)  # MLflow puts the Default experiment's artifacts under the working directory
        built = _build(home)
    settings, cid, other = built["settings"], built["cid"], built["other"]
    frame_path = settings.features_dir("s") / "training_frame.parquet"
    built["schemas"] = {p: pq.read_schema(p) for p in settings.dataset_dir("s").glob("*.parquet")}
    built["provenance"] = read_frame(frame_path).attrs
    built["before"] = totals(settings)
    built["found_before"] = find(settings, cid, environ=ENV)
    built["other_before"] = find(settings, other, environ=ENV)
    built["dry"] = forget(settings, cid, dry_run=True, environ=ENV)
    built["after_dry"] = totals(settings)
    built["report"] = forget(settings, cid, environ=ENV)
    built["after"] = totals(settings)
    built["found_after"] = find(settings, cid, environ=ENV)
    built["other_after"] = find(settings, other, environ=ENV)
    built["again"] = forget(settings, cid, environ=ENV)
    return built


def _stores(found: dict[str, int]) -> set[str]:
    return {k for k in found if not k.startswith("scan:")}


def test_given_the_customer_everywhere_find_sees_every_store(world):
    found = world["found_before"]
    run = world["run_id"]
    expected = {"data/s/customers.parquet", "data/s/transactions.parquet", "data/s/events.parquet",
                "data/s/truth.parquet", "features/s/training_frame.parquet", "quarantine/s/transactions.parquet",
                "quarantine/s/events.parquet", "online:s", "predictions", "decisions", "feedback",
                "scores/churn/v1/scores.parquet", f"mlartifacts/train-churn/{run}/artifacts/heldout/heldout.parquet",
                f"mlartifacts/train-churn/{run}/artifacts/model/input_example.json"}
    assert expected <= set(found), expected - set(found)
    assert found["quarantine/s/transactions.parquet"] == 3  # by column, padded, and inside an unreadable line
    assert found["predictions"] == 5 and found["decisions"] == 3 and found["data/s/customers.parquet"] == 1


def test_after_forget_nothing_of_the_customer_is_left_anywhere(world):
    report = world["report"]
    assert world["found_after"] == {}  # every store and the byte-for-byte scan of every file
    assert report.remaining == {}


def test_a_remote_artifact_store_is_reported_not_erased_and_does_not_fail(world):
    report = world["report"]
    assert report.not_erased == [{"store": "artifacts", "where": world["remote_heldout"],
                                  "why": "not erased: remote artifact store, erase by hand"}]
    assert not report.clean  # until someone erases it by hand


def test_forget_removes_exactly_what_find_found_and_every_other_row_stays(world):
    report, before, after = world["report"], world["before"], world["after"]
    assert report.removed == {k: v for k, v in world["found_before"].items() if not k.startswith("scan:")}
    for location, rows in before.items():
        removed = report.bandit_trials if location == "bandit.trials" else report.removed.get(location, 0)
        if location in report.files_deleted:
            assert location not in after and rows == removed, location
        else:
            assert after[location] == rows - removed, location
    assert _stores(world["other_after"]) == _stores(world["other_before"])  # other customers are still found
    assert world["other_after"]["data/s/transactions.parquet"] == world["other_before"]["data/s/transactions.parquet"]


def test_emptied_files_are_removed_and_rewritten_ones_keep_their_schema_order_and_provenance(world):
    from features.store import read_frame

    settings, report = world["settings"], world["report"]
    assert "quarantine/s/events.parquet" in report.files_deleted
    assert not list((settings.log_root / "date=2024-07-02").glob("part-*.parquet"))  # the customer's own day
    assert list((settings.log_root / "date=2024-07-03").glob("part-*.parquet"))  # untouched
    for path, schema in world["schemas"].items():
        assert pq.read_schema(path).equals(schema, check_metadata=True), path
    tx = pd.read_parquet(settings.dataset_dir("s") / "transactions.parquet")
    assert tx.equals(tx.sort_values(["customer_id", "timestamp"], kind="stable"))
    assert read_frame(settings.features_dir("s") / "training_frame.parquet").attrs == world["provenance"]


def test_bandit_counts_still_reconcile_with_the_feedback_after_erasure(world):
    from serving.decision_store import DecisionStore

    store = DecisionStore(world["settings"].decisions_path)
    index = ["placement", "segment", "variant"]
    bandit = store.bandits().set_index(index)[["trials", "successes"]]
    bandit = bandit[(bandit["trials"] != 0) | (bandit["successes"] != 0)]
    recount = store.recount("conversion").set_index(index)[["trials", "successes"]]
    store.close()
    pd.testing.assert_frame_equal(bandit.sort_index(), recount.sort_index(), check_dtype=False)
    assert world["report"].bandit_trials == world["before"]["bandit.trials"] - world["after"]["bandit.trials"] > 0


def test_a_second_forget_removes_nothing_and_does_not_fail(world):
    again = world["again"]
    assert again.removed == {} and again.files_rewritten == [] and again.files_deleted == []
    assert again.bandit_trials == 0 and again.remaining == {}


def test_a_dry_run_changes_nothing_and_says_what_would_go(world):
    dry, report = world["dry"], world["report"]
    assert world["after_dry"] == world["before"]
    assert dry.dry_run and dry.removed == report.removed and dry.bandit_trials == report.bandit_trials
    assert sorted(dry.files_deleted) == sorted(report.files_deleted)
    assert _stores(dry.remaining) == _stores(world["found_before"])


def test_the_audit_log_records_each_erasure_by_key_never_by_id(world):
    settings = world["settings"]
    text = (settings.home / AUDIT_LOG).read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 2  # two erasures; the dry run is not one
    assert world["cid"] not in text and all(line["customer_key"] == world["key"] for line in lines)
    assert lines[0]["total"] == world["report"].total > 0 and lines[1]["total"] == 0


def test_the_report_names_what_it_cannot_erase(world):
    report = world["report"]
    assert report.trained_models == ["churn/1"]  # trained on the data set that held the customer
    assert {u["store"] for u in report.unattributed} >= {"evidently"}
    assert json.dumps(report.to_dict(), default=str)  # serializable for the CLI


def test_quarantined_ids_match_as_read_labeled_tables_by_their_id_column_and_unknown_is_no_error():
    settings = Settings.from_env()
    folder = settings.quarantine_dir("retail")
    folder.mkdir(parents=True)
    pd.DataFrame({"CustomerID": ["17850.0", " 17850", "17851", None], "_raw_line": [None, None, None, "x,17850,3"],
                  "_reason": "bad"}).astype("string").to_parquet(folder / "transactions.parquet", index=False)
    labeled = settings.dataset_dir("telco")
    labeled.mkdir(parents=True)
    (labeled / "ingest_report.json").write_text(json.dumps({"kind": "labeled", "id_column": "customerID"}))
    pd.DataFrame({"customerID": ["7590-VHVEG", "17850"], "tenure": [1, 2], "label": [0, 1]}).to_parquet(
        labeled / "table.parquet", index=False)

    assert forget(settings, "nobody", environ=ENV).total == 0
    unreachable = forget(settings, "17850", online_url="redis://127.0.0.1:1/0", dry_run=True, environ=ENV)
    assert [(p["store"], p["where"]) for p in unreachable.not_erased] == [
        ("online", f"online:redis://127.0.0.1:1/0#{ds}") for ds in ("retail", "telco")]
    report = forget(settings, "17850", environ=ENV)

    assert report.removed == {"quarantine/retail/transactions.parquet": 3, "data/telco/table.parquet": 1}
    assert pd.read_parquet(folder / "transactions.parquet")["CustomerID"].tolist() == ["17851"]
    assert find(settings, "17850", environ=ENV) == {}
    with pytest.raises(ValueError):
        forget(settings, "  ", environ=ENV)


def test_quarantined_rows_are_found_by_the_id_ingest_parsed_whatever_the_source_column_is_called(
        tmp_path: Path) -> None:
    from features.pipeline import ingest_config, load_ingest_config

    (tmp_path / "kunden.csv").write_text("Kundennr;seit\n17850;2024-01-01\n17851;2024-01-01\n17850;2024-01-01\n")
    (tmp_path / "belege.csv").write_text("Beleg;Kundennr;Zeit;Menge;Preis\nA1;17850;2024-02-01;1;3\n"
                                         "A2;17850;2024-02-02;1;-3\nA3;17851;2024-02-02;1;-3\nA4;17850;gestern;1;3\n")
    (tmp_path / "laden.yaml").write_text("""dataset: laden
tables:
  - {table: customers, path: kunden.csv, csv: {sep: ";"}, columns: {customer_id: Kundennr, signup_at: seit}}
  - table: transactions
    path: belege.csv
    csv: {sep: ";"}
    columns: {order_id: Beleg, customer_id: Kundennr, timestamp: Zeit, quantity: Menge, unit_price: Preis}
""")
    settings = Settings.from_env()
    ingest_config(settings, load_ingest_config(tmp_path / "laden.yaml"), pd.Timestamp("2024-06-01"))
    folder = settings.quarantine_dir("laden")
    assert sorted(pd.read_parquet(folder / "transactions.parquet")["_customer_id"]) == ["17850", "17850", "17851"]

    report = forget(settings, "17850", environ=ENV)
    assert report.removed["quarantine/laden/transactions.parquet"] == 2
    assert report.removed["quarantine/laden/customers.parquet"] == 1  # the repeated customer row
    assert pd.read_parquet(folder / "transactions.parquet")["Kundennr"].tolist() == ["17851"]
    assert not (folder / "customers.parquet").exists() and report.clean


def test_the_last_resort_scan_finds_the_customer_outside_the_known_stores():
    settings = Settings.from_env()
    settings.home.mkdir(parents=True)
    (settings.home / "serve.log").write_text("GET /churn customer_id=c0000042 200\n")
    exports = settings.home / "exports"
    exports.mkdir()
    pd.DataFrame({"who": ["c0000041", "c0000042"] * 50, "n": range(100)}).to_parquet(
        exports / "crm.parquet", compression="zstd", index=False)  # no id column the stores know

    found = find(settings, "c0000042", environ=ENV)
    report = forget(settings, "c0000042", environ=ENV)

    assert set(found) == {"scan:serve.log", "scan:exports/crm.parquet"}
    assert report.removed == {} and set(report.remaining) == set(found) and not report.clean


def test_the_scan_finds_an_id_standing_alone_not_digits_inside_another_number():
    settings = Settings.from_env()
    settings.home.mkdir(parents=True)
    (settings.home / "numbers.txt").write_text('{"recency_ratio": 0.6498178506375228, "at": "00:09:20.178506", '
                                                '"x": "x17850", "y": 178506.5, "z": 17850.05}\n')
    pd.DataFrame({"note": ["ratio 0.6498178506375228", "at 00:09:20.178506", "y 178506.5"]}).to_parquet(
        settings.home / "notes.parquet", compression="zstd", index=False)
    assert find(settings, "17850", environ=ENV) == {} and find(settings, "178506", environ=ENV) == {}

    (settings.home / "serve.log").write_text("GET /churn customer_id=17850 200\n")
    (settings.home / "export.csv").write_text("id,spend\n17850.0,3\n")  # the id written as a float
    (settings.home / "customer_17850.png").write_bytes(b"\x89PNG")  # named after the customer
    pd.DataFrame({"note": ["called 178506, twice", "178506.0"]}).to_parquet(settings.home / "calls.parquet",
                                                                            index=False)
    pd.DataFrame({"CustomerID": [17850, 17851], "orders": [3, 17850]}).to_parquet(settings.home / "crm.parquet")
    assert find(settings, "17850", environ=ENV) == {"scan:serve.log": 1, "scan:export.csv": 1,
                                                    "scan:customer_17850.png": 1,
                                                    "scan:crm.parquet": 1}  # an id kept as a number; not the count
    assert set(find(settings, "178506", environ=ENV)) == {"scan:calls.parquet"}  # its bytes hold it several times
