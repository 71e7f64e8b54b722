"""Which JPEG settings made a data set's copies? Re-encode uncompressed originals and compare with the copies.

    python scripts/jpeg_match.py --images runs/cifar10-originals/val --data-dir ../shared/data \
        --out docs/results/cifar10-selection-round16/jpeg-match.json

``--images``: uncompressed originals named ``<split>-<row>-label-<class>.png`` (``scripts/cifar10_originals.py``
writes them), each paired with its copy, row ``row`` of ``split`` in the data set under ``--data-dir``. For
each quality and chroma subsampling (``service.defense.domain.jpeg_round_trip``, the gateway's JPEG input step),
the RMS distance in 0-255 units between JPEG(original) and the copy, and the share of 8-bit values that
are equal; beside them, the distance between the original itself and the copy. The setting that lands
nearest the copies is the one a JPEG input step should use to bring uncompressed inputs into the
domain the bundle was trained on (docs/results/cifar10-selection-round16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from service.defense.domain import jpeg_round_trip
from training.data import load
from training.evaluate.originals import dataset_copies, load_images

SUBSAMPLING = ("4:4:4", "4:2:2", "4:2:0")  # Pillow's chroma subsampling; 4:2:0 is its default for colour


def distance(a: np.ndarray, b: np.ndarray) -> dict:
    """RMS distance (0-255 units) and the share of equal 8-bit values."""
    a8, b8 = np.round(a * 255), np.round(b * 255)
    return {"rms_0_255": float(np.sqrt(np.mean((a8 - b8) ** 2))), "equal_values": float(np.mean(a8 == b8))}


def match_table(originals: np.ndarray, copies: np.ndarray, qualities: list[int], subsamplings: list[str]) -> dict:
    rows = [{"quality": q, "subsampling": s, **distance(jpeg_round_trip(originals, q, s), copies)}
            for q in qualities for s in subsamplings]
    best = min(rows, key=lambda r: r["rms_0_255"])
    return {"original_to_copy": distance(originals, copies), "rows": rows,
            "nearest": {"quality": best["quality"], "subsampling": best["subsampling"]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="<split>-<row>-label-<class>.png originals")
    p.add_argument("--data-dir", type=Path, required=True, help="the data set holding their JPEG copies")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--qualities", type=int, nargs="+", default=[60, 70, 75, 80, 90, 95])
    p.add_argument("--subsampling", nargs="+", choices=SUBSAMPLING, default=["4:2:0", "4:4:4"])
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    originals, labels, names = load_images(args.images)
    copies = dataset_copies(load(args.dataset, args.data_dir), names, labels)
    report = {"command": "python scripts/jpeg_match.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "images": len(originals),
              **match_table(originals, copies, args.qualities, args.subsampling)}
    for r in report["rows"]:
        print(f"quality {r['quality']} {r['subsampling']}: {r['rms_0_255']:.2f} RMS to the copy, "
              f"{100 * r['equal_values']:.1f} % of values equal")
    print(f"the originals themselves: {report['original_to_copy']['rms_0_255']:.2f} RMS; nearest: {report['nearest']}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
