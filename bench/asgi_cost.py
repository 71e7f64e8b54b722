"""What one ``/classify`` digit costs the gateway in process, without a network (MNIST, embedded classifier):

    python -m bench.asgi_cost --data-dir ../shared/data --requests 3000 --rounds 3

Per round, CPU and wall time per request of ``--requests`` sequential single digits sent as ASGI calls
through the whole app (middleware, routing, session, metrics, the defended route), then of the route's own
work alone (decode, the pipeline with the embedded classifier, encode): the difference is what the web
framework and the bookkeeping cost. ``--lean-chain`` times a third path: the gateway's own middleware
(``AccessGuard``) straight in front of the ``/classify`` handler, without FastAPI's and Starlette's
layers (error middleware, telemetry, body limit, exception handlers, routing): what bypassing them would
save. ``--fastapi-routes`` removes the plain routes that ``service.app``
puts ahead of FastAPI's, to compare with FastAPI's own route handling. One onnxruntime thread
(``MAGNET_ORT_THREADS=1`` unless set). Figures in docs/results/throughput.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import orjson


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--bundle", type=Path, default=Path("models/mnist"))
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fastapi-routes", action="store_true",
                   help="drop the plain routes ahead of FastAPI's (service.app.hot_routes)")
    p.add_argument("--lean-chain", action="store_true",
                   help="also time AccessGuard straight in front of the /classify handler (no framework layers)")
    p.add_argument("--out", type=Path, default=None, help="write the rounds as JSON here")
    return p


def _scope(body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/classify", "raw_path": b"/classify", "query_string": b"", "root_path": "",
            "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()), (b"cookie", b"magnet_session=bench-session")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000), "state": {}}


async def _run(args) -> list[dict]:
    os.environ.setdefault("MAGNET_ORT_THREADS", "1")
    from fastapi.routing import APIRoute

    from starlette.requests import Request

    from service.access import AccessGuard
    from service.app import HOT_ROUTES, create_app
    from service.errors import MagnetError, handle_magnet_error
    from service.routes import classify
    from service.codecs import decode_classify_request
    from service.dataplane import encode_results
    from service.settings import Settings
    from training.data import load

    test = load(json.loads((args.bundle / "manifest.json").read_text())["dataset"], args.data_dir).test
    bodies = [orjson.dumps({"inputs": test.x[i : i + 1].tolist()}) for i in range(min(200, len(test.x)))]
    app = create_app(Settings(bundle=args.bundle, upstream=None))
    if args.fastapi_routes:
        app.router.routes[:] = [r for r in app.router.routes
                                if isinstance(r, APIRoute) or getattr(r, "path", None) not in HOT_ROUTES]
    gw = app.state.gateway

    startup, sent = asyncio.Queue(), asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                       startup.get, sent.put))
    started = await sent.get()
    if started["type"] != "lifespan.startup.complete":
        raise SystemExit(f"the app did not start: {started}")

    async def through_app(body: bytes, target=app) -> list[dict]:
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects

        out: list[dict] = []

        async def send(message: dict) -> None:
            out.append(message)

        await target(_scope(body), receive, send)
        if out[0]["status"] != 200:
            raise SystemExit(f"/classify answered {out[0]['status']}: {out[-1].get('body', b'')[:200]!r}")
        return out

    async def route_work(body: bytes) -> bytes:
        x = decode_classify_request(body, gw.defense.manifest.input, gw.settings.max_batch)
        outcome = await gw.pipeline.classify(x, member=0, shadow=False)
        return orjson.dumps({"results": encode_results(outcome, False, gw.probabilities)})

    async def classify_only(scope, receive, send) -> None:
        """The /classify handler with the app's MagNet error handler, as the framework would call it."""
        scope["app"] = app
        request = Request(scope, receive, send)
        try:
            response = await classify(request)
        except MagnetError as e:
            response = await handle_magnet_error(request, e)
        await response(scope, receive, send)

    lean = AccessGuard(classify_only, app.state.gateway.settings, None, gw.metrics)

    async def lean_chain(body: bytes) -> list[dict]:
        return await through_app(body, lean)

    paths = [("app", through_app), ("route_work", route_work)] + ([("lean_chain", lean_chain)] if args.lean_chain else [])
    for _, f in paths:  # warm-up
        for body in bodies:
            await f(body)
    rounds = []
    for r in range(args.rounds):
        row = {"round": r}
        for name, f in paths:
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(args.requests):
                await f(bodies[i % len(bodies)])
            row[f"{name}_cpu_ms"] = 1e3 * (time.process_time() - cpu) / args.requests
            row[f"{name}_wall_ms"] = 1e3 * (time.perf_counter() - wall) / args.requests
        print(f"round {r}: through the app {row['app_cpu_ms']:.3f} ms CPU per request, the route's own work "
              f"{row['route_work_cpu_ms']:.3f} ms" + (f", AccessGuard and the handler alone {row['lean_chain_cpu_ms']:.3f} ms"
                                                      if args.lean_chain else ""), flush=True)
        rounds.append(row)
    lifespan.cancel()
    return rounds


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    rounds = asyncio.run(_run(args))
    if args.out is not None:
        args.out.write_text(json.dumps({"fastapi_routes": args.fastapi_routes, "requests": args.requests,
                                        "bundle": str(args.bundle), "rounds": rounds,
                                        "median_app_cpu_ms": float(np.median([r["app_cpu_ms"] for r in rounds]))},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
