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
import sys

import numpy as np
import orjson

from bench.gateway_load import drive, requests_for
from bench.hop_floor import (bundle_and_digits, one_client_parser, read_body, run_lifespan, send_json, serve_asgi,
                              write_one_client_report)
from tests.procs import REPO, start_gateway, start_on_free_port


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
            await run_lifespan(receive, send)
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = await read_body(receive)
        if scope["method"] == "GET":  # health and model readiness
            out = b"{}"
        else:
            out = self.infer(body)
            await asyncio.sleep(self.delay_s)
        await send_json(send, 200, out)


def main(argv: list[str] | None = None) -> int:
    p = one_client_parser(__doc__)
    p.add_argument("--delay-ms", type=float, default=2.0, help="the model server's time off this machine's cores")
    p.add_argument("--serve", nargs=4, metavar=("PORT", "MODEL", "NAME", "DELAY_MS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve_asgi(DistantServer(args.serve[1], args.serve[2], float(args.serve[3]) / 1e3), int(args.serve[0]))
        return 0
    defense, name, images = bundle_and_digits(p, args)
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
        write_one_client_report("bench.speculation", argv, args, rounds, summary, delay_ms=args.delay_ms)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
