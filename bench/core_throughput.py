"""Throughput of the defense core on one device, separate sessions against one fused graph per member,
and whether the device's decisions equal the CPU's:

    python -m bench.core_throughput --data-dir ../shared/data --device cuda --batch 1024 \\
        --bundle models/mnist models/cifar10 --check 10000 --out docs/results/core-throughput-gpu.json

Per bundle and variant (``separate``, ``fused``), images per second over ``--seconds`` of back-to-back
calls on one batch of ``--batch`` test images (numpy in and out: host I/O included), for two paths:

- ``screen``: the member's autoencoders and the reconstruction scores, the reformed batch out (what runs
  in the gateway when the classifier is upstream);
- ``core``: the whole decision with the bundle's classifier (embedded): autoencoders, classifier on what
  the member needs (x and the reformed x for divergence detectors, else the reformed x), all scores, the
  decisions and the labels.

``--check N``: the decisions (accepted, and the label of accepted images) of every variant on the
device, on the first N test images, against separate sessions on the CPU; differing images are counted
and the largest score difference is given (a float difference can move a score across its threshold).
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

from service.defense.core import Defense
from training.data import load


def decide_all(defense: Defense, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(accepted, labels with -1 for rejected, scores) for ``x``, with the embedded classifier: the fused
    graph's logits when the member has one, else the classifier's sessions."""
    screening = defense.screen(x)
    n = len(x)
    if screening.logits is not None:
        logits = screening.logits
    else:
        rows = np.concatenate([screening.x, screening.reformed]) if defense.needs_logits(0) else screening.reformed
        logits = defense.classifier.logits(rows)
    if defense.needs_logits(0):
        verdict = defense.decide(screening, logits[:n], logits[n:])
        reformed_logits = logits[n:]
    else:
        verdict = defense.decide(screening)
        reformed_logits = logits
    labels = np.where(verdict.accepted, reformed_logits.argmax(axis=1), -1)
    return verdict.accepted, labels, verdict.scores


def rate(fn, images: int, seconds: float) -> float:
    fn()  # warm-up: first-call allocations, cuDNN algorithm search
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return calls * images / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--bundle", type=Path, nargs="+", default=[Path("models/mnist")])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: onnxruntime's default)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--check", type=int, default=0, help="compare decisions with the CPU's on this many test images")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    report = {"command": ["python", "-m", "bench.core_throughput", *(argv if argv is not None else sys.argv[1:])],
              "machine": platform.machine(), "cpus": os.cpu_count(),
              "onnxruntime": ort.__version__, "providers_available": ort.get_available_providers(),
              "device": args.device, "batch": args.batch, "bundles": {}}
    for bundle in args.bundle:
        separate = Defense(bundle, device=args.device, threads=args.threads, fused=False)
        test = load(separate.manifest.dataset, args.data_dir).test.x
        x = np.ascontiguousarray(np.resize(test, (args.batch, *test.shape[1:])))
        variants = {"separate": separate,
                    "fused": Defense(bundle, device=args.device, threads=args.threads, fused=True, embed_classifier=True)}
        screen_only = Defense(bundle, device=args.device, threads=args.threads, fused=True)
        rows = {}
        for name, defense in variants.items():
            screener = defense if name == "separate" else screen_only
            rows[name] = {"providers": defense.providers,
                          "screen_img_per_s": rate(lambda: screener.screen(x), len(x), args.seconds),
                          "core_img_per_s": rate(lambda: decide_all(defense, x), len(x), args.seconds)}
            print(bundle.name, name, json.dumps(rows[name]), flush=True)
        if args.check:
            cpu = Defense(bundle, device="cpu", threads=args.threads)
            xs = test[: args.check]
            want_accepted, want_labels, want_scores = decide_all(cpu, xs)
            for name, defense in variants.items():
                accepted, labels, scores = decide_all(defense, xs)
                rows[name]["check"] = {
                    "images": len(xs), "decisions_differ": int((accepted != want_accepted).sum()),
                    "labels_differ": int((labels != want_labels).sum()),
                    "max_score_diff": max(float(np.nanmax(np.abs(scores[k] - want_scores[k]))) for k in want_scores)}
                print(bundle.name, name, "check", json.dumps(rows[name]["check"]), flush=True)
        report["bundles"][str(bundle)] = rows
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
