"""A/B of gateway variants in front of KServe (MNIST), in one run, interleaved:

    python -m bench.ab_gateway --data-dir ../shared/data --baseline-tree /tmp/wt-base --rounds 3 \\
        --wire json,binary [--env-variant "one thread:MAGNET_ORT_THREADS=1" ...]

Variants: the code in ``--baseline-tree`` (a ``git worktree`` of an earlier commit), this tree as it is,
and this tree with each ``--env-variant`` ("name:KEY=VALUE[,KEY=VALUE]"). Per variant, wire and round:
added p50 at one client (the mean of two 5 s gateway runs minus the mean of two 5 s KServe-direct runs,
interleaved, same wire: JSON is /classify against KServe's JSON v2, binary is the gateway's v2 front
against KServe's, both with the binary data extension), and throughput over KServe direct at 16 clients
(6 s each). Figures in docs/results/throughput.md; on 2 shared cores they are noisy, hence the rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench import gateway_load
from bench.gateway_load import Request, requests_for
from tests.procs import REPO, free_port, start_model_server, start_on_free_port
from training.data import load


def drive(url: str, requests: list[Request], seconds: float, clients: int = 1) -> tuple[float, float]:
    """(p50 ms, req/s) of ``bench.gateway_load``'s closed loop of ``clients`` for ``seconds``; any error fails."""
    figures = gateway_load.drive(url, requests, seconds, clients)
    if figures["errors"]:
        raise RuntimeError(f"{figures['errors']} requests to {url} failed")
    return figures["p50_ms"], figures["req_per_s"]


def env_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    if not name or not env:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'name:KEY=VALUE[,KEY=VALUE]'")
    return name, env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--baseline-tree", type=Path, required=True, help="a worktree of the commit to compare with")
    p.add_argument("--env-variant", type=env_variant, action="append", default=[],
                   help="this tree with extra environment: 'name:KEY=VALUE[,KEY=VALUE]' (repeatable)")
    p.add_argument("--wire", type=lambda s: s.split(","), default=["json"], help="json, binary or json,binary")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="write every round's figures as JSON here")
    args = p.parse_args(argv)
    digits = load("mnist", args.data_dir).test.x[:200]
    fronts = {"json": ("/classify", requests_for(digits, "json", "classify"), requests_for(digits, "json", "v2")),
              "binary": ("/v2/models/mnist/infer", requests_for(digits, "binary", "v2"),
                         requests_for(digits, "binary", "v2"))}
    variants = {"baseline": (args.baseline_tree.resolve(), {}), "this tree": (REPO, {}),
                **{name: (REPO, env) for name, env in args.env_variant}}
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
                    env={"MAGNET_WORKERS": "1", "MAGNET_UPSTREAM_MODEL": "mnist", "MAGNET_MODEL_NAME": "mnist",
                         "PYTHONPATH": str(tree), **env})
                try:
                    for wire in args.wire:
                        path, through, direct = fronts[wire]
                        drive(f"{base}{path}", through, 2)
                        d1 = drive(direct_url, direct, 5)[0]
                        g1 = drive(f"{base}{path}", through, 5)[0]
                        d2 = drive(direct_url, direct, 5)[0]
                        g2 = drive(f"{base}{path}", through, 5)[0]
                        g16 = drive(f"{base}{path}", through, 6, 16)[1]
                        d16 = drive(direct_url, direct, 6, 16)[1]
                        row = {"wire": wire, "added_p50_ms": (g1 + g2 - d1 - d2) / 2, "direct_p50_ms": (d1 + d2) / 2,
                               "c16_ratio": g16 / d16}
                        results.setdefault(name, []).append(row)
                        print(name, json.dumps(row), flush=True)
                finally:
                    gateway.stop()
    finally:
        kserve.stop()
    for name, rows in results.items():
        for wire in args.wire:
            mine = [r for r in rows if r["wire"] == wire]
            print(f"{name} ({wire}): added p50 {[round(r['added_p50_ms'], 2) for r in mine]} ms, "
                  f"16-client ratio {[round(r['c16_ratio'], 2) for r in mine]}")
    if args.out:
        args.out.write_text(json.dumps({"command": sys.argv, "variants": {k: str(v[0]) + (f" {v[1]}" if v[1] else "")
                                                                          for k, v in variants.items()},
                                        "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
