"""Where one request's time goes in the gateway in front of KServe (MNIST, one client, sequential):

    python -m bench.stage_breakdown --data-dir ../shared/data --requests 500

Runs KServe and the gateway as processes, sends ``--requests`` single digits to KServe directly and then
through the gateway, twice, and prints the p50s, the CPU time each process spent per request (user +
system, the process and its children: what the hop costs the machine, beside what it costs the client
in wall time), and the gateway's own stage means from its metrics (``magnet_stage_seconds``: decode,
queue, defense, upstream, total; the first round's requests are included, so means sit a little above
steady state). Figures in docs/results/throughput.md.

With ``--concurrency N`` (N > 1) each of the two phases is instead a closed loop of N clients for
``--seconds`` (as ``bench.gateway_load`` drives them), and it prints req/s, p50 and the CPU per request of
KServe, the gateway and the load generator's own process: what bounds the N-client ratio on shared cores.

    python -m bench.stage_breakdown --data-dir ../shared/data --concurrency 16 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import psutil

from bench.gateway_load import Request, drive, mnist_json_requests
from tests.procs import REPO, start_gateway, start_model_server


async def p50(url: str, requests: list[Request], n: int) -> float:
    latencies = []
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            t = time.perf_counter()
            body, headers = requests[i % len(requests)]
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
            latencies.append(time.perf_counter() - t)
    return float(np.median(latencies) * 1e3)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its children so far."""
    root = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [root, *root.children(recursive=True)])


def sequential(kserve, kurl: str, v2, gateway, gurl: str, body, n: int) -> None:
    """One round of ``n`` sequential digits, KServe direct then through the gateway."""
    k0 = cpu_seconds(kserve.pid)
    direct = asyncio.run(p50(f"{kurl}/v2/models/mnist/infer", v2, n))
    k1, g1 = cpu_seconds(kserve.pid), cpu_seconds(gateway.pid)
    through = asyncio.run(p50(f"{gurl}/classify", body, n))
    k2, g2 = cpu_seconds(kserve.pid), cpu_seconds(gateway.pid)
    print(f"KServe direct p50 {direct:.2f} ms, through the gateway {through:.2f} ms (+{through - direct:.2f}); "
          f"CPU ms per request: KServe {(k1 - k0) / n * 1e3:.2f} direct, {(k2 - k1) / n * 1e3:.2f} behind "
          f"the gateway; gateway {(g2 - g1) / n * 1e3:.2f}")


def closed_loop(kserve, kurl: str, v2, gateway, gurl: str, body, clients: int, seconds: float) -> None:
    """One round of a closed loop of ``clients`` for ``seconds``, KServe direct then through the gateway
    (each after a second of warm-up), with the CPU per request of every process."""
    for name, url, requests in (("KServe direct", f"{kurl}/v2/models/mnist/infer", v2),
                                ("through the gateway", f"{gurl}/classify", body)):
        drive(url, requests, 1.0, clients)
        before = cpu_seconds(kserve.pid), cpu_seconds(gateway.pid), time.process_time()
        run = drive(url, requests, seconds, clients)
        after = cpu_seconds(kserve.pid), cpu_seconds(gateway.pid), time.process_time()
        per = [(b - a) / run["requests"] * 1e3 for a, b in zip(before, after)]
        print(f"{clients} clients, {name}: {run['req_per_s']:.0f} req/s, p50 {run['p50_ms']:.2f} ms, CPU ms per "
              f"request: KServe {per[0]:.2f}, gateway {per[1]:.2f}, load generator {per[2]:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=1, help="clients of a closed loop instead of sequential requests")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each closed-loop phase")
    args = p.parse_args(argv)
    body, v2 = mnist_json_requests(args.data_dir)
    kserve, kurl = start_model_server(REPO / "models" / "mnist" / "classifier.onnx", "mnist")
    gateway, gurl = start_gateway("--log-level", "warning", "--upstream", kurl, env={"MAGNET_UPSTREAM_MODEL": "mnist"})
    try:
        for _ in range(2):
            if args.concurrency > 1:
                closed_loop(kserve, kurl, v2, gateway, gurl, body, args.concurrency, args.seconds)
            else:
                sequential(kserve, kurl, v2, gateway, gurl, body, args.requests)
        metrics = urllib.request.urlopen(gateway.operator_url + "/metrics").read().decode()
        for stage in ("decode", "queue", "defense", "upstream", "total"):
            total = float(re.search(rf'magnet_stage_seconds_sum{{stage="{stage}"}} (\S+)', metrics).group(1))
            count = float(re.search(rf'magnet_stage_seconds_count{{stage="{stage}"}} (\S+)', metrics).group(1))
            print(f"{stage:>8}: {total / count * 1e3:.3f} ms mean over {count:.0f} requests")
    finally:
        gateway.stop()
        kserve.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
