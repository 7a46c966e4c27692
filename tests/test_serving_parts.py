"""The parts behind the API, without a server: the prediction log, the online store, the request checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from serving.online import SQLiteOnlineStore, build_records, open_store
from serving.predlog import PredictionLog, load_salt, make_row, pseudonymize, read_log
from serving.scoring import InputError, check_records


def _rows(n: int, start: int = 0) -> list[dict]:
    return [make_row(f"r{start + i}", "churn", {"name": "churn", "version": "1", "alias": "champion"},
                     pseudonymize(f"C{start + i}", b"salt"), False, {"x": float(i)},
                     {"probability": 0.5, "decision": False}, None) for i in range(n)]


# --- prediction log --------------------------------------------------------------------------------------------
def test_log_flushes_in_segments_and_reads_back_every_row(tmp_path: Path) -> None:
    # Given a log with a small batch size
    plog = PredictionLog(tmp_path, flush_s=60, batch_rows=10)
    # When rows arrive in pieces and the log is closed
    plog.append(_rows(25))
    plog.flush()
    plog.append(_rows(7, start=25))
    plog.close()
    # Then every row is in an immutable segment, none twice, no temporary file left behind
    frame = read_log(tmp_path)
    assert sorted(frame["request_id"]) == sorted(f"r{i}" for i in range(32))
    assert plog.written == 32 and plog.pending == 0
    assert not list(tmp_path.rglob("*.tmp"))
    assert frame["customer_key"].str.len().eq(32).all()
    assert not frame["customer_key"].str.contains("C1").any()  # pseudonymized, never the id


def test_log_background_writer_flushes_without_being_asked(tmp_path: Path) -> None:
    plog = PredictionLog(tmp_path, flush_s=0.05, batch_rows=1000)
    plog.append(_rows(3))
    deadline = pd.Timestamp.now() + pd.Timedelta(seconds=5)
    while plog.written < 3 and pd.Timestamp.now() < deadline:
        pass
    assert plog.written == 3
    plog.close()


def test_a_crash_loses_only_the_unflushed_rows_and_corrupts_nothing(tmp_path: Path) -> None:
    # Given a process that logs, flushes once, logs more and is killed before the next flush
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from serving.predlog import PredictionLog, make_row
        plog = PredictionLog({str(tmp_path)!r}, flush_s=3600, batch_rows=10**6)
        row = lambda i: make_row(f"r{{i}}", "churn", {{"name": "churn", "version": "1"}}, None, False, {{}}, {{}}, None)
        plog.append([row(i) for i in range(50)])
        plog.flush()
        plog.append([row(i) for i in range(50, 60)])
        os._exit(9)  # no close, no flush: a crash
    """)
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    # Then the flushed segment is whole and readable; only the last unflushed batch is gone
    frame = read_log(tmp_path)
    assert len(frame) == 50
    for f in tmp_path.rglob("*.parquet"):
        pq.read_table(f)  # every segment parses


def test_log_keeps_rows_when_a_write_fails_and_writes_them_later(tmp_path: Path) -> None:
    blocker = tmp_path / "root"
    blocker.write_text("a file where the log folder should be")
    plog = PredictionLog(blocker, flush_s=3600)
    plog.append(_rows(5))
    assert plog.flush() == 0 and plog.pending == 5 and plog.last_error
    blocker.unlink()
    assert plog.flush() == 5
    plog.close()
    assert len(read_log(blocker)) == 5


def test_read_log_filters_a_time_window(tmp_path: Path) -> None:
    plog = PredictionLog(tmp_path, flush_s=3600)
    old = pd.Timestamp("2026-01-01", tz="UTC")
    rows = _rows(3)
    for i, r in enumerate(rows):
        r["ts"] = old + pd.Timedelta(days=i)
    plog.append(rows)
    plog.close()
    assert list(read_log(tmp_path, start=pd.Timestamp("2026-01-02"))["request_id"]) == ["r1", "r2"]
    assert list(read_log(tmp_path, end=pd.Timestamp("2026-01-02"))["request_id"]) == ["r0"]


def test_compaction_merges_past_days_into_one_file_with_every_row_and_retention_removes_old_days(
        tmp_path: Path) -> None:
    from monitoring.config import LogPolicy, MonitorConfig
    from monitoring.schedule import schedule
    from personalize.settings import Settings
    from serving.predlog import compact, log_status, prune

    # Given a log a server wrote over three days, one small segment a flush, and one segment that is broken
    plog = PredictionLog(tmp_path, flush_s=3600)
    today = pd.Timestamp.now(tz="UTC").normalize()
    for day in (3, 2, 0):
        for k in range(40):
            rows = _rows(3, start=1000 * day + 3 * k)
            for i, r in enumerate(rows):
                r["ts"] = today - pd.Timedelta(days=day) + pd.Timedelta(minutes=k, seconds=i)
            plog.append(rows)
            plog.flush()
    plog.close()
    broken = tmp_path / f"date={(today - pd.Timedelta(days=2)):%Y-%m-%d}" / "part-0-0-000000.parquet"
    broken.write_bytes(b"not parquet")
    before = read_log(tmp_path, skipped=[])
    # When the past days are compacted
    done = compact(tmp_path, max_rows=100)
    # Then the same rows in the same order are there, in 2 files a past day (120 rows, 100 a file); today, still
    # being written, and the broken segment are left as they are
    assert done == {"days": 2, "segments_in": 80, "files_out": 4, "rows": 240, "unreadable": 1}
    assert read_log(tmp_path, skipped=[]).equals(before)
    assert [d["segments"] for d in log_status(tmp_path)] == [2, 3, 40] and log_status(tmp_path)[1]["unreadable"] == 1
    assert compact(tmp_path)["days"] == 0  # nothing left to merge
    # And retention removes whole days older than it keeps (a dry run removes nothing)
    noon = today + pd.Timedelta(hours=13)  # 2.5 days before: day -2, 01:00; day -3 is wholly older
    assert prune(tmp_path, keep_days=2.5, now=noon, dry_run=True)["days"] == 1 and len(log_status(tmp_path)) == 3
    assert prune(tmp_path, keep_days=2.5, now=noon)["rows"] == 120
    assert [d["day"] for d in log_status(tmp_path)] == [f"{today - pd.Timedelta(days=2):%Y-%m-%d}", f"{today:%Y-%m-%d}"]
    # And the scheduled loop keeps the log by its policy before each round
    settings = Settings(home=tmp_path / "home", prediction_log=tmp_path)
    policy = MonitorConfig(log=LogPolicy(keep_days=1))
    assert schedule(settings, None, [], policy, every_s=0, iterations=1).failed == 0
    assert [d["day"] for d in log_status(tmp_path)] == [f"{today:%Y-%m-%d}"]


def test_salt_is_created_once_and_kept(tmp_path: Path) -> None:
    first = load_salt(tmp_path, environ={})
    assert load_salt(tmp_path, environ={}) == first
    assert oct(os.stat(tmp_path / "secrets" / "id_salt").st_mode)[-3:] == "600"
    assert load_salt(tmp_path, environ={"PERSONALIZE_ID_SALT": "s3cret"}) == b"s3cret"
    assert pseudonymize("C1", first) == pseudonymize("C1", first) != pseudonymize("C2", first)
    assert pseudonymize("C1", first) != pseudonymize("C1", b"other")


# --- online store ----------------------------------------------------------------------------------------------
def test_build_records_keeps_feature_and_cycle_blocks_apart() -> None:
    features = pd.DataFrame({"customer_id": ["a", "b"], "cutoff": pd.Timestamp("2026-01-01"),
                             "frequency": [3, 0], "recency_days": [2.0, np.nan]})
    cycle = pd.DataFrame({"customer_id": ["a"], "frequency": [1.0], "T": [10.0]})
    records = build_records(features, cycle, {"a": {"consent": True, "segments": ["x"], "segment": "x"}})
    assert records["a"] == {"features": {"frequency": 3, "recency_days": 2.0},
                            "cycle": {"frequency": 1.0, "T": 10.0},
                            "profile": {"consent": True, "segments": ["x"], "segment": "x"}}
    assert records["b"] == {"features": {"frequency": 0, "recency_days": None}, "cycle": {}, "profile": {}}


def test_sqlite_store_replaces_its_content_in_one_go(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'o.sqlite'}", "d")
    assert isinstance(store, SQLiteOnlineStore)
    store.write({"a": {"features": {"x": 1}, "cycle": {}}, "b": {"features": {"x": 2}, "cycle": {}}}, {"v": 1})
    store.write({"b": {"features": {"x": 3}, "cycle": {}}}, {"v": 2})
    assert store.get_many(["a", "b", "zz"]) == {"b": {"features": {"x": 3}, "cycle": {}, "profile": {}}}
    assert store.meta() == {"v": 2}
    assert store.delete(["b"]) == 1 and store.get_many(["b"]) == {}


def test_unmaterialized_store_is_a_clear_error(tmp_path: Path) -> None:
    from serving.online import OnlineStoreError

    with pytest.raises(OnlineStoreError, match="personalize materialize"):
        open_store(f"sqlite:///{tmp_path / 'none.sqlite'}", "d").get_many(["a"])
    with pytest.raises(OnlineStoreError, match="unknown online store URL"):
        open_store("ftp://x", "d")


# --- request checks --------------------------------------------------------------------------------------------
GOOD = {"orders": 3, "spend": 10.5, "channel": "web", "member": True}


@pytest.mark.parametrize("record, field", [
    ({**GOOD, "extra": 1}, "features.extra"),
    ({k: v for k, v in GOOD.items() if k != "spend"}, "features.spend"),
    ({**GOOD, "orders": -1}, "features.orders"),
    ({**GOOD, "spend": "ten"}, "features.spend"),
    ({**GOOD, "spend": float("inf")}, "features.spend"),
    ({**GOOD, "member": "maybe"}, "features.member"),
    ({**GOOD, "channel": 1.5}, "features.channel"),
])
def test_bad_records_name_the_field(record: dict, field: str) -> None:
    with pytest.raises(InputError) as error:
        check_records([record], ["orders", "spend"], ["channel"], ["member"], frozenset({"orders"}))
    assert error.value.field == field


def test_a_number_where_a_category_goes_is_named_as_the_client_sent_it() -> None:
    with pytest.raises(InputError, match=r"features.channel: is a category: a string or null, got the number 3$"):
        check_records([{**GOOD, "channel": 3.0}], ["orders", "spend"], ["channel"], ["member"], frozenset())  # JSON 3


def test_good_records_pass_with_nulls() -> None:
    check_records([GOOD, {**GOOD, "spend": None, "channel": None, "member": None}], ["orders", "spend"],
                  ["channel"], ["member"], frozenset({"orders"}))


def test_columns_the_training_table_had_but_the_model_does_not_read_are_accepted() -> None:
    unused = frozenset({"customer_id", "email"})
    check_records([{**GOOD, "customer_id": "c1", "email": "a@b.c"}], ["orders", "spend"], ["channel"], ["member"],
                  frozenset({"orders"}), unused=unused)
    with pytest.raises(InputError) as error:  # a typo is still an error, and so is a missing feature
        check_records([{**GOOD, "customer_id": "c1", "chanel": "web"}], ["orders", "spend"], ["channel"], ["member"],
                      frozenset({"orders"}), unused=unused)
    assert error.value.field == "features.chanel"
    with pytest.raises(InputError) as error:
        check_records([{"orders": 1, "spend": 2.0, "member": True, "email": "a@b.c"}], ["orders", "spend"],
                      ["channel"], ["member"], frozenset({"orders"}), unused=unused)
    assert error.value.field == "features.channel"


# --- the Redis online store (a real server on loopback: the redis_url fixture, tests/conftest.py) -------------
def test_redis_store_behaves_like_the_sqlite_one(redis_url: str) -> None:
    from serving.online import RedisOnlineStore

    store = open_store(redis_url, "d")
    assert isinstance(store, RedisOnlineStore)
    store.write({"a": {"features": {"x": 1}, "cycle": {}}, "b": {"features": {"x": 2}, "cycle": {"T": 3.0}}}, {"v": 1})
    store.write({"b": {"features": {"x": 3}, "cycle": {}}}, {"v": 2})  # a new snapshot replaces the old one
    assert store.get_many(["a", "b", "zz"]) == {"b": {"features": {"x": 3}, "cycle": {}, "profile": {}}}
    assert store.meta() == {"v": 2}
    assert open_store(redis_url, "other").get_many(["b"]) == {}  # data sets do not see each other
    assert store.delete(["b"]) == 1 and store.get_many(["b"]) == {}
    store.close()


def test_materialize_fills_the_store_with_what_training_computes(tmp_path: Path) -> None:
    from features.definitions import FeatureSpec
    from features.pipeline import ingest_synthetic
    from features.store import FeatureStore
    from features.synthetic import SyntheticConfig, generate
    from personalize.settings import Settings
    from serving.online import materialize

    settings = Settings.from_env()
    ingest_synthetic(settings, "s", generate(SyntheticConfig(customers=120, days=200)))
    as_of = pd.Timestamp("2024-06-01")
    report = materialize(settings.dataset_dir("s"), f"sqlite:///{tmp_path / 's.sqlite'}", as_of)
    online = open_store(f"sqlite:///{tmp_path / 's.sqlite'}", "s")
    store = FeatureStore(settings.dataset_dir("s"))
    spec = FeatureSpec(categories=tuple(online.meta()["categories"]))
    frame = store.offline([as_of], spec).set_index("customer_id")
    assert report.customers == len(frame) == online.count()
    cid = frame.index[0]
    got = online.get_many([cid])[cid]["features"]
    for column in spec.columns:
        want = frame.loc[cid, column]
        assert (got[column] is None and pd.isna(want)) or got[column] == pytest.approx(float(want)), column
    # a moment before any customer: a clear error, and the store keeps what it had
    from personalize.errors import PersonalizeError

    with pytest.raises(PersonalizeError, match="nothing to materialize"):
        materialize(settings.dataset_dir("s"), f"sqlite:///{tmp_path / 's.sqlite'}", pd.Timestamp("2000-01-01"))
    assert online.count() == report.customers


def test_a_table_file_is_typed_as_the_model_was_trained_and_bad_values_name_their_row() -> None:
    from types import SimpleNamespace

    from serving.batch import _typed

    columns = SimpleNamespace(numeric=["spend", "visits"], categorical=["plan"], boolean=["member"])
    scorer = SimpleNamespace(features=["spend", "visits", "plan", "member"], columns=columns,
                             counts=frozenset({"visits"}))
    raw = pd.DataFrame({"spend": ["1,5", "", "2", "two"], "visits": ["1", "0", "-3", ""],
                        "plan": ["gold", "", "x", "y"], "member": ["TRUE", "false", "1", "maybe"],
                        "other": ["a", "b", "c", "d"]},
                       index=pd.Index([1, 2, 3, 4]))
    typed, reasons = _typed(raw, scorer, decimal_comma=True)
    assert typed.loc[[1, 3], "spend"].tolist() == [1.5, 2.0] and np.isnan(typed.loc[2, "spend"])  # blank: missing
    assert typed.loc[[1, 2, 3], "member"].tolist() == [1.0, 0.0, 1.0] and typed.loc[2, "plan"] is None
    # a negative count is quarantined, as the API refuses it
    assert reasons.by_row == {3: ["negative_visits"], 4: ["invalid_spend", "invalid_member"]}
    assert list(typed.columns) == ["spend", "visits", "plan", "member"]

    typed_raw = pd.DataFrame({"spend": [1.0, float("inf")], "visits": [-2, 1], "plan": ["a", "b"],
                              "member": [True, False]}, index=pd.Index([1, 2]))  # typed already, as Parquet has it
    assert _typed(typed_raw, scorer, decimal_comma=False)[1].by_row == {1: ["negative_visits"], 2: ["invalid_spend"]}

    raw = pd.DataFrame({"spend": ["1.621,37", "2"], "visits": [1, 2], "plan": [3.0, None], "member": ["1.0", "0.0"]},
                       index=pd.Index([1, 2]))  # a Parquet file: a category read as floats (a null among ints)
    typed, reasons = _typed(raw, scorer, decimal_comma=True)
    assert typed["spend"].tolist() == [1621.37, 2.0] and typed["plan"].tolist() == [3, None]
    assert str(typed.loc[1, "plan"]) == "3" and typed["member"].tolist() == [1.0, 0.0] and not reasons.by_row


def test_a_numeric_category_beside_a_null_keeps_its_training_spelling() -> None:
    from types import SimpleNamespace

    from serving.scoring import Classifier

    # Given a model whose category was learned as "3" and "7", and a batch where one row lacks it
    columns = SimpleNamespace(numeric=["x"], categorical=["region"], boolean=[])
    scorer = SimpleNamespace(numeric_only=False, features=["x", "region"], columns=columns,
                             model=SimpleNamespace(categories={"region": ["3", "7"]}))
    # When the rows become the model's matrix, Then 3 stays the category "3" (not the float 3.0, unseen: missing)
    x = Classifier._matrix(scorer, [{"x": 1.0, "region": 3}, {"x": None, "region": None}])
    assert x["region"].astype(object).tolist()[0] == "3" and pd.isna(x["region"].iloc[1])
    assert x["x"].iloc[0] == 1.0 and np.isnan(x["x"].iloc[1])


def test_a_forecast_series_is_found_as_the_data_writes_it_and_its_start_is_bounded() -> None:
    from types import SimpleNamespace

    from serving.scoring import Forecast

    history = SimpleNamespace(history=pd.DataFrame({"ds": pd.date_range("2024-01-01", "2024-03-31")}))
    asked = []

    class Model:  # the pyfunc's interface: fitted series by name, and a predict over (series, ds)
        models = {"total": history, "category.Kuche_Bad": history}

        def predict(self, context, frame: pd.DataFrame) -> pd.DataFrame:
            asked.append(frame)
            return pd.DataFrame({"yhat": 1.0, "yhat_lower": 0.5, "yhat_upper": 1.5}, index=frame.index)

    forecast = Forecast(Model())
    points = forecast.predict("category.Küche & Bad", 3, None)  # as the data and /status spell it
    assert [p["ds"] for p in points] == ["2024-04-01", "2024-04-02", "2024-04-03"]
    assert set(asked[-1]["series"]) == {"category.Kuche_Bad"}
    with pytest.raises(InputError, match="unknown series 'category.Bad'"):
        forecast.predict("category.Bad", 3, None)
    assert forecast.predict("total", 2, pd.Timestamp("2024-01-01"))[0]["ds"] == "2024-01-01"  # the first day
    for start in ("2023-12-31", "2029-04-01", "2999-01-01"):  # before the history, 5 years after it, past 2262
        with pytest.raises(InputError) as caught:
            forecast.predict("total", 2, pd.Timestamp(start))
        assert caught.value.field == "start"


def test_a_rows_integer_id_is_the_id_batch_scoring_and_erasure_use() -> None:
    """A feature value is read as a float (JSON's 100001 arrives as 100001.0): a row's id column still names the
    customer "100001", as ingest, batch scoring and `forget 100001` do, not "100001.0"."""
    from features.ingest import normalize_ids
    from serving.api import _row_id

    assert _row_id(100001.0) == _row_id(100001) == normalize_ids(pd.Series([100001])).iloc[0] == "100001"
    assert _row_id(1.5) == "1.5" and _row_id(None) is None and _row_id(True) is None
