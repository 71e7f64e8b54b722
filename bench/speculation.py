"""Speculative forwarding (``MAGNET_SPECULATE``) at one client, in front of a model server that does not
share the gateway's cores:

    python -m bench.speculation --data-dir ../shared/data --delay-ms 2 --seconds 8 --rounds 3 \
        --out docs/results/speculation.json

A model server on another machine or on an accelerator spends its time where the gateway's CPU is free.
This stands one in: a small OIP v2 server (uvicorn, httptools, uvloop) that runs the bundle's classifier
with onnxruntime (one thread) and then waits ``--delay-ms`` without using a core (``asyncio.sleep``: the
network and the accelerator), before it answers. Targets, interleaved round by round, single digits from
one closed-loop client (``bench.gateway_load``'s load generator), JSON everywhere:

- ``direct``: that server called directly;
- ``speculate_off``: ``magnet serve --upstream SERVER`` with ``MAGNET_SPECULATE=off`` (screen, then send);
- ``speculate_auto``: the same with the default, ``auto`` (send after the reformer, screen meanwhile).

Added p50 = the gateway's p50 minus ``direct``'s in the same round. On this repository's 2-core machine
with KServe on the same cores, the same comparison is in ``bench.ab_gateway``'s A/B
(docs/results/throughput.md).
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

import numpy as np
import orjson

from bench.gateway_load import BUNDLE, VERSIONS, _version, drive, requests_for
from service.defense import Defense
from tests.procs import REPO, start_gateway, start_on_free_port
from training.data import load


class DistantServer:
    """OIP v2 ``infer`` on an ONNX classifier, answered ``delay_s`` after the classifier has run."""

    def __init__(self, model_file: str, name: str, delay_s: float) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(model_file, opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.name, self.delay_s = name, delay_s

    def infer(self, body: bytes) -> bytes:
        tensor = orjson.loads(body)["inputs"][0]
        x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        out = self.session.run(None, {self.input: x})[0]
        return orjson.dumps({"model_name": self.name, "outputs": [
            {"name": "output", "shape": list(out.shape), "datatype": "FP32", "data": out.ravel()}]},
            option=orjson.OPT_SERIALIZE_NUMPY)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["method"] == "GET":  # health and model readiness
            out = b"{}"
        else:
            out = self.infer(body)
            await asyncio.sleep(self.delay_s)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


def serve(port: int, model_file: str, name: str, delay_ms: float) -> None:
    import uvicorn

    uvicorn.run(DistantServer(model_file, name, delay_ms / 1e3), host="127.0.0.1", port=port, log_level="warning",
                access_log=False, loop="uvloop", http="httptools", lifespan="on")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, help="directory with the bundle's data set")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="bundle the gateway serves (default models/mnist)")
    p.add_argument("--delay-ms", type=float, default=2.0, help="the model server's time off this machine's cores")
    p.add_argument("--seconds", type=float, default=8, help="measured seconds per target and round")
    p.add_argument("--warmup", type=float, default=2, help="warm-up seconds per target and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the targets take turns within each")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--serve", nargs=4, metavar=("PORT", "MODEL", "NAME", "DELAY_MS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.serve[2], float(args.serve[3]))
        return 0
    if args.data_dir is None:
        p.error("--data-dir is required")

    defense = Defense(args.bundle, device="cpu")
    name = defense.manifest.dataset
    images = load(name, args.data_dir).test.x[:200]
    procs = []
    try:
        server, surl = start_on_free_port(
            lambda port: [sys.executable, "-m", "bench.speculation", "--serve", str(port), str(defense.classifier_file),
                          name, str(args.delay_ms)], f"/v2/models/{name}/ready", timeout=60, cwd=REPO)
        procs.append(server)
        targets = {"direct": (f"{surl}/v2/models/{name}/infer", requests_for(images, "json", "v2"))}
        for variant, mode in (("speculate_off", "off"), ("speculate_auto", "auto")):
            gateway, gurl = start_gateway("--log-level", "warning", "--bundle", str(args.bundle), "--upstream", surl,
                                          env={"MAGNET_UPSTREAM_MODEL": name, "MAGNET_SPECULATE": mode}, timeout=120)
            procs.append(gateway)
            targets[variant] = (f"{gurl}/classify", requests_for(images, "json", "classify"))
        rounds: list[dict] = []
        for r in range(args.rounds):
            rounds.append({})
            for target, (url, reqs) in targets.items():
                drive(url, reqs, args.warmup, 1)
                rounds[-1][target] = run = drive(url, reqs, args.seconds, 1)
                if run["errors"]:
                    raise SystemExit(f"{target}: {run['errors']} requests failed")
                print(f"round {r + 1} {target}: p50 {run['p50_ms']:.3f} ms, p99 {run['p99_ms']:.2f} ms, "
                      f"{run['req_per_s']:.0f} req/s", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
    added = {v: [rd[v]["p50_ms"] - rd["direct"]["p50_ms"] for rd in rounds] for v in ("speculate_off", "speculate_auto")}
    summary = {"added_p50_ms_per_round": added,
               "added_p50_ms_median": {v: float(np.median(a)) for v, a in added.items()},
               "saved_ms_per_round": [off - auto for off, auto in zip(added["speculate_off"], added["speculate_auto"])]}
    print(json.dumps(summary, indent=1))
    if args.out:
        report = {"command": "python -m bench.speculation " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bundle": str(args.bundle), "delay_ms": args.delay_ms,
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "python": platform.python_version()},
                  "versions": {pkg: _version(pkg) for pkg in (*VERSIONS, "uvloop", "httptools")},
                  "concurrency": 1, "wire": "json", "seconds": args.seconds, "rounds": rounds, "summary": summary}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
