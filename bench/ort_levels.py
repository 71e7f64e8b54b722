"""onnxruntime's graph optimization levels on the shipped models, on this CPU:

    python -m bench.ort_levels --bundles models/mnist models/cifar10 --out docs/results/ort-levels.json

For every ONNX file of each bundle (autoencoders, reformers, the classifier), the median time of one
``session.run`` at each batch size with the session built at 'basic', 'extended' and 'all'
(onnxruntime's default), one intra-op thread, random inputs in [0, 1]; and the level that the gateway's
``MAGNET_ORT_OPTIMIZATION=auto`` picks for it on this machine (``service.defense.runtime``). 'all' adds
the CPU layout transformations (NCHWc blocked convolutions and the reorders around them).
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
import onnxruntime as ort

from service.defense import runtime
from service.defense.bundle import read_manifest, verify_files


def median_run_ms(session: ort.InferenceSession, rows: int, budget_s: float) -> float:
    feeds = runtime.probe_feeds(session, rows)
    session.run(None, feeds)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 2000):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", type=Path, nargs="+", default=[Path("models/mnist"), Path("models/cifar10")])
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 16, 256])
    p.add_argument("--seconds", type=float, default=1.0, help="timing budget per model, level and batch")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    rows = []
    for bundle in args.bundles:
        manifest = read_manifest(bundle)
        files = verify_files(bundle, manifest)
        for name in dict.fromkeys([*manifest.autoencoder_files(), manifest.classifier.file]):
            path = files[name]
            row = {"bundle": str(bundle), "file": name, "ms": {}}
            for level in runtime.LEVELS:
                session = runtime.make_session(path, [runtime.CPU], threads=1, optimization=level)
                row["ms"][level] = {str(b): median_run_ms(session, b, args.seconds) for b in args.batches}
            auto = runtime.make_session(path, [runtime.CPU], threads=1, optimization="auto")
            row["auto"] = next(k for k, v in runtime.LEVELS.items() if v == auto.get_session_options().graph_optimization_level)
            row["all_over_extended"] = {b: row["ms"]["all"][b] / row["ms"]["extended"][b] for b in row["ms"]["all"]}
            print(f"{bundle}/{name}: " + "; ".join(f"{lvl} " + " / ".join(f"{v:.3f}" for v in t.values())
                                                 for lvl, t in row["ms"].items())
                  + f" ms at batches {args.batches}; auto picks '{row['auto']}'", flush=True)
            rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python -m bench.ort_levels " + " ".join(argv if argv is not None else sys.argv[1:]),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "onnxruntime": ort.__version__,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "threads": 1, "batches": args.batches, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
