"""What bf16 autocast does to a training step's attack on this machine (``training.loops.native_bf16``):

    python -m bench.bf16_cost

Seconds for one FGSM step (one forward and backward pass of the CIFAR-10 ResNet-9, read back from the
shipped ONNX file) on 64 random images, in float32 and under bf16 autocast, alternated, best of
``--repeats``; and whether ``native_bf16`` would turn bf16 on here. Without bf16 instructions PyTorch
emulates the bf16 kernels. Figures in CHANGELOG.md (training's bf16 default).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from training.attacks.pgd import fgsm
from training.from_onnx import torch_twin
from training.loops import native_bf16


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", type=Path, default=Path("models/shared/cifar10-resnet9.onnx"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    classifier = torch_twin(args.classifier, "cifar10", "classifier", (3, 32, 32)).eval()
    for param in classifier.parameters():
        param.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(args.images, 3, 32, 32, generator=gen), torch.randint(10, (args.images,), generator=gen)
    seconds: dict[str, list[float]] = {"float32": [], "bf16": []}
    for _ in range(args.repeats):
        for name, bf16 in (("float32", False), ("bf16", True)):
            started = time.perf_counter()
            fgsm(classifier, x, y, 0.01, bf16=bf16)
            seconds[name].append(time.perf_counter() - started)
    print(json.dumps({"images": args.images, "threads": torch.get_num_threads(), "native_bf16": native_bf16("cpu"),
                      "seconds_best": {k: min(v) for k, v in seconds.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
