"""Write MNIST (the four IDX .gz files) or CIFAR-10 as an image folder: OUT/train/<class>/*.png, OUT/test/<class>/*.png.

    python examples/own-classifier/make_folder.py --data-dir DATA --dataset mnist --out digits [--limit N]

Stands in for "your own images" in the README's tutorial; any folder laid out this way will do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True, help="where the data set's files are")
    p.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    p.add_argument("--out", type=Path, required=True, help="the folder to write")
    p.add_argument("--limit", type=int, default=0, help="at most this many images per split (0: all)")
    args = p.parse_args()
    if args.dataset == "mnist":
        from training.data import load_mnist

        ds = load_mnist(args.data_dir)
        # MNIST's own split: the 5,000 validation images go back into train (the folder recipe holds out its own)
        splits = {"train": (np.concatenate([ds.val.x, ds.train.x]), np.concatenate([ds.val.y, ds.train.y])),
                  "test": (ds.test.x, ds.test.y)}
    else:
        from training.images import load_cifar10

        ds = load_cifar10(args.data_dir)
        splits = {"train": (np.concatenate([ds.val.x, ds.train.x]), np.concatenate([ds.val.y, ds.train.y])),
                  "test": (ds.test.x, ds.test.y)}
    for split, (x, y) in splits.items():
        n = min(args.limit, len(y)) if args.limit else len(y)
        for i in range(n):
            folder = args.out / split / ds.classes[y[i]]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (x[i] * 255).round().astype(np.uint8)
            image = Image.fromarray(pixels[0]) if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0))
            image.save(folder / f"{i:05d}.png")
        print(f"{split}: {n} images in {args.out / split}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
