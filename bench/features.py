"""Point-in-time features for N synthetic customers: the Ibis/DuckDB path beside a plain pandas peer.

    python bench/features.py            # 1,000,000 customers (~20M transactions), 3 repeats
    python bench/features.py --quick    # 100,000 customers, 1 repeat: about a minute

Three measurements, each in a fresh subprocess (so each has its own peak RSS), over the same Parquet files and
one cutoff, timed from reading the files to the result frame in memory:

- ``duckdb``: the RFM block of ``customer_features_v1`` (recency, frequency, monetary, 30/90-day orders and
  spend, inter-purchase gaps) through Ibis on DuckDB;
- ``pandas``: the same columns with plain pandas groupbys, the peer;
- ``duckdb_full``: the whole feature set (all columns, including returns and category shares).

Before timing is reported, the DuckDB and pandas results are compared value by value: the bench fails if they
differ. Figures are medians over the repeats; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RFM = ["frequency", "monetary_total", "monetary_mean", "recency_days", "first_purchase_days", "orders_30d",
       "orders_90d", "spend_30d", "spend_90d", "ipi_mean_days", "ipi_std_days"]


# --- the measured paths (run in a worker subprocess) -----------------------------------------------------------
def run_duckdb(data: Path, cutoff: pd.Timestamp, categories: tuple[str, ...], full: bool) -> pd.DataFrame:
    from features.definitions import FeatureSpec, order_features
    from features.store import FeatureStore

    store = FeatureStore(data)  # connects and registers the Parquet files: part of the measured work
    spec = FeatureSpec(categories=categories)
    if full:
        return store.offline([cutoff], spec)
    rfm, _, _ = order_features(store.entities([cutoff]), store.transactions, spec)
    return rfm.select("customer_id", *RFM).to_pandas()


def run_pandas(data: Path, cutoff: pd.Timestamp) -> pd.DataFrame:
    customers = pd.read_parquet(data / "customers.parquet", columns=["customer_id", "signup_at"])
    tx = pd.read_parquet(data / "transactions.parquet",
                         columns=["customer_id", "order_id", "timestamp", "amount", "is_return"])
    known = customers.loc[customers["signup_at"] < cutoff, "customer_id"]
    tx = tx[(tx["timestamp"] < cutoff) & ~tx["is_return"] & tx["customer_id"].isin(known)]
    orders = tx.groupby(["customer_id", "order_id"], sort=False).agg(ts=("timestamp", "min"), value=("amount", "sum"))
    age = (cutoff - orders["ts"]).dt.total_seconds() / 86_400
    orders = orders.assign(in30=age <= 30, in90=age <= 90)
    orders["v30"] = orders["value"].where(orders["in30"], 0.0)
    orders["v90"] = orders["value"].where(orders["in90"], 0.0)
    g = orders.groupby(level="customer_id", sort=False)
    out = g.agg(frequency=("value", "size"), monetary_total=("value", "sum"), last=("ts", "max"),
                first=("ts", "min"), orders_30d=("in30", "sum"), orders_90d=("in90", "sum"),
                spend_30d=("v30", "sum"), spend_90d=("v90", "sum"))
    out["monetary_mean"] = out["monetary_total"] / out["frequency"]
    out["recency_days"] = (cutoff - out["last"]).dt.total_seconds() / 86_400
    out["first_purchase_days"] = (cutoff - out["first"]).dt.total_seconds() / 86_400
    days = tx.assign(day=tx["timestamp"].dt.floor("D"))[["customer_id", "day"]].drop_duplicates()
    days = days.sort_values(["customer_id", "day"])
    days["gap"] = days.groupby("customer_id", sort=False)["day"].diff().dt.days
    gaps = days.groupby("customer_id", sort=False)["gap"].agg(ipi_mean_days="mean", ipi_std_days="std")
    return out.join(gaps).reset_index()[["customer_id", *RFM]]


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM): unlike ru_maxrss it does not carry the parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    cutoff = pd.Timestamp(args.cutoff)
    import features.definitions  # noqa: F401  imports are not part of the measured work
    import features.store  # noqa: F401

    started = time.perf_counter()
    if args.worker == "pandas":
        frame = run_pandas(args.data, cutoff)
    else:
        frame = run_duckdb(args.data, cutoff, tuple(args.categories), full=args.worker == "duckdb_full")
    seconds = time.perf_counter() - started
    if args.out:
        frame.to_parquet(args.out, index=False)
    print(json.dumps({"seconds": seconds, "rows": len(frame), "columns": frame.shape[1],
                      "peak_rss_gib": peak_rss_gib()}))


# --- the driver ------------------------------------------------------------------------------------------------
def measure(kind: str, data: Path, cutoff: pd.Timestamp, categories: tuple[str, ...],
            out: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(data), "--cutoff", str(cutoff),
           "--categories", *categories]
    if out:
        cmd += ["--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(duck: pd.DataFrame, peer: pd.DataFrame) -> dict[str, float]:
    """Largest absolute difference per column; raise if the two paths do not compute the same thing."""
    a = duck.set_index("customer_id").sort_index()
    b = peer.set_index("customer_id").sort_index()
    if not a.index.equals(b.index):
        raise SystemExit(f"duckdb and pandas disagree on the customers: {len(a)} vs {len(b)}")
    diffs = {}
    for col in RFM:
        x, y = a[col].astype(float), b[col].astype(float)
        if not (x.isna() == y.isna()).all():
            raise SystemExit(f"duckdb and pandas disagree on which {col} values are missing")
        diff = (x - y).abs().max()
        diffs[col] = 0.0 if pd.isna(diff) else float(diff)
        tolerance = 1e-6 * max(1.0, float(y.abs().max()))
        if diffs[col] > tolerance:
            raise SystemExit(f"duckdb and pandas disagree on {col}: max abs difference {diffs[col]}")
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 customers, one repeat")
    parser.add_argument("--customers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--worker", choices=["duckdb", "duckdb_full", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cutoff", help=argparse.SUPPRESS)
    parser.add_argument("--categories", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from features.synthetic import SyntheticConfig, generate, write

    customers = args.customers or (100_000 if args.quick else 1_000_000)
    repeats = args.repeats or (1 if args.quick else 3)
    config = SyntheticConfig(customers=customers, events=False, seed=42)
    with tempfile.TemporaryDirectory(prefix="bench-features-") as tmp:
        data = Path(tmp) / "data"
        t0 = time.perf_counter()
        synthetic = generate(config)
        write(synthetic, data)
        transactions = len(synthetic.transactions)
        del synthetic
        print(f"generated {customers:,} customers, {transactions:,} transactions in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        cutoff = pd.Timestamp(config.end) - pd.Timedelta(days=90)
        runs: dict[str, list[dict]] = {"duckdb": [], "pandas": [], "duckdb_full": []}
        for r in range(repeats):
            for kind in runs:
                out = Path(tmp) / f"{kind}.parquet" if r == 0 and kind != "duckdb_full" else None
                runs[kind].append(measure(kind, data, cutoff, config.categories, out))
                print(f"  repeat {r + 1}/{repeats} {kind:12s} {runs[kind][-1]['seconds']:7.2f}s "
                      f"peak {runs[kind][-1]['peak_rss_gib']:.2f} GiB", flush=True)
        diffs = compare(pd.read_parquet(Path(tmp) / "duckdb.parquet"), pd.read_parquet(Path(tmp) / "pandas.parquet"))

    med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    peak = {k: max(x["peak_rss_gib"] for x in v) for k, v in runs.items()}
    rows = runs["duckdb"][0]["rows"]
    print()
    print(f"features for {customers:,} customers / {transactions:,} transactions, cutoff {cutoff.date()}, "
          f"median of {repeats}, {os.cpu_count()} cores")
    print(f"{'path':34s} {'seconds':>9s} {'rows/s':>12s} {'tx/s':>12s} {'peak GiB':>9s}")
    labels = {"duckdb": "Ibis on DuckDB, RFM block", "pandas": "pandas groupby, RFM block (peer)",
              "duckdb_full": f"Ibis on DuckDB, all {runs['duckdb_full'][0]['columns'] - 2} features"}
    for kind, label in labels.items():
        print(f"{label:34s} {med[kind]:9.2f} {rows / med[kind]:12,.0f} {transactions / med[kind]:12,.0f} "
              f"{peak[kind]:9.2f}")
    print(f"speedup pandas / duckdb (RFM block): {med['pandas'] / med['duckdb']:.2f}x   "
          f"values identical to within {max(diffs.values()):.1e}")
    print(json.dumps({
        "bench": "features",
        "customers": customers,
        "transactions": transactions,
        "duckdb_s": round(med["duckdb"], 3),
        "pandas_s": round(med["pandas"], 3),
        "speedup": round(med["pandas"] / med["duckdb"], 2),
        "peak_rss_gib": round(peak["duckdb"], 2),
        "duckdb_full_s": round(med["duckdb_full"], 3),
        "peak_rss_gib_full": round(peak["duckdb_full"], 2),
        "peak_rss_gib_pandas": round(peak["pandas"], 2),
    }))


if __name__ == "__main__":
    main()
