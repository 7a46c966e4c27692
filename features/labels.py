"""Labels for a horizon H after each cutoff, from the transactions in ``[cutoff, cutoff + H)``.

Per (customer, cutoff):

- ``purchases_in_h``: orders in the horizon; ``spend_in_h``: their value;
- ``propensity``: 1 if the customer buys in the horizon, else 0; ``buys_<category>`` the same per category;
- ``churn``: 1 if a customer who had bought before the cutoff buys nothing in the horizon, 0 if they buy;
  missing for customers who never bought (there is nothing to churn from);
- ``days_to_next_purchase``: days from the cutoff to the first order in the horizon, censored at H, with
  ``next_purchase_event`` = 1 when it was observed (0 = censored).

A label is only known once its horizon has passed: :func:`check_horizon` refuses a cutoff whose horizon runs past
the end of the observed data.
"""

from __future__ import annotations

from datetime import timedelta

import ibis
import ibis.expr.types as ir
import pandas as pd

from features.definitions import DAY_S, KEYS, FeatureSpec, attach, slug
from personalize.errors import ContractError

LABEL_COLUMNS = ["purchases_in_h", "spend_in_h", "propensity", "churn", "days_to_next_purchase",
                 "next_purchase_event"]


def category_label_columns(spec: FeatureSpec) -> dict[str, str]:
    return {c: f"buys_{slug(c)}" for c in spec.categories}


def check_horizon(cutoffs: list[pd.Timestamp], horizon_days: int, observed_until: pd.Timestamp) -> None:
    late = [c for c in cutoffs if c + timedelta(days=horizon_days) > observed_until]
    if late:
        raise ContractError(
            f"the {horizon_days}-day horizon after cutoff {late[0]} ends after the data does ({observed_until}); "
            f"the latest usable cutoff is {observed_until - timedelta(days=horizon_days)}")


def customer_labels(entities: ir.Table, transactions: ir.Table, horizon_days: int,
                    spec: FeatureSpec = FeatureSpec()) -> ir.Table:
    purchases = transactions.filter(~transactions.is_return).select("customer_id", "order_id", "timestamp",
                                                                    "amount", "category")
    horizon = ibis.interval(seconds=int(horizon_days * DAY_S))
    joined = entities.join(purchases, [entities.customer_id == purchases.customer_id,
                                       purchases.timestamp >= entities.cutoff,
                                       purchases.timestamp < entities.cutoff + horizon])
    aggs = {
        "purchases_in_h": joined.order_id.nunique(),
        "spend_in_h": joined.amount.sum(),
        "_first": joined.timestamp.min(),
    }
    for category, column in category_label_columns(spec).items():
        aggs[column] = (joined.category == category).any().cast("int64")
    future = joined.group_by(KEYS).aggregate(**aggs)
    past = transactions.filter(~transactions.is_return)
    bought_before = entities.join(past, [entities.customer_id == past.customer_id,
                                         past.timestamp < entities.cutoff])
    bought_before = bought_before.select(*KEYS).distinct().mutate(_had=ibis.literal(1))

    out = attach(attach(entities.select(*KEYS), future), bought_before)
    bought = out.purchases_in_h.fill_null(0) > 0
    days = (out._first.epoch_seconds() - out.cutoff.epoch_seconds()).cast("float64") / DAY_S
    cols = {
        "purchases_in_h": out.purchases_in_h.fill_null(0).cast("int64"),
        "spend_in_h": out.spend_in_h.fill_null(0).cast("float64"),
        "propensity": bought.cast("int64"),
        "churn": ibis.ifelse(out._had.isnull(), ibis.null("int64"), (~bought).cast("int64")),
        "days_to_next_purchase": ibis.ifelse(bought, days, float(horizon_days)),
        "next_purchase_event": bought.cast("int64"),
    }
    for column in category_label_columns(spec).values():
        cols[column] = out[column].fill_null(0).cast("int64")
    return out.select(*KEYS, **cols).order_by(KEYS)
