"""Scoring behind the API: load a registered model by alias, check a request's records against it, score them,
explain them, and keep the served versions fresh (hot reload).

Everything here is plain Python with no HTTP in it; :mod:`serving.service` is the thin BentoML layer on top.

- :func:`load` resolves ``models:/name@alias`` to a version and loads that exact version once, with what serving
  needs beside it: the input columns and their kinds, the cold-start prior (the label's base rate for a classifier,
  the mean answer over the held-out customers for the purchase cycle; both from the held-out frame logged with the
  model), and which columns are counts (never negative in the held-out frame and whole numbers), so a negative
  count is refused instead of scored.
- :class:`Classifier` scores records with the booster directly: a float matrix in the model's column order when
  every input is numeric (the common case, no pandas on the request path), the pyfunc's own frame path otherwise.
  Reason codes are the booster's TreeSHAP contributions (``pred_contrib``) in log-odds, computed only on request.
- :class:`ModelSet` holds what is served per endpoint; :meth:`ModelSet.refresh` compares each alias with the
  loaded version and loads a moved one in the caller's (background) thread, swapping it in with one assignment,
  so requests in flight finish on the old model and none fail. A version that cannot load leaves the old one in
  place and the error in :meth:`ModelSet.status`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from personalize.errors import PersonalizeError, first_line
from serving.config import ENDPOINT_KINDS

log = logging.getLogger(__name__)


class InputError(PersonalizeError):
    """A request the model cannot score; ``field`` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotServing(PersonalizeError):
    """No version of the model is loaded (none registered under the alias, or it failed to load)."""


# --- loading -----------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    name: str
    version: str
    alias: str
    kind: str  # "classifier" | "cycle" | "forecast"
    scorer: Any
    run_id: str
    loaded_at: float = field(default_factory=time.time)

    @property
    def ref(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "alias": self.alias}


def _heldout(run_id: str) -> pd.DataFrame | None:
    import mlflow.artifacts

    from training.registry import HELDOUT_ARTIFACT

    try:
        return pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=HELDOUT_ARTIFACT))
    except Exception:  # a model logged without one: no prior, no count checks
        return None


def _counts(frame: pd.DataFrame | None, columns: list[str]) -> frozenset[str]:
    """Columns that are counts: whole, non-negative numbers throughout the held-out frame."""
    if frame is None or frame.empty:
        return frozenset()
    out = set()
    for c in columns:
        if c in frame.columns and pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c]):
            v = frame[c].dropna().to_numpy(dtype=float)
            if len(v) and (v >= 0).all() and np.allclose(v, np.round(v)):
                out.add(c)
    return frozenset(out)


def load(client: Any, name: str, alias: str, threads: int = 1, version: str | None = None) -> Loaded:
    """The version ``alias`` points to (or ``version`` itself), loaded. Raises :class:`NotServing` when there is
    none.

    ``client`` is an ``MlflowClient`` on the registry, or a store that answers the same two look-ups and also
    loads the pyfunc and the held-out frame itself (``load_pyfunc`` and ``heldout``: the champions a Bento
    carries, :class:`serving.bento.BentoRegistry`)."""
    import mlflow.pyfunc

    from training.cycle import CyclePyfunc
    from training.forecast import PurchaseForecastModel
    from training.train import ClassifierModel

    try:
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        raise NotServing(f"no {name}@{version or alias} in the registry: {first_line(exc)}") from None
    own_store = hasattr(client, "load_pyfunc")
    pyfunc = (client.load_pyfunc(name, str(mv.version)) if own_store
              else mlflow.pyfunc.load_model(f"models:/{name}/{mv.version}"))
    inner = pyfunc.unwrap_python_model()
    heldout = None
    if not isinstance(inner, PurchaseForecastModel):
        heldout = client.heldout(name, str(mv.version)) if own_store else _heldout(mv.run_id)
    if isinstance(inner, ClassifierModel):
        kind, scorer = "classifier", Classifier(inner, heldout, threads)
    elif isinstance(inner, CyclePyfunc):
        kind, scorer = "cycle", Cycle(inner, heldout)
    elif isinstance(inner, PurchaseForecastModel):
        kind, scorer = "forecast", Forecast(inner)
        if scorer.measure is None and not own_store:  # a bundle logged before it recorded its measure: the run did
            scorer.measure = client.get_run(mv.run_id).data.params.get("measure")
    else:
        raise NotServing(f"{name} version {mv.version} is a {type(inner).__name__}, which this service cannot serve")
    return Loaded(name, str(mv.version), alias, kind, scorer, mv.run_id)


# --- record checks -----------------------------------------------------------------------------------------------
def check_records(records: list[dict[str, Any]], numeric: list[str], categorical: list[str], boolean: list[str],
                  counts: frozenset[str], where: str = "features", unused: frozenset[str] = frozenset()) -> None:
    """Every record has the model's columns with values of the right kind, and no other column but the ``unused``
    ones its training table had (an id, a label, a column set aside: sent as the table has them, ignored); raises
    :class:`InputError` naming the first offending field (``features.recency_days``, ``items[3].features.x``).
    A blank string (a table's empty cell) is set to None in the record itself, so it is scored as missing."""
    expected = set(numeric) | set(categorical) | set(boolean)
    for i, record in enumerate(records):
        at = where if len(records) == 1 else f"items[{i}].{where}"
        if len(record) == len(expected) and expected.issuperset(record):  # the usual case: exactly the columns
            unknown = missing = []
        else:
            unknown, missing = sorted(set(record) - expected - unused), sorted(expected - set(record))
        if unknown:
            raise InputError(f"{at}.{unknown[0]}", f"unknown feature (the model takes {len(expected)} features: "
                                                   f"{', '.join(sorted(expected)[:8])}{', ...' if len(expected) > 8 else ''})")
        if missing:
            raise InputError(f"{at}.{missing[0]}", f"missing ({len(missing)} feature(s) missing; send null for an "
                                                   "unknown value)")
        for c in expected:
            v = record[c]
            if type(v) is str and not v.strip():
                record[c] = None  # a blank cell, the way a table file has it: missing, as batch scoring reads it
        for c in numeric:
            v = record[c]
            if v is None:
                continue
            if type(v) is float and v - v == 0.0 and (v >= 0 or c not in counts):  # finite, and not a negative count
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InputError(f"{at}.{c}", f"must be a number or null, got {type(v).__name__}")
            if not math.isfinite(v):
                raise InputError(f"{at}.{c}", "must be finite")
            if c in counts and v < 0:
                raise InputError(f"{at}.{c}", f"is a count and cannot be negative (got {v})")
        for c in boolean:
            v = record[c]
            if v is not None and not isinstance(v, bool) and v not in (0, 1):
                raise InputError(f"{at}.{c}", f"must be true, false or null, got {v!r}")
        for c in categorical:
            v = record[c]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int))):
                shown = int(v) if isinstance(v, float) and v.is_integer() else v  # as the client wrote it
                raise InputError(f"{at}.{c}", f"is a category: a string or null, got the {_json_type(v)} {shown!r}")


def _json_type(value: Any) -> str:
    """What a value was in the request's JSON: the API reads a JSON integer as a float where numbers go."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "array" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__


# --- classifiers -------------------------------------------------------------------------------------------------
class Classifier:
    """A churn or propensity champion: calibrated probability, decision at the model's threshold, reasons."""

    def __init__(self, model: Any, heldout: pd.DataFrame | None, threads: int = 1) -> None:
        from training.train import Calibrator

        self.model = model
        self.booster = model._booster
        # One thread per booster call on the request path: a one-row predict gains nothing from more, and with
        # XGBoost's default (every core) it stalled for milliseconds whenever the machine was busy (measured by
        # bench/serving.py: ~24 ms against ~0.3 ms per row). Batch scoring asks for more.
        self.threads = threads
        self.columns = model.columns
        self._numeric, self._categorical, self._boolean = (list(model.columns.numeric),
                                                           list(model.columns.categorical),
                                                           list(model.columns.boolean))
        self.features: list[str] = list(model.columns.features)
        self._vocabulary = {c: frozenset(v) for c, v in (getattr(model, "categories", None) or {}).items()
                            if c in model.columns.categorical}
        self.unused = frozenset(model.columns.unused)
        # A model of a labeled table (its label is among the unused columns): its columns are not in the online
        # store, so it scores the rows it is sent, never a customer looked up by id.
        self.from_table = bool(self.unused)
        self.numeric_only = not model.columns.categorical
        self.calibrator = Calibrator.from_dict(model.calibrator)
        self.threshold = float(model.threshold)
        self.counts = _counts(heldout, list(model.columns.numeric))
        self.prior = float(heldout["label"].mean()) if heldout is not None and "label" in heldout else 0.5
        import lightgbm as lgb

        self.lightgbm = isinstance(self.booster, lgb.Booster)
        if not self.lightgbm:
            self.booster.set_param({"nthread": threads})

    def check(self, records: list[dict[str, Any]], where: str = "features") -> None:
        check_records(records, self._numeric, self._categorical, self._boolean, self.counts, where, self.unused)

    def unseen(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record's categorical values the model never saw in training (scored as missing), by column."""
        return {c: v for c, known in self._vocabulary.items()
                if (v := record.get(c)) is not None and str(v) not in known}

    def unseen_counts(self, frame: pd.DataFrame) -> dict[str, int]:
        """Per categorical column of ``frame`` (as :func:`serving.batch.score_matrix` reads it), the rows with a
        value the model never saw in training; columns without one are left out."""
        return {c: n for c, known in self._vocabulary.items()
                if (n := int((frame[c].notna() & ~frame[c].astype(str).isin(known)).sum()))}

    def _matrix(self, records: list[dict[str, Any]]) -> np.ndarray | pd.DataFrame:
        if self.numeric_only:
            return np.array([[np.nan if (v := r.get(c)) is None else float(v) for c in self.features]
                             for r in records], dtype=float)
        from training.tune import model_matrix

        # object columns: a category 3 beside a null stays 3 (the training vocabulary's "3"), not the float 3.0
        frame = pd.DataFrame(records, columns=self.features, dtype=object)
        x, _ = model_matrix(frame, list(self.columns.numeric), list(self.columns.categorical),
                            list(self.columns.boolean), self.model.categories)
        return x

    def _raw(self, x: np.ndarray | pd.DataFrame) -> np.ndarray:
        rounds = self.model.rounds
        if self.lightgbm:
            return np.asarray(self.booster.predict(x, num_iteration=rounds, num_threads=self.threads))
        if isinstance(x, np.ndarray):
            return np.asarray(self.booster.inplace_predict(x, iteration_range=(0, rounds), validate_features=False))
        import xgboost as xgb

        return np.asarray(self.booster.predict(xgb.DMatrix(x, enable_categorical=True), iteration_range=(0, rounds)))

    def score(self, records: list[dict[str, Any]]) -> np.ndarray:
        return self.calibrator.transform(self._raw(self._matrix(records)))

    def reasons(self, records: list[dict[str, Any]], top: int) -> list[list[dict[str, Any]]]:
        """The ``top`` features pushing each score most, by |TreeSHAP contribution| (log-odds, before
        calibration, which is monotone and keeps the direction)."""
        x = self._matrix(records)
        rounds = self.model.rounds
        if self.lightgbm:
            contrib = np.asarray(self.booster.predict(x, num_iteration=rounds, pred_contrib=True,
                                                     num_threads=self.threads))
        else:
            import xgboost as xgb

            data = (xgb.DMatrix(x, feature_names=self.booster.feature_names, feature_types=self.booster.feature_types)
                    if isinstance(x, np.ndarray) else xgb.DMatrix(x, enable_categorical=True))
            contrib = np.asarray(self.booster.predict(data, iteration_range=(0, rounds), pred_contribs=True))
        contrib = contrib[:, : len(self.features)]
        out = []
        for i, record in enumerate(records):
            order = np.argsort(-np.abs(contrib[i]))[:top]
            out.append([{"feature": self.features[j], "value": record.get(self.features[j]),
                         "contribution": round(float(contrib[i, j]), 6),
                         "direction": "up" if contrib[i, j] > 0 else "down"} for j in order if contrib[i, j] != 0])
        return out


def _one_thread(obj: Any, depth: int = 3) -> None:
    """Every XGBoost booster inside the model predicts with one thread: a request scores one customer, and with
    OpenMP's default of every core a one-row predict waits on the other threads (11 ms instead of a fraction of one
    on a busy 2-core machine), as for the classifiers."""
    import xgboost as xgb

    if isinstance(obj, xgb.Booster):
        obj.set_param({"nthread": 1})
        return
    if depth == 0 or obj is None or isinstance(obj, (str, bytes, int, float, np.ndarray, pd.DataFrame)):
        return
    for value in list(getattr(obj, "__dict__", {}).values()):
        _one_thread(value, depth - 1)


# --- purchase cycle ----------------------------------------------------------------------------------------------
# a purchase summary's counts of purchase days, and its spend (returns are not purchases)
WHOLE_SUMMARY = ("frequency", "purchases_30d", "purchases_90d", "purchases_180d", "purchases_365d")
SPEND_SUMMARY = ("monetary", "spend_total", "spend_90d")


class Cycle:
    """The purchase-cycle champion: expected purchases in H days, days to the next one, P(purchase), P(alive)."""

    def __init__(self, model: Any, heldout: pd.DataFrame | None) -> None:
        from training.cycle import BTYD_COLUMNS, FEATURE_COLUMNS, OUTPUT_COLUMNS

        self.model = model
        _one_thread(model)
        self.horizon_days = int(model.horizon_days)
        self.inputs = [*BTYD_COLUMNS, *FEATURE_COLUMNS]
        self.outputs = list(OUTPUT_COLUMNS)
        self.counts = _counts(heldout, self.inputs) | {"frequency", "T", "recency"}
        self.prior: dict[str, float] = {}
        if heldout is not None and not heldout.empty:
            predicted = pd.DataFrame(self.predict(heldout.to_dict("records"), self.horizon_days), dtype=float)
            self.prior = {c: _finite(predicted[c].mean()) for c in self.outputs}

    def check(self, records: list[dict[str, Any]], where: str = "summary") -> None:
        check_records(records, self.inputs, [], [], frozenset(self.counts), where)
        for i, r in enumerate(records):
            at = where if len(records) == 1 else f"items[{i}].{where}"
            for c in ("frequency", "recency", "T"):
                if r.get(c) is None:
                    raise InputError(f"{at}.{c}", "is required for the purchase-cycle model")
            if r["recency"] > r["T"]:
                raise InputError(f"{at}.recency", f"cannot exceed T (the customer's age): {r['recency']} > {r['T']}")
            if r["frequency"] > r["T"] + 1:
                raise InputError(f"{at}.frequency", "more repeat purchase days than days since the first purchase")
            for c in WHOLE_SUMMARY:
                if r.get(c) is not None and r[c] != int(r[c]):
                    raise InputError(f"{at}.{c}", f"is a number of purchase days: a whole number (got {r[c]})")
            for c in SPEND_SUMMARY:
                if r.get(c) is not None and r[c] < 0:
                    raise InputError(f"{at}.{c}", f"is spend on purchases, returns left out: it cannot be negative "
                                                  f"(got {r[c]})")

    def predict(self, records: list[dict[str, Any]], horizon_days: int) -> list[dict[str, float]]:
        # the frame built column by column from floats: pandas' record and per-column conversions, and iterrows on
        # the way out, cost several times what a BG/NBD model's own prediction does
        frame = pd.DataFrame({"customer_id": [str(r.get("customer_id", i)) for i, r in enumerate(records)],
                              **{c: np.array([_as_float(r.get(c)) for r in records], dtype=float)
                                 for c in self.inputs}})
        out = self.model.model.predict(frame, horizon_days)[self.outputs].to_numpy(dtype=float)
        return [{c: _finite(v) for c, v in zip(self.outputs, row)} for row in out.tolist()]


def _as_float(value: Any) -> float:
    """A summary value as a float, NaN for a missing or non-numeric one (as ``pd.to_numeric(errors="coerce")``)."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# --- forecasts ---------------------------------------------------------------------------------------------------
MAX_LEAD_DAYS = 5 * 365  # the latest forecast start, in days after a series' history ends


class Forecast:
    """The Prophet forecaster: daily purchase volume per series over a horizon."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.series = sorted(model.models)
        self.measure: str | None = getattr(model, "measure", None)  # orders, spend or units per day
        # each series' first day, and the day after its history ends: where a forecast starts by default
        self.begins = {name: pd.Timestamp(m.history["ds"].min()).normalize() for name, m in model.models.items()}
        self.starts = {name: pd.Timestamp(m.history["ds"].max()).normalize() + pd.Timedelta(days=1)
                       for name, m in model.models.items()}

    def predict(self, series: str, horizon_days: int, start: Any = None) -> list[dict[str, Any]]:
        """``horizon_days`` days from ``start`` (a date; default: the day after the history), which must fall in
        the series' history or at most :data:`MAX_LEAD_DAYS` after it: before the data a trend extrapolated
        backwards answers nothing, and decades ahead pandas' calendar ends (2262)."""
        if series not in self.model.models:
            from training.forecast import series_name

            if series_name(series) not in self.model.models:  # as written in the data: category.Küche
                raise InputError("series", f"unknown series {series!r}; known: {', '.join(self.series[:20])}")
            series = series_name(series)
        first = self.starts[series]
        if start is not None:
            begin, latest = self.begins[series], first + pd.Timedelta(days=MAX_LEAD_DAYS)
            day = pd.Timestamp(start).date()
            if not begin.date() <= day <= latest.date():
                raise InputError("start", f"{day} is outside the series' range: from its first day "
                                          f"({begin.date()}) to {MAX_LEAD_DAYS:,} days after its history "
                                          f"({latest.date()})")
            first = pd.Timestamp(start).normalize()
        ds = pd.date_range(first, periods=horizon_days, freq="D")
        out = self.model.predict(None, pd.DataFrame({"series": series, "ds": ds}))
        return [{"ds": d.date().isoformat(), "yhat": _finite(r.yhat), "yhat_lower": _finite(r.yhat_lower),
                 "yhat_upper": _finite(r.yhat_upper)} for d, r in zip(ds, out.itertuples(index=False))]


# --- what is served ----------------------------------------------------------------------------------------------
class ModelSet:
    """The champion (and, in shadow mode, the challenger) of each endpoint, kept fresh from the registry."""

    def __init__(self, client: Any, endpoints: dict[str, str], alias: str = "champion",
                 shadow_alias: str | None = None, required: tuple[str, ...] = ()) -> None:
        self.client, self.endpoints, self.alias, self.shadow_alias = client, endpoints, alias, shadow_alias
        self.required = required  # endpoints the operator named (`serve --model`): not ready until they serve
        self.current: dict[str, Loaded] = {}
        self.shadow: dict[str, Loaded] = {}
        self.errors: dict[str, str] = {}
        self.checked_at: float | None = None
        self.reloads = 0
        self.failed_reloads = 0
        self.retry_failed_s = 60.0  # a version that failed to load is tried again after this long, not every check
        self._failed: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()  # one refresh at a time; readers never take it

    def get(self, endpoint: str) -> Loaded:
        loaded = self.current.get(endpoint)
        if loaded is None:
            name = self.endpoints.get(endpoint, endpoint)
            why = self.errors.get(endpoint) or f"no {name}@{self.alias} has been loaded yet"
            raise NotServing(why)
        return loaded

    def _version(self, name: str, alias: str) -> tuple[str | None, str]:
        """The version ``alias`` points to, or None and why not (a Bento says what it carries instead)."""
        try:
            return str(self.client.get_model_version_by_alias(name, alias).version), ""
        except Exception as exc:
            from_bento = hasattr(self.client, "load_pyfunc")
            return None, (first_line(exc) if from_bento else f"no version of {name} has the alias {alias!r}")

    def _refresh_one(self, endpoint: str, name: str, alias: str, target: dict[str, Loaded]) -> None:
        version, why = self._version(name, alias)
        loaded = target.get(endpoint)
        if version is None:
            if alias == self.alias and loaded is None:
                self.errors[endpoint] = why
            if alias != self.alias:
                target.pop(endpoint, None)  # the challenger was promoted or removed: stop shadowing
            return
        champion = self.current.get(endpoint)
        if alias != self.alias and champion is not None and champion.version == version:
            target.pop(endpoint, None)  # the challenger is the champion (promoted, alias kept): nothing to shadow
            return
        if loaded is not None and loaded.version == version:
            return
        failed = self._failed.get((endpoint, alias))
        if failed is not None and failed[0] == version and time.monotonic() - failed[1] < self.retry_failed_s:
            return
        try:
            fresh = load(self.client, name, alias)
            expected = ENDPOINT_KINDS.get(endpoint, fresh.kind)
            if fresh.kind != expected:
                raise NotServing(f"it is a {fresh.kind} model, and /{endpoint} answers with a {expected}")
        except Exception as exc:
            self._failed[(endpoint, alias)] = (version, time.monotonic())
            self.failed_reloads += 1
            message = f"{name} version {version} ({alias}) failed to load: {str(exc).splitlines()[0][:300]}"
            if loaded is not None:
                message += f"; still serving version {loaded.version}"
            self.errors[endpoint if alias == self.alias else f"{endpoint}@{alias}"] = message
            log.error(message)
            return
        target[endpoint] = fresh  # one assignment: a request sees the old model or the new one
        self._failed.pop((endpoint, alias), None)
        self.errors.pop(endpoint if alias == self.alias else f"{endpoint}@{alias}", None)
        if loaded is not None:
            self.reloads += 1
            log.info("%s: %s version %s -> %s (%s)", endpoint, name, loaded.version, fresh.version, alias)
        else:
            log.info("%s: loaded %s version %s (%s)", endpoint, name, fresh.version, alias)

    def refresh(self) -> None:
        with self._lock:
            for endpoint, name in self.endpoints.items():
                self._refresh_one(endpoint, name, self.alias, self.current)
                if self.shadow_alias:
                    self._refresh_one(endpoint, name, self.shadow_alias, self.shadow)
            self.checked_at = time.time()

    @property
    def ready(self) -> bool:
        """Checked the registry once, every endpoint with a champion there has it loaded, and every required
        endpoint has one."""
        return self.checked_at is not None and not any(e in self.errors and e not in self.current
                                                       and "failed to load" in self.errors[e]
                                                       for e in self.endpoints) \
            and all(e in self.current for e in self.required)

    def status(self) -> dict[str, Any]:
        return {
            "models": {e: (self.current[e].ref | {"kind": self.current[e].kind} if e in self.current else None)
                       for e in self.endpoints},
            "shadow": {e: m.ref for e, m in self.shadow.items()},
            "errors": dict(self.errors), "reloads": self.reloads, "failed_reloads": self.failed_reloads,
            "checked_at": self.checked_at,
        }
