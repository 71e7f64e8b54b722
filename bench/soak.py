"""Soak: mixed traffic through a real gateway in front of a real KServe model server, which is restarted
twice on the way (docs/results/soak.md).

    python -m bench.soak --data-dir ../shared/data --seconds 600 --out docs/results/soak.json

Traffic, from concurrent clients for ``--seconds``:

- good: one clean MNIST test digit per request (JSON floats);
- perturbed: a test digit plus sign noise of 0.3 (an FGSM-sized L∞ change without a gradient; most
  are rejected) or uniform noise;
- bad: malformed JSON, wrong shapes, values out of range, a text/plain body, an unknown v2 model;
- oversized: a 9 MiB body (over the 8 MiB limit) or 300 digits (over the 256 batch limit);
- slow: raw-socket clients that trickle a body, or send a head and stop (the gateway cuts them off).

Each kind of client has its own API key, so the per-caller limits apply as they would in production:
the perturbed traffic's caller gets throttled (429) once its rejections pass the limit, the others not.

The upstream is stopped (SIGTERM) and started again on the same port at 1/3 and 2/3 of the run. Every
request is counted by its answer's status (or as a connection error); the report gives the counts, the
good requests' p50/p99, the gateway's resident memory at start and end, its 500s and
``magnet_unexpected_errors_total``, which must both be zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import psutil

from tests.procs import MODEL_SERVER, free_port, start_gateway, start_process, url_of
from training.data import load_mnist

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "mnist"


def start_kserve(port: int):
    cmd = [sys.executable, MODEL_SERVER, "--model-file", BUNDLE / "classifier.onnx", "--model-name", "mnist",
           "--http-port", str(port)]
    return start_process(cmd, url_of(port) + "/v2/health/ready", timeout=90)


def bodies(x: np.ndarray) -> dict[str, list[tuple[str, bytes, dict]]]:
    """Requests per category: (path, body, headers)."""
    rng = np.random.default_rng(0)
    js = {"Content-Type": "application/json"}
    dump = lambda o: orjson.dumps(o, option=orjson.OPT_SERIALIZE_NUMPY)  # noqa: E731
    good = [("/classify", dump({"inputs": d[0]}), js) for d in x[:200]]
    perturbed = [("/classify", dump({"inputs": np.clip(d[0] + 0.3 * rng.choice([-1, 1], d[0].shape), 0, 1)}), js)
                 for d in x[200:300]]
    perturbed += [("/classify", dump({"inputs": rng.uniform(size=(28, 28))}), js) for _ in range(20)]
    bad = [("/classify", b"{oops", js), ("/classify", dump({"inputs": [[0.5] * 27] * 28}), js),
           ("/classify", dump({"inputs": [[2.0] * 28] * 28}), js),
           ("/classify", dump({"inputs": [[0.5] * 28] * 28}), {"Content-Type": "text/plain"}),
           ("/classify", dump({"images": ["not base64!"]}), js),
           ("/v2/models/nope/infer", dump({"inputs": []}), js)]
    oversized = [("/classify", b" " * (9 * 2**20), js), ("/classify", dump({"inputs": np.zeros((300, 28, 28))}), js)]
    return {"good": good, "perturbed": perturbed, "bad": bad, "oversized": oversized}


async def client(session, base, kind, requests, deadline, stats, latencies, pace, key):
    while time.monotonic() < deadline:
        path, body, headers = random.choice(requests)
        headers = {**headers, "X-API-Key": key}
        t = time.perf_counter()
        try:
            async with session.post(base + path, data=body, headers=headers) as r:
                await r.read()
                stats[kind][r.status] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            stats[kind][f"connection error: {type(e).__name__}"] += 1
        if kind == "good":
            latencies.append(time.perf_counter() - t)
        await asyncio.sleep(pace)


async def slow_client(base, deadline, stats, key):
    host, port = base.removeprefix("http://").split(":")
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            if random.random() < 0.5:  # trickle a body
                writer.write(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"X-API-Key: %s\r\nContent-Length: 5000\r\n\r\n" % key.encode())
                kind = "slow body"
                for _ in range(60):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(1)
                    if reader.at_eof():
                        break
            else:  # a head that never ends
                writer.write(b"POST /classify HTTP/1.1\r\nHost: x\r\n")
                kind = "slow head"
            line = await asyncio.wait_for(reader.readline(), 90)
            status = line.split(b" ")[1].decode() if line.startswith(b"HTTP/") else "closed without answer"
            stats["slow"][f"{kind}: {status}"] += 1
            writer.close()
        except (ConnectionError, asyncio.TimeoutError) as e:
            stats["slow"][f"connection error: {type(e).__name__}"] += 1


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def run(args) -> dict:
    x = load_mnist(args.data_dir, download=False).test.x
    requests = bodies(x)
    port = free_port()
    kserve = start_kserve(port)
    keys = {kind: f"soak-{kind}-key-0123456789" for kind in ("good", "perturbed", "bad", "oversized", "slow")}
    gateway, base = start_gateway("--log-level", "warning", "--upstream", url_of(port), timeout=120,
                                  env={"MAGNET_UPSTREAM_TIMEOUT_S": "5",
                                       "MAGNET_API_KEYS": ",".join(f"{k}:{v}" for k, v in keys.items())})
    gw_process = psutil.Process(gateway.pid)
    rss_start = gw_process.memory_info().rss / 2**20
    stats: dict[str, Counter] = defaultdict(Counter)
    latencies: list[float] = []
    restarts = []
    started = time.monotonic()
    deadline = started + args.seconds
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            mix = [("good", 8, 0.0), ("perturbed", 2, 0.05), ("bad", 2, 0.05), ("oversized", 1, 0.5)]
            tasks = [asyncio.create_task(client(session, base, kind, requests[kind], deadline, stats, latencies,
                                                pace, keys[kind]))
                     for kind, n, pace in mix for _ in range(n)]
            tasks += [asyncio.create_task(slow_client(base, deadline, stats, keys["slow"])) for _ in range(4)]
            for fraction in (1 / 3, 2 / 3):
                await asyncio.sleep(max(0.0, started + fraction * args.seconds - time.monotonic()))
                kserve.stop()
                down = time.monotonic()
                await asyncio.sleep(3)
                kserve = await asyncio.to_thread(start_kserve, port)
                restarts.append({"at_s": round(down - started, 1), "down_s": round(time.monotonic() - down, 1)})
            await asyncio.gather(*tasks)
        rss_end = gw_process.memory_info().rss / 2**20
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.operator_url}/metrics") as r:
                metrics = await r.text()
    finally:
        gateway.stop()
        kserve.stop()
    ms = np.array(latencies) * 1000
    sent = sum(sum(c.values()) for c in stats.values())
    answered = sum(n for c in stats.values() for k, n in c.items() if not str(k).startswith("connection error"))
    count_500 = sum(n for c in stats.values() for k, n in c.items() if str(k).endswith("500") or k == 500)
    return {"command": "python -m bench.soak " + " ".join(sys.argv[1:]), "seconds": args.seconds,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "requests_sent": sent,
            "requests_answered": answered, "status_by_kind": {k: dict(sorted((str(s), n) for s, n in c.items()))
                                                               for k, c in stats.items()},
            "good_p50_ms": float(np.percentile(ms, 50)), "good_p99_ms": float(np.percentile(ms, 99)),
            "gateway_rss_mb": {"start": round(rss_start, 1), "end": round(rss_end, 1)},
            "http_500": count_500, "unexpected_errors": metric(metrics, "magnet_unexpected_errors_total"),
            "upstream_restarts": restarts,
            "upstream_errors": {r: metric(metrics, f'magnet_upstream_errors_total{{reason="{r}"}}')
                                for r in ("unavailable", "timeout", "bad_response")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["http_500"] == 0 and report["unexpected_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
