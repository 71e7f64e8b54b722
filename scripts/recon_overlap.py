"""Where uncompressed clean images and FGSM examples fall on a bundle's reconstruction detector.

    python scripts/recon_overlap.py --bundle models/cifar10-jpeg-inputs --data-dir ../shared/data \
        --images tests/data/cifar10-originals --out docs/results/recon-overlap.json

Scores over the detector's threshold (1 = the threshold), through the core: the clean validation
images, FGSM at ``--eps`` crafted against the bundle's classifier on the first ``--n`` validation images,
and the uncompressed images of ``--images`` (``*-label-<class>.png``). Selection round 4 read it to see
whether any threshold keeps the attack out and the uncompressed images in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from service.defense.core import Defense
from training.attacks.pgd import fgsm
from training.evaluate.originals import load_images
from training.from_onnx import classifier_twin
from training.specs import load_for_manifest

QUANTILES = (0.0, 0.01, 0.05, 0.5, 0.95, 0.995, 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--detector", default="recon")
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    defense = Defense(args.bundle, device="cpu")
    m = defense.manifest
    threshold = next(d.threshold for d in m.members[0].detectors if d.name == args.detector)

    def relative(x: np.ndarray) -> np.ndarray:
        return np.concatenate([defense.screen(x[i : i + 1000]).scores[args.detector]
                               for i in range(0, len(x), 1000)]) / threshold

    val = load_for_manifest(m, args.data_dir).val
    twin = classifier_twin(defense)
    x, y = torch.from_numpy(val.x[: args.n]), torch.from_numpy(val.y[: args.n])
    attacked = fgsm(twin, x, y, torch.full((len(x),), args.eps)).detach().numpy()
    groups = {"validation clean": relative(val.x), f"validation FGSM eps {args.eps:g}": relative(attacked),
              f"uncompressed ({args.images})": relative(load_images(args.images)[0])}
    result = {"bundle": str(args.bundle), "detector": args.detector, "threshold": threshold,
              "quantiles": list(QUANTILES),
              "score_over_threshold": {k: [round(float(q), 3) for q in np.quantile(v, QUANTILES)]
                                       for k, v in groups.items()}}
    for group, values in result["score_over_threshold"].items():
        print(f"{group}: score / threshold at quantiles {list(QUANTILES)}: {values}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
