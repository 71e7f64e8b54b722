"""What the JPEG input step (``input.jpeg_quality``) costs, and how close it brings an original to the data.

    python -m bench.jpeg_step --data-dir ../shared/data --images tests/data/cifar10-originals

- cost: microseconds per 32 x 32 colour image of ``service.defense.domain.jpeg_round_trip`` on one
  process, batches of 1 and of 256 (the first test images of the CIFAR-10 data under ``--data-dir``);
- fidelity: for each original (``*-label-<class>.png``, test image ``NN`` of ``test-NN-...``), the mean
  absolute difference (in 1/255) between its round trip and the data set's JPEG copy of it, against the
  difference between the original itself and that copy.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from service.defense.domain import jpeg_round_trip
from training.images import CIFAR10_CLASSES


def _rate(fn, n: int, seconds: float) -> float:
    fn()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        done += 1
    return (time.perf_counter() - started) / done / n * 1e6


def data_copies(data_dir: Path, labels: list[int]) -> np.ndarray:
    """The data set's JPEG copies of test images 0..len(labels)-1 (``test/<class>/NNNN.jpg`` numbers each
    class's images in test-batch order)."""
    seen: dict[int, int] = {}
    names = []
    for y in labels:
        names.append(f"test/{CIFAR10_CLASSES[y]}/{seen.get(y, 0):04d}.jpg")
        seen[y] = seen.get(y, 0) + 1
    archive = next((data_dir / "cifar10").glob("*.tar.gz"))
    found = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.name in names:
                found[member.name] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
    return np.stack([found[n] for n in names]).astype(np.float32).transpose(0, 3, 1, 2) / 255


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--quality", type=int, default=75)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    files = sorted(args.images.glob("test-*-label-*.png"))
    labels = [int(re.search(r"-label-(\d+)", f.name).group(1)) for f in files]
    originals = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32)
    originals = originals.transpose(0, 3, 1, 2) / 255
    copies = data_copies(args.data_dir, labels)
    batch = np.concatenate([copies] * (256 // len(copies) + 1))[:256]
    result = {
        "quality": args.quality,
        "us_per_image_batch_1": _rate(lambda: jpeg_round_trip(batch[:1], args.quality), 1, args.seconds),
        "us_per_image_batch_256": _rate(lambda: jpeg_round_trip(batch, args.quality), 256, args.seconds),
        "originals": len(files),
        "mean_abs_round_trip_to_copy_255": float(np.abs(jpeg_round_trip(originals, args.quality) - copies).mean() * 255),
        "mean_abs_original_to_copy_255": float(np.abs(originals - copies).mean() * 255),
        "mean_abs_copy_round_trip_to_copy_255": float(np.abs(jpeg_round_trip(copies, args.quality) - copies).mean() * 255),
    }
    text = json.dumps(result, indent=1) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
