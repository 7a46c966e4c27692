"""Online serving speed: our BentoML service beside `mlflow models serve` and a minimal Starlette floor, one model.

    python bench/serving.py               # 50,000-row table, 10 s per load level, 1 worker: about 4 minutes
    python bench/serving.py --quick       # 5,000 rows, 4 s per load level: 2 to 3 minutes (servers start slowly)
    python bench/serving.py --workers 2   # every server with 2 worker processes

Set-up, in a temporary ``PERSONALIZE_HOME`` with its own SQLite MLflow registry: a seeded synthetic labeled table
(``--rows`` customers x 30 numeric features, a planted logistic truth) is ingested
(:func:`features.pipeline.ingest_labeled`), trained with a one-trial XGBoost study
(:func:`training.train.train_and_register`) and force-promoted to ``churn@champion``
(:func:`training.registry.promote`). Every measurement below scores that one champion, loaded the way the service
loads it (:func:`serving.scoring.load`), on the same few hundred single-customer feature records from the table,
cycled in the same order.

- in process: the booster's own predict on a one-row float matrix (``Classifier._raw``, the floor; and the same
  booster set to one thread, as the HTTP floor runs it), our whole
  scoring call (``Classifier.score([record])``: the record check is not in it, the matrix, predict and calibration
  are) and the service's request handler without HTTP (``Runtime.classify``: checks, scoring, answer, prediction
  log); medians in microseconds;
- over HTTP on loopback, one server at a time (each killed, with its whole process group, before the next starts):
  ``starlette``, a minimal Starlette app under ``uvicorn --workers N`` that parses the JSON, predicts with the same
  booster and answers JSON (the HTTP floor; its booster is set to ``nthread=1``, what a server scoring one row per
  call should do: with XGBoost's default of every core, OpenMP threads wait on each other and on the load
  generator, and a one-row predict takes milliseconds instead of microseconds); ``mlflow``, ``mlflow models serve -m models:/churn@champion
  --env-manager local --workers N`` (the peer; body ``{"dataframe_records": [record]}``); ``service``, our
  ``personalize serve --workers N`` (body ``{"features": record}``, and once more with ``"explain": true`` at
  concurrency 1). Each server is waited for (ready and answering), its answers are checked against the in-process
  scores, it is warmed up, then loaded at concurrency 1 and 32 for ``--duration`` seconds each by ``wrk`` (one
  thread, a Lua script cycling through the records, keep-alive connections) or, without ``/usr/bin/wrk``, by an
  asyncio/aiohttp load generator in its own process. Figures: requests/s, p50 and p99 latency, and errors (non-2xx
  answers plus socket errors and timeouts);
- batch: :func:`serving.batch.score_matrix` over every row of the table beside the booster's predict on the same
  float matrix, rows/s, median of 3.

The load generator shares the machine with the server (and with anything else running), so absolute figures move
with the host; the ratios between servers, measured minutes apart in one run, are the comparable part. The table
ends with the issue's targets (met / NOT met); the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEED = 42
FEATURES = 30
DATASET = "benchchurn"
MODEL = "churn"
RECORDS = 300  # distinct single-customer records cycled by every load generator
WRK = Path("/usr/bin/wrk")
BIN = Path(sys.executable).parent
CONCURRENCY = (1, 32)
# the targets
TARGET_VS_MLFLOW = 5.0  # service / mlflow requests/s at concurrency 32, at least
TARGET_VS_FLOOR = 0.5  # service / starlette requests/s at concurrency 32, at least
TARGET_P50_OVERHEAD_MS = 1.5  # service p50 minus starlette p50 at concurrency 1, at most
TARGET_P99_MS = 60.0  # service p99 at concurrency 32, at most
TARGET_BATCH = 0.67  # score_matrix rows/s over raw booster rows/s, at least


# --- set-up: a champion in a temporary registry ----------------------------------------------------------------
def synthetic_table(rows: int, seed: int = SEED) -> pd.DataFrame:
    """``rows`` customers, 30 numeric features (counts, amounts, rates, scores; 2% missing in a few) and a 0/1
    churn label drawn from a planted logistic truth with two interactions."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for k in range(FEATURES):
        kind = k % 3
        if kind == 0:
            cols[f"count_{k:02d}"] = rng.poisson(1 + k % 5, rows).astype(float)
        elif kind == 1:
            cols[f"amount_{k:02d}"] = np.round(rng.lognormal(3, 1, rows), 2)
        else:
            cols[f"score_{k:02d}"] = np.round(rng.normal(0, 1, rows), 4)
    frame = pd.DataFrame(cols)
    z = (frame - frame.mean()) / frame.std()
    beta = rng.normal(0, 0.6, FEATURES) * (rng.random(FEATURES) < 0.5)
    logit = -1.2 + z.to_numpy() @ beta + 0.5 * z.iloc[:, 0] * z.iloc[:, 1] - 0.4 * np.abs(z.iloc[:, 2])
    label = rng.random(rows) < 1 / (1 + np.exp(-logit))
    for c in list(frame.columns)[-3:]:
        frame.loc[rng.random(rows) < 0.02, c] = np.nan
    frame.insert(0, "customer_id", [f"C{i:07d}" for i in range(rows)])
    frame["churned"] = np.where(label, "yes", "no")
    return frame


def build_champion(settings: Any, rows: int, tmp: Path) -> dict[str, Any]:
    """Ingest the table, train a one-trial XGBoost churn model, register and force-promote it."""
    from features.labeled import LabeledTableSpec, load_labeled
    from features.pipeline import ingest_labeled
    from training.registry import GateConfig, connect, promote
    from training.train import TrainConfig, train_and_register
    from training.tune import TuneConfig

    started = time.perf_counter()
    client = connect(settings.tracking_uri)
    path = tmp / f"{DATASET}.parquet"
    synthetic_table(rows).to_parquet(path, index=False)
    ingest_labeled(settings, DATASET, load_labeled(LabeledTableSpec(path=path, label_column="churned",
                                                                    positive="yes", id_column="customer_id")))
    tune = TuneConfig(trials=1, families=("xgboost",), max_rounds=300, early_stopping_rounds=30, cv_folds=None,
                      seed=SEED)
    outcome = train_and_register(settings, "churn", DATASET, TrainConfig(tune=tune), model_name=MODEL)
    promote(client, MODEL, GateConfig(bootstrap_rounds=200), reason="bench", force=True)
    return {"client": client, "version": outcome.version, "test_auc": outcome.trained.test_metrics["roc_auc"],
            "rounds": outcome.trained.model.rounds, "setup_s": time.perf_counter() - started}


def feature_records(frame: pd.DataFrame, features: list[str], n: int) -> list[dict[str, Any]]:
    """The first ``n`` rows as JSON-ready records: whole numbers as int, missing as None."""
    out = []
    for row in frame[features].iloc[:n].itertuples(index=False):
        out.append({c: (None if v != v else int(v) if float(v).is_integer() else float(v))
                    for c, v in zip(features, row)})
    return out


# --- in process ------------------------------------------------------------------------------------------------
def median_us(fn, args: list[Any], repeat: int, budget_s: float = 5.0) -> float:
    """Median wall time of ``fn(a)`` over ``repeat`` calls cycling through ``args`` (fewer if the budget runs out)."""
    for a in args[:20]:
        fn(a)
    times: list[int] = []
    deadline = time.perf_counter() + budget_s
    for k in range(repeat):
        a = args[k % len(args)]
        t = time.perf_counter_ns()
        fn(a)
        times.append(time.perf_counter_ns() - t)
        if time.perf_counter() > deadline and len(times) >= 50:
            break
    return statistics.median(times) / 1000


def in_process_figures(scorer: Any, records: list[dict[str, Any]], config: Any, client: Any,
                       repeat: int) -> dict[str, float]:
    from serving.api import Runtime

    matrices = [np.array([[np.nan if r[c] is None else float(r[c]) for c in scorer.features]]) for r in records]
    single = scorer.booster.copy()
    single.set_param({"nthread": 1})
    figures = {"raw_us": median_us(scorer._raw, matrices, repeat),
               "raw_1thread_us": median_us(lambda x: single.inplace_predict(x, iteration_range=(0, scorer.model.rounds),
                                                                            validate_features=False), matrices, repeat),
               "score_us": median_us(lambda r: scorer.score([r]), records, repeat)}
    runtime = Runtime(config, client, start_reloader=False, freeze_heap=False)
    try:
        figures["classify_us"] = median_us(lambda r: runtime.classify("churn", features=r), records, repeat)
        figures["classify_explain_us"] = median_us(lambda r: runtime.classify("churn", features=r, explain=True),
                                                   records, repeat // 5)
    finally:
        runtime.close()
    return figures


def batch_figures(scorer: Any, frame: pd.DataFrame, repeats: int = 3) -> dict[str, float]:
    """rows/s of score_matrix over the whole table beside the booster on the same float matrix."""
    from serving.batch import score_matrix

    x = frame[scorer.features].to_numpy(dtype=float, na_value=np.nan)
    ours, raw = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        p = score_matrix(scorer, frame)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        r = scorer._raw(x)
        raw.append(time.perf_counter() - t)
    if not np.allclose(p, scorer.calibrator.transform(r)):
        raise SystemExit("score_matrix and the booster disagree on the same rows")
    return {"batch_rows_per_s": len(frame) / statistics.median(ours), "raw_rows_per_s": len(frame) / statistics.median(raw)}


# --- servers ---------------------------------------------------------------------------------------------------
FLOOR_APP = '''"""The HTTP floor: parse the JSON record, predict with the booster, answer JSON."""
import json
import os

import numpy as np
import xgboost as xgb
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

META = json.loads(open(os.environ["BENCH_FLOOR_META"]).read())
BOOSTER = xgb.Booster()
BOOSTER.load_model(META["booster"])
BOOSTER.set_param({"nthread": 1})  # one row at a time: OpenMP threads would only wait on each other
FEATURES, ROUNDS = META["features"], META["rounds"]


async def churn(request):
    record = json.loads(await request.body())["features"]
    x = np.array([[np.nan if (v := record.get(c)) is None else float(v) for c in FEATURES]])
    p = float(BOOSTER.inplace_predict(x, iteration_range=(0, ROUNDS), validate_features=False)[0])
    return Response(json.dumps({"probability": p}), media_type="application/json")


app = Starlette(routes=[Route("/churn", churn, methods=["POST"])])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()[:300]


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


class Server:
    """One server in its own process group; stopping it kills the whole group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], logfile: Path, port: int, path: str,
                 ready_path: str | None = None) -> None:
        self.name, self.cmd, self.env, self.logfile, self.port = name, cmd, env, logfile, port
        self.url = f"http://127.0.0.1:{port}{path}"
        self.ready_url = f"http://127.0.0.1:{port}{ready_path}" if ready_path else None
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        with open(self.logfile, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM the process group and every descendant (BentoML's workers run in sessions of their own), then
        SIGKILL whatever is left after 15 s."""
        if self.proc is None:
            return
        pids = {self.proc.pid, *descendants(self.proc.pid)}
        for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            pids |= descendants(self.proc.pid)
            for kill, target in ((os.killpg, self.proc.pid), *((os.kill, p) for p in pids)):
                try:
                    kill(target, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and alive(pids, self.proc.pid):
                self.proc.poll()
                time.sleep(0.1)
            if not alive(pids, self.proc.pid):
                break
        self.proc.wait(timeout=5)
        self.proc = None

    def wait_ready(self, body: bytes, timeout_s: float = 180) -> float:
        """Seconds until the server answers 200 (its readiness probe first, when it has one)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if (self.ready_url is None or get_status(self.ready_url) == 200) and post(self.url, body)[0] == 200:
                    return time.monotonic() - started
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])


def _stat() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) of every live process."""
    out = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(path.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return out


def descendants(pid: int) -> set[int]:
    stat = _stat()
    children: dict[int, list[int]] = {}
    for p, (ppid, _, _) in stat.items():
        children.setdefault(ppid, []).append(p)
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pids: set[int], pgid: int) -> bool:
    """Any of ``pids``, or any member of the group ``pgid``, still running (zombies do not count)."""
    return any((p in pids or g == pgid) and state != "Z" for p, (_, g, state) in _stat().items())


# --- load generation -------------------------------------------------------------------------------------------
WRK_SCRIPT = """
local bodies = {%s}
local requests = {}
local n = #bodies
local i = 0
init = function(args)
  for k = 1, n do
    requests[k] = wrk.format("POST", "%s", {["Content-Type"] = "application/json"}, bodies[k])
  end
end
request = function()
  i = i %% n + 1
  return requests[i]
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH {"requests": %%d, "duration_us": %%d, "socket_errors": %%d, "non_2xx": %%d, ' ..
    '"p50_us": %%.1f, "p99_us": %%.1f, "max_us": %%.1f}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def wrk_load(url: str, bodies: list[bytes], concurrency: int, duration: float, tmp: Path) -> dict[str, float]:
    path = "/" + url.split("/", 3)[3]
    script = tmp / "load.lua"
    script.write_text(WRK_SCRIPT % (", ".join(f"[==[{b.decode()}]==]" for b in bodies), path))
    cmd = [str(WRK), "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "10s",
           "-s", str(script), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(line[6:])


async def _python_load(url: str, bodies: list[bytes], concurrency: int, duration: float) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    counts = {"socket_errors": 0, "non_2xx": 0}
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        started = time.perf_counter()
        deadline = started + duration

        async def user(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                body = bodies[i % len(bodies)]
                i += concurrency
                t = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        await response.read()
                        if not 200 <= response.status < 300:
                            counts["non_2xx"] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    counts["socket_errors"] += 1
                    continue
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(user(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1e6 if latencies else np.array([np.nan])
    return {"requests": len(latencies) + counts["socket_errors"], "duration_us": elapsed * 1e6, **counts,
            "p50_us": float(np.percentile(ms, 50)), "p99_us": float(np.percentile(ms, 99)), "max_us": float(ms.max())}


def python_load(url: str, bodies: list[bytes], concurrency: int, duration: float, tmp: Path) -> dict[str, float]:
    """The fallback load generator, in its own process so it does not share this one's interpreter."""
    path = tmp / "bodies.json"
    path.write_text(json.dumps([b.decode() for b in bodies]))
    cmd = [sys.executable, __file__, "--load", url, "--bodies", str(path), "--concurrency", str(concurrency),
           "--duration", str(duration)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load(url: str, bodies: list[bytes], concurrency: int, duration: float, tmp: Path, loader: str) -> dict[str, float]:
    raw = (wrk_load if loader == "wrk" else python_load)(url, bodies, concurrency, duration, tmp)
    seconds = raw["duration_us"] / 1e6
    return {"rps": (raw["requests"] - raw["socket_errors"] - raw["non_2xx"]) / seconds, "p50_ms": raw["p50_us"] / 1e3,
            "p99_ms": raw["p99_us"] / 1e3, "errors": int(raw["socket_errors"] + raw["non_2xx"]),
            "requests": int(raw["requests"])}


# --- one server's measurements ---------------------------------------------------------------------------------
def check_answers(server: Server, bodies: list[bytes], expected: np.ndarray, extract) -> float:
    """Largest |answer - in-process score| over the first records; raises if a server scores another model."""
    worst = 0.0
    for body, want in zip(bodies[:20], expected[:20]):
        status, answer = post(server.url, body)
        if status != 200:
            raise RuntimeError(f"{server.name} answered {status}: {answer!r}")
        worst = max(worst, abs(extract(answer) - float(want)))
    if worst > 1e-5:
        raise RuntimeError(f"{server.name} scores differ from the in-process model by up to {worst:.2e}")
    return worst


def measure_server(server: Server, bodies: list[bytes], expected: np.ndarray, extract, duration: float, tmp: Path,
                   loader: str, extra: dict[str, list[bytes]] | None = None) -> dict[str, Any]:
    with server:
        ready_s = server.wait_ready(bodies[0])
        print(f"  {server.name:9s} ready in {ready_s:.1f}s", flush=True)
        diff = check_answers(server, bodies, expected, extract)
        load(server.url, bodies, 32, 1.0, tmp, loader)  # warm-up, discarded
        out: dict[str, Any] = {"ready_s": ready_s, "max_abs_diff": diff}
        for c in CONCURRENCY:
            out[f"c{c}"] = load(server.url, bodies, c, duration, tmp, loader)
            print(f"  {server.name:9s} c{c:<3d} {out[f'c{c}']['rps']:8.0f} req/s  p50 {out[f'c{c}']['p50_ms']:6.2f} ms"
                  f"  p99 {out[f'c{c}']['p99_ms']:6.2f} ms  errors {out[f'c{c}']['errors']}", flush=True)
        for label, other in (extra or {}).items():
            out[label] = load(server.url, other, 1, duration, tmp, loader)
            print(f"  {server.name:9s} {label} {out[label]['rps']:8.0f} req/s  p50 {out[label]['p50_ms']:6.2f} ms",
                  flush=True)
    return out


def http_figures(settings: Any, scorer: Any, records: list[dict[str, Any]], workers: int, duration: float,
                 tmp: Path, loader: str) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PERSONALIZE_HOME": str(settings.home.resolve()), "MLFLOW_TRACKING_URI": settings.tracking_uri,
           "PERSONALIZE_OPTUNA_STORAGE": settings.optuna_storage_url, "BENTOML_HOME": str(tmp / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "True", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "PYTHONUNBUFFERED": "1"}
    booster = tmp / "floor" / "booster.ubj"
    booster.parent.mkdir()
    if scorer.lightgbm:
        raise SystemExit("the Starlette floor predicts with an XGBoost booster; the champion is LightGBM")
    scorer.booster.save_model(str(booster))
    (tmp / "floor" / "meta.json").write_text(json.dumps({"booster": str(booster), "features": scorer.features,
                                                          "rounds": scorer.model.rounds}))
    (tmp / "floor" / "floor_app.py").write_text(FLOOR_APP)
    matrix = np.array([[np.nan if r[c] is None else float(r[c]) for c in scorer.features] for r in records])
    raw, calibrated = scorer._raw(matrix), scorer.score(records)
    ours = [json.dumps({"features": r}).encode() for r in records]
    peer = [json.dumps({"dataframe_records": [r]}).encode() for r in records]
    explain = [json.dumps({"features": r, "explain": True}).encode() for r in records]
    n = str(workers)
    out = {}
    port = free_port()
    out["starlette"] = measure_server(
        Server("starlette", [str(BIN / "uvicorn"), "floor_app:app", "--app-dir", str(tmp / "floor"), "--host",
                             "127.0.0.1", "--port", str(port), "--workers", n, "--no-access-log", "--log-level",
                             "warning"],
               {**env, "BENCH_FLOOR_META": str(tmp / "floor" / "meta.json")}, tmp / "starlette.log", port, "/churn"),
        ours, raw, lambda a: a["probability"], duration, tmp, loader)
    port = free_port()
    out["mlflow"] = measure_server(
        Server("mlflow", [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
                          "local", "-h", "127.0.0.1", "-p", str(port), "--workers", n],
               env, tmp / "mlflow.log", port, "/invocations", "/ping"),
        peer, calibrated, lambda a: a["predictions"][0]["probability"], duration, tmp, loader)
    port = free_port()
    out["service"] = measure_server(
        Server("service", [str(BIN / "personalize"), "serve", "--port", str(port), "--workers", n, "--dataset",
                           DATASET], env, tmp / "service.log", port, "/churn", "/readyz"),
        ours, np.round(calibrated, 6), lambda a: a["results"][0]["probability"], duration, tmp, loader,
        {"explain_c1": explain})
    return out


# --- report ----------------------------------------------------------------------------------------------------
def print_tables(http: dict[str, dict[str, Any]], figures: dict[str, Any], workers: int, loader: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    table = Table(title=f"Single-row churn scoring over loopback HTTP, {workers} worker(s) per server, "
                        f"{figures['duration_s']:g} s per level, load by {loader}")
    for col in ("server", "c1 req/s", "c1 p50 ms", "c1 p99 ms", "c32 req/s", "c32 p50 ms", "c32 p99 ms", "errors"):
        table.add_column(col, justify="left" if col == "server" else "right")
    labels = {"starlette": "starlette + booster (floor)", "mlflow": "mlflow models serve (peer)",
              "service": "personalize serve (ours)"}
    for name, label in labels.items():
        s = http[name]
        errors = sum(s[k]["errors"] for k in s if isinstance(s[k], dict))
        table.add_row(label, f"{s['c1']['rps']:,.0f}", f"{s['c1']['p50_ms']:.2f}", f"{s['c1']['p99_ms']:.2f}",
                      f"{s['c32']['rps']:,.0f}", f"{s['c32']['p50_ms']:.2f}", f"{s['c32']['p99_ms']:.2f}", str(errors))
    e = http["service"]["explain_c1"]
    table.add_row("personalize serve, explain", f"{e['rps']:,.0f}", f"{e['p50_ms']:.2f}", f"{e['p99_ms']:.2f}", "", "",
                  "", str(e["errors"]))
    console.print(table)

    inproc = Table(title="In process, one record per call (median µs) and batch (rows/s, median of 3)")
    for col in ("path", "figure"):
        inproc.add_column(col, justify="left" if col == "path" else "right")
    inproc.add_row("booster predict, 1-row matrix (Classifier._raw)", f"{figures['raw_us']:.0f} µs")
    inproc.add_row("the same, booster set to 1 thread (as in the floor)", f"{figures['raw_1thread_us']:.0f} µs")
    inproc.add_row(escape("Classifier.score([record])"), f"{figures['score_us']:.0f} µs")
    inproc.add_row("Runtime.classify (the service's handler, no HTTP)", f"{figures['classify_us']:.0f} µs")
    inproc.add_row("Runtime.classify with explain", f"{figures['classify_explain_us']:.0f} µs")
    inproc.add_row(f"score_matrix over {figures['rows']:,} rows", f"{figures['batch_rows_per_s']:,.0f} rows/s")
    inproc.add_row("booster predict on the same float matrix", f"{figures['raw_rows_per_s']:,.0f} rows/s")
    console.print(inproc)

    targets = Table(title="Targets (issue #4)")
    for col in ("figure", "value", "target", ""):
        targets.add_column(col, justify="left" if col in ("figure", "") else "right")
    for label, value, text, met in target_rows(figures):
        targets.add_row(label, value, text, "met" if met else "NOT met")
    console.print(targets)


def target_rows(f: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    vs_mlflow = f["service_rps_c32"] / f["mlflow_rps_c32"]
    vs_floor = f["service_rps_c32"] / f["starlette_rps_c32"]
    overhead = f["service_p50_c1_ms"] - f["starlette_p50_c1_ms"]
    batch = f["batch_rows_per_s"] / f["raw_rows_per_s"]
    return [("service / mlflow req/s at c32", f"{vs_mlflow:.2f}x", f">= {TARGET_VS_MLFLOW:g}x",
             vs_mlflow >= TARGET_VS_MLFLOW),
            ("service / starlette req/s at c32", f"{vs_floor:.2f}x", f">= {TARGET_VS_FLOOR:g}x",
             vs_floor >= TARGET_VS_FLOOR),
            ("service p50 - starlette p50 at c1", f"{overhead:+.2f} ms", f"<= {TARGET_P50_OVERHEAD_MS:g} ms",
             overhead <= TARGET_P50_OVERHEAD_MS),
            ("service p99 at c32", f"{f['service_p99_c32_ms']:.1f} ms", f"<= {TARGET_P99_MS:g} ms",
             f["service_p99_c32_ms"] <= TARGET_P99_MS),
            ("score_matrix / raw booster rows/s", f"{batch:.2f}x", f">= {TARGET_BATCH:g}x", batch >= TARGET_BATCH),
            ("service errors", str(f["errors"]), "0", f["errors"] == 0)]


# --- the driver ------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5,000 rows, 4 s per load level")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of every server")
    parser.add_argument("--duration", type=float, default=None, help="seconds per load level (default 10, quick 4)")
    parser.add_argument("--rows", type=int, default=None, help="rows of the synthetic table (default 50,000)")
    parser.add_argument("--loader", choices=["wrk", "python"], default="wrk" if WRK.exists() else "python",
                        help="load generator (default: wrk when /usr/bin/wrk exists)")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # the python load generator's worker mode
    parser.add_argument("--bodies", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        bodies = [b.encode() for b in json.loads(args.bodies.read_text())]
        print(json.dumps(asyncio.run(_python_load(args.load, bodies, args.concurrency, args.duration))))
        return
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    rows = args.rows or (5_000 if args.quick else 50_000)
    duration = args.duration or (4.0 if args.quick else 10.0)

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import mlflow  # noqa: F401  (configures its loggers on import: quiet them after)
    import optuna

    for noisy in ("mlflow", "alembic", "optuna"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from personalize.settings import Settings
    from serving.config import ServeConfig
    from serving.scoring import load as load_model

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as name:
        tmp = Path(name)
        home = tmp / "home"
        settings = Settings(home=home, optuna_storage=f"sqlite:///{(home / 'optuna.db').resolve()}")
        os.environ.pop("MLFLOW_REGISTRY_URI", None)  # this process's registry is the temporary one only
        os.environ.update({"PERSONALIZE_HOME": str(home), "MLFLOW_TRACKING_URI": settings.tracking_uri})
        setup = build_champion(settings, rows, tmp)
        loaded = load_model(setup["client"], MODEL, "champion")
        scorer = loaded.scorer
        print(f"set-up: {rows:,} rows x {FEATURES} features, churn v{loaded.version} champion ({scorer.model.family}, "
              f"{setup['rounds']} rounds, test ROC-AUC {setup['test_auc']:.3f}) in {setup['setup_s']:.0f}s",
              flush=True)
        frame = pd.read_parquet(settings.dataset_dir(DATASET) / "table.parquet")
        records = feature_records(frame, scorer.features, RECORDS)
        config = ServeConfig(home=home, tracking_uri=settings.tracking_uri, dataset=DATASET,
                             prediction_log=tmp / "inprocess-predictions")
        figures: dict[str, Any] = in_process_figures(scorer, records, config, setup["client"],
                                                     1_000 if args.quick else 5_000)
        figures.update(batch_figures(scorer, frame))
        print(f"in process: raw {figures['raw_us']:.0f} µs (1 thread {figures['raw_1thread_us']:.0f}), score {figures['score_us']:.0f} µs, classify "
              f"{figures['classify_us']:.0f} µs; batch {figures['batch_rows_per_s']:,.0f} rows/s vs raw "
              f"{figures['raw_rows_per_s']:,.0f}", flush=True)
        http = http_figures(settings, scorer, records, args.workers, duration, tmp, args.loader)
    s, m, f = http["service"], http["mlflow"], http["starlette"]
    figures.update({"rows": rows, "duration_s": duration})
    out = {
        "bench": "serving",
        "workers": args.workers,
        "service_rps_c32": round(s["c32"]["rps"], 1),
        "mlflow_rps_c32": round(m["c32"]["rps"], 1),
        "starlette_rps_c32": round(f["c32"]["rps"], 1),
        "service_p50_c1_ms": round(s["c1"]["p50_ms"], 3),
        "starlette_p50_c1_ms": round(f["c1"]["p50_ms"], 3),
        "service_p99_c32_ms": round(s["c32"]["p99_ms"], 2),
        "errors": sum(s[k]["errors"] for k in ("c1", "c32", "explain_c1")),
        "explain_p50_c1_ms": round(s["explain_c1"]["p50_ms"], 3),
        "batch_rows_per_s": round(figures["batch_rows_per_s"]),
        "raw_rows_per_s": round(figures["raw_rows_per_s"]),
        "mlflow_p50_c1_ms": round(m["c1"]["p50_ms"], 3),
        "service_rps_c1": round(s["c1"]["rps"], 1),
        "starlette_rps_c1": round(f["c1"]["rps"], 1),
        "mlflow_rps_c1": round(m["c1"]["rps"], 1),
        "starlette_p99_c32_ms": round(f["c32"]["p99_ms"], 2),
        "mlflow_p99_c32_ms": round(m["c32"]["p99_ms"], 2),
        "raw_us": round(figures["raw_us"], 1),
        "raw_1thread_us": round(figures["raw_1thread_us"], 1),
        "score_us": round(figures["score_us"], 1),
        "classify_us": round(figures["classify_us"], 1),
        "peer_errors": sum(x[k]["errors"] for x in (m, f) for k in ("c1", "c32")),
        "quick": args.quick,
        "rows": rows,
        "duration_s": duration,
        "loader": args.loader,
        "cores": os.cpu_count(),
        "bench_s": round(time.perf_counter() - started, 1),
    }
    print()
    print_tables(http, {**figures, **out}, args.workers, args.loader)
    print(f"{os.cpu_count()} cores (load generator and server share them), {out['bench_s']:.0f}s in all")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
