"""A/B of the gateway's onnxruntime settings in front of KServe (MNIST), in one run, interleaved:

    python -m bench.ab_threads --data-dir ../shared/data --baseline-tree /tmp/wt-base --rounds 3

Variants: the code in ``--baseline-tree`` (a ``git worktree`` of an earlier commit), this tree as it is,
this tree with ``MAGNET_ORT_SPINNING=false``, this tree with ``MAGNET_ORT_THREADS=1``. Per variant and
round: added p50 at one client (the mean of two 5 s gateway runs minus the mean of two 5 s KServe-direct
runs, interleaved), and throughput over KServe direct at 16 clients (6 s each). Figures in
docs/results/throughput.md; on 2 shared cores they are noisy, hence the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from bench.gateway_load import Request, _drive, mnist_json_requests
from tests.procs import REPO, free_port, start_model_server, start_on_free_port


def drive(url: str, requests: list[Request], seconds: float, clients: int = 1) -> tuple[float, float]:
    """(p50 ms, req/s) of ``bench.gateway_load``'s closed loop of ``clients`` for ``seconds``; any error fails."""
    figures = asyncio.run(_drive(url, requests, seconds, clients))
    if figures["errors"]:
        raise RuntimeError(f"{figures['errors']} requests to {url} failed")
    return figures["p50_ms"], figures["req_per_s"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--baseline-tree", type=Path, required=True, help="a worktree of the commit to compare with")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    body, v2 = mnist_json_requests(args.data_dir)
    variants = {"baseline": (args.baseline_tree.resolve(), {}), "this tree": (REPO, {}),
                "spinning off": (REPO, {"MAGNET_ORT_SPINNING": "false"}), "one thread": (REPO, {"MAGNET_ORT_THREADS": "1"})}
    kserve, kurl = start_model_server(REPO / "models" / "mnist" / "classifier.onnx", "mnist")
    direct_url = f"{kurl}/v2/models/mnist/infer"
    results: dict[str, list[dict]] = {}
    try:
        for _ in range(args.rounds):
            for name, (tree, env) in variants.items():
                flags = ["--log-level", "warning", "--operator-port", str(free_port()), "--upstream", kurl]
                gateway, base = start_on_free_port(
                    lambda port: [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *flags],
                    "/readyz", 60, cwd=tree,
                    env={"MAGNET_WORKERS": "1", "MAGNET_UPSTREAM_MODEL": "mnist", "PYTHONPATH": str(tree), **env})
                try:
                    drive(f"{base}/classify", body, 2)
                    d1 = drive(direct_url, v2, 5)[0]
                    g1 = drive(f"{base}/classify", body, 5)[0]
                    d2 = drive(direct_url, v2, 5)[0]
                    g2 = drive(f"{base}/classify", body, 5)[0]
                    g16 = drive(f"{base}/classify", body, 6, 16)[1]
                    d16 = drive(direct_url, v2, 6, 16)[1]
                finally:
                    gateway.stop()
                results.setdefault(name, []).append({"added_p50_ms": (g1 + g2 - d1 - d2) / 2, "c16_ratio": g16 / d16})
                print(name, json.dumps(results[name][-1]), flush=True)
    finally:
        kserve.stop()
    for name, rows in results.items():
        print(f"{name}: added p50 {[round(r['added_p50_ms'], 2) for r in rows]} ms, "
              f"16-client ratio {[round(r['c16_ratio'], 2) for r in rows]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
