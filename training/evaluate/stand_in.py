"""Fit the uncompressed stand-in to real originals, part by part.

    python -m training.evaluate.stand_in --images tests/data/cifar10-originals --data-dir DATA \\
        --out docs/results/cifar10-stand-in.json

The validation pre-images that play uncompressed CIFAR-10 images (``training.domain_sim``) were set by one
number, the spread, to sit as far from their JPEG as the 20 real originals do from theirs. Split by what a
4:2:0 JPEG does to each part (``detail_components``: luma, the 2 x 2 chroma means it quantizes, the chroma
within each 2 x 2 block it drops), one spread for all gives the wrong mix: too little luma detail, too
much chroma. This fits one setting per part (luma spread, chroma spread, ``chroma_detail`` strength) to
the originals' medians, and reports each part's quartiles for the originals, the old one-spread stand-in
(``--compare``) and the fitted one, on the first ``--val-images`` validation images. Only the originals'
pixels are used (no label, no attack, no model).
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
from training.domain_sim import chroma_detail, detail_components, fit_stand_in, jpeg_preimage
from training.evaluate.originals import load_images


def quartiles(parts: dict[str, np.ndarray]) -> dict[str, list[float]]:
    return {k: [round(float(q), 3) for q in np.percentile(v, [25, 50, 75])] for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="folder of *-label-<class>.png originals")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--quality", type=int, default=75, help="the data set's JPEG quality")
    p.add_argument("--val-images", type=int, default=2000)
    p.add_argument("--compare", type=float, nargs="*", default=[0.4], metavar="SPREAD",
                   help="one-spread stand-ins to report beside the fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    originals, _, _ = load_images(args.images)
    copies = jpeg_round_trip(originals, args.quality)
    x = load(args.dataset, args.data_dir).val.x[: args.val_images]
    fit = fit_stand_in(originals, copies, x, args.quality, np.random.default_rng(args.seed))
    rng = np.random.default_rng(args.seed + 1)
    rows = {"originals": quartiles(detail_components(originals, copies))}
    for s in args.compare:
        rows[f"spread {s}"] = quartiles(detail_components(jpeg_preimage(x, args.quality, s, rng), x))
    fitted = chroma_detail(jpeg_preimage(x, args.quality, fit["spread"], rng, chroma_spread=fit["chroma_spread"]),
                           fit["chroma"], rng)
    rows["fitted"] = quartiles(detail_components(fitted, x))
    report = {"command": "python -m training.evaluate.stand_in " + " ".join(argv if argv is not None else sys.argv[1:]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "originals": len(originals),
              "validation_images": len(x), "quality": args.quality,
              "fit": {k: (round(v, 4) if isinstance(v, float) else {kk: round(vv, 3) for kk, vv in v.items()})
                      for k, v in fit.items()},
              "parts_quartiles_0_255": rows}
    print(f"fitted: --spread {fit['spread']:.2f} --spread-chroma {fit['chroma_spread']:.2f} --chroma {fit['chroma']:.2f}")
    for name, r in rows.items():
        print(f"{name:>12s}: " + "  ".join(f"{k} {v[1]:.2f} ({v[0]:.2f}-{v[2]:.2f})" for k, v in r.items()))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
