"""Load benchmark: the gateway (embedded default and in front of KServe) against KServe alone.

    python -m bench.gateway_load --data-dir DATA --seconds 20 --concurrency 16 --workers 1,2 \\
        --wire json,binary --out docs/results/bench-mnist.json --plot docs/results/bench-mnist.png

Every target gets single-digit requests (the app-facing case) from a closed loop of ``--concurrency``
aiohttp clients for ``--seconds``, after a warm-up. All processes share this machine's cores with the
load generator, so figures are for comparison between rows of one run, not absolute capacity. Each row
also records the resident memory of the serving processes (a gateway's parent and workers summed) after
its run; the report records the machine and the versions that matter.

Rows, for each ``--wire`` (json: ``/classify`` JSON to the gateway and JSON to KServe; binary: the OIP
v2 binary data extension on the gateway's front and to KServe) and each ``--workers`` count:
``kserve_direct``; ``gateway_embedded`` (the bundle's classifier in-process); ``gateway_to_kserve``
(micro-batching on, the default); and, for json with one worker, ``gateway_to_kserve_unbatched``
(``MAGNET_BATCH_ROWS=0``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import psutil

from tests.procs import ManagedProcess, start_gateway, start_model_server
from training.data import load_mnist

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "mnist"
VERSIONS = ("onnxruntime", "uvicorn", "fastapi", "orjson", "kserve", "numpy")

Request = tuple[bytes, dict[str, str]]


async def _drive(url: str, requests: list[Request], seconds: float, concurrency: int) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < deadline:
                body, headers = requests[i % len(requests)]
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
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


def rss_mb(proc: ManagedProcess) -> float:
    """Resident memory of a process and its children (a gateway's workers), in MB."""
    root = psutil.Process(proc.pid)
    tree = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20


def requests_for(digits: np.ndarray, wire: str, front: str) -> list[Request]:
    """One request per digit: ``front`` is 'classify' (the gateway's own API) or 'v2' (OIP v2)."""
    out = []
    for d in digits:
        if front == "classify":  # /classify has no binary form: the binary rows use the gateway's v2 front
            out.append((orjson.dumps({"inputs": d[0]}, option=orjson.OPT_SERIALIZE_NUMPY),
                        {"Content-Type": "application/json"}))
        elif wire == "json":
            out.append((orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                                  "data": d.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY),
                        {"Content-Type": "application/json"}))
        else:
            raw = np.ascontiguousarray(d[None], dtype="<f4").tobytes()
            header = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                               "parameters": {"binary_data_size": len(raw)}}],
                                   "parameters": {"binary_data_output": True}})
            out.append((header + raw, {"Content-Type": "application/octet-stream",
                                       "Inference-Header-Content-Length": str(len(header))}))
    return out


def plan(args: argparse.Namespace) -> list[dict]:
    """The rows to run, in order: name, target kind, wire, workers."""
    rows = []
    for wire in args.wire:
        rows.append({"name": f"kserve_direct_{wire}", "kind": "kserve", "wire": wire, "workers": 0})
        for w in args.workers:
            for kind in ("embedded", "to_kserve"):
                rows.append({"name": f"gateway_{kind}_{wire}_w{w}", "kind": kind, "wire": wire, "workers": w})
            if wire == "json" and w == 1:
                rows.append({"name": "gateway_to_kserve_unbatched_json_w1", "kind": "to_kserve", "wire": wire,
                             "workers": 1, "env": {"MAGNET_BATCH_ROWS": "0"}})
    return rows


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["results"])
    rates = [report["results"][n]["req_per_s"] for n in names]
    p50 = [report["results"][n]["p50_ms"] for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 0.45 * len(names) + 1.5), sharey=True)
    a.barh(names, rates, color=["#888" if n.startswith("kserve") else "#2a6fdb" for n in names])
    a.set_xlabel("requests / s (single-digit requests)")
    b.barh(names, p50, color="#d98c1f")
    b.set_xlabel("p50 latency, ms")
    a.invert_yaxis()
    fig.suptitle(f"{report['machine']}, {report['concurrency']} concurrent clients, {report['seconds']:.0f} s per row")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="directory with the MNIST IDX files")
    p.add_argument("--seconds", type=float, default=20, help="measured seconds per row")
    p.add_argument("--warmup", type=float, default=3, help="warm-up seconds per row (not measured)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1],
                   help="gateway worker counts to run, comma-separated (default 1)")
    p.add_argument("--wire", type=lambda s: s.split(","), default=["json"],
                   help="json, binary or json,binary (default json)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--plot", type=Path, help="draw the rows as a PNG here (needs matplotlib)")
    args = p.parse_args(argv)
    if not set(args.wire) <= {"json", "binary"}:
        p.error("--wire takes json and/or binary")

    digits = load_mnist(args.data_dir, download=False).test.x[:256]
    kserve, kurl = start_model_server(BUNDLE / "classifier.onnx", "mnist")
    results = {}
    try:
        for row in plan(args):
            front = "v2" if row["kind"] == "kserve" or row["wire"] == "binary" else "classify"
            reqs = requests_for(digits, row["wire"], front)
            if row["kind"] == "kserve":
                proc, url = kserve, f"{kurl}/v2/models/mnist/infer"
            else:
                flags = ["--log-level", "warning", "--workers", str(row["workers"])]
                env = dict(row.get("env", {}))
                if row["kind"] == "to_kserve":
                    flags += ["--upstream", kurl]
                    env["MAGNET_UPSTREAM_BINARY"] = str(row["wire"] == "binary").lower()
                proc, base = start_gateway(*flags, env=env, timeout=120)
                url = f"{base}/classify" if front == "classify" else f"{base}/v2/models/mnist/infer"
            try:
                asyncio.run(_drive(url, reqs, args.warmup, args.concurrency))
                figures = asyncio.run(_drive(url, reqs, args.seconds, args.concurrency))
                figures["rss_mb"] = rss_mb(proc)
            finally:
                if proc is not kserve:
                    proc.stop()
            results[row["name"]] = {**figures, "wire": row["wire"], "workers": row["workers"]}
            print(row["name"], json.dumps(results[row["name"]]), flush=True)
    finally:
        kserve.stop()
    for name, r in results.items():  # each gateway row against KServe direct on the same wire
        r["ratio_to_kserve"] = r["req_per_s"] / results[f"kserve_direct_{r['wire']}"]["req_per_s"]
    report = {"command": "python -m bench.gateway_load " + " ".join(argv or sys.argv[1:]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
                         f"{platform.python_version()}",
              "versions": {pkg: _version(pkg) for pkg in VERSIONS},
              "concurrency": args.concurrency, "seconds": args.seconds, "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
