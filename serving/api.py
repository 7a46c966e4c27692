"""The request handling behind each endpoint, with no HTTP in it: resolve records (online store or the request's
own), score with the served model, explain on request, build the answer and the prediction-log rows; segments and
personalization decisions (:mod:`serving.decisions`) with their decision log, feedback and bandits
(:mod:`serving.decision_store`).

:class:`Runtime` is created once per server worker by :mod:`serving.service` and is what its endpoints call; tests
drive it directly too.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.segments import RuleError, SegmentConfig, assign_one, check_columns, closest_name, load_segments
from serving.config import ServeConfig
from serving.decision_store import EVENTS, DecisionStore, UnknownDecision
from serving.decisions import CYCLE_SCORES, SCORES, Catalog, decide, load_catalog
from serving.online import OnlineStoreError, open_store
from serving.predlog import PredictionLog, load_salt, make_row, pseudonymize
from serving.scoring import InputError, Loaded, ModelSet, NotServing

log = logging.getLogger(__name__)


def store_meta(url: str, dataset: str) -> dict[str, Any] | None:
    """What ``materialize`` recorded with the online store at ``url`` (its features, the segments it assigned);
    None when the store cannot be read (not materialized yet, or unreachable: the server says why)."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return None
    try:
        store = open_store(url, dataset)
        try:
            return store.meta()
        finally:
            store.close()
    except Exception:
        return None


def served_segments(explicit: Path | None, meta: dict[str, Any] | None) -> tuple[SegmentConfig, bool]:
    """The rule segments the API assigns, and whether it evaluates them on each customer's stored features (True)
    or answers the ones ``materialize`` stored with the customer: the server's own file (``--segments``), else the
    segments ``materialize`` recorded (both evaluated live), else the default file beside the stored segments of a
    store materialized before the segments were recorded with it."""
    if explicit is not None:
        return load_segments(explicit), True
    recorded = (meta or {}).get("segment_config")
    if recorded:
        return SegmentConfig.model_validate(recorded), True
    return load_segments(None), False


def unknown_rule_names(catalog: Catalog, segments: Any, url: str, dataset: str,
                       meta: dict[str, Any] | None = None) -> list[str] | None:
    """The catalog's rule names that no decision's context has (:meth:`Catalog.unknown_names`) against the rule
    segments and the features of the online store at ``url`` (its ``meta``, when read already); None when those
    features cannot be read (a store not materialized yet, or unreachable)."""
    features = ((meta if meta is not None else store_meta(url, dataset)) or {}).get("feature_columns")
    if not features:
        return None
    return catalog.unknown_names(set(features) | set(segments.names))


def _row_id(value: Any) -> str | None:
    """A row's id value as batch scoring keeps it (:func:`features.ingest.normalize_ids`): text, trimmed, a whole
    number without its ``.0``; None for a blank or a null."""
    from features.ingest import normalize_ids

    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():  # a JSON integer, read as a float by the features' type
        value = int(value)
    return normalize_ids(pd.Series([value], dtype=object)).iloc[0]


class Runtime:
    """Everything one worker serves with: the models, the online store, the prediction log."""

    def __init__(self, config: ServeConfig, client: Any | None = None, start_reloader: bool = True,
                 freeze_heap: bool = True) -> None:
        from training.registry import connect

        self.config = config
        self.client = client if client is not None else connect(config.settings.tracking_uri)
        self.models = ModelSet(self.client, config.models, config.alias,
                               config.shadow_alias if config.shadow else None, required=config.required)
        self.models.refresh()
        self.freeze_heap = freeze_heap  # a server process; not a test or a notebook that embeds the runtime
        if freeze_heap:
            _freeze_heap()
        self.log = PredictionLog(config.log_root, flush_s=config.log_flush_s)
        self.salt = load_salt(config.home)
        self.catalog = load_catalog(config.catalog)
        meta = store_meta(config.online_url, config.dataset)
        self.segments, self._live_segments = served_segments(config.segments, meta)
        try:
            check_columns(self.segments, (meta or {}).get("feature_columns") or self.segments.columns())
        except RuleError as exc:  # `personalize serve` refuses to start
            log.warning("%s: those segments never hold for a stored customer", exc)
        self.decisions = DecisionStore(config.decisions_path)
        # the scores each placement's rules read: a decision computes only those (the purchase cycle costs ~10 ms)
        self._needed = {p.name: frozenset(self.catalog.rule_names(p.name)) & SCORES
                        for p in self.catalog.placements}
        for problem in unknown_rule_names(self.catalog, self.segments, config.online_url, config.dataset, meta) or ():
            log.warning("the catalog's %s", problem)  # `personalize serve` refuses to start
        self._rng = np.random.default_rng()
        self._lock = threading.Lock()
        self._store = None
        self._known: set[str] = set()  # feature names a request's record may carry (filled on first need)
        self.served = 0
        self._stop = threading.Event()
        self._reloader = None
        if start_reloader:
            self._reloader = threading.Thread(target=self._reload_loop, name="model-reload", daemon=True)
            self._reloader.start()

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def _reload_loop(self) -> None:
        while not self._stop.wait(self.config.reload_s):
            try:
                before = self.models.reloads
                self.models.refresh()
                if self.models.reloads != before and self.freeze_heap:
                    _freeze_heap(unfreeze=True)
            except Exception:  # the registry may be briefly unreachable: keep serving, try again later
                log.exception("model refresh failed")

    def close(self) -> None:
        self._stop.set()
        self.log.close()
        self.decisions.close()
        if self._store is not None:
            self._store.close()

    @property
    def store(self):
        if self._store is None:
            self._store = open_store(self.config.online_url, self.config.dataset)
        return self._store

    def status(self) -> dict[str, Any]:
        from personalize.settings import redact

        try:
            store = {"url": redact(self.config.online_url), **self.store.meta()}
            columns = store.pop("feature_columns", None)
        except Exception as exc:
            store, columns = {"url": redact(self.config.online_url), "error": str(exc)}, None
        # a champion of another data set's features loads fine but answers every id with a 503: say so here
        by_id = {}
        for endpoint in ("churn", "propensity"):
            loaded = self._served(endpoint)
            if loaded is not None and columns is not None:
                if loaded.scorer.from_table:
                    by_id[endpoint] = f"{loaded.name} v{loaded.version} scores a labeled table's rows, not ids"
                elif any(c not in columns for c in loaded.scorer.features):
                    by_id[endpoint] = self._foreign(loaded, dict.fromkeys(columns))
        return {"ready": self.models.ready, **self.models.status(), "served": self.served,
                "prediction_log": self.log.status(), "online_store": store, "shadow_mode": self.config.shadow,
                **({"not_scoring_ids": by_id} if by_id else {})}

    # --- shared steps -------------------------------------------------------------------------------------------
    @staticmethod
    def request_id(given: str | None = None) -> str:
        return given if given and len(given) <= 64 and given.isprintable() else uuid.uuid4().hex

    def _items(self, customer_id: str | None, record: dict[str, Any] | None, items: list[Any] | None,
               record_field: str) -> list[tuple[str | None, dict[str, Any] | None]]:
        given = [x is not None for x in (customer_id, record, items)]
        if items is not None:
            if customer_id is not None or record is not None:
                raise InputError("items", f"send either items or a single customer_id/{record_field}, not both")
            if len(items) > self.config.max_batch:
                raise InputError("items", f"{len(items)} items is over the limit of {self.config.max_batch}")
            if not items:
                raise InputError("items", "the batch is empty")
            out = []
            for i, item in enumerate(items):
                cid, rec = item.get("customer_id"), item.get(record_field)
                if cid is None and rec is None:
                    raise InputError(f"items[{i}]", f"needs a customer_id or {record_field}")
                out.append((cid, rec))
            return out
        if not any(given):
            raise InputError("customer_id", f"send a customer_id, a {record_field} record, or items")
        return [(customer_id, record)]

    def _lookup(self, ids: list[str], block: str) -> dict[str, dict[str, Any]]:
        if not ids:
            return {}
        try:
            found = self.store.get_many(ids)
        except OnlineStoreError as exc:
            raise NotServing(str(exc)) from None
        return {cid: r[block] for cid, r in found.items() if r.get(block)}

    @staticmethod
    def _check(scorer: Any, pairs: list[tuple[str | None, dict[str, Any] | None]], batch: bool, block: str) -> None:
        """The records the request brought (looked-up ones were checked when materialized)."""
        for i, (_, record) in enumerate(pairs):
            if record is not None:
                scorer.check([record], f"items[{i}].{block}" if batch else block)

    def _emit(self, rows: list[dict[str, Any]]) -> None:
        self.served += len(rows)
        self.log.append(rows)

    # --- classifiers --------------------------------------------------------------------------------------------
    def classify(self, endpoint: str, customer_id: str | None = None, features: dict[str, Any] | None = None,
                 items: list[dict[str, Any]] | None = None, explain: bool = False,
                 request_id: str | None = None) -> dict[str, Any]:
        loaded = self.models.get(endpoint)
        scorer = loaded.scorer
        pairs = self._items(customer_id, features, items, "features")
        if scorer.from_table and any(r is None for _, r in pairs):
            raise InputError("customer_id" if items is None else "items",
                             f"{loaded.name} v{loaded.version} was trained on a table of its own columns, which the "
                             "online store does not hold: send the customer's row as `features`")
        stored = self._lookup([c for c, r in pairs if r is None], "features")
        records, cold = [], []
        for cid, record in pairs:
            if record is not None:
                records.append(record)
                cold.append(False)
            elif cid in stored:
                row = stored[cid]
                if not all(c in row for c in scorer.features):
                    raise NotServing(self._foreign(loaded, row))
                records.append({c: row[c] for c in scorer.features})
                cold.append(False)
            else:
                records.append(None)
                cold.append(True)
        self._check(scorer, pairs, items is not None, "features")
        id_column = getattr(scorer.columns, "id_column", None) if scorer.from_table else None
        if id_column:  # a table's row names its customer in the table's id column, as its batch scores do
            pairs = [(_row_id(r.get(id_column)) if cid is None and r is not None else cid, r) for cid, r in pairs]
        n = len(scorer.features)  # a checked record with more columns brought unused ones: not scored, not logged
        records = [r if r is None or len(r) == n else {c: r[c] for c in scorer.features} for r in records]
        warm = [i for i, c in enumerate(cold) if not c]
        probs = scorer.score([records[i] for i in warm]) if warm else []
        reasons = scorer.reasons([records[i] for i in warm], self.config.explain_top) if explain and warm else None
        action = self.config.actions.get(endpoint, "act")
        rid = self.request_id(request_id)
        shadow_out = self._shadow_scores(endpoint, [records[i] for i in warm])
        position = {i: k for k, i in enumerate(warm)}

        def answer(i: int) -> dict[str, Any]:
            k = position.get(i)
            p = scorer.prior if k is None else float(probs[k])
            act = k is not None and p >= scorer.threshold  # no history, nothing to act on: an unknown id (or a typo
            # upstream) gets the base rate, never an offer, even where the base rate is above the threshold
            out = {"customer_id": pairs[i][0], "probability": round(p, 6), "decision": act,
                   "action": action if act else "none", "threshold": scorer.threshold, "cold_start": k is None}
            if k is None:
                out["prior"] = "global base rate of the model's held-out data; no decision without history"
                return out
            if reasons is not None:
                out["reasons"] = reasons[k]
            if unseen := scorer.unseen(records[i]):
                out["unseen_categories"] = unseen  # scored as missing: a new value, or a typo upstream
            return out

        results = [answer(i) for i in range(len(pairs))]
        rows = [make_row(rid, endpoint, loaded.ref, pseudonymize(pairs[i][0], self.salt), r["cold_start"],
                         records[i], {"probability": r["probability"], "decision": r["decision"]},
                         shadow_out[position[i]] if shadow_out is not None and i in position else None)
                for i, r in enumerate(results)]
        self._emit(rows)
        return {"request_id": rid, "model": loaded.ref, "results": results}

    def _foreign(self, loaded: Loaded, row: dict[str, Any]) -> str:
        """Why a model cannot score the online store's customers: it reads features the store does not hold (it was
        trained on another data set's, e.g. other categories' shares). Scoring them as missing would be made up."""
        missing = [c for c in loaded.scorer.features if c not in row]
        named = ", ".join(missing[:3]) + ("…" if len(missing) > 3 else "")
        return (f"{loaded.name} v{loaded.version} reads {len(missing)} feature(s) the online store of "
                f"{self.config.dataset} does not hold ({named}): it was trained on another data set; serve this "
                "store a model of its own data set, or send `features`")

    def classify_ids(self, endpoint: str, customer_ids: list[str]) -> list[dict[str, Any]]:
        """The adaptive-batching path: customer ids only (features from the online store, so nothing in a merged
        batch can be a bad record); one answer per id, each with the model and its own request id."""
        out = self.classify(endpoint, items=[{"customer_id": c} for c in customer_ids])
        return [{**r, "model": out["model"], "request_id": out["request_id"]} for r in out["results"]]

    def _shadow_scores(self, endpoint: str, records: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        shadow: Loaded | None = self.models.shadow.get(endpoint)
        if shadow is None or not records or shadow.kind != "classifier":
            return None
        current = self.models.current.get(endpoint)
        if current is not None and current.version == shadow.version:
            return None
        try:
            p = shadow.scorer.score([{c: r.get(c) for c in shadow.scorer.features} for r in records])
        except Exception as exc:  # a shadow must never hurt the answer
            return [{"version": shadow.version, "error": str(exc)[:200]}] * len(records)
        return [{"version": shadow.version, "probability": round(float(x), 6),
                 "decision": bool(x >= shadow.scorer.threshold)} for x in p]

    # --- segments and decisions ---------------------------------------------------------------------------------
    def _record(self, customer_id: str | None, features: dict[str, Any] | None) -> dict[str, Any] | None:
        """The customer's stored record (features, cycle, profile), or the request's own features; None: cold."""
        if features is not None:
            return {"features": features, "cycle": {}, "profile": {}}
        if customer_id is None:
            raise InputError("customer_id", "send a customer_id or a features record")
        try:
            return self.store.get_many([customer_id]).get(customer_id)
        except OnlineStoreError as exc:
            raise NotServing(str(exc)) from None

    def _segments_of(self, record: dict[str, Any] | None) -> dict[str, Any]:
        if record is None:
            return assign_one(None, self.segments)
        profile = record.get("profile") or {}
        if (self._live_segments and record.get("features")) or "segments" not in profile:
            # the served segment rules on the customer's stored features (a few microseconds): `serve --segments`
            # applies to every customer, whatever the store was materialized with (served_segments)
            out = assign_one(record.get("features") or {}, self.segments)
        else:  # as materialized
            names = list(profile["segments"])
            out = {"segments": names, "segment": profile.get("segment") or self.segments.fallback,
                   "cold_start": False}
        if profile.get("cluster") is not None:
            out["cluster"] = profile["cluster"]
        return out

    def segment(self, customer_id: str | None = None, features: dict[str, Any] | None = None,
                request_id: str | None = None) -> dict[str, Any]:
        """The customer's rule segments (all that hold, in priority order), the primary one, and the cluster."""
        record = self._record(customer_id, features)
        if features is not None:
            self._check_record(features)
        return {"request_id": self.request_id(request_id), "customer_id": customer_id, **self._segments_of(record)}

    def _check_record(self, features: dict[str, Any]) -> None:
        """A request's own feature record: the names the segments read are numbers or null, and every name is one
        this server knows (a typo would otherwise read as a missing feature and land the customer in "other")."""
        for name in sorted(self.segments.columns()):
            value = features.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InputError(f"features.{name}", f"must be a number or null, got {value!r}")
        unknown = sorted(set(features) - self._known)
        if unknown:  # the store may have been materialized again, or a model reloaded, since the names were read
            self._known = self._known_features()
            unknown = sorted(set(features) - self._known)
        if unknown:
            read = ", ".join(sorted(self.segments.columns())) or "none"
            raise InputError(f"features.{unknown[0]}", f"unknown feature {unknown[0]!r}: not a feature of the online "
                                                       f"store or of a served model (the segments read: {read})")

    def _known_features(self) -> set[str]:
        """Every feature name a record may carry: the segments' and the catalog's, the served models', the store's."""
        known = self.segments.columns() | self.catalog.rule_names()
        for endpoint in ("churn", "propensity"):
            loaded = self._served(endpoint)
            if loaded is not None:  # a labeled table's model also takes the table's other columns, ignored
                known |= set(loaded.scorer.features) | set(getattr(loaded.scorer, "unused", ()))
        try:
            known |= set(self.store.meta().get("feature_columns") or ())
        except OnlineStoreError:  # a record can still be checked against the models' and the rules' names
            pass
        return known

    def _scores(self, record: dict[str, Any], customer_key: str | None, rid: str, needed: frozenset[str],
                given: bool = False) -> tuple[dict[str, Any], list, list, dict[str, str]]:
        """Churn, propensity and next-purchase scores from the record, with the prediction-log rows; a model that is
        not served leaves its scores out (the decision works on what there is), and so does one that cannot score
        the record, saying why (the last item)."""
        scores: dict[str, Any] = {}
        models: list[dict[str, str]] = []
        rows = []
        unavailable: dict[str, str] = {}
        features = record.get("features") or {}
        for endpoint in ("churn", "propensity"):
            if endpoint not in needed:
                continue
            loaded = self._served(endpoint)
            if loaded is None:
                unavailable[endpoint] = f"no {endpoint} model is served"
                continue
            scorer = loaded.scorer
            complete = all(c in features for c in scorer.features)
            if scorer.from_table and not (given and complete):  # a model of a table's own columns (churn_telco)
                unavailable[endpoint] = (f"{loaded.name} v{loaded.version} scores a labeled table's rows: send its "
                                         "columns as `features`")
                continue
            if not given and not complete:  # a model of another data set's features scores only a record with them
                unavailable[endpoint] = self._foreign(loaded, features)
                continue
            row = {c: features.get(c) for c in scorer.features}
            if given:  # the request's own record: every feature of every served model, values checked
                missing = [c for c in scorer.features if c not in features]
                if missing:
                    raise InputError(f"features.{missing[0]}", f"missing: the {endpoint} model needs it (send null "
                                                               "for an unknown value)")
                scorer.check([row], "features")
            p = float(scorer.score([row])[0])
            scores[endpoint] = round(p, 6)
            models.append(loaded.ref)
            rows.append(make_row(rid, "personalize", loaded.ref, customer_key, False, row,
                                 {"probability": scores[endpoint], "decision": p >= scorer.threshold}, None))
        cycle = record.get("cycle") or {}
        if needed & CYCLE_SCORES:
            loaded = self._served("next_purchase")
            if loaded is None or not cycle:
                unavailable["next_purchase"] = ("no purchase-cycle model is served" if loaded is None else
                                                "no purchase summary for this customer")
            else:
                scorer = loaded.scorer
                inputs = {c: cycle.get(c) for c in scorer.inputs}
                stored = (record.get("profile") or {}).get("cycle_scores") or {}
                if stored.get("cycle_version") == loaded.version:  # materialized by this champion: no live call
                    out = {"expected_days_to_next": stored.get("days_to_next"), "p_purchase": stored.get("p_next"),
                           "precomputed": True}
                else:
                    out = scorer.predict([{**inputs, "customer_id": "x"}], scorer.horizon_days)[0]
                scores["days_to_next"] = out.get("expected_days_to_next")
                scores["p_next"] = out.get("p_purchase")
                models.append(loaded.ref)
                rows.append(make_row(rid, "personalize", loaded.ref, customer_key, False, inputs,
                                     dict(out), None))
        return scores, models, rows, unavailable

    def _served(self, endpoint: str, needed: frozenset[str] | None = None) -> Any | None:
        """The loaded champion of ``endpoint``, or None when the decision does not need it or none is served."""
        if needed is not None and endpoint not in needed:
            return None
        try:
            return self.models.get(endpoint)
        except NotServing:
            return None

    def _cold_scores(self, needed: frozenset[str]) -> tuple[dict[str, Any], list]:
        scores, models = {}, []
        for endpoint in ("churn", "propensity"):
            loaded = self._served(endpoint, needed)
            if loaded is None or loaded.scorer.from_table:
                continue
            scores[endpoint] = round(float(loaded.scorer.prior), 6)
            models.append(loaded.ref)
        return scores, models

    def personalize(self, placement: str, customer_id: str | None = None, features: dict[str, Any] | None = None,
                    consent: bool | None = None, context: dict[str, Any] | None = None,
                    request_id: str | None = None) -> dict[str, Any]:
        """One variant of ``placement`` for the customer, why, and the experiment arm; logged as a decision the
        application reports impressions, clicks and conversions against (``/feedback``)."""
        try:
            self.catalog.placement(placement)
        except KeyError:
            known = ", ".join(p.name for p in self.catalog.placements)
            raise InputError("placement", f"unknown placement {placement!r}; known: {known}") from None
        if features is not None:
            self._check_record(features)
        for name in sorted(set(context or ()) - set(self.catalog.context)):  # a typo would silently read as missing
            close = closest_name(name, self.catalog.context)
            declared = ", ".join(self.catalog.context) or "none"
            raise InputError(f"context.{name}", f"{name!r} is not a context name the catalog declares (declared: "
                                                f"{declared}){f'; did you mean {close!r}?' if close else ''}")
        rid = self.request_id(request_id)
        record = self._record(customer_id, features)
        cold = record is None
        profile = {} if cold else (record.get("profile") or {})
        stored = profile.get("consent")
        if features is not None and customer_id is not None:  # a known customer's own record: their stored consent
            stored = ((self._record(customer_id, None) or {}).get("profile") or {}).get("consent")
        if consent is None or (stored is not None and not stored):  # a stored opt-out holds whatever is sent
            consent = stored
        consent = bool(consent) if consent is not None else self.config.assume_consent
        out: dict[str, Any] = {"request_id": rid, "decision_id": uuid.uuid4().hex, "customer_id": customer_id,
                               "placement": placement, "consent": consent, "cold_start": cold}
        if not consent:
            decision = decide(self.catalog, placement, customer_id, {}, False, self.decisions.bandit_stats, self._rng)
            self.decisions.record_decision(out["decision_id"], _now(), decision, None, None, cold, False, None)
            return {**out, **_public(decision), "segment": None, "segments": [], "scores": {}}
        key = pseudonymize(customer_id, self.salt)
        segments = self._segments_of(record)
        needed = self._needed[placement]
        if cold:
            scores, models = self._cold_scores(needed)
            rows, unavailable = [], {}
        else:
            scores, models, rows, unavailable = self._scores(record, key, rid, needed, given=features is not None)
        # a cold start's scores are the models' base rates, reported but not read by the rules: no history, no
        # offer (a rule on churn or propensity does not hold for a customer the models know nothing of)
        ctx = {**(context or {}), **(record or {}).get("features", {}), **({} if cold else scores),
               "segment": segments["segment"], "cluster": segments.get("cluster"), "cold_start": cold,
               **{name: name in segments["segments"] for name in self.segments.names}}
        with self._lock:  # numpy's Generator is not thread-safe
            decision = decide(self.catalog, placement, customer_id, ctx, True, self.decisions.bandit_stats,
                              self._rng)
        self.decisions.record_decision(out["decision_id"], _now(), decision, key, segments["segment"], cold, True,
                                       scores)
        if rows:
            self._emit(rows)
        return {**out, **_public(decision), "segment": segments["segment"], "segments": segments["segments"],
                **({"cluster": segments["cluster"]} if "cluster" in segments else {}), "scores": scores,
                "models": models, **({"unavailable_scores": unavailable} if unavailable else {})}

    def feedback(self, decision_id: str, event: str, value: float | None = None,
                 request_id: str | None = None) -> dict[str, Any]:
        """An impression, click or conversion of a decision; the bandit that made it learns from it."""
        if event not in EVENTS:
            raise InputError("event", f"unknown event {event!r}; one of {', '.join(EVENTS)}")
        try:
            out = self.decisions.record_feedback(decision_id, event, _now(), value, self.catalog.reward)
        except UnknownDecision as exc:
            raise InputError("decision_id", str(exc)) from None
        return {"request_id": self.request_id(request_id), **out}


    # --- purchase cycle -----------------------------------------------------------------------------------------
    def next_purchase(self, customer_id: str | None = None, summary: dict[str, Any] | None = None,
                      items: list[dict[str, Any]] | None = None, horizon_days: int | None = None,
                      request_id: str | None = None) -> dict[str, Any]:
        loaded = self.models.get("next_purchase")
        scorer = loaded.scorer
        h = int(horizon_days or scorer.horizon_days)
        pairs = self._items(customer_id, summary, items, "summary")
        stored = self._lookup([c for c, r in pairs if r is None], "cycle")
        self._check(scorer, pairs, items is not None, "summary")
        records, cold = [], []
        for cid, record in pairs:
            rec = record if record is not None else stored.get(cid)
            cold.append(rec is None)
            records.append(None if rec is None else {**{c: rec.get(c) for c in scorer.inputs}, "customer_id": cid})
        warm = [i for i, c in enumerate(cold) if not c]
        predicted = scorer.predict([records[i] for i in warm], h) if warm else []
        prior = scorer.prior if h == scorer.horizon_days else {}
        rid = self.request_id(request_id)
        position = {i: k for k, i in enumerate(warm)}
        results = []
        for i in range(len(pairs)):
            if cold[i]:
                out = {**{c: (round(v, 6) if v is not None else None) for c, v in prior.items()}, "cold_start": True,
                       "prior": "mean answer over the model's held-out customers"}
            else:
                out = {**{c: (round(v, 6) if v is not None else None) for c, v in predicted[position[i]].items()},
                       "cold_start": False}
            results.append({"customer_id": pairs[i][0], "horizon_days": h, **out})
        self._emit([make_row(rid, "next_purchase", loaded.ref, pseudonymize(pairs[i][0], self.salt), cold[i],
                             None if cold[i] else {k: v for k, v in records[i].items() if k != "customer_id"},
                             {k: v for k, v in results[i].items() if k not in ("customer_id", "prior")}, None)
                    for i in range(len(pairs))])
        return {"request_id": rid, "model": loaded.ref, "results": results}

    # --- forecasts ----------------------------------------------------------------------------------------------
    def forecast(self, series: str, horizon_days: int = 30, start: str | None = None,
                 request_id: str | None = None) -> dict[str, Any]:
        loaded = self.models.get("forecast")
        first = None
        if start is not None:
            try:
                first = pd.Timestamp(start)
            except (ValueError, TypeError):
                raise InputError("start", f"not a date: {start!r}") from None
        points = loaded.scorer.predict(series, horizon_days, first)
        rid = self.request_id(request_id)
        self._emit([make_row(rid, "forecast", loaded.ref, None, False, {"series": series, "start": start,
                                                                         "horizon_days": horizon_days},
                             {"total": sum(p["yhat"] or 0.0 for p in points)}, None)])
        return {"request_id": rid, "model": loaded.ref, "series": series, "measure": loaded.scorer.measure,
                "forecast": points}


def _now() -> str:
    return pd.Timestamp.now(tz="UTC").isoformat()


def _public(decision: dict[str, Any]) -> dict[str, Any]:
    """The decision's fields an application sees (the posterior only as the bandit's means)."""
    out = {k: decision.get(k) for k in ("variant", "policy", "reason", "experiment", "arm")}
    if decision.get("posterior"):
        out["bandit"] = {"segment": decision.get("bandit_segment"),
                         "means": {v: p["mean"] for v, p in decision["posterior"].items()}}
    return out


def _freeze_heap(unfreeze: bool = False) -> None:
    """Move everything alive now (the libraries, the loaded models) out of the garbage collector's sight.

    The server imports MLflow, the boosters, pymc and Prophet: some 300,000 objects, which a full collection walks
    in about 0.25 s while holding the GIL, stalling every request in flight (it was the p99 at concurrency 32).
    Frozen, they are never walked again; requests' own short-lived objects are collected as usual. After a
    reload the heap is thawed once, collected (the old model goes), and frozen again."""
    import gc

    if unfreeze:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
