"""Peak memory of the defense core on one large batch, with and without chunked CPU inference and the
shared onnxruntime arena (each setting in a fresh process: peaks only grow):

    python -m bench.peak_memory --bundle models/cifar10
    python -m bench.peak_memory --bundle models/cifar10-pool --all-members

Each run loads the bundle on the CPU (one intra-op thread, as one worker on 2 cores), optionally sends 16
images through every member first (a pool serving many sessions), then 256 random images through member
0's screen and the classifier on x and on the reformed x, and prints the process's peak RSS and the
seconds of that last step. Figures in docs/results/throughput.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SETTINGS = {"one call, own arenas": {"chunk": 10**9, "shared": False},
            "chunks, own arenas": {"chunk": None, "shared": False},
            "chunks, shared arena": {"chunk": None, "shared": True}}


def measure(bundle: Path, chunk: int | None, shared: bool, all_members: bool) -> dict:
    from service.defense import runtime

    if chunk is not None:
        runtime.CPU_CHUNK_ELEMENTS = chunk
    if not shared:
        runtime._shared_arena = False  # as if this onnxruntime could not register one
    from service.defense import Defense

    defense = Defense(bundle, device="cpu", threads=1)
    x = np.random.default_rng(0).random((256, *defense.input_shape), dtype=np.float32)
    if all_members:
        for m in range(len(defense.members)):
            s = defense.screen(x[:16], m)
            defense.classifier(np.concatenate([x[:16], s.reformed]))
    started = time.perf_counter()
    s = defense.screen(x, 0)
    logits = defense.classifier(np.concatenate([x, s.reformed]))
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "seconds": time.perf_counter() - started, "logits_sum": float(logits.sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--all-members", action="store_true", help="16 images through every member first")
    p.add_argument("--one", help=argparse.SUPPRESS)  # a setting's name: measure it in this process
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.bundle, **SETTINGS[args.one], all_members=args.all_members)))
        return 0
    for name in SETTINGS:
        cmd = [sys.executable, "-m", "bench.peak_memory", "--bundle", str(args.bundle), "--one", name]
        out = subprocess.run(cmd + (["--all-members"] if args.all_members else []), check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"{name:<22} peak {r['peak_mb']:.0f} MB, {r['seconds']:.2f} s, logits sum {r['logits_sum']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
