"""What one more HTTP hop costs at one client: the floor under the gateway's added latency.

    python -m bench.hop_floor --data-dir ../shared/data --seconds 8 --rounds 3 --out docs/results/hop-floor.json

Three targets, single-digit requests from one closed-loop client (``bench.gateway_load``'s load
generator), JSON on every wire, interleaved round by round so that drift on a shared machine falls on
all of them alike:

- ``kserve_direct``: the KServe server (``docker/kserve/serve_onnx.py``) serving the bundle's classifier;
- ``floor_proxy``: a proxy that does nothing but forward: a raw ASGI app on the gateway's own server stack
  (uvicorn, httptools, uvloop) that reads the body and posts it, unchanged, to KServe with the gateway's
  own upstream client (``service.upstream.http1``), then returns the answer. No decoding, no defense;
- ``gateway_to_kserve``: ``magnet serve --upstream KSERVE`` with its defaults (``/classify``).

``floor_proxy`` minus ``kserve_direct`` is what the hop alone costs on this machine (two more socket
round trips and wake-ups, one more process to schedule); ``gateway_to_kserve`` minus ``floor_proxy`` is
the gateway's own work (decoding, the autoencoders, scoring, encoding). The issue's target is on the
sum of the two (added p50 ≤ 1 ms). Each run also records the CPU time per request (user + system, from
``/proc``) of the process that answers the client and of KServe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from bench.gateway_load import BUNDLE, VERSIONS, _version, drive, requests_for
from bench.stage_breakdown import cpu_seconds
from service.defense import Defense
from tests.procs import REPO, start_gateway, start_model_server, start_on_free_port
from training.data import load


async def run_lifespan(receive, send) -> None:
    """Answer an ASGI lifespan until shutdown is asked (the caller cleans up, then says it is complete)."""
    while (message := await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})


async def read_body(receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def send_json(send, status: int, out: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})


class ForwardingApp:
    """The floor: POST bodies forwarded unchanged to ``upstream`` + the request's path; GET /ready 200."""

    def __init__(self, upstream: str) -> None:
        from service.upstream.http1 import Http1Client

        self.client = Http1Client(upstream)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
            await self.client.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = await read_body(receive)
        if scope["method"] == "GET":
            status, out = 200, b"ready"
        else:
            answer = await self.client.request("POST", scope["path"], body, {"Content-Type": "application/json"})
            status, out = answer.status, answer.body
        await send_json(send, status, out)


def serve_asgi(app, port: int) -> None:
    """``app`` on the gateway's own server stack (uvicorn, httptools, uvloop) at 127.0.0.1:``port``."""
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop",
                http="httptools", lifespan="on")


def serve_proxy(port: int, upstream: str) -> None:
    serve_asgi(ForwardingApp(upstream), port)


def one_client_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the one-client, round-by-round benchmarks (this one and ``bench.speculation``)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, help="directory with the bundle's data set")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="bundle the gateway serves (default models/mnist)")
    p.add_argument("--seconds", type=float, default=8, help="measured seconds per target and round")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds per target and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the targets take turns within each")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    return p


def bundle_and_digits(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Defense, str, np.ndarray]:
    """The bundle, its data set's name and the first 200 test images that the clients send."""
    if args.data_dir is None:
        p.error("--data-dir is required")
    defense = Defense(args.bundle, device="cpu")
    name = defense.manifest.dataset
    return defense, name, load(name, args.data_dir).test.x[:200]


def write_one_client_report(module: str, argv: list[str] | None, args: argparse.Namespace, rounds: list[dict],
                            summary: dict, **extra) -> None:
    """The rounds and summary as JSON at ``args.out``, with the command, machine and versions."""
    report = {"command": f"python -m {module} " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bundle": str(args.bundle), **extra,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "versions": {pkg: _version(pkg) for pkg in (*VERSIONS, "uvloop", "httptools")},
              "concurrency": 1, "wire": "json", "seconds": args.seconds, "rounds": rounds, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = one_client_parser(__doc__)
    p.add_argument("--serve-proxy", nargs=2, metavar=("PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_proxy:
        serve_proxy(int(args.serve_proxy[0]), args.serve_proxy[1])
        return 0
    defense, name, images = bundle_and_digits(p, args)
    v2 = requests_for(images, "json", "v2")
    kserve, kurl = start_model_server(defense.classifier_file, name)
    procs = [kserve]
    try:
        proxy, purl = start_on_free_port(lambda port: [sys.executable, "-m", "bench.hop_floor", "--serve-proxy",
                                                       str(port), kurl], "/ready", timeout=60, cwd=REPO)
        procs.append(proxy)
        gateway, gurl = start_gateway("--log-level", "warning", "--bundle", str(args.bundle), "--upstream", kurl,
                                      env={"MAGNET_MODEL_NAME": name, "MAGNET_UPSTREAM_MODEL": name}, timeout=120)
        procs.append(gateway)
        targets = {"kserve_direct": (f"{kurl}/v2/models/{name}/infer", v2),
                   "floor_proxy": (f"{purl}/v2/models/{name}/infer", v2),
                   "gateway_to_kserve": (f"{gurl}/classify", requests_for(images, "json", "classify"))}
        servers = {"kserve_direct": kserve, "floor_proxy": proxy, "gateway_to_kserve": gateway}
        rounds: list[dict] = []
        for r in range(args.rounds):
            rounds.append({})
            for target, (url, reqs) in targets.items():
                drive(url, reqs, args.warmup, 1)
                before = {t: cpu_seconds(proc.pid) for t, proc in servers.items()}
                rounds[-1][target] = run = drive(url, reqs, args.seconds, 1)
                spent = {t: cpu_seconds(proc.pid) - before[t] for t, proc in servers.items()}
                if run["errors"]:
                    raise SystemExit(f"{target}: {run['errors']} requests failed")
                # CPU per request of the process that answers the client, and of KServe behind it
                run["server_cpu_ms_per_request"] = 1e3 * spent[target] / run["requests"]
                run["kserve_cpu_ms_per_request"] = 1e3 * spent["kserve_direct"] / run["requests"]
                print(f"round {r + 1} {target}: p50 {run['p50_ms']:.3f} ms, p99 {run['p99_ms']:.2f} ms, "
                      f"{run['req_per_s']:.0f} req/s; CPU per request {run['server_cpu_ms_per_request']:.2f} ms "
                      f"(KServe {run['kserve_cpu_ms_per_request']:.2f})", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
    p50 = {t: float(np.median([rd[t]["p50_ms"] for rd in rounds])) for t in targets}
    summary = {"p50_ms_median_of_rounds": p50,
               "hop_ms": p50["floor_proxy"] - p50["kserve_direct"],
               "gateway_work_ms": p50["gateway_to_kserve"] - p50["floor_proxy"],
               "added_p50_ms": p50["gateway_to_kserve"] - p50["kserve_direct"],
               "per_round_added_p50_ms": [rd["gateway_to_kserve"]["p50_ms"] - rd["kserve_direct"]["p50_ms"]
                                          for rd in rounds],
               "per_round_hop_ms": [rd["floor_proxy"]["p50_ms"] - rd["kserve_direct"]["p50_ms"] for rd in rounds]}
    print(json.dumps(summary, indent=1))
    if args.out:
        write_one_client_report("bench.hop_floor", argv, args, rounds, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
