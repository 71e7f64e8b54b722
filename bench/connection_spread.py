"""How a burst of keep-alive connections lands on the gateway's worker processes:

    python -m bench.connection_spread --data-dir ../shared/data --workers 2 --connections 16 --rounds 6 \\
        [--env UV_TCP_SINGLE_ACCEPT=1]

Starts ``magnet serve --workers N`` (embedded MNIST bundle) from this tree, and per round opens
``--connections`` connections at once from one aiohttp session (as ``bench.gateway_load`` does), sends a
few digits on each, and counts the established connections each worker holds. Run it from a worktree of
an older commit to see that commit's behaviour. Figures in docs/results/throughput.md.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import aiohttp
import psutil

from bench.gateway_load import mnist_json_requests
from tests.procs import start_gateway


def per_worker(pid: int, port: int) -> list[int]:
    """Established connections on ``port`` held by each worker (child of ``pid`` but multiprocessing's
    resource tracker), largest first."""
    workers = [p for p in psutil.Process(pid).children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
    return sorted((sum(1 for c in p.connections("tcp") if c.laddr.port == port and c.status == "ESTABLISHED")
                   for p in workers), reverse=True)


async def burst(url: str, requests, connections: int, pid: int) -> list[int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        async def one(k: int) -> None:
            for i in range(3):
                body, headers = requests[(k + i) % len(requests)]
                async with session.post(f"{url}/classify", data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"/classify answered {r.status}")

        await asyncio.gather(*(one(k) for k in range(connections)))
        return per_worker(pid, int(url.rsplit(":", 1)[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the gateway (repeatable)")
    args = p.parse_args(argv)
    requests, _ = mnist_json_requests(args.data_dir)
    env = {"MAGNET_WORKERS": str(args.workers), **dict(e.split("=", 1) for e in args.env)}
    gateway, url = start_gateway("--workers", str(args.workers), env=env, timeout=120)
    try:
        spreads = [asyncio.run(burst(url, requests, args.connections, gateway.pid)) for _ in range(args.rounds)]
    finally:
        gateway.stop()
    print(f"{args.connections} connections at once on {args.workers} workers, per round (largest first):",
          ", ".join(" / ".join(map(str, s)) for s in spreads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
