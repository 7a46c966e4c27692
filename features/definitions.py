"""Point-in-time customer features, written once with Ibis.

The definitions take Ibis tables and return an Ibis expression, so the same code runs on DuckDB (the default)
or any Ibis backend that has the tables (PySpark for scale). Nothing here touches a connection or a clock.

Everything is computed for an *entity table* of ``(customer_id, cutoff)`` pairs, Feast-style: a training frame
passes every customer at every cutoff; an online lookup passes one customer at ``as_of``. A row only ever sees data
strictly before its cutoff; the cart-abandonment feature only counts carts whose 24 h purchase window closed
before the cutoff, so that its value cannot change once the cutoff has passed.

Feature set ``customer_features_v1`` (per customer and cutoff; durations in days unless named otherwise):

- RFM: ``recency_days``, ``frequency`` (orders), ``monetary_total``, ``monetary_mean`` (per order),
  ``orders_30d``, ``orders_90d``, ``spend_30d``, ``spend_90d``, ``first_purchase_days``
- purchase cycle: ``ipi_mean_days``, ``ipi_std_days`` (gaps between distinct purchase days),
  ``recency_ratio`` (days since the last order / the usual gap)
- returns: ``returns``, ``return_rate``
- tenure: ``tenure_days`` (since signup)
- engagement over the last 28 days: ``sessions_28d``, ``sessions_per_week``, ``pages_per_session``,
  ``time_on_site_per_session_s``, ``searches_28d``, ``browse_sessions_28d`` (sessions without a purchase) and
  ``browse_pages_per_session`` (content pages per such session: the "content explorer" signal)
- cart: ``cart_adds_28d``, ``cart_abandonments_28d``, ``cart_abandon_rate``
- category affinity: ``n_categories`` and one ``cat_share_<category>`` per configured category (share of spend)
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import ibis
import ibis.expr.types as ir

from personalize.errors import ConfigError

FEATURE_VERSION = "customer_features_v1"
DAY_S = 86_400.0
MONEY = "decimal(18, 4)"  # amounts and durations are summed exactly, so a feature never depends on row order


@dataclass(frozen=True)
class FeatureSpec:
    """Parameters of a feature set; stored with every frame built from it."""

    version: str = FEATURE_VERSION
    categories: tuple[str, ...] = ()
    engagement_days: int = 28
    short_days: int = 30
    long_days: int = 90
    cart_window_hours: int = 24
    page_events: tuple[str, ...] = field(default=("page_view", "product_view"))

    def __post_init__(self) -> None:
        columns = [slug(c) for c in self.categories]
        clash = sorted({c for c in columns if columns.count(c) > 1})
        if clash:
            names = [c for c in self.categories if slug(c) in clash]
            raise ConfigError(f"categories {names} all become the column name cat_share_{clash[0]}; rename them")

    @property
    def category_columns(self) -> dict[str, str]:
        return {c: f"cat_share_{slug(c)}" for c in self.categories}

    @property
    def columns(self) -> list[str]:
        return [*BASE_COLUMNS, *self.category_columns.values()]


BASE_COLUMNS = [
    "recency_days", "frequency", "monetary_total", "monetary_mean", "orders_30d", "orders_90d", "spend_30d",
    "spend_90d", "first_purchase_days", "ipi_mean_days", "ipi_std_days", "recency_ratio", "returns",
    "return_rate", "tenure_days", "sessions_28d", "sessions_per_week", "pages_per_session",
    "time_on_site_per_session_s", "searches_28d", "browse_sessions_28d", "browse_pages_per_session", "cart_adds_28d",
    "cart_abandonments_28d", "cart_abandon_rate", "n_categories",
]
# Counts are 0, not missing, when a customer has no activity; ratios and recencies stay missing (NaN).
ZERO_WHEN_ABSENT = {
    "frequency", "monetary_total", "orders_30d", "orders_90d", "spend_30d", "spend_90d", "returns",
    "sessions_28d", "sessions_per_week", "searches_28d", "browse_sessions_28d", "cart_adds_28d", "cart_abandonments_28d",
    "n_categories",
}
KEYS = ["customer_id", "cutoff"]


# Letters that Unicode does not decompose into a base letter and an accent
_LETTERS = str.maketrans({"ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE", "ł": "l",
                          "Ł": "L", "đ": "d", "Đ": "D", "þ": "th", "Þ": "TH"})


def ascii_letters(text: str) -> str:
    """Accents dropped and a few letters spelled out (``Küche`` -> ``Kuche``, ``Straße`` -> ``Strasse``), so a name
    made of it stays readable; other characters are kept for the caller to replace."""
    decomposed = unicodedata.normalize("NFKD", str(text).translate(_LETTERS))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def slug(text: str) -> str:
    """A column-name part: ``Küche & Bad`` -> ``kuche_bad``."""
    return re.sub(r"[^0-9a-z]+", "_", ascii_letters(text).lower()).strip("_") or "blank"


def _days(later: ir.TimestampValue, earlier: ir.TimestampValue) -> ir.FloatingValue:
    return (later.epoch_seconds() - earlier.epoch_seconds()).cast("float64") / DAY_S


def _ratio(num: ir.NumericValue, den: ir.NumericValue) -> ir.FloatingValue:
    return ibis.ifelse(den > 0, num.cast("float64") / den.cast("float64"), ibis.null("float64"))


def attach(left: ir.Table, right: ir.Table) -> ir.Table:
    """``left`` with ``right``'s non-key columns, matched on (customer_id, cutoff); no match gives nulls."""
    joined = left.left_join(right, [left[k] == right[k] for k in KEYS])
    return joined.select(*[left[c] for c in left.columns], *[right[c] for c in right.columns if c not in KEYS])


def _before_cutoff(entities: ir.Table, table: ir.Table, since_days: float | None = None) -> ir.Table:
    """Rows of ``table`` (customer_id, timestamp, ...) paired with each entity whose cutoff they precede."""
    cond = [entities.customer_id == table.customer_id, table.timestamp < entities.cutoff]
    if since_days is not None:
        cond.append(table.timestamp >= entities.cutoff - ibis.interval(seconds=int(since_days * DAY_S)))
    joined = entities.join(table, cond)
    return joined.select(*KEYS, *[c for c in table.columns if c != "customer_id"])


def order_features(entities: ir.Table, transactions: ir.Table,
                   spec: FeatureSpec) -> tuple[ir.Table, ir.Table, ir.Table]:
    lines = _before_cutoff(entities, transactions.select("customer_id", "order_id", "timestamp", "amount",
                                                         "is_return", "category"))
    lines = lines.mutate(amount=lines.amount.cast(MONEY))  # exact sums: same value whatever the order
    purchases = lines.filter(~lines.is_return)
    orders = purchases.group_by([*KEYS, "order_id"]).aggregate(
        ts=purchases.timestamp.min(), value=purchases.amount.sum())
    # The purchase cycle counts distinct purchase days, as buy-till-you-die models do. Between consecutive
    # orders the day number either repeats (same day: gap 0) or moves on, so the non-zero gaps between
    # consecutive orders are exactly the gaps between distinct purchase days: one window, no DISTINCT pass.
    day = orders.ts.epoch_seconds() // 86_400
    orders = orders.mutate(gap=day - day.lag().over(ibis.window(group_by=KEYS, order_by=orders.ts)))
    age = _days(orders.cutoff, orders.ts)
    new_day = orders.gap > 0
    rfm = orders.group_by(KEYS).aggregate(
        frequency=orders.count(),
        monetary_total=orders.value.sum().cast("float64"),  # summed exactly, then a plain float
        last_ts=orders.ts.max(),
        first_ts=orders.ts.min(),
        orders_30d=(age <= spec.short_days).cast("int64").sum(),
        orders_90d=(age <= spec.long_days).cast("int64").sum(),
        spend_30d=orders.value.sum(where=age <= spec.short_days).cast("float64").fill_null(0.0),
        spend_90d=orders.value.sum(where=age <= spec.long_days).cast("float64").fill_null(0.0),
        _n=new_day.cast("int64").sum(),
        _s1=orders.gap.sum(where=new_day),
        _s2=(orders.gap * orders.gap).sum(where=new_day),
    )
    mean = _ratio(rfm._s1, rfm._n)
    var = ibis.ifelse(rfm._n > 1, (rfm._s2.cast("float64") - rfm._s1.cast("float64") * mean)
                      / (rfm._n - 1).cast("float64"), ibis.null("float64"))
    rfm = rfm.mutate(
        monetary_mean=_ratio(rfm.monetary_total, rfm.frequency),
        recency_days=_days(rfm.cutoff, rfm.last_ts),
        first_purchase_days=_days(rfm.cutoff, rfm.first_ts),
        ipi_mean_days=mean,
        ipi_std_days=ibis.ifelse(var < 0, 0.0, var).sqrt(),
    ).drop("last_ts", "first_ts", "_n", "_s1", "_s2")
    rfm = rfm.mutate(recency_ratio=_ratio(rfm.recency_days, rfm.ipi_mean_days))

    returns = lines.filter(lines.is_return)
    returns = returns.group_by(KEYS).aggregate(returns=returns.order_id.nunique())

    spend = purchases.amount
    cat_aggs = {"n_categories": purchases.category.nunique(), "_spend": spend.sum()}
    for category, column in spec.category_columns.items():
        cat_aggs[column] = spend.sum(where=purchases.category == category)
    cats = purchases.group_by(KEYS).aggregate(**cat_aggs)
    cats = cats.mutate(**{col: _ratio(cats[col].fill_null(0), cats._spend)
                          for col in spec.category_columns.values()})
    cats = cats.drop("_spend")
    return rfm, returns, cats


def engagement_features(entities: ir.Table, events: ir.Table, transactions: ir.Table,
                        spec: FeatureSpec) -> tuple[ir.Table, ir.Table]:
    ev = _before_cutoff(entities, events.select("customer_id", "session_id", "timestamp", "event_type",
                                                "item", "duration_s"), spec.engagement_days)
    is_page = ev.event_type.isin(list(spec.page_events))
    sessions = ev.session_id.nunique()
    engagement = ev.group_by(KEYS).aggregate(
        sessions_28d=sessions,
        _pages=is_page.cast("int64").sum(),
        _time=ev.duration_s.cast(MONEY).sum(),
        searches_28d=(ev.event_type == "search").cast("int64").sum(),
    )
    engagement = engagement.mutate(
        sessions_per_week=engagement.sessions_28d.cast("float64") / (spec.engagement_days / 7.0),
        pages_per_session=_ratio(engagement._pages, engagement.sessions_28d),
        time_on_site_per_session_s=_ratio(engagement._time.fill_null(0).cast("float64"), engagement.sessions_28d),
    ).drop("_pages", "_time")
    # Sessions without a purchase event: how much content a customer reads when not buying.
    per_session = ev.group_by([*KEYS, "session_id"]).aggregate(
        _pages=is_page.cast("int64").sum(), _bought=(ev.event_type == "purchase").cast("int64").sum())
    browse = per_session.filter(per_session._bought == 0)
    browse = browse.group_by(KEYS).aggregate(browse_sessions_28d=browse.count(), _pages=browse._pages.sum())
    browse = browse.mutate(browse_pages_per_session=_ratio(browse._pages, browse.browse_sessions_28d)).drop("_pages")
    engagement = attach(engagement, browse)

    # Cart abandonment: an add-to-cart whose purchase window closed before the cutoff, with no purchase in it.
    window = ibis.interval(seconds=spec.cart_window_hours * 3600)
    adds = ev.filter((ev.event_type == "add_to_cart") & (ev.timestamp + window < ev.cutoff))
    adds = adds.select(*KEYS, add_session=adds.session_id, add_ts=adds.timestamp, add_item=adds.item)
    buys = transactions.filter(~transactions.is_return).select(buy_customer=transactions.customer_id,
                                                                buy_ts=transactions.timestamp)
    matched = adds.left_join(buys, [adds.customer_id == buys.buy_customer, buys.buy_ts >= adds.add_ts,
                                    buys.buy_ts <= adds.add_ts + window])
    per_add = matched.group_by([*KEYS, "add_session", "add_ts", "add_item"]).aggregate(
        bought=matched.buy_ts.count())
    cart = per_add.group_by(KEYS).aggregate(
        cart_adds_28d=per_add.count(),
        cart_abandonments_28d=(per_add.bought == 0).cast("int64").sum(),
    )
    cart = cart.mutate(cart_abandon_rate=_ratio(cart.cart_abandonments_28d, cart.cart_adds_28d))
    return engagement, cart


def customer_features(entities: ir.Table, customers: ir.Table, transactions: ir.Table, events: ir.Table,
                      spec: FeatureSpec = FeatureSpec()) -> ir.Table:
    """One row per entity (customer_id, cutoff) with the columns of ``spec``, in that order."""
    base = entities.select(*KEYS).join(customers.select("customer_id", "signup_at"), "customer_id", how="left")
    base = base.mutate(tenure_days=_days(base.cutoff, base.signup_at)).drop("signup_at")
    rfm, returns, cats = order_features(entities, transactions, spec)
    engagement, cart = engagement_features(entities, events, transactions, spec)
    out = base
    for part in (rfm, returns, cats, engagement, cart):
        out = attach(out, part)
    out = out.mutate(**{c: out[c].fill_null(0) for c in ZERO_WHEN_ABSENT})
    out = out.mutate(return_rate=_ratio(out.returns, out.frequency))
    cast = {c: out[c].cast("float64") for c in spec.columns}
    return out.select(*KEYS, **cast).order_by(KEYS)
