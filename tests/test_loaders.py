"""Reading files through a column mapping: a broken file is one clear error naming the file and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from features.ingest import REASON, SOURCE_FILE, SOURCE_ROW
from features.labeled import LABEL, LabeledTableSpec, load_labeled
from features.loaders import CsvOptions, TableMapping, load_table, load_tables
from personalize.errors import ConfigError, DataFileError

ORDERS_CSV = """cust,invoice,when,qty,price,sku
1,A1,2024-01-02 10:00:00,2,3.50,X
1,A2,2024-01-05 11:00:00,1,10.00,Y
,A3,2024-01-06 11:00:00,1,10.00,Y
2,CA4,2024-01-07 09:00:00,-1,3.50,X
"""
MAPPING = {"customer_id": "cust", "order_id": "invoice", "timestamp": "when", "quantity": "qty",
           "unit_price": "price", "item": "sku"}


def mapping(path: Path, **kw) -> TableMapping:
    return TableMapping(table="transactions", path=path, columns=kw.pop("columns", MAPPING), return_prefix="CA", **kw)


def test_csv_and_parquet_give_the_same_valid_rows(tmp_path: Path) -> None:
    csv = tmp_path / "orders.csv"
    csv.write_text(ORDERS_CSV)
    parquet = tmp_path / "orders.parquet"
    pd.read_csv(csv, dtype=str, keep_default_na=False).to_parquet(parquet)
    from_csv, from_parquet = load_table(mapping(csv)), load_table(mapping(parquet))
    pd.testing.assert_frame_equal(from_csv.valid, from_parquet.valid)
    assert from_csv.valid["amount"].tolist() == [7.0, 10.0, -3.5]
    assert from_csv.valid["is_return"].tolist() == [False, False, True]
    assert from_csv.reasons == {"missing_customer_id": 1}


def test_typed_parquet_with_null_integer_ids_matches_csv(tmp_path: Path) -> None:
    typed = pd.DataFrame({"cust": [1, 1, None], "invoice": ["A1", "A2", "A3"],
                          "when": pd.to_datetime(["2024-01-02", "2024-01-05", "2024-01-06"]),
                          "qty": [2, 1, 1], "price": [3.5, 10.0, 10.0], "sku": ["X", "Y", "Y"]})
    typed.to_parquet(tmp_path / "orders.parquet")  # pyarrow: int column with a null -> float64 in pandas
    result = load_table(mapping(tmp_path / "orders.parquet"))
    assert result.valid["customer_id"].tolist() == ["1", "1"] and result.reasons == {"missing_customer_id": 1}


@pytest.mark.parametrize("decimal, amounts, reasons", [
    (None, [6.0, 2.55, 10.0, 3703.5, 4.2], {"unparseable_amount": 1}),  # the file's own way, found per column
    (",", [6.0, 2.55, 10.0, 3703.5, 4.2], {"unparseable_amount": 1}),
    (".", [6.0, 10.0], {"unparseable_amount": 4}),  # told dots: every comma is unparseable, none misread
])
def test_a_mapping_reads_decimal_commas(tmp_path: Path, decimal: str | None, amounts: list[float],
                                        reasons: dict[str, int]) -> None:
    (tmp_path / "orders.csv").write_text("cust;invoice;when;qty;price\n1;A1;2024-01-02;2;3\n1;A2;2024-01-03;1;2,55\n"
                                         "2;A3;2024-01-04;1;10\n2;A4;2024-01-05;3;1.234,50\n3;A5;2024-01-06;1;4,2\n"
                                         "3;A6;2024-01-07;1;n/a\n")
    columns = {k: v for k, v in MAPPING.items() if k != "item"}
    result = load_table(mapping(tmp_path / "orders.csv", columns=columns, csv=CsvOptions(sep=";", decimal=decimal)))
    assert result.valid["amount"].tolist() == pytest.approx(amounts) and result.reasons == reasons


def test_a_column_with_numbers_only_dots_read_is_not_taken_for_decimal_commas(tmp_path: Path) -> None:
    (tmp_path / "orders.csv").write_text("cust;invoice;when;qty;price\n1;A1;2024-01-02;2;1.5\n1;A2;2024-01-03;1;2,55\n"
                                         "2;A3;2024-01-04;1;1.234\n")
    columns = {k: v for k, v in MAPPING.items() if k != "item"}
    result = load_table(mapping(tmp_path / "orders.csv", columns=columns, csv=CsvOptions(sep=";")))
    assert result.valid["amount"].tolist() == [3.0, 1.234] and result.reasons == {"unparseable_amount": 1}
    comma = load_table(mapping(tmp_path / "orders.csv", columns=columns, csv=CsvOptions(sep=";", decimal=",")))
    assert comma.valid["amount"].tolist() == [2.55, 1234.0] and comma.reasons == {"unparseable_amount": 1}


def test_a_comma_before_three_digits_alone_does_not_make_a_column_decimal_commas(tmp_path: Path) -> None:
    (tmp_path / "orders.tsv").write_text("cust\tinvoice\twhen\tqty\tprice\n1\tA1\t2024-01-02\t1,000\t3\n"
                                         "1\tA2\t2024-01-03\t2\t4\n")  # a US export: 1,000 may be a thousand
    columns = {k: v for k, v in MAPPING.items() if k != "item"}
    result = load_table(mapping(tmp_path / "orders.tsv", columns=columns, csv=CsvOptions(sep="\t")))
    assert result.valid["quantity"].tolist() == [2] and result.reasons == {"unparseable_quantity": 1}  # not 1


def test_a_thousands_comma_beside_a_decimal_dot_is_read_when_the_mapping_says_so(tmp_path: Path) -> None:
    (tmp_path / "orders.csv").write_text('cust,invoice,when,qty,price\n1,A1,2024-01-02,"1,000",3\n'
                                         '1,A2,2024-01-03,2,"1,234.50"\n2,A3,2024-01-04,1,"1,23"\n'
                                         '2,A4,2024-01-05,1,9.5\n')
    columns = {k: v for k, v in MAPPING.items() if k != "item"}
    plain = load_table(mapping(tmp_path / "orders.csv", columns=columns))
    assert plain.reasons == {"unparseable_quantity": 1, "unparseable_amount": 2}  # never read as 1 or 1.234
    grouped = load_table(mapping(tmp_path / "orders.csv", columns=columns, csv=CsvOptions(thousands=",")))
    assert grouped.valid["quantity"].tolist() == [1000, 2, 1] and grouped.valid["amount"].tolist() == [3000.0,
                                                                                                      2469.0, 9.5]
    assert grouped.reasons == {"unparseable_amount": 1}  # 1,23: a comma that groups no thousands
    with pytest.raises(ValueError, match="needs a decimal dot"):
        CsvOptions(decimal=",", thousands=",")
    with pytest.raises(ValueError, match="not for a labeled table"):  # refused there, not ignored
        LabeledTableSpec(path=tmp_path / "orders.csv", label_column="qty", positive="1", csv={"thousands": ","})


def test_files_of_one_table_each_read_numbers_and_times_their_own_way(tmp_path: Path) -> None:
    (tmp_path / "jan.csv").write_text("cust;invoice;when;qty;price\n1;A1;02.01.2024 10:00;2;2,55\n"
                                      "1;A2;03.01.2024 10:00;1;1.234,50\n1;A3;04.01.2024 10:00;1;1.5\n")
    pd.DataFrame({"cust": ["2", "2"], "invoice": ["B1", "B2"], "qty": [1, 3], "price": [1.5, None],
                  "when": pd.to_datetime(["2024-02-02", "2024-02-03"])}).to_parquet(tmp_path / "feb.parquet")
    (tmp_path / "mar.csv").write_text("cust,invoice,when,qty,price\n3,C1,2024-03-02,1,7.25\n3,C2,2024-03-03,1,n/a\n")
    columns = {k: v for k, v in MAPPING.items() if k != "item"}
    result = load_tables([
        mapping(tmp_path / "jan.csv", columns=columns, csv=CsvOptions(sep=";", decimal=","),
                timestamp_format="%d.%m.%Y %H:%M"),
        mapping(tmp_path / "feb.parquet", columns=columns),  # native times, no format to give
        mapping(tmp_path / "mar.csv", columns=columns)])
    assert result.valid["amount"].tolist() == pytest.approx([5.1, 1234.5, 1.5, 7.25])
    assert result.valid["timestamp"].min() == pd.Timestamp("2024-01-02 10:00")
    # 1.5 under the first file's decimal ",": unparseable there, as in that file alone
    assert result.reasons == {"missing_amount": 1, "unparseable_amount": 2}
    assert sorted(result.quarantined[SOURCE_FILE]) == sorted(map(str, (tmp_path / "jan.csv", tmp_path / "feb.parquet",
                                                                       tmp_path / "mar.csv")))
    assert result.quarantined.loc[result.quarantined[SOURCE_FILE] == str(tmp_path / "jan.csv"), "price"].tolist() == [
        "1.5"]  # quarantine keeps the value as read
    with pytest.raises(ConfigError, match="must share their return_prefix: "):
        load_tables([mapping(tmp_path / "mar.csv", columns=columns),
                     TableMapping(table="transactions", path=tmp_path / "feb.parquet", columns=columns)])


def test_several_files_of_one_table_are_one_table(tmp_path: Path) -> None:
    (tmp_path / "jan.csv").write_text(ORDERS_CSV)
    (tmp_path / "feb.csv").write_text("cust,invoice,when,qty,price,sku\n"
                                      "1,A1,2024-01-02 10:00:00,2,3.50,X\n3,B1,2024-02-02 10:00:00,1,1,Z\n")
    result = load_tables([mapping(tmp_path / "jan.csv"), mapping(tmp_path / "feb.csv")])
    assert result.rows_in == 6 and len(result.valid) == 4
    quarantine = result.quarantined.sort_values(REASON)
    assert quarantine[REASON].tolist() == ["duplicate", "missing_customer_id"]  # A1 repeats across the files
    assert quarantine[SOURCE_FILE].tolist() == [str(tmp_path / "feb.csv"), str(tmp_path / "jan.csv")]
    assert quarantine[SOURCE_ROW].tolist() == [1, 3]


def test_a_trailing_separator_is_read_without_shifting_columns(tmp_path: Path) -> None:
    csv = tmp_path / "orders.csv"
    csv.write_text("".join(line + ",\n" if i else line + "\n" for i, line in enumerate(ORDERS_CSV.splitlines())))
    result = load_table(mapping(csv))
    assert result.valid["customer_id"].tolist() == ["1", "1", "2"] and result.reasons == {"missing_customer_id": 1}


def test_a_row_with_too_many_fields_is_quarantined_with_its_raw_text(tmp_path: Path) -> None:
    csv = tmp_path / "orders.csv"
    lines = ORDERS_CSV.splitlines()
    lines[2] += ",surprise"  # the second data row
    csv.write_text("\n".join(lines) + "\n")
    result = load_table(mapping(csv))
    assert result.rows_in == 4 and len(result.valid) + len(result.quarantined) == 4
    assert result.valid["order_id"].tolist() == ["A1", "CA4"]  # the rows around it keep their values
    bad = result.quarantined.set_index(SOURCE_ROW)
    assert bad.loc[2, REASON] == "wrong_field_count" and bad.loc[2, "_raw_line"].endswith(",surprise")
    assert bad.loc[3, REASON] == "missing_customer_id"  # row numbers are the file's, not shifted


def test_rows_with_more_values_than_the_header_are_a_clear_error(tmp_path: Path) -> None:
    csv = tmp_path / "orders.csv"
    csv.write_text("".join(line + ",extra\n" if i else line + "\n" for i, line in enumerate(ORDERS_CSV.splitlines())))
    with pytest.raises(DataFileError, match="more fields than the header"):
        load_table(mapping(csv))


@pytest.mark.parametrize("header", ["cust,invoice,when,qty,price,cust", "cust,invoice,when,qty,price,cust "])
def test_a_header_naming_a_column_twice_is_a_clear_error(tmp_path: Path, header: str) -> None:
    csv = tmp_path / "orders.csv"
    csv.write_text(header + "\n1,A1,2024-01-02 10:00:00,2,3.50,X\n")
    with pytest.raises(DataFileError, match="more than once") as err:
        load_table(mapping(csv))
    assert err.value.column == "cust"


def test_a_source_column_mapped_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="more than one contract column"):
        TableMapping(table="transactions", path=Path("x.csv"), columns={**MAPPING, "order_id": "cust"})


def test_a_missing_mapped_column_names_the_file_and_the_column(tmp_path: Path) -> None:
    csv = tmp_path / "orders.csv"
    csv.write_text(ORDERS_CSV.replace("qty", "quantity_sold"))
    with pytest.raises(DataFileError) as err:
        load_table(mapping(csv))
    assert str(csv) in str(err.value) and "'qty'" in str(err.value)
    assert err.value.column == "qty"


def test_a_wrong_encoding_is_a_clear_error(tmp_path: Path) -> None:
    csv = tmp_path / "orders.csv"
    csv.write_bytes(ORDERS_CSV.replace("sku\n", "sku\n3,Ä1,2024-01-02 10:00:00,1,1,Z\n").encode("latin-1"))
    with pytest.raises(DataFileError, match="not utf-8 text.*csv.encoding"):
        load_table(mapping(csv))
    assert load_table(mapping(csv, csv=CsvOptions(encoding="latin-1"))).rows_in == 5


@pytest.mark.parametrize(("content", "message"), [
    ("", "the file is empty"),
    ("\n\n", "no columns"),
    ("cust,invoice,when,qty,price,sku\n", "header but no rows"),
])
def test_an_empty_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    csv = tmp_path / "orders.csv"
    csv.write_text(content)
    with pytest.raises(DataFileError, match=message):
        load_table(mapping(csv))


def test_a_missing_file_and_a_non_parquet_file_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no such file"):
        load_table(mapping(tmp_path / "nope.csv"))
    fake = tmp_path / "orders.parquet"
    fake.write_text(ORDERS_CSV)
    with pytest.raises(DataFileError, match="not a readable Parquet file"):
        load_table(mapping(fake))


def test_a_mapping_must_cover_the_contract() -> None:
    with pytest.raises(ValueError, match="needs a mapping for"):
        TableMapping(table="transactions", path=Path("x.csv"), columns={"customer_id": "a"})
    with pytest.raises(ValueError, match="unknown contract column"):
        TableMapping(table="events", path=Path("x.csv"),
                     columns={"customer_id": "a", "session_id": "b", "timestamp": "c", "event_type": "d", "colour": "e"})


def test_a_labeled_table_infers_types_and_quarantines_bad_rows(tmp_path: Path) -> None:
    csv = tmp_path / "churn.csv"
    csv.write_text("id,plan,spend,active,left\n"
                   "a,gold,10.5,TRUE,yes\nb,silver,,FALSE,no\nb,gold,3,TRUE,no\nc,gold,1,TRUE,\nd,free,0,FALSE,No\n"
                   "d,free,0,FALSE,No\n")
    table = load_labeled(LabeledTableSpec(path=csv, id_column="id", label_column="left", positive="Yes"))
    assert table.numeric == ["spend"] and table.categorical == ["plan"] and table.boolean == ["active"]
    assert table.frame["id"].tolist() == ["a", "b", "d"]
    assert table.frame[LABEL].tolist() == [1, 0, 0]
    # b again with other values (the first row kept), d again as it was, c without a label
    assert table.result.reasons == {"repeated_id": 1, "duplicate": 1, "missing_label": 1}
    for column, problem in (("left", "the id column cannot be the label column"),
                            ("active", "not an id: 3 of 5 distinct rows repeat")):
        with pytest.raises(DataFileError, match=problem):
            load_labeled(LabeledTableSpec(path=csv, id_column=column, label_column="left", positive="Yes"))
    twice = tmp_path / "twice.csv"  # a file exported twice: its repeats are duplicates, its id still an id
    twice.write_text(csv.read_text() + "".join(csv.read_text().splitlines(keepends=True)[1:]))
    assert load_labeled(LabeledTableSpec(path=twice, id_column="id", label_column="left",
                                         positive="Yes")).result.reasons["duplicate"] == 6
    blank = tmp_path / "blank.csv"
    blank.write_text("id,spend,left\n,1,yes\n,2,no\n")
    with pytest.raises(DataFileError, match="the id column is entirely missing"):
        load_labeled(LabeledTableSpec(path=blank, id_column="id", label_column="left", positive="yes"))


def test_a_labeled_table_sets_aside_columns_that_cannot_be_features(tmp_path: Path) -> None:
    n = 80
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "row": range(1, n + 1),  # a running row number
        "email": [f"u{i}@example.com" for i in range(n)],  # an identifier that is not the id column
        "notes": [""] * n,  # entirely missing
        "country": ["NL"] * n,  # one value on every row
        "promo": ["spring" if i % 3 == 0 else "" for i in range(n)],  # one value, but its absence says something
        "signed_up": [f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}" for i in range(n)],  # a date that is not the time
        "plan": rng.choice(["basic", "pro"], n),
        "spend": np.round(rng.gamma(2, 20, n), 2),
        "left": rng.choice(["yes", "no"], n),
    })
    csv = tmp_path / "t.csv"
    frame.to_csv(csv, index=False)
    table = load_labeled(LabeledTableSpec(path=csv, label_column="left", positive="yes"))
    assert set(table.ignored) == {"row", "email", "notes", "country", "signed_up"}
    assert table.ignored["notes"] == "entirely missing" and table.ignored["row"].startswith("a row number")
    assert table.ignored["signed_up"].startswith("a date or time")
    assert "identifier" in table.ignored["email"] and table.ignored["country"] == "one value on every row"
    assert table.numeric == ["spend"] and table.categorical == ["promo", "plan"] and table.boolean == []
    assert len(table.frame) == n and "email" in table.frame  # set aside, not lost

    parquet = tmp_path / "t.parquet"  # typed columns: a timestamp, an all-null float, pandas categories, a duration
    frame.assign(signed_up=pd.to_datetime(frame["signed_up"]), notes=np.nan, plan=frame["plan"].astype("category"),
                 waited=pd.to_timedelta(frame["spend"], unit="D")).to_parquet(parquet, index=False)
    table = load_labeled(LabeledTableSpec(path=parquet, label_column="left", positive="yes", drop_columns=("row",)))
    assert set(table.ignored) == {"email", "notes", "country", "signed_up", "waited"} and "row" not in table.frame
    assert table.ignored["waited"].startswith("a duration (timedelta)")
    # categories are read as their values (MLflow's signature could not take the dtype: training crashed at logging)
    assert "plan" in table.categorical and table.frame["plan"].dtype == object
    assert sorted(table.frame["plan"].unique()) == ["basic", "pro"]

    lookalikes = tmp_path / "lookalikes.csv"  # codes and versions that are not dates, dates that are
    pd.DataFrame({"speed": [f"{5 + i % 3}/10/20 Mbps" for i in range(n)],
                  "release": [f"2024.{1 + i % 3}.{i % 4}" for i in range(n)],
                  "bad_date": ["99/99/9999", "31/05/2024"] * (n // 2),
                  "worded": [f"{1 + i % 28} May 2024" for i in range(n)],
                  "Unnamed: 0": range(0, 2 * n, 2),  # pandas' index after a filter: increasing, with gaps
                  "left": frame["left"]}).to_csv(lookalikes, index=False)
    table = load_labeled(LabeledTableSpec(path=lookalikes, label_column="left", positive="yes"))
    assert set(table.ignored) == {"worded", "Unnamed: 0"} and table.categorical == ["speed", "release", "bad_date"]

    only_bad = tmp_path / "bad.csv"
    frame[["email", "notes", "left"]].to_csv(only_bad, index=False)
    with pytest.raises(DataFileError, match="no column can be a feature.*email: text with a distinct value"):
        load_labeled(LabeledTableSpec(path=only_bad, label_column="left", positive="yes"))


def test_a_labeled_table_in_another_separator_reads_decimal_commas_and_hints_the_separator(tmp_path: Path) -> None:
    csv = tmp_path / "eu.csv"
    csv.write_text("id;spend;fee;plan;left\na;29,85;1.234,5;gold;yes\nb;-3,5;7;silver;no\nc;12;8;gold;no\n")
    with pytest.raises(DataFileError, match="looks ';'-separated"):
        load_labeled(LabeledTableSpec(path=csv, id_column="id", label_column="left", positive="yes"))
    table = load_labeled(LabeledTableSpec(path=csv, id_column="id", label_column="left", positive="yes",
                                          csv=CsvOptions(sep=";")))
    assert table.numeric == ["spend", "fee"] and table.frame["spend"].tolist() == [29.85, -3.5, 12.0]
    assert table.frame["fee"].tolist() == [1234.5, 7.0, 8.0]  # a thousands dot beside a decimal comma
    assert CsvOptions(sep="\\t").sep == CsvOptions(sep="tab").sep == "\t"  # as typed in a shell or YAML
    comma = tmp_path / "us.csv"
    comma.write_text('id,spend,left\na,"29,85",yes\nb,"3,5",no\n')  # a comma-separated file keeps "29,85" text
    assert load_labeled(LabeledTableSpec(path=comma, id_column="id", label_column="left", positive="yes")).numeric == []


def test_a_numeric_label_matches_its_positive_value_as_a_number(tmp_path: Path) -> None:
    parquet = tmp_path / "t.parquet"  # a null turns Parquet's integer labels into floats: 1.0, 0.0
    pd.DataFrame({"id": ["a", "b", "c", "d"], "x": [1, 2, 3, 4], "y": [1.0, 0.0, None, 1.0]}).to_parquet(parquet)
    table = load_labeled(LabeledTableSpec(path=parquet, id_column="id", label_column="y", positive="1"))
    assert table.frame[LABEL].tolist() == [1, 0, 1] and table.result.reasons == {"missing_label": 1}
    big = tmp_path / "big.csv"  # labels that differ in the seventh digit stay two classes
    pd.DataFrame({"x": [1, 2, 3], "y": [1000001, 1000002, 1000001]}).to_csv(big, index=False)
    assert load_labeled(LabeledTableSpec(path=big, label_column="y", positive="1000002")).frame[LABEL].tolist() == [
        0, 1, 0]


def test_dropping_the_label_id_or_time_and_a_feature_named_label_are_clear_errors(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("id,when,x,y\na,2024-01-01,1,yes\nb,2024-01-02,2,no\n")
    for column, what in (("y", "the label"), ("id", "the id"), ("when", "the time column")):
        with pytest.raises(DataFileError, match=f"cannot drop {what} column"):
            load_labeled(LabeledTableSpec(path=csv, id_column="id", time_column="when", label_column="y",
                                          positive="yes", drop_columns=(column,)))
    named = tmp_path / "named.csv"
    named.write_text("label,y\n1,yes\n0,no\n")
    with pytest.raises(DataFileError, match="'label' would be overwritten by the 0/1 target"):
        load_labeled(LabeledTableSpec(path=named, label_column="y", positive="yes"))


def test_a_labeled_table_needs_its_positive_value_and_two_classes(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("id,y\na,1\nb,2\nc,3\n")
    with pytest.raises(DataFileError, match="never occurs"):
        load_labeled(LabeledTableSpec(path=csv, label_column="y", positive="yes"))
    with pytest.raises(DataFileError, match="two values"):
        load_labeled(LabeledTableSpec(path=csv, label_column="y", positive="1"))
    with pytest.raises(DataFileError, match="'target'"):
        load_labeled(LabeledTableSpec(path=csv, label_column="target", positive="1"))


def test_a_labeled_tables_time_column_reads_the_format_it_is_given(tmp_path: Path) -> None:
    csv = tmp_path / "us.csv"
    csv.write_text("id,when,x,y\na,03/04/2024,1,yes\nb,12/31/2024,2,no\n")  # month first: never guessed
    spec = LabeledTableSpec(path=csv, id_column="id", time_column="when", label_column="y", positive="yes")
    assert load_labeled(spec).result.reasons == {"unparseable_time": 2}
    dated = load_labeled(spec.model_copy(update={"timestamp_format": "%m/%d/%Y"}))
    assert dated.frame["when"].dt.strftime("%Y-%m-%d").tolist() == ["2024-03-04", "2024-12-31"]
