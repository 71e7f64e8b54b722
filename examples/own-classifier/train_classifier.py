"""Train a small classifier on an image folder and export it to ONNX, the way a user's own model might be:
a different architecture from the paper's, taking **NHWC images in 0..255** and returning **softmax
probabilities**.

    python examples/own-classifier/train_classifier.py --data digits --out digits-classifier.onnx

Then: magnet train folder --data digits --classifier digits-classifier.onnx --layout nhwc --scale 255 \
          --outputs probabilities --out digits-bundle
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.images import load_folder


class SmallNet(nn.Module):
    """conv(32, 5x5, stride 2) - conv(64, 3x3, stride 2) - global average pool - linear, on NHWC 0..255."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 32, 5, stride=2, padding=2), nn.GELU(),
                                  nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # N x H x W x C, 0..255
        x = pixels.permute(0, 3, 1, 2) / 255.0
        return torch.softmax(self.head(self.body(x)), dim=1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="DATA/train/<class>/*.png")
    p.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    ds = load_folder(args.data, seed=args.seed)
    x = torch.from_numpy(ds.train.x).permute(0, 2, 3, 1).contiguous() * 255  # as the model takes them
    y = torch.from_numpy(ds.train.y)
    model = SmallNet(x.shape[-1], len(ds.classes))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 128):
            idx = order[i:i + 128]
            loss = nn.functional.nll_loss(model(x[idx]).clamp_min(1e-12).log(), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = torch.from_numpy(ds.val.x).permute(0, 2, 3, 1) * 255
            acc = (model(val).argmax(1).numpy() == ds.val.y).mean()
        model.train()
        print(f"epoch {epoch + 1}/{args.epochs}: validation accuracy {acc:.2%} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    h, w, c = x.shape[1:]
    torch.onnx.export(model, (torch.zeros(1, h, w, c),), str(args.out), input_names=["pixels"],
                      output_names=["probabilities"], dynamic_axes={"pixels": {0: "n"}, "probabilities": {0: "n"}},
                      dynamo=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
