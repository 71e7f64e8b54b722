"""Load benchmark: the gateway (embedded default and in front of KServe) against KServe alone.

    python -m bench.gateway_load --data-dir DATA --bundle models/mnist --seconds 20 --concurrency 1,4,16 \
        --workers 1,2 --wire json,binary --out docs/results/bench-mnist.json --plot docs/results/bench-mnist.png \
        --md docs/results/bench-mnist.md

Every target gets single-image requests (the app-facing case) from a closed loop of aiohttp clients, at
each ``--concurrency`` in turn, for ``--seconds`` after a warm-up. All processes share this machine's cores
with the load generator, so figures are for comparison between rows of one run, not absolute capacity.
KServe (the project's ``docker/kserve/serve_onnx.py``, its command and the script's sha256 recorded)
serves the bundle's own classifier file: the baseline is the same model, not a tuned-down one.

Rows, for each ``--wire`` (json: ``/classify`` JSON to the gateway and JSON to KServe; binary: the OIP
v2 binary data extension on the gateway's front and to KServe) and each ``--workers`` count:
``kserve_direct``; ``gateway_embedded`` (the bundle's classifier in-process); ``gateway_to_kserve``
(micro-batching on, the default); and, for json with one worker, ``gateway_to_kserve_unbatched``
(``MAGNET_BATCH_ROWS=0``). A bundle with divergence detectors sends two rows upstream per image (x and
its reformed copy). After a gateway row's runs, one request at the largest batch (``MAGNET_MAX_BATCH``
images, binary) is sent, and the peak resident memory (VmHWM) of every process of the gateway is
recorded: ``peak_rss_per_process_mb`` is the largest, a worker's.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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

from service.defense import Defense
from tests.procs import MODEL_SERVER, ManagedProcess, start_gateway, start_model_server
from training.data import load

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "mnist"
VERSIONS = ("onnxruntime", "uvicorn", "fastapi", "orjson", "kserve", "numpy")

Request = tuple[bytes, dict[str, str]]
LARGEST_BATCH = 256  # MAGNET_MAX_BATCH's default


async def _once(url: str, request: Request) -> None:
    """One request, which must succeed (the largest batch, before the memory reading)."""
    async with aiohttp.ClientSession() as session, session.post(url, data=request[0], headers=request[1]) as r:
        body = await r.read()
        if r.status != 200:
            raise RuntimeError(f"the largest batch got {r.status}: {body[:300]!r}")


def _summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "req_per_s": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _drive_part(job: tuple) -> tuple[list[float], int, float]:
    """One load-generator process's share: waits for the common start (wall clock), then drives."""
    url, requests, seconds, concurrency, start_at = job
    time.sleep(max(0.0, start_at - time.time()))
    return asyncio.run(_drive(url, requests, seconds, concurrency))


def drive(url: str, requests: list[Request], seconds: float, concurrency: int, processes: int = 1) -> dict:
    """The closed loop of ``concurrency`` clients for ``seconds``, from one process or spread over
    ``processes`` (one Python client process tops out at a few thousand requests per second: a GPU
    gateway needs several). The processes start together; latencies are pooled, req/s summed."""
    if processes <= 1:
        return _summary(*asyncio.run(_drive(url, requests, seconds, concurrency)))
    import multiprocessing

    shares = [c for c in (concurrency // processes + (k < concurrency % processes) for k in range(processes)) if c]
    start_at = time.time() + 2.0 + 0.5 * len(shares)  # after every process has started and imported
    with multiprocessing.get_context("spawn").Pool(len(shares)) as pool:
        parts = pool.map(_drive_part, [(url, requests, seconds, c, start_at) for c in shares])
    latencies = [t for part in parts for t in part[0]]
    return _summary(latencies, sum(p[1] for p in parts), max(p[2] for p in parts))


async def _drive(url: str, requests: list[Request], seconds: float,
                 concurrency: int) -> tuple[list[float], int, float]:
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
    return latencies, errors, elapsed


def rss_mb(proc: ManagedProcess) -> float:
    """Resident memory of a process and its children (a gateway's workers), in MB."""
    root = psutil.Process(proc.pid)
    tree = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in tree if p.is_running()) / 2**20


def peak_rss_mb(proc: ManagedProcess) -> float:
    """The largest peak resident memory (VmHWM) of a process and its children: one worker's peak."""
    root = psutil.Process(proc.pid)
    peaks = []
    for p in [root, *root.children(recursive=True)]:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
        except OSError:
            continue
        peaks += [int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(peaks)


def binary_request(x: np.ndarray) -> Request:
    """An OIP v2 binary-data request for the batch ``x``, asking for binary outputs."""
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = orjson.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "parameters": {"binary_data_output": True}})
    return header + raw, {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(header))}


def requests_for(images: np.ndarray, wire: str, front: str) -> list[Request]:
    """One request per image: ``front`` is 'classify' (the gateway's own API) or 'v2' (OIP v2)."""
    out = []
    for d in images:
        if front == "classify":  # /classify has no binary form: the binary rows use the gateway's v2 front
            out.append((orjson.dumps({"inputs": d[0] if d.shape[0] == 1 else d}, option=orjson.OPT_SERIALIZE_NUMPY),
                        {"Content-Type": "application/json"}))
        elif wire == "json":
            out.append((orjson.dumps({"inputs": [{"name": "input", "shape": [1, *d.shape], "datatype": "FP32",
                                                  "data": d.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY),
                        {"Content-Type": "application/json"}))
        else:
            out.append(binary_request(d[None]))
    return out


def mnist_json_requests(data_dir: Path, n: int = 200) -> tuple[list[Request], list[Request]]:
    """JSON requests of the first ``n`` MNIST test digits: for the gateway's /classify, and for OIP v2."""
    digits = load("mnist", data_dir).test.x[:n]
    return requests_for(digits, "json", "classify"), requests_for(digits, "json", "v2")


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
    """Throughput, p50 and p99 against concurrency, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for name, r in report["results"].items():
        cs = sorted(int(c) for c in r["runs"])
        style = {"color": "#555", "linestyle": "--"} if name.startswith("kserve") else {}
        for ax, key in zip(axes, ("req_per_s", "p50_ms", "p99_ms")):
            ax.plot(cs, [r["runs"][str(c)][key] for c in cs], marker="o", label=name, **style)
    for ax, label in zip(axes, ("requests / s (single-image requests)", "p50 latency, ms", "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report['bundle']}: {report['machine']}, {report['seconds']:.0f} s per point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    """The report as a results page: one table per concurrency, every ratio from the same run."""
    lines = [f"# Throughput: `{report['bundle']}` ({report['machine']})", "",
             f"Command: `{report['command']}`", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".", "",
             f"Model server: `{' '.join(report['model_server']['command'])}` (script sha256 "
             f"`{report['model_server']['script_sha256'][:16]}…`), serving the bundle's classifier "
             f"`{report['model_server']['model_file']}`. Upstream rows per image: {report['upstream_rows_per_image']}.", "",
             "Rows: `json` = `/classify` JSON to the gateway and JSON to KServe; `binary` = the OIP v2 binary data "
             "extension on the gateway's v2 front and to KServe; `wN` = N worker processes; ratio = req/s over "
             "KServe direct on the same wire at the same concurrency; added p50 = p50 minus KServe direct's p50 "
             "on the same wire at the same concurrency; RSS = the gateway's process tree after the runs; peak = "
             f"the largest VmHWM of one process after one request of {report['largest_batch']} images.", ""]
    if report.get("plot"):
        lines += [f"![throughput and latency against concurrency]({report['plot']})", ""]
    cs = sorted({int(c) for r in report["results"].values() for c in r["runs"]})
    for c in cs:
        lines += [f"## {c} concurrent client{'s' if c > 1 else ''}", "",
                  "| row | req/s | p50 ms | p99 ms | ratio to KServe | added p50 ms | RSS MB | peak RSS per process MB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in report["results"].items():
            run = r["runs"].get(str(c))
            if run is None:
                continue
            peak = r.get("peak_rss_per_process_mb")
            lines.append(f"| {name} | {run['req_per_s']:.0f} | {run['p50_ms']:.2f} | {run['p99_ms']:.1f} "
                         f"| {run['ratio_to_kserve']:.2f} | {run['added_p50_ms']:+.2f} | {r['rss_mb']:.0f} "
                         f"| {'—' if peak is None else f'{peak:.0f}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="directory with the bundle's data set")
    p.add_argument("--bundle", type=Path, default=BUNDLE, help="bundle to serve (default models/mnist)")
    p.add_argument("--seconds", type=float, default=20, help="measured seconds per row and concurrency")
    p.add_argument("--warmup", type=float, default=3, help="warm-up seconds per row and concurrency (not measured)")
    p.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[16],
                   help="requests in flight, comma-separated (default 16)")
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[1],
                   help="gateway worker counts to run, comma-separated (default 1)")
    p.add_argument("--wire", type=lambda s: s.split(","), default=["json"],
                   help="json, binary or json,binary (default json)")
    p.add_argument("--client-processes", type=int, default=1,
                   help="spread each concurrency over this many load-generator processes (default 1)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    p.add_argument("--plot", type=Path, help="draw throughput, p50 and p99 against concurrency as a PNG here")
    p.add_argument("--md", type=Path, help="write the results page (markdown) here")
    args = p.parse_args(argv)
    if not set(args.wire) <= {"json", "binary"}:
        p.error("--wire takes json and/or binary")

    defense = Defense(args.bundle, device="cpu")
    manifest = defense.manifest
    name = manifest.dataset
    images = load(manifest.dataset, args.data_dir).test.x[:LARGEST_BATCH]
    largest = binary_request(images)
    kserve, kurl = start_model_server(defense.classifier_file, name)
    results = {}
    try:
        for row in plan(args):
            front = "v2" if row["kind"] == "kserve" or row["wire"] == "binary" else "classify"
            reqs = requests_for(images, row["wire"], front)
            if row["kind"] == "kserve":
                proc, url = kserve, f"{kurl}/v2/models/{name}/infer"
            else:
                flags = ["--log-level", "warning", "--workers", str(row["workers"]), "--bundle", str(args.bundle)]
                env = {"MAGNET_MODEL_NAME": name, **row.get("env", {})}
                if row["kind"] == "to_kserve":
                    flags += ["--upstream", kurl]
                    # the largest batch (512 upstream rows for a divergence bundle) can take KServe more than
                    # the default 10 s on a few shared cores; the bench measures throughput, not timeouts
                    env |= {"MAGNET_UPSTREAM_MODEL": name, "MAGNET_UPSTREAM_BINARY": str(row["wire"] == "binary").lower(),
                            "MAGNET_UPSTREAM_TIMEOUT_S": "120"}
                proc, base = start_gateway(*flags, env=env, timeout=120)
                url = f"{base}/classify" if front == "classify" else f"{base}/v2/models/{name}/infer"
            result = {"wire": row["wire"], "workers": row["workers"], "runs": {}}
            try:
                for c in args.concurrency:
                    drive(url, reqs, args.warmup, c, args.client_processes)
                    result["runs"][str(c)] = drive(url, reqs, args.seconds, c, args.client_processes)
                    print(row["name"], c, json.dumps(result["runs"][str(c)]), flush=True)
                result["rss_mb"] = rss_mb(proc)
                if proc is not kserve:
                    asyncio.run(_once(f"{base}/v2/models/{name}/infer", largest))
                    result["peak_rss_per_process_mb"] = peak_rss_mb(proc)
            finally:
                if proc is not kserve:
                    proc.stop()
            results[row["name"]] = result
    finally:
        kserve.stop()
    for r in results.values():  # each row against KServe direct on the same wire, at the same concurrency
        for c, run in r["runs"].items():
            direct = results[f"kserve_direct_{r['wire']}"]["runs"][c]
            run["ratio_to_kserve"] = run["req_per_s"] / direct["req_per_s"]
            run["added_p50_ms"] = run["p50_ms"] - direct["p50_ms"]
    divergence = any(defense.needs_logits(m) for m in range(len(defense.members)))
    report = {"command": "python -m bench.gateway_load " + " ".join(argv if argv is not None else sys.argv[1:]),
              "bundle": _shown(args.bundle), "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                                     f"{platform.python_implementation()} {platform.python_version()}",
              "versions": {pkg: _version(pkg) for pkg in VERSIONS},
              "model_server": {"command": ["python", str(MODEL_SERVER.relative_to(ROOT)), "--model-file", "…",
                                           "--model-name", name, "--http-port", "…"],
                               "script_sha256": hashlib.sha256(MODEL_SERVER.read_bytes()).hexdigest(),
                               "model_file": str(Path(defense.classifier_file).resolve().relative_to(ROOT))},
              "gateway_settings": "defaults, except MAGNET_WORKERS and the rows' own (MAGNET_BATCH_ROWS=0, "
                                  "MAGNET_UPSTREAM_BINARY)",
              "upstream_rows_per_image": 2 if divergence else 1, "largest_batch": LARGEST_BATCH,
              "concurrency": args.concurrency, "seconds": args.seconds,
              "client_processes": args.client_processes, "results": results}
    if args.plot:
        plot(report, args.plot)
        report["plot"] = args.plot.name
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        args.md.write_text(markdown(report))
    return 0


def _shown(path: Path) -> str:
    """A path as the results page shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
