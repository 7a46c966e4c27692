"""Behavioural clustering of customers: K-Means or a Gaussian mixture on scaled point-in-time features.

:class:`CustomerClusters` follows the scikit-learn contract. ``fit(frame)`` takes a customer features frame (the
columns of ``customer_features_v1``, one row per customer at one cutoff; :func:`cluster_frame` builds it), and:

1. **picks the columns**: by default :data:`DEFAULT_FEATURES`, those the frame has. Two of them are derived from
   the frame: ``relative_price`` (log spend per order minus what the customer's category mix predicts, a linear fit
   over the ``cat_share_*`` columns: positive = pays more than usual for what they buy) and
   ``category_concentration`` (sum of squared category spend shares: 1 = one category only). Without ``cat_share_*``
   columns they fall back to ``monetary_mean`` and ``n_categories``. Columns that are entirely missing or constant
   in the fit frame are left out (``dropped_`` says why);
2. **preprocesses**, as one scikit-learn ``Pipeline`` (``pipeline_``): a missing value becomes the column's median
   in the fit frame, the non-negative heavy-tailed columns (counts, money, durations: :data:`LOG_COLUMNS`) get
   ``log1p``, then everything is standardized;
3. **chooses k** when ``k`` is None: K-Means by the best silhouette over ``k_range`` (on a seeded subsample of at
   most ``sample`` rows), a Gaussian mixture by the lowest BIC;
4. **describes** each cluster (``profiles_``, :meth:`CustomerClusters.describe`): its share of customers, the
   features that set it apart (cluster mean minus overall mean in standardized units, with the raw means beside
   them) and a suggested name from the top one or two (``"high monetary_total, high frequency"``).

Cluster labels are ordered by size in the fit frame (0 is the largest), so a refit on the same data with the same
seed gives the same labels. :func:`log_clusters` logs a fitted model in MLflow and registers it (alias
``challenger``; ``champion`` too when asked, as clustering has no promotion gate).

On the synthetic shop the planted segments overlap heavily in observable behaviour (a supervised classifier on the
same features reaches an adjusted Rand index of about 0.27), so expect a modest agreement, around 0.1-0.15.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from personalize.errors import PersonalizeError

log = logging.getLogger(__name__)

SHARE_PREFIX = "cat_share_"
RELATIVE_PRICE = "relative_price"
CATEGORY_CONCENTRATION = "category_concentration"
DERIVED = (RELATIVE_PRICE, CATEGORY_CONCENTRATION)
# Recency, frequency, money, price level, purchase rhythm, breadth of taste. Chosen on two synthetic shops (seeds 42
# and 7): adding engagement (sessions), returns or the raw category shares lowered the agreement with the planted
# segments, and the derived price level raised it (0.11 -> 0.14 adjusted Rand index for K-Means at k=5).
DEFAULT_FEATURES: tuple[str, ...] = ("recency_days", "frequency", "monetary_total", RELATIVE_PRICE, "ipi_mean_days",
                                     CATEGORY_CONCENTRATION)
FALLBACKS = {RELATIVE_PRICE: "monetary_mean", CATEGORY_CONCENTRATION: "n_categories"}  # when no cat_share_* columns
# Counts, money and durations: non-negative and heavy-tailed, so log1p before scaling. Rates, shares and the derived
# columns (already a log, or bounded) are only scaled.
LOG_COLUMNS = frozenset({
    "recency_days", "frequency", "monetary_total", "monetary_mean", "orders_30d", "orders_90d", "spend_30d",
    "spend_90d", "first_purchase_days", "ipi_mean_days", "ipi_std_days", "recency_ratio", "returns", "tenure_days",
    "sessions_28d", "sessions_per_week", "pages_per_session", "time_on_site_per_session_s", "searches_28d",
    "browse_sessions_28d", "browse_pages_per_session", "cart_adds_28d", "cart_abandonments_28d", "n_categories",
})
METHODS = ("kmeans", "gmm")
MIN_ROWS_PER_CLUSTER = 5  # a frame needs this many rows per cluster of the largest k tried
NAME_MIN_Z = 0.25  # a feature names a cluster only if its mean is this many standard deviations from the overall one
TOP_FEATURES = 5  # distinguishing features listed per cluster


class ClusteringError(PersonalizeError):
    """The frame or the parameters do not allow clustering (too few rows, no usable feature, bad k range, ...)."""


def _log1p_nonneg(x: Any) -> Any:
    """log1p, with negative values (never in a valid frame) clipped to 0 rather than turned into NaN."""
    return np.log1p(np.clip(x, 0, None))


# --- the columns ---------------------------------------------------------------------------------------------------
class FeatureFrame(TransformerMixin, BaseEstimator):
    """``columns`` of a customer features frame as floats (±inf as missing), deriving :data:`DERIVED` columns from
    ``monetary_mean`` and the ``cat_share_*`` columns the fit frame had."""

    def __init__(self, columns: Sequence[str] = ()) -> None:
        self.columns = columns

    def fit(self, X: pd.DataFrame, y: Any = None) -> FeatureFrame:
        columns = list(self.columns)
        derived = [c for c in columns if c in DERIVED]
        self.share_columns_ = sorted(c for c in X.columns if c.startswith(SHARE_PREFIX)) if derived else []
        if derived and not self.share_columns_:
            raise ClusteringError(f"{', '.join(derived)} need the {SHARE_PREFIX}* columns, which the frame lacks")
        needs = [c for c in columns if c not in DERIVED] + self.share_columns_
        if RELATIVE_PRICE in columns:
            needs.append("monetary_mean")
        self.input_columns_ = list(dict.fromkeys(needs))
        _require(X, self.input_columns_)
        self.price_coef_ = np.zeros(len(self.share_columns_))
        self.price_intercept_ = 0.0
        if RELATIVE_PRICE in columns:
            shares, log_price, ok = self._price_inputs(X)
            if ok.sum() > len(self.share_columns_):
                from sklearn.linear_model import LinearRegression

                fit = LinearRegression().fit(shares[ok], log_price[ok])
                self.price_coef_, self.price_intercept_ = fit.coef_, float(fit.intercept_)
            elif ok.any():
                self.price_intercept_ = float(log_price[ok].mean())
        return self

    def _price_inputs(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raw = X[self.share_columns_].to_numpy(dtype=float)
        bought = np.isfinite(raw).any(axis=1)
        mean = X["monetary_mean"].to_numpy(dtype=float)
        ok = bought & np.isfinite(mean) & (mean > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_price = np.where(ok, np.log(np.where(ok, mean, 1.0)), np.nan)
        return np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0), log_price, ok

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        _require(X, self.input_columns_)
        out = {}
        for column in self.columns:
            if column == RELATIVE_PRICE:
                shares, log_price, ok = self._price_inputs(X)
                out[column] = np.where(ok, log_price - (shares @ self.price_coef_ + self.price_intercept_), np.nan)
            elif column == CATEGORY_CONCENTRATION:
                raw = X[self.share_columns_].to_numpy(dtype=float)
                bought = np.isfinite(raw).any(axis=1)
                out[column] = np.where(bought, (np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0) ** 2).sum(axis=1),
                                       np.nan)
            else:
                out[column] = pd.to_numeric(X[column], errors="coerce").to_numpy(dtype=float)
        frame = pd.DataFrame(out, index=X.index, columns=list(self.columns))
        return frame.replace([np.inf, -np.inf], np.nan)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.asarray(list(self.columns), dtype=object)


def _require(frame: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ClusteringError(f"the frame lacks the column(s) {', '.join(missing)} the clustering model uses")


def resolve_features(frame: pd.DataFrame, features: Sequence[str] | None = None) -> list[str]:
    """The columns to cluster on: ``features`` as given (each must be in the frame or be derivable), or the
    :data:`DEFAULT_FEATURES` the frame has (a derived one replaced by its fallback when it cannot be derived)."""
    shares = any(c.startswith(SHARE_PREFIX) for c in frame.columns)

    def derivable(c: str) -> bool:
        return shares and (c != RELATIVE_PRICE or "monetary_mean" in frame.columns)

    if features is not None:
        wanted = list(dict.fromkeys(features))
        if not wanted:
            raise ClusteringError("no feature columns given")
        missing = [c for c in wanted if c not in frame.columns and not (c in DERIVED and derivable(c))]
        if missing:
            raise ClusteringError(f"the frame has no column(s) {', '.join(missing)}"
                                  + (f" (derived columns need {SHARE_PREFIX}* columns)"
                                     if set(missing) & set(DERIVED) else ""))
        numeric = [c for c in wanted if c in DERIVED or pd.api.types.is_numeric_dtype(frame[c])
                   or pd.api.types.is_bool_dtype(frame[c])]
        if len(numeric) < len(wanted):
            raise ClusteringError(f"not numeric: {', '.join(c for c in wanted if c not in numeric)}")
        return wanted
    out = []
    for c in DEFAULT_FEATURES:
        if c in DERIVED and derivable(c):
            out.append(c)
        elif c in DERIVED and FALLBACKS[c] in frame.columns:
            out.append(FALLBACKS[c])
        elif c in frame.columns:
            out.append(c)
    if not out:
        raise ClusteringError(f"no usable feature columns: the frame has none of {', '.join(DEFAULT_FEATURES)}; "
                              "pass features=[...] to name the columns to cluster on")
    return list(dict.fromkeys(out))


def usable_columns(values: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    """The columns with at least two distinct values, and why each other one is left out."""
    keep, dropped = [], {}
    for c in values.columns:
        present = values[c].dropna()
        if present.empty:
            dropped[c] = "all missing"
        elif present.nunique() < 2:
            dropped[c] = "constant"
        else:
            keep.append(c)
    return keep, dropped


def preprocessor(columns: Sequence[str], log_columns: Iterable[str] = LOG_COLUMNS) -> Pipeline:
    """Select/derive ``columns``, fill missing values with the fit medians, log1p the heavy-tailed ones, standardize."""
    logged = [c for c in columns if c in set(log_columns)]
    plain = [c for c in columns if c not in logged]
    parts = []
    if logged:
        parts.append(("log", Pipeline([("impute", SimpleImputer(strategy="median")),
                                       ("log1p", FunctionTransformer(_log1p_nonneg, feature_names_out="one-to-one"))]),
                      logged))
    if plain:
        parts.append(("plain", SimpleImputer(strategy="median"), plain))
    pipeline = Pipeline([("features", FeatureFrame(list(columns))),
                         ("impute_log", ColumnTransformer(parts, verbose_feature_names_out=False)),
                         ("scale", StandardScaler())])
    return pipeline.set_output(transform="pandas")


# --- the estimator -------------------------------------------------------------------------------------------------
class CustomerClusters(ClusterMixin, BaseEstimator):
    """K-Means (``method="kmeans"``) or a Gaussian mixture (``"gmm"``) on preprocessed behavioural features.

    ``k=None`` chooses the number of clusters in ``k_range`` (both ends included): the best silhouette for K-Means,
    computed on a seeded subsample of at most ``sample`` rows, the lowest BIC for the mixture. ``features=None``
    uses :data:`DEFAULT_FEATURES`. ``covariance_type`` is the mixture's ("diag": each cluster its own variances).

    Fitted attributes: ``k_``, ``scores_`` ({k: silhouette or BIC}), ``silhouette_`` (of the chosen k, subsampled),
    ``bic_`` (mixture only), ``features_`` (columns used), ``dropped_`` ({column: why not}), ``input_columns_`` (what
    :meth:`predict` needs), ``pipeline_``, ``model_``, ``labels_`` and ``profiles_`` (see :meth:`describe`)."""

    def __init__(self, method: str = "kmeans", k: int | None = None, k_range: tuple[int, int] = (2, 8),
                 features: Sequence[str] | None = None, seed: int = 0, sample: int = 5_000,
                 covariance_type: str = "diag") -> None:
        self.method = method
        self.k = k
        self.k_range = k_range
        self.features = features
        self.seed = seed
        self.sample = sample
        self.covariance_type = covariance_type

    # -- fit --------------------------------------------------------------------------------------------------------
    def _candidates(self) -> list[int]:
        if self.method not in METHODS:
            raise ClusteringError(f"method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.covariance_type not in ("full", "diag", "tied", "spherical"):
            raise ClusteringError(f"covariance_type {self.covariance_type!r}: use full, diag, tied or spherical")
        if int(self.sample) < 100:
            raise ClusteringError(f"sample={self.sample}: the silhouette needs a subsample of at least 100 rows")
        if self.k is not None:
            if int(self.k) < 2:
                raise ClusteringError(f"k={self.k}: at least 2 clusters")
            return [int(self.k)]
        try:
            low, high = (int(v) for v in self.k_range)
        except (TypeError, ValueError):
            raise ClusteringError(f"k_range={self.k_range!r}: give (smallest k, largest k)") from None
        if not 2 <= low <= high:
            raise ClusteringError(f"k_range={self.k_range!r}: need 2 <= smallest k <= largest k")
        return list(range(low, high + 1))

    def fit(self, X: pd.DataFrame, y: Any = None) -> CustomerClusters:
        candidates = self._candidates()
        if not isinstance(X, pd.DataFrame):
            raise ClusteringError("fit takes a pandas DataFrame of customer features")
        requested = resolve_features(X, self.features)
        values = FeatureFrame(requested).fit(X).transform(X)
        self.features_, self.dropped_ = usable_columns(values)
        for column, why in self.dropped_.items():
            log.warning("clustering without %s: %s in the fit frame", column, why)
        if not self.features_:
            raise ClusteringError("no usable feature columns: " + ", ".join(f"{c} is {why}"
                                                                           for c, why in self.dropped_.items()))
        needed = MIN_ROWS_PER_CLUSTER * max(candidates)
        if len(X) < needed:
            raise ClusteringError(f"too few rows: {len(X)} customers for up to {max(candidates)} clusters (needs at "
                                  f"least {needed}, {MIN_ROWS_PER_CLUSTER} per cluster); lower k or k_range")
        self.pipeline_ = preprocessor(self.features_)
        Z = self.pipeline_.fit_transform(X)[self.features_]
        distinct = len(np.unique(Z.to_numpy().round(9), axis=0))
        if distinct < max(candidates):
            raise ClusteringError(f"too few distinct customers: {distinct} distinct feature vectors for up to "
                                  f"{max(candidates)} clusters; lower k or k_range")
        self.input_columns_ = list(self.pipeline_.named_steps["features"].input_columns_)

        fitted, self.scores_ = {}, {}
        for k in candidates:  # silhouette: higher is better; BIC: lower is better
            fitted[k] = self._fit_one(Z.to_numpy(), k)
            self.scores_[k] = (self._silhouette(Z.to_numpy(), fitted[k][1]) if self.method == "kmeans"
                               else float(fitted[k][0].bic(Z.to_numpy())))
        sign = -1.0 if self.method == "kmeans" else 1.0
        self.k_ = min(self.scores_, key=lambda k: (sign * self.scores_[k], k))  # a tie goes to the smaller k
        self.model_, raw = fitted[self.k_]
        # labels by size, largest first (ties by the model's own order): stable names for the same data and seed
        sizes = np.bincount(raw, minlength=self.k_)
        order = sorted(range(self.k_), key=lambda c: (-sizes[c], c))
        self.relabel_ = np.empty(self.k_, dtype=int)
        self.relabel_[order] = np.arange(self.k_)
        self.labels_ = self.relabel_[raw]
        self.silhouette_ = self._silhouette(Z.to_numpy(), self.labels_)
        self.bic_ = float(self.model_.bic(Z.to_numpy())) if self.method == "gmm" else None
        self.profiles_ = profiles(values[self.features_], Z, self.labels_, self.k_)
        log.info("clustered %d customers into %d %s clusters on %d features (silhouette %.3f)", len(X), self.k_,
                 self.method, len(self.features_), self.silhouette_)
        return self

    def _fit_one(self, Z: np.ndarray, k: int) -> tuple[Any, np.ndarray]:
        if self.method == "kmeans":
            from sklearn.cluster import KMeans

            model = KMeans(n_clusters=k, n_init=10, random_state=self.seed).fit(Z)
            return model, model.labels_.astype(int)
        from sklearn.mixture import GaussianMixture

        model = GaussianMixture(n_components=k, covariance_type=self.covariance_type, n_init=3, reg_covar=1e-2,
                                random_state=self.seed).fit(Z)
        return model, model.predict(Z).astype(int)

    def _silhouette(self, Z: np.ndarray, labels: np.ndarray) -> float:
        from sklearn.metrics import silhouette_score

        if len(np.unique(labels)) < 2:
            return float("nan")
        size = int(self.sample) if len(Z) > int(self.sample) else None
        return float(silhouette_score(Z, labels, sample_size=size, random_state=self.seed))

    # -- use --------------------------------------------------------------------------------------------------------
    def _check(self) -> None:
        from sklearn.utils.validation import check_is_fitted

        try:
            check_is_fitted(self, "model_")
        except Exception:
            raise ClusteringError("the clustering model is not fitted; call fit(frame) first") from None

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        """The standardized features the clusters live in (one column per ``features_``)."""
        self._check()
        if not isinstance(X, pd.DataFrame):
            raise ClusteringError("transform takes a pandas DataFrame of customer features")
        return self.pipeline_.transform(X)[self.features_]

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """A cluster label (0 = the largest cluster at fit) for each row of a customer features frame."""
        Z = self.transform(X)
        if len(Z) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.relabel_[self.model_.predict(Z.to_numpy())].astype(np.int64)

    def describe(self) -> list[dict[str, Any]]:
        """Per cluster (by label): ``size`` and ``share`` of the fit frame, the ``features`` that set it apart
        (``z``: cluster mean minus overall mean of the standardized feature; ``cluster_mean``/``overall_mean``: of
        the raw values, missing ones ignored) and a suggested ``name``."""
        self._check()
        return json.loads(json.dumps(self.profiles_))


# --- profiles ------------------------------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 6) + 0.0  # + 0.0: no -0.0


def profiles(raw: pd.DataFrame, scaled: pd.DataFrame, labels: np.ndarray, k: int,
             top: int = TOP_FEATURES) -> list[dict[str, Any]]:
    """Each cluster's size, distinguishing features and suggested name (pure: frames in, plain dicts out)."""
    labels = np.asarray(labels)
    overall_raw = raw.mean(skipna=True)
    overall_z = scaled.mean()
    out = []
    for c in range(k):
        mask = labels == c
        z = (scaled[mask].mean() - overall_z) if mask.any() else pd.Series(0.0, index=scaled.columns)
        cluster_raw = raw[mask].mean(skipna=True) if mask.any() else pd.Series(np.nan, index=raw.columns)
        ranked = sorted(scaled.columns, key=lambda f: (-abs(float(z[f])), f))
        out.append({
            "cluster": c, "size": int(mask.sum()), "share": round(float(mask.mean()), 6) if len(labels) else 0.0,
            "features": [{"feature": f, "direction": "high" if z[f] > 0 else "low", "z": _num(z[f]),
                          "cluster_mean": _num(cluster_raw[f]), "overall_mean": _num(overall_raw[f])}
                         for f in ranked[:top]],
            "ranked": ranked, "z": {f: float(z[f]) for f in ranked},
        })
    names = cluster_names([(p["ranked"], p["z"]) for p in out])
    for p, name in zip(out, names):
        p["name"] = name
        del p["ranked"], p["z"]
    return [{"cluster": p["cluster"], "name": p["name"], "size": p["size"], "share": p["share"],
             "features": p["features"]} for p in out]


def cluster_names(ranked: list[tuple[list[str], dict[str, float]]], words: int = 2) -> list[str]:
    """A name per cluster from its top ``words`` features (``"high frequency, low recency_days"``); features less
    than :data:`NAME_MIN_Z` from the overall mean do not name (a cluster with none is ``"average"``); a name
    two clusters share grows by one feature, then gets the cluster number."""
    def name(features: list[str], z: dict[str, float], n: int) -> str:
        parts = [f"{'high' if z[f] > 0 else 'low'} {f}" for f in features[:n] if abs(z[f]) >= NAME_MIN_Z]
        return ", ".join(parts) or "average"

    names = [name(f, z, words) for f, z in ranked]
    for n in range(words + 1, words + 3):
        clash = {x for x in names if names.count(x) > 1}
        if not clash:
            break
        names = [name(f, z, n) if x in clash else x for x, (f, z) in zip(names, ranked)]
    clash = {x for x in names if names.count(x) > 1}
    return [f"{x} ({i})" if x in clash else x for i, x in enumerate(names)]


def profiles_markdown(described: list[dict[str, Any]]) -> str:
    """The description as a markdown table: one row per cluster, its top features with raw and overall means."""
    def cell(f: dict[str, Any]) -> str:
        def fmt(x: float | None) -> str:
            return "-" if x is None else f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"

        return f"{f['feature']} {f['z']:+.2f}σ ({fmt(f['cluster_mean'])} vs {fmt(f['overall_mean'])})"

    rows = [f"| {p['cluster']} | {p['name']} | {p['size']:,} | {p['share']:.1%} | "
            f"{'; '.join(cell(f) for f in p['features'][:3])} |" for p in described]
    return "\n".join(["| cluster | name | customers | share | top features (z, cluster mean vs overall mean) |",
                      "|---|---|---|---|---|", *rows, ""])


def adjusted_rand(labels: Sequence[Any], truth: Sequence[Any]) -> float:
    """Agreement of cluster labels with known groups: 1 = the same partition, about 0 = chance."""
    from sklearn.metrics import adjusted_rand_score

    labels, truth = np.asarray(labels), np.asarray(truth)
    if len(labels) != len(truth):
        raise ClusteringError(f"{len(labels)} labels for {len(truth)} known groups")
    return float(adjusted_rand_score(truth, labels))


# --- the frame -----------------------------------------------------------------------------------------------------
def cluster_frame(dataset_dir: Path, as_of: pd.Timestamp | str | None = None,
                  categories: Iterable[str] | None = None) -> pd.DataFrame:
    """Every customer known before ``as_of`` (default: the day after the last transaction or event) with the
    features at that cutoff, built as the online store builds them (every category's share unless ``categories``
    are given); provenance in ``frame.attrs``."""
    from features.definitions import FeatureSpec
    from features.store import FeatureStore
    from serving.online import default_as_of

    store = FeatureStore(Path(dataset_dir))
    cutoff = pd.Timestamp(as_of) if as_of is not None else default_as_of(store)
    spec = FeatureSpec(categories=tuple(categories)) if categories is not None else store.every_category(cutoff)
    frame = store.offline([cutoff], spec)
    if frame.empty:
        raise ClusteringError(f"{Path(dataset_dir).name}: no customer had signed up before {cutoff}")
    frame.attrs.update(store.provenance([cutoff], None, spec, None))
    frame.attrs["as_of"] = str(cutoff)
    return frame


# --- MLflow --------------------------------------------------------------------------------------------------------
def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("mlflow", "scikit-learn", "pandas", "numpy")]


def _trusted_types(model: CustomerClusters) -> list[str]:
    """The types outside scikit-learn the skops file holds (MLflow's sklearn flavor stores models with skops, which
    loads only trusted types): this module's own and numpy's, nothing else."""
    import skops.io

    found = skops.io.get_untrusted_types(data=skops.io.dumps(model))
    foreign = [t for t in found if not t.startswith((f"{__name__}.", "numpy."))]
    if foreign:
        raise ClusteringError(f"the model holds types MLflow would not load: {', '.join(foreign)}")
    return found


def _input_example(frame: pd.DataFrame, rows: int = 3) -> pd.DataFrame:
    complete = frame.dropna()
    example = (complete if len(complete) >= rows else frame).head(rows)
    return example.astype(float).reset_index(drop=True)


def log_clusters(model: CustomerClusters, frame: pd.DataFrame, tracking_uri: str, experiment: str | None = None,
                 name: str = "customer_segments", dataset: str | None = None, artifact_root: str | None = None,
                 promote: bool = False) -> tuple[str, str]:
    """Log a fitted :class:`CustomerClusters` (params, scores, profiles, the model with signature and input
    example from ``frame``) in one MLflow run of ``experiment`` (default ``segments-<dataset>``), register it as a
    new version of ``name`` with the alias ``challenger`` and, with ``promote``, ``champion`` too. Returns
    (run id, version)."""
    import mlflow
    from mlflow.models import infer_signature

    from training.registry import check_name, connect, register, set_champion
    from training.tracking import use_experiment

    model._check()
    check_name(name)
    dataset = dataset or frame.attrs.get("dataset")
    experiment = experiment or f"segments-{dataset or 'default'}"
    client = connect(tracking_uri)
    use_experiment(tracking_uri, experiment, artifact_root)
    described = model.describe()
    provenance = {k: str(frame.attrs[k]) for k in ("feature_version", "data_fingerprint", "as_of")
                  if frame.attrs.get(k) is not None}
    metrics = {f"score_k{k}": float(v) for k, v in model.scores_.items() if np.isfinite(v)}
    if np.isfinite(model.silhouette_):
        metrics["silhouette"] = model.silhouette_
    if model.bic_ is not None:
        metrics["bic"] = model.bic_
    metrics.update({f"share_cluster{p['cluster']}": p["share"] for p in described})
    with mlflow.start_run(run_name=f"{name}-{dataset or 'frame'}") as run:
        mlflow.set_tags({"kind": "clustering", "method": model.method, **({"dataset": dataset} if dataset else {}),
                         **provenance})
        mlflow.log_params({"method": model.method, "k": model.k_, "k_requested": model.k or "auto",
                           "k_range": f"{model.k_range[0]}-{model.k_range[1]}", "features": ",".join(model.features_),
                           "dropped": ",".join(model.dropped_) or "-", "seed": model.seed, "sample": model.sample,
                           "covariance_type": model.covariance_type if model.method == "gmm" else "-",
                           "rows": len(frame), "selection": "silhouette" if model.method == "kmeans" else "bic"})
        mlflow.log_metrics(metrics)
        mlflow.log_dict({"method": model.method, "k": model.k_, "features": model.features_,
                         "clusters": described}, "clusters/profiles.json")
        mlflow.log_text(f"# {name}: {model.k_} {model.method} clusters\n\n{profiles_markdown(described)}",
                        "clusters/profiles.md")
        example = _input_example(frame[model.input_columns_])
        info = mlflow.sklearn.log_model(model, name="model", signature=infer_signature(example, model.predict(example)),
                                        input_example=example, pip_requirements=_pip_requirements(),
                                        skops_trusted_types=_trusted_types(model),
                                        metadata={"kind": "clustering", "k": model.k_,
                                                  "names": [p["name"] for p in described]})
    names = "; ".join(f"{p['cluster']}: {p['name']} ({p['share']:.0%})" for p in described)
    version = register(client, name, info.model_uri, run.info.run_id,
                       tags={"method": model.method, "k": str(model.k_), "silhouette": f"{model.silhouette_:.4f}",
                             **({"dataset": dataset} if dataset else {}), **provenance},
                       description=f"{model.k_} {model.method} clusters of {dataset or 'a features frame'} on "
                                   f"{', '.join(model.features_)}: {names}"[:4000],
                       kind="clustering")
    if promote:  # no gate for clustering: the caller decides; the audit trail keeps rollback working
        set_champion(client, name, version, "clustering: promoted on registration (no gate)")
    log.info("logged %s clusters in run %s, registered %s version %s%s", model.method, run.info.run_id, name,
             version, " (champion)" if promote else "")
    return run.info.run_id, version
