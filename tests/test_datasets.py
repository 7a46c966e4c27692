"""The adapters read the shared public data sets and reproduce the figures their SOURCE.md gives."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from features.datasets import (derive_customers, load_labeled_source, load_transactions, retail_category,
                               transaction_sources)

NOW = pd.Timestamp("2026-01-01")


@pytest.fixture(scope="module")
def retail(data_root: Path):
    return load_transactions(transaction_sources(data_root)["online_retail"], NOW)


def test_online_retail_reconciles_with_its_published_counts(retail) -> None:
    result, attributes = retail
    assert result.rows_in == 541_909
    assert result.reasons["missing_customer_id"] == 135_080
    assert len(result.valid) + len(result.quarantined) == 541_909
    valid = result.valid
    assert valid["customer_id"].nunique() == 4_372
    assert not valid["customer_id"].str.endswith(".0").any()  # "17850.0" is read as "17850"
    returns = valid[valid["is_return"]]
    assert returns["order_id"].str.startswith("C").all() and (returns["quantity"] < 0).all()
    assert (valid.loc[~valid["is_return"], "quantity"] > 0).all()
    assert valid["timestamp"].min() == pd.Timestamp("2010-12-01 08:26")
    assert set(attributes.columns) == {"country"} and len(attributes) == 4_372


def test_online_retail_categories_cover_most_lines(retail) -> None:
    result, _ = retail
    shares = result.valid["category"].value_counts(normalize=True)
    assert shares.get("other", 0) < 0.2
    assert retail_category(pd.Series(["SET OF 3 CAKE TINS", "POSTAGE", "RED RETROSPOT BAG"]),
                           pd.Series(["1", "POST", "2"])).tolist() == ["kitchen", "service", "bags"]


def test_cdnow_has_every_row_and_customer(data_root: Path) -> None:
    result, _ = load_transactions(transaction_sources(data_root)["cdnow"], NOW)
    assert result.rows_in == 69_659 and result.quarantined.empty
    assert result.valid["customer_id"].nunique() == 23_570
    assert result.valid["order_id"].is_unique
    assert round(result.valid["amount"].sum(), 2) == 2_500_315.63
    customers = derive_customers(result.valid)
    assert customers["signup_at"].max() < pd.Timestamp("1997-04-01")  # a Q1 1997 cohort


@pytest.mark.parametrize(("name", "rows", "positives"), [("telco_churn", 7_043, 1_869),
                                                         ("online_shoppers", 12_330, 1_908)])
def test_labeled_tables_load_and_pass_their_contract(data_root: Path, name: str, rows: int, positives: int) -> None:
    table = load_labeled_source(name, data_root)
    assert table.result.rows_in == rows and table.result.quarantined.empty
    assert int(table.frame["label"].sum()) == positives


def test_telco_blank_total_charges_are_missing_not_broken(data_root: Path) -> None:
    table = load_labeled_source("telco_churn", data_root)
    assert table.frame["TotalCharges"].isna().sum() == 11
    assert "TotalCharges" in table.numeric and "Contract" in table.categorical
