"""Segments, decisions, experiments, bandits, consent and cold start: the pure parts, the decision store, and the
runtime on a materialized synthetic shop (no trained models: decisions must work on whatever is served)."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from features.segments import Rule, RuleError, assign, assign_one, load_segments
from features.synthetic import PLANTED_RESPONSE
from personalize.errors import ConfigError
from personalize.settings import Settings
from serving.decision_store import DecisionStore
from serving.decisions import HOLDOUT, Catalog, assign_arm, decide, load_catalog, thompson
from serving.simulation import key_floor, simulate


# --- rules and segments ------------------------------------------------------------------------------------------
FRAME = pd.DataFrame({
    "sessions_per_week": [6.0, 1.0, None, 0.0],
    "cart_abandonments_28d": [0, 2, None, 0],
    "browse_pages_per_session": [4.5, 1.0, None, None],
    "monetary_total": [800.0, 20.0, None, 0.0],
    "tenure_days": [400.0, 12.0, None, 3.0],
    "frequency": [9, 1, None, 0],
    "country": ["DE", "FR", None, "DE"],
})


@pytest.mark.parametrize("text, expected", [
    ("sessions_per_week > 5", [True, False, False, False]),
    ("cart_abandonments_28d > 0", [False, True, False, False]),
    ("browse_pages_per_session > 3", [True, False, False, False]),
    ("monetary_total > 500", [True, False, False, False]),
    ("tenure_days <= 30 and frequency == 0", [False, False, False, True]),
    ("1 <= frequency < 5", [False, True, False, False]),
    ("country in ['DE', 'NL']", [True, False, False, True]),
    ("country not in ['DE']", [False, True, False, False]),
    ("monetary_total / frequency > 50", [True, False, False, False]),  # x / 0 is missing, never true
    ("not monetary_total > 500", [False, True, True, True]),
    ("high_spender or frequency > 5", None),  # an unknown name: an error naming it
])
def test_rules_evaluate_column_wise_and_one_record_alike(text: str, expected: list[bool] | None) -> None:
    rule = Rule(text)
    if expected is None:
        with pytest.raises(RuleError, match="high_spender"):
            rule.evaluate(FRAME)
        return
    assert rule.evaluate(FRAME).tolist() == expected
    assert [rule.holds(r) for r in FRAME.to_dict("records")] == expected


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "frequency.real > 1", "frequency[0] > 1",
                                  "lambda: 1", "x in y", "frequency >", ""])
def test_rules_outside_the_language_are_refused(text: str) -> None:
    with pytest.raises(RuleError):
        Rule(text)


def test_the_seeds_examples_are_the_default_segments_and_overlap_with_a_primary() -> None:
    config = load_segments()
    assert {"frequent_visitor", "cart_abandoner", "content_explorer", "high_value", "new_visitor"} <= set(config.names)
    out = assign(FRAME, config)
    assert list(out.loc[0, "segments"]) == ["high_value", "frequent_visitor", "content_explorer"]  # overlaps kept
    assert out.loc[0, "segment"] == "high_value"  # the first in the file's order
    assert out.loc[2, "segment"] == config.fallback  # all missing: no segment holds
    assert out.loc[3, "segment"] == "new_visitor"
    for i, record in enumerate(FRAME.to_dict("records")):  # the request path agrees with the batch path
        assert assign_one(record, config)["segments"] == list(out.loc[i, "segments"])
    assert assign_one(None, config) == {"segments": ["new_visitor"], "segment": "new_visitor", "cold_start": True}


@pytest.mark.parametrize("body, where", [
    ("segments:\n  - name: a\n    rule: x >\n", "segments.0.rule"),
    ("segments:\n  - name: Bad Name\n    rule: x > 1\n", "segments.0.name"),
    ("segments:\n  - name: a\n    rule: x > 1\n  - name: a\n    rule: x > 2\n", "declared twice"),
    ("segments: []\n", "segments"),
    ("segments:\n  - name: a\n    rule: x > 1\n    colour: red\n", "colour"),
    ("segments: [\n", "not valid YAML"),
])
def test_a_bad_segment_file_names_the_field(tmp_path: Path, body: str, where: str) -> None:
    path = tmp_path / "segments.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        load_segments(path)


def test_a_rule_reading_a_feature_the_data_spells_otherwise_is_told_its_name(tmp_path: Path) -> None:
    from features.segments import RuleError, check_columns

    path = tmp_path / "segments.yaml"
    path.write_text("segments:\n  - {name: kitchen, rule: cat_share_Küche > 0.2}\n"
                    "  - {name: loyal, rule: frequncy > 5}\n")
    with pytest.raises(RuleError, match=r"cat_share_Küche: did you mean cat_share_kuche\?; frequncy: did you mean "
                                        r"frequency\?"):
        check_columns(load_segments(path), ["cat_share_kuche", "frequency", "recency_days"])


# --- catalog, assignment, policies -------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, where", [
    (lambda c: c["placements"][0].update(default="nope"), "default"),
    (lambda c: c["experiments"][0].update(placement="nope"), "unknown placement"),
    (lambda c: c["experiments"][0]["arms"].append({"name": "x", "variant": "nope"}), "not a variant"),
    (lambda c: c["experiments"][0]["arms"].append({"name": "y", "policy": "rules", "variant": "newsletter"}),
     "exactly one"),
    (lambda c: c["experiments"][0].update(holdout=1.5), "holdout"),
    (lambda c: c["placements"][0]["variants"].append({"id": "z", "eligible": "churn >"}), "does not parse"),
])
def test_a_bad_catalog_names_the_problem(tmp_path: Path, mutate, where: str) -> None:
    import yaml

    raw = yaml.safe_load(Path("serving/catalog.yaml").read_text())
    mutate(raw)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=where):
        load_catalog(path)


@given(st.text(min_size=1, max_size=40))
@hsettings(max_examples=200, deadline=None)
def test_the_same_customer_always_lands_in_the_same_arm(customer_id: str) -> None:
    experiment = load_catalog().experiment("email_rules")
    assert assign_arm(experiment, customer_id) == assign_arm(experiment, customer_id)


def test_arms_get_their_configured_shares_and_the_holdout_always_the_default() -> None:
    catalog = load_catalog()
    experiment = catalog.experiment("email_rules")
    arms = Counter(assign_arm(experiment, f"c{i}") for i in range(20_000))
    assert arms[HOLDOUT] / 20_000 == pytest.approx(experiment.holdout, abs=0.01)
    ctx = {"churn": 0.95, "cart_abandoner": True, "segment": "cart_abandoner"}
    for cid in [f"c{i}" for i in range(300)]:
        out = decide(catalog, "email", cid, ctx, True, lambda *_: {}, np.random.default_rng(0))
        if out["arm"] == HOLDOUT:
            assert out["variant"] == "newsletter" and out["policy"] == "holdout"
        else:
            assert out["variant"] == "retention_offer" and "churn >= 0.7" in out["reason"]


@pytest.mark.parametrize("ctx, variant", [
    ({"churn": 0.8, "cart_abandoner": True, "days_to_next": 3}, "retention_offer"),  # catalog order decides
    ({"churn": 0.2, "cart_abandoner": True, "days_to_next": 3}, "cart_discount"),
    ({"churn": 0.2, "cart_abandoner": False, "days_to_next": 3}, "replenish_reminder"),
    ({"churn": 0.2, "cart_abandoner": False, "days_to_next": 30}, "newsletter"),
    ({}, "newsletter"),  # no scores at all (no model served): rules reading them do not hold
])
def test_rules_pick_the_first_eligible_variant(ctx: dict, variant: str) -> None:
    catalog = Catalog.model_validate({**load_catalog().model_dump(), "experiments": []})
    out = decide(catalog, "email", "c1", ctx, True, lambda *_: {}, np.random.default_rng(0))
    assert out["variant"] == variant and out["policy"] == "rules"


def test_a_rule_less_variant_the_rules_never_choose_is_refused_and_none_eligible_is_the_default() -> None:
    """`rules` chooses the first variant whose rule holds, else the default: another variant without a rule would
    never be chosen, so the catalog refuses it (a bandit or a fixed arm could serve it). `bandit`, or a cold start on
    any placement, with nothing eligible: the default (it was a 500: Thompson sampling over no variant)."""
    page = {"name": "page", "policy": "rules", "default": "similar", "variants": [
        {"id": "free_shipping"}, {"id": "bundle", "eligible": "basket_value > 100"}, {"id": "similar"}]}
    with pytest.raises(ValueError, match="variant 'free_shipping' has no rule"):
        Catalog.model_validate({"placements": [page], "context": ["basket_value"]})
    page["variants"][0]["eligible"] = "True"  # for everyone, as the message says
    catalog = Catalog.model_validate({"placements": [page, {
        "name": "strict", "policy": "bandit", "default": "x1", "variants": [
            {"id": "x1", "eligible": "churn >= 0.99"}, {"id": "x2", "eligible": "churn >= 0.999"}]}],
        "context": ["basket_value"]})
    out = decide(catalog, "page", "c1", {"basket_value": 150}, True, lambda *_: {}, np.random.default_rng(0))
    assert out["variant"] == "free_shipping" and out["reason"] == "rule: True"
    for ctx in ({"churn": 0.2}, {"cold_start": True}):
        out = decide(catalog, "strict", "c1", ctx, True, lambda *_: {}, np.random.default_rng(0))
        assert (out["variant"], out["policy"]) == ("x1", "default") and "no variant is eligible" in out["reason"]
        assert "bandit_segment" not in out  # feedback on it teaches the bandit nothing


def test_no_consent_gets_the_default_and_no_experiment() -> None:
    out = decide(load_catalog(), "email", "c1", {"churn": 0.99}, False, lambda *_: {}, np.random.default_rng(0))
    assert out == {"placement": "email", "experiment": None, "arm": None, "variant": "newsletter",
                   "policy": "default", "reason": "no personalization consent: the non-personalized default"}


def test_thompson_prefers_the_variant_with_the_better_posterior() -> None:
    rng = np.random.default_rng(3)
    stats = {"a": (1000, 100), "b": (1000, 20)}
    picks = Counter(thompson(["a", "b"], stats, rng)[0] for _ in range(500))
    assert picks["a"] > 490
    flat = Counter(thompson(["a", "b"], {}, rng)[0] for _ in range(2000))  # no data: explores evenly
    assert abs(flat["a"] - flat["b"]) < 200


def test_thompson_per_segment_beats_random_by_a_wide_margin() -> None:
    rng = np.random.default_rng(0)
    truth = np.array(list(PLANTED_RESPONSE))[rng.integers(0, len(PLANTED_RESPONSE), 2000)]
    ts = simulate(truth, truth, PLANTED_RESPONSE, 15_000, "thompson", seed=1)
    rnd = simulate(truth, truth, PLANTED_RESPONSE, 15_000, "random", seed=1)
    oracle = simulate(truth, truth, PLANTED_RESPONSE, 15_000, "oracle", seed=1)
    assert oracle.regret == 0 and oracle.best_share == 1
    assert ts.regret < 0.35 * rnd.regret
    assert ts.best_share > 0.6 > rnd.best_share


def test_a_bandit_over_keys_converges_to_the_keys_floor_and_no_lower() -> None:
    # Given: customers whose key is their true segment for half of them and a coin toss for the others
    rng = np.random.default_rng(0)
    segments = np.array(list(PLANTED_RESPONSE))
    truth = segments[rng.integers(0, len(segments), 2000)]
    noisy = np.where(rng.random(2000) < 0.5, truth, segments[rng.integers(0, len(segments), 2000)])
    # Then: perfect keys have no floor; one key for everyone has the global best variant's; noisy keys lie between
    mixed = {v: np.mean([PLANTED_RESPONSE[t][v] for t in truth]) for v in PLANTED_RESPONSE[truth[0]]}
    global_best = max(mixed, key=mixed.__getitem__)
    one_key = np.mean([max(PLANTED_RESPONSE[t].values()) - PLANTED_RESPONSE[t][global_best] for t in truth])
    assert key_floor(truth, truth, PLANTED_RESPONSE) == 0
    assert key_floor(np.zeros(2000), truth, PLANTED_RESPONSE) == pytest.approx(one_key)
    assert 0 < key_floor(noisy, truth, PLANTED_RESPONSE) < one_key
    # and a long Thompson run over the noisy keys ends close above their floor, never below it
    run = simulate(noisy, truth, PLANTED_RESPONSE, 30_000, "thompson", seed=1)
    floor = key_floor(noisy, truth, PLANTED_RESPONSE) * 30_000
    assert floor <= run.regret < 1.6 * floor


# --- the decision store -------------------------------------------------------------------------------------------
def _decision(placement: str = "homepage_banner", variant: str = "discount_10", segment: str = "s") -> dict:
    return {"placement": placement, "variant": variant, "policy": "bandit", "bandit_segment": segment,
            "experiment": None, "arm": None}


def test_feedback_is_idempotent_implies_impressions_and_reconciles_with_the_bandit(tmp_path: Path) -> None:
    store = DecisionStore(tmp_path / "d.sqlite")
    store.record_decision("d1", "2026-01-01T00:00:00", _decision(), "k1", "s", False, True, {})
    store.record_decision("d2", "2026-01-01T00:00:01", _decision(), "k2", "s", False, True, {})
    store.record_decision("d3", "2026-01-01T00:00:02", {**_decision(), "bandit_segment": None, "policy": "rules"},
                          "k3", "s", False, True, {})
    out = store.record_feedback("d1", "conversion", "t", 9.0, "conversion")
    assert out["implied_impression"] and out["bandit_updated"] and not out["duplicate"]
    assert store.record_feedback("d1", "conversion", "t", 9.0, "conversion")["duplicate"]  # a client's retry
    assert store.record_feedback("d1", "impression", "t", None, "conversion")["duplicate"]  # already implied
    store.record_feedback("d2", "impression", "t", None, "conversion")
    store.record_feedback("d2", "click", "t", None, "conversion")
    store.record_feedback("d3", "conversion", "t", None, "conversion")  # a rules decision: no bandit learns
    assert store.bandit_stats("homepage_banner", "s") == {"discount_10": (2, 1)}
    bandit = store.bandits()[["placement", "segment", "variant", "trials", "successes"]]
    pd.testing.assert_frame_equal(bandit, store.recount("conversion"), check_dtype=False)
    with pytest.raises(Exception, match="no decision"):
        store.record_feedback("nope", "click", "t", None, "conversion")


def test_bandit_posteriors_survive_a_restart(tmp_path: Path) -> None:
    store = DecisionStore(tmp_path / "d.sqlite")
    for i in range(5):
        store.record_decision(f"d{i}", "t", _decision(), f"k{i}", "s", False, True, {})
        store.record_feedback(f"d{i}", "conversion" if i < 2 else "impression", "t", None, "conversion")
    store.close()
    again = DecisionStore(tmp_path / "d.sqlite")
    assert again.bandit_stats("homepage_banner", "s") == {"discount_10": (5, 2)}


def test_forgetting_a_customer_takes_them_out_of_the_posterior(tmp_path: Path) -> None:
    store = DecisionStore(tmp_path / "d.sqlite")
    for i, key in enumerate(["gone", "gone", "kept"]):
        store.record_decision(f"d{i}", "t", _decision(), key, "s", False, True, {})
        store.record_feedback(f"d{i}", "conversion", "t", None, "conversion")
    out = store.forget("gone", "conversion")
    assert out == {"decisions": 2, "feedback": 4, "bandit_trials_removed": 2}
    assert store.bandit_stats("homepage_banner", "s") == {"discount_10": (1, 1)}
    assert store.holds("gone") == 0


# --- the runtime on a materialized shop ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from features.pipeline import ingest_synthetic
    from features.synthetic import SyntheticConfig, generate
    from serving.online import default_url, materialize

    home = tmp_path_factory.mktemp("decisions") / "home"
    settings = Settings(home=home, mlflow_tracking_uri=f"sqlite:///{home.parent / 'mlflow.db'}")
    ingest_synthetic(settings, "synthetic", generate(SyntheticConfig(customers=250, days=400)))
    materialize(settings.dataset_dir("synthetic"), default_url(home, "synthetic"))
    return settings


@pytest.fixture()
def runtime(shop: Settings, tmp_path: Path):
    from serving.api import Runtime
    from serving.config import ServeConfig
    from training.registry import connect

    config = ServeConfig(home=shop.home, tracking_uri=shop.tracking_uri, decisions=tmp_path / "decisions.sqlite",
                         prediction_log=tmp_path / "predlog")
    rt = Runtime(config, client=connect(shop.tracking_uri), start_reloader=False, freeze_heap=False)
    yield rt
    rt.close()


def _profiles(settings: Settings) -> dict[str, dict]:
    con = sqlite3.connect(settings.home / "online" / "synthetic.sqlite")
    return {cid: json.loads(p) for cid, p in con.execute("SELECT customer_id, profile FROM customers")}


def test_materialized_profiles_carry_consent_and_segments(shop: Settings) -> None:
    profiles = _profiles(shop)
    customers = pd.read_parquet(shop.dataset_dir("synthetic") / "customers.parquet")
    consent = dict(zip(customers["customer_id"], customers["consent"]))
    assert profiles and all(p["consent"] == bool(consent[c]) for c, p in profiles.items())
    assert all(p["segment"] == (p["segments"][0] if p["segments"] else "other") for p in profiles.values())


def test_segment_endpoint_answers_the_stored_segments_and_a_records(runtime, shop: Settings) -> None:
    cid, profile = next(iter(_profiles(shop).items()))
    out = runtime.segment(cid)
    assert out["segments"] == profile["segments"] and out["cold_start"] is False
    assert runtime.segment(features={"monetary_total": 900.0})["segment"] == "high_value"
    assert runtime.segment("never-seen")["cold_start"] is True
    from serving.scoring import InputError

    with pytest.raises(InputError) as err:
        runtime.segment(features={"monetary_total": "lots"})
    assert err.value.field == "features.monetary_total"
    with pytest.raises(InputError) as err:  # a typo is not a missing feature that lands the customer in "other"
        runtime.segment(features={"monetary_totl": 900.0})
    assert err.value.field == "features.monetary_totl" and "monetary_total" in str(err.value)
    stored = runtime.store.get_many([cid])[cid]["features"]
    assert runtime.segment(features=stored)["segments"] == profile["segments"]  # the store's own record is known


def test_the_servers_own_segments_file_applies_to_stored_customers(shop: Settings, tmp_path: Path) -> None:
    """`serve --segments FILE` after a `materialize` with the default segments: a stored customer's segments are
    the file's rules on their stored features (they were the ones materialized, so a rule reading the file's names
    never held)."""
    from serving.api import Runtime
    from serving.config import ServeConfig
    from training.registry import connect

    mine = tmp_path / "segments.yaml"
    mine.write_text("segments:\n  - {name: everyone, rule: recency_days >= 0}\nfallback: regular\n")
    config = ServeConfig(home=shop.home, tracking_uri=shop.tracking_uri, decisions=tmp_path / "decisions.sqlite",
                         prediction_log=tmp_path / "predlog", segments=mine)
    rt = Runtime(config, client=connect(shop.tracking_uri), start_reloader=False, freeze_heap=False)
    try:
        cid, profile = next(iter(_profiles(shop).items()))
        assert "everyone" not in profile["segments"]  # materialized with the default segments
        assert rt.segment(cid)["segments"] == ["everyone"] and rt.segment(cid)["segment"] == "everyone"
        decision = rt.personalize("email", customer_id=cid, consent=True)
        assert decision["segments"] == ["everyone"]
    finally:
        rt.close()


def test_a_store_materialized_with_other_segments_is_served_with_them_and_a_bad_file_is_refused(
        shop: Settings, tmp_path: Path) -> None:
    """`materialize --segments mine.yaml`, then a server without --segments: it assigns mine.yaml's segments (the
    store records them), as before the API evaluated segments itself. `serve --segments` with a rule reading no stored
    feature refuses to start."""
    from typer.testing import CliRunner

    from personalize.cli import app
    from serving.api import Runtime
    from serving.config import ServeConfig
    from serving.online import materialize

    mine = tmp_path / "segments.yaml"
    mine.write_text("segments:\n  - {name: everyone, rule: recency_days >= 0}\nfallback: regular\n")
    url = f"sqlite:///{tmp_path / 'online.sqlite'}"
    materialize(shop.dataset_dir("synthetic"), url, segments=load_segments(mine))
    config = ServeConfig(home=shop.home, tracking_uri=shop.tracking_uri, decisions=tmp_path / "decisions.sqlite",
                         prediction_log=tmp_path / "predlog", online_store=url)
    rt = Runtime(config, start_reloader=False, freeze_heap=False)
    try:
        cid = next(iter(_profiles(shop)))
        assert rt.segment(cid)["segments"] == ["everyone"] and rt.segments.fallback == "regular"
    finally:
        rt.close()
    typo = tmp_path / "typo.yaml"
    typo.write_text("segments:\n  - {name: lapsed, rule: recency_dayz > 180}\n")
    result = CliRunner().invoke(app, ["serve", "--segments", str(typo), "--port", "38999"],
                                env={"PERSONALIZE_HOME": str(shop.home), "MLFLOW_TRACKING_URI": shop.tracking_uri})
    assert result.exit_code == 2 and "recency_dayz" in result.output and "recency_days" in result.output, \
        result.output


def test_a_rule_reading_a_name_no_decision_has_is_found_before_serving(shop: Settings, tmp_path: Path) -> None:
    import yaml

    from serving.api import unknown_rule_names
    from serving.online import default_url

    raw = yaml.safe_load(Path("serving/catalog.yaml").read_text())
    raw["placements"][0]["variants"][0]["eligible"] = "churn_score >= 0.7"  # a typo of churn
    raw["placements"][2]["variants"][0]["eligible"] = "device == 'mobile' and frequency > 2"
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
    catalog, segments, url = load_catalog(tmp_path / "catalog.yaml"), load_segments(), default_url(shop.home,
                                                                                                   "synthetic")
    never = (": that rule would never hold (a name the application sends in each request's context is declared "
             "under `context:` in the catalog)")
    assert unknown_rule_names(catalog, segments, url, "synthetic") == [
        "placement 'email', variant 'retention_offer' reads 'churn_score', which is no score, segment, feature or "
        "declared context name (did you mean 'churn'?)" + never,
        "placement 'product_page', variant 'bundle_offer' reads 'device', which is no score, segment, feature "
        "or declared context name" + never]
    raw["context"] = ["device"]  # a name each request sends in its context
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
    assert len(unknown_rule_names(load_catalog(tmp_path / "catalog.yaml"), segments, url, "synthetic")) == 1
    # a context name that is also a stored feature or a segment: known and new customers would read it differently
    raw["context"] = ["device", "recency_days", "high_value"]
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
    shadowed = unknown_rule_names(load_catalog(tmp_path / "catalog.yaml"), segments, url, "synthetic")
    assert [line.split(",")[0] for line in shadowed] == ["context name 'recency_days'", "context name 'high_value'",
                                                         "placement 'email'"]
    raw["context"] = ["churn"]  # a score: refused with the file
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="'churn' is a name every decision has"):
        load_catalog(tmp_path / "catalog.yaml")
    assert unknown_rule_names(load_catalog(), segments, url, "synthetic") == []  # the embedded catalog
    assert unknown_rule_names(catalog, segments, default_url(shop.home, "nowhere"), "nowhere") is None  # unknown


def test_a_request_context_carries_declared_names_only(shop: Settings, tmp_path: Path) -> None:
    import yaml

    from serving.api import Runtime
    from serving.config import ServeConfig
    from serving.scoring import InputError
    from training.registry import connect

    raw = yaml.safe_load(Path("serving/catalog.yaml").read_text())
    raw["context"] = ["device"]
    raw["placements"][2]["variants"][0]["eligible"] = "device == 'mobile'"  # product_page: bundle_offer
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(raw))
    config = ServeConfig(home=shop.home, tracking_uri=shop.tracking_uri, decisions=tmp_path / "decisions.sqlite",
                         prediction_log=tmp_path / "predlog", catalog=tmp_path / "catalog.yaml")
    rt = Runtime(config, client=connect(shop.tracking_uri), start_reloader=False, freeze_heap=False)
    try:
        cid = next(c for c, p in _profiles(shop).items() if p["consent"])
        mobile = rt.personalize("product_page", cid, context={"device": "mobile"})
        assert mobile["variant"] == "bundle_offer" and mobile["reason"] == "rule: device == 'mobile'"
        assert rt.personalize("product_page", cid, context={"device": "desktop"})["variant"] == "similar_items"
        with pytest.raises(InputError, match="'devise' is not a context name the catalog declares "
                                             r"\(declared: device\); did you mean 'device'\?") as caught:
            rt.personalize("product_page", cid, context={"devise": "mobile"})  # a typo: not silently the default
        assert caught.value.field == "context.devise"
    finally:
        rt.close()


def test_a_customer_without_consent_gets_the_default_and_leaves_no_trace(runtime, shop: Settings) -> None:
    cid = next(c for c, p in _profiles(shop).items() if not p["consent"])
    out = runtime.personalize("homepage_banner", cid)
    assert out["consent"] is False and out["variant"] == "new_arrivals" and out["policy"] == "default"
    runtime.feedback(out["decision_id"], "conversion")
    row = runtime.decisions.decision(out["decision_id"])
    assert row["customer_key"] is None and row["scores"] is None
    own = runtime.personalize("homepage_banner", cid, features=runtime.store.get_many([cid])[cid]["features"])
    assert own["consent"] is False and own["policy"] == "default"  # sending a record does not bypass the opt-out
    assert runtime.decisions.decision(own["decision_id"])["customer_key"] is None
    for features in (None, runtime.store.get_many([cid])[cid]["features"]):  # nor does a request's "consent": true
        sent = runtime.personalize("homepage_banner", cid, features=features, consent=True)
        assert sent["consent"] is False and sent["policy"] == "default" and sent["scores"] == {}
        assert runtime.decisions.decision(sent["decision_id"])["customer_key"] is None
    assert runtime.decisions.bandits().empty  # no bandit learned from it
    runtime.log.flush()
    assert not list(runtime.config.log_root.rglob("*.parquet"))  # nothing in the prediction log either


def test_a_cold_start_customer_explores_with_the_cold_start_segment(runtime) -> None:
    out = runtime.personalize("homepage_banner", "brand-new", consent=True)
    assert out["cold_start"] is True and out["segment"] == "new_visitor" and out["policy"] == "bandit"
    assert "exploring" in out["reason"]
    assert out["variant"] in {"new_arrivals", "discount_10", "bestsellers"}  # the others need history


def test_the_bandit_learns_from_feedback_through_the_runtime(runtime, shop: Settings) -> None:
    """Planted: in every segment discount_10 converts at 30 %, everything else at 2 %."""
    rng = np.random.default_rng(5)
    ids = [c for c, p in _profiles(shop).items() if p["consent"]]
    chosen = []
    for _ in range(800):
        out = runtime.personalize("homepage_banner", ids[rng.integers(len(ids))])
        chosen.append(out["variant"])
        runtime.feedback(out["decision_id"], "impression")
        if rng.random() < (0.3 if out["variant"] == "discount_10" else 0.02):
            runtime.feedback(out["decision_id"], "conversion", 10.0)
    assert Counter(chosen[-200:])["discount_10"] > 120  # learned: most of the last impressions
    bandit = runtime.decisions.bandits()[["placement", "segment", "variant", "trials", "successes"]]
    pd.testing.assert_frame_equal(bandit, runtime.decisions.recount("conversion"), check_dtype=False)
    assert bandit["trials"].sum() == 800


def test_bad_decision_requests_name_the_field(runtime) -> None:
    from serving.scoring import InputError

    for call, field in [(lambda: runtime.personalize("billboard", "c1"), "placement"),
                        (lambda: runtime.personalize("email"), "customer_id"),
                        (lambda: runtime.feedback("nope", "click"), "decision_id"),
                        (lambda: runtime.feedback("nope", "purchase"), "event")]:
        with pytest.raises(InputError) as err:
            call()
        assert err.value.field == field
