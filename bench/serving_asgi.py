"""Where a scoring request's time goes: the service's ASGI app called in process, with and without its middlewares.

    python bench/serving_asgi.py            # 5,000-row table, 4,000 calls per variant: about 1.5 minutes
    python bench/serving_asgi.py --quick    # 1,000 calls per variant

No HTTP and no load generator: each variant is one ``await app(scope, receive, send)`` per request on a fresh event
loop, the same single-record ``POST /churn`` bodies cycled, the median over the calls (after 300 warm-up calls).
Set-up as in ``bench/serving.py`` (one XGBoost champion, 300 rounds, 30 features, in a temporary
``PERSONALIZE_HOME``). Variants, each in its own process (the service registers its Prometheus metrics once per
process):

- ``floor``: the Starlette app of ``bench/serving.py``'s HTTP floor (parse, predict with the booster, answer);
- ``service``: ``serving.service:Personalization`` as BentoML builds it for a worker (``service.to_asgi``), every
  middleware on;
- ``service -X``: the same without middleware X (``OpenTelemetryMiddleware``: request spans, excluded for the
  scoring routes but still consulted; ``TimeoutMiddleware``: BentoML's request timeout, which its configuration
  cannot switch off; ``RequestMetrics``: our Prometheus request metrics). The difference to ``service`` is what X
  costs a request;
- ``classify``: ``Runtime.classify``, the service's handler without any HTTP or ASGI layer.

What the machine does beside the bench moves every figure; compare the rows of one run. The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WARMUP = 300
STRIPPABLE = ("OpenTelemetryMiddleware", "TimeoutMiddleware", "RequestMetrics")


def _bench_serving() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serving", REPO / "bench" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = module
    spec.loader.exec_module(module)
    return module


def _scope(body: bytes) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/churn", "raw_path": b"/churn", "root_path": "", "query_string": b"", "state": {},
            "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}


async def _time_app(app: Any, bodies: list[bytes], calls: int) -> float:
    """Median µs of one request through ``app``; every answer must be a 200."""
    cycle = itertools.cycle(bodies)

    async def one() -> None:
        body = next(cycle)
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(_scope(body), receive, send)
        if sent[0].get("status") != 200:
            raise RuntimeError(f"answered {sent[0].get('status')}: {sent[1:] and sent[1].get('body', b'')[:300]}")

    for _ in range(WARMUP):
        await one()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        await one()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def run_variant(variant: str, home: Path, floor: Path, calls: int) -> float:
    """One variant in this process (the child side of :func:`main`)."""
    records = json.loads((home / "records.json").read_text())
    bodies = [json.dumps({"features": r}).encode() for r in records]
    if variant == "floor":
        os.environ["BENCH_FLOOR_META"] = str(floor / "meta.json")
        sys.path.insert(0, str(floor))
        import floor_app

        return asyncio.run(_time_app(floor_app.app, bodies, calls))
    from personalize.settings import Settings

    settings = Settings(home=home)
    if variant == "classify":
        from serving.api import Runtime
        from serving.config import ServeConfig

        config = ServeConfig(home=home, tracking_uri=settings.tracking_uri, dataset="benchchurn",
                             prediction_log=home / "classify-log")
        runtime = Runtime(config, start_reloader=False, freeze_heap=False)
        try:
            cycle = itertools.cycle(records)
            for _ in range(WARMUP):
                runtime.classify("churn", features=next(cycle))
            times = []
            for _ in range(calls):
                record = next(cycle)
                t = time.perf_counter()
                runtime.classify("churn", features=record)
                times.append(time.perf_counter() - t)
            return statistics.median(times) * 1e6
        finally:
            runtime.close()
    strip = variant.split("-", 1)[1] if variant.startswith("service-") else None
    from _bentoml_impl.loader import load
    from bentoml._internal.context import server_context

    os.chdir(REPO)
    service = load("serving.service:Personalization", standalone_load=True)
    server_context.service_type, server_context.service_name = "entry_service", service.name
    server_context.service_routes = [api.route for api in service.apis.values()]
    server_context.bento_name, server_context.bento_version = service.name, "not available"
    app = service.to_asgi(is_main=True)
    names = [m.cls.__name__ for m in app.user_middleware]
    if strip is not None:
        if strip not in names:
            raise SystemExit(f"no middleware {strip} in {names}")
        app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ != strip]

    async def timed() -> float:
        from serving.service import RUNTIME

        async with app.router.lifespan_context(app):
            started = time.monotonic()
            while RUNTIME.get("runtime") is None or not RUNTIME["runtime"].models.ready:
                if time.monotonic() - started > 120:
                    raise RuntimeError("the service's models did not load in 120 s")
                await asyncio.sleep(0.1)
            return await _time_app(app, bodies, calls)

    return asyncio.run(timed())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 calls per variant")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per variant (default 4,000)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    calls = args.calls or (1_000 if args.quick else 4_000)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.variant:
        for noisy in ("mlflow", "alembic", "bentoml", "serving", "training"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        print(json.dumps({"us": run_variant(args.variant, args.home, args.floor, calls)}))
        return

    sb = _bench_serving()
    import mlflow  # noqa: F401  (configures its loggers on import: quiet them after)
    import optuna

    for noisy in ("mlflow", "alembic", "optuna"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from personalize.settings import Settings
    from serving.scoring import load as load_model

    started = time.perf_counter()
    variants = ["floor", "service", *(f"service-{m}" for m in STRIPPABLE), "classify"]
    us: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-asgi-") as name:
        tmp = Path(name)
        home = tmp / "home"
        settings = Settings(home=home, optuna_storage=f"sqlite:///{(home / 'optuna.db').resolve()}")
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
        env = {**os.environ, "PERSONALIZE_HOME": str(home), "MLFLOW_TRACKING_URI": settings.tracking_uri,
               "PERSONALIZE_DATASET": sb.DATASET, "BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
               "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prometheus"), "PERSONALIZE_PREDICTION_LOG": str(tmp / "log")}
        os.environ.update({k: env[k] for k in ("PERSONALIZE_HOME", "MLFLOW_TRACKING_URI")})
        (tmp / "prometheus").mkdir()
        setup = sb.build_champion(settings, 5_000, tmp)
        scorer = load_model(setup["client"], sb.MODEL, "champion").scorer
        import pandas as pd

        frame = pd.read_parquet(settings.dataset_dir(sb.DATASET) / "table.parquet")
        (home / "records.json").write_text(json.dumps(sb.feature_records(frame, scorer.features, sb.RECORDS)))
        floor = tmp / "floor"
        floor.mkdir()
        scorer.booster.save_model(str(floor / "booster.ubj"))
        (floor / "meta.json").write_text(json.dumps({"booster": str(floor / "booster.ubj"),
                                                     "features": scorer.features, "rounds": scorer.model.rounds}))
        (floor / "floor_app.py").write_text(sb.FLOOR_APP)
        print(f"set-up: churn champion ({scorer.model.family}, {setup['rounds']} rounds) in {setup['setup_s']:.0f}s; "
              f"{calls:,} calls per variant", flush=True)
        for variant in variants:
            for f in (tmp / "prometheus").glob("*"):
                f.unlink()
            done = subprocess.run([sys.executable, __file__, "--variant", variant, "--home", str(home), "--floor",
                                   str(floor), "--calls", str(calls)], env=env, cwd=REPO, capture_output=True,
                                  text=True, timeout=600)
            lines = [line for line in done.stdout.splitlines() if line.startswith('{"us"')]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"variant {variant} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            us[variant] = json.loads(lines[-1])["us"]
            print(f"  {variant:36s} {us[variant]:7.0f} µs", flush=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"One single-record POST /churn through the ASGI app in process, median of {calls:,} calls")
    for col in ("variant", "µs", "vs service", "what it costs"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    service = us["service"]
    for variant in variants:
        cost = f"{service - us[variant]:+.0f} µs" if variant.startswith("service-") else ""
        table.add_row(variant, f"{us[variant]:.0f}", f"{us[variant] / service:.2f}x", cost)
    Console(width=120).print(table)
    out = {"bench": "serving_asgi", "calls": calls, "quick": args.quick,
           "floor_us": round(us["floor"], 1), "service_us": round(service, 1), "classify_us": round(us["classify"], 1),
           **{f"without_{m}_us": round(us[f"service-{m}"], 1) for m in STRIPPABLE},
           "floor_vs_service": round(us["floor"] / service, 3), "cores": os.cpu_count(),
           "bench_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
