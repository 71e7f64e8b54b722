"""Load benchmark: the gateway (embedded default and in front of KServe) against KServe alone.

    python -m bench.gateway_load --data-dir DATA --seconds 20 --concurrency 16 --out docs/results/bench-mnist.json

Every target gets single-digit requests (the app-facing case) from a closed loop of ``--concurrency``
aiohttp clients for ``--seconds``, after a warm-up. All processes share this machine's cores with the
load generator, so figures are for comparison between rows of one run, not absolute capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import orjson

from tests.procs import start_gateway, start_model_server
from training.data import load_mnist

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "mnist"


async def _drive(url: str, bodies: list[bytes], seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.post(url, data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    errors += r.status != 200
                latencies.append(time.perf_counter() - t0)
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "req_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def run_target(url: str, bodies: list[bytes], args: argparse.Namespace) -> dict:
    asyncio.run(_drive(url, bodies, args.warmup, args.concurrency))
    return asyncio.run(_drive(url, bodies, args.seconds, args.concurrency))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="directory with the MNIST IDX files")
    p.add_argument("--seconds", type=float, default=20, help="measured seconds per target")
    p.add_argument("--warmup", type=float, default=3, help="warm-up seconds per target (not measured)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)

    digits = load_mnist(args.data_dir, download=False).test.x[:256]
    gateway_bodies = [orjson.dumps({"inputs": d[0]}, option=orjson.OPT_SERIALIZE_NUMPY) for d in digits]
    v2_bodies = [orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                           "data": d.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY)
                 for d in digits]
    kserve, kurl = start_model_server(BUNDLE / "classifier.onnx", "mnist")
    embedded, eurl = start_gateway("--log-level", "warning")
    proxied, gurl = start_gateway("--log-level", "warning", "--upstream", kurl)
    # the same gateway with micro-batching off (MAGNET_BATCH_ROWS=0): each request its own upstream call
    unbatched, uurl = start_gateway("--log-level", "warning", "--upstream", kurl, env={"MAGNET_BATCH_ROWS": "0"})
    results = {}
    try:
        targets = {
            "kserve_direct": (f"{kurl}/v2/models/mnist/infer", v2_bodies),
            "gateway_embedded": (f"{eurl}/classify", gateway_bodies),
            "gateway_to_kserve": (f"{gurl}/classify", gateway_bodies),
            "gateway_to_kserve_unbatched": (f"{uurl}/classify", gateway_bodies),
        }
        for name, (url, bodies) in targets.items():
            results[name] = run_target(url, bodies, args)
            print(name, json.dumps(results[name]), flush=True)
    finally:
        for proc in (kserve, embedded, proxied, unbatched):
            proc.stop()
    report = {"command": "python -m bench.gateway_load " + " ".join(argv or sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "concurrency": args.concurrency,
              "seconds": args.seconds, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
