"""What a batch buys an attack step on one CPU thread (``magnet evaluate --cache-slots``):

    python -m bench.attack_batch --out docs/results/attack-batch-cost.json

Milliseconds for one forward and backward pass to the input of the CIFAR-10 ResNet-9 (read back from
the shipped ONNX file), the cost of one step of the Carlini attacks, at each batch size, per step and per
image; the sizes alternate within each repeat and the best repeat counts. Carlini's L0 and L-infinity
searches take thousands of such steps per example, each example at its own pace, so a one-example batch
is what a resumable run would otherwise use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from training.from_onnx import torch_twin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", type=Path, default=Path("models/shared/cifar10-resnet9.onnx"))
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="steps timed per size and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)  # as it was (a test calls main in its own process)


def _run(args, argv) -> int:
    classifier = torch_twin(args.classifier, "cifar10", "classifier", (3, 32, 32)).eval()
    for param in classifier.parameters():
        param.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    best = {b: float("inf") for b in args.sizes}
    for _ in range(args.repeats):
        for b in args.sizes:
            x = torch.rand(b, 3, 32, 32, generator=gen, requires_grad=True)
            for _ in range(2):  # warm-up
                torch.autograd.grad(classifier(x).sum(), [x])
            started = time.perf_counter()
            for _ in range(args.steps):
                torch.autograd.grad(classifier(x).sum(), [x])
            best[b] = min(best[b], (time.perf_counter() - started) / args.steps * 1000)
    rows = [{"batch": b, "ms_per_step": round(best[b], 2), "ms_per_image": round(best[b] / b, 2),
             "images_per_second_vs_batch_1": round(best[args.sizes[0]] / args.sizes[0] / (best[b] / b), 2)}
            for b in args.sizes]
    out = {"command": "python -m bench.attack_batch " + " ".join(argv if argv is not None else sys.argv[1:]),
           "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "cpus": os.cpu_count(),
           "torch": torch.__version__, "note": args.note, "rows": rows}
    for r in rows:
        print(f"batch {r['batch']}: {r['ms_per_step']:.1f} ms a step, {r['ms_per_image']:.1f} ms an image "
              f"({r['images_per_second_vs_batch_1']:.2f} x batch 1's throughput)")
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
