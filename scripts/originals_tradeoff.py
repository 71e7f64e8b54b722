"""Where a bundle's divergence threshold trades clean uncompressed images against attacks from them.

    python scripts/originals_tradeoff.py --bundle models/cifar10 runs/c11-bundle \\
        --images runs/cifar10-originals/val --rates 2 3 4 5

For each bundle (first member, one divergence detector), on the ``--images`` originals
(``*-label-<class>.png``, e.g. the validation originals of ``scripts/cifar10_originals.py``): at the shipped
threshold and at the thresholds that reject each of ``--rates`` percent of those clean originals, the
clean originals rejected and accepted-and-right, and FGSM (``--eps``) crafted from them against the
bundle's classifier, defended (rejected, or accepted and right). The thresholds are set on the same
images they are judged on: an analysis of the trade-off, not a calibration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from service.defense.core import Defense
from training.attacks.pgd import fgsm
from training.evaluate.domain_shift import scores_of
from training.evaluate.originals import load_images
from training.from_onnx import classifier_twin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, nargs="+", required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--rates", type=float, nargs="+", default=[2, 3, 4, 5], help="percent of clean originals rejected")
    p.add_argument("--eps", type=float, nargs="+", default=[0.025, 0.05])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    x, y, _ = load_images(args.images)
    report = {"command": "python scripts/originals_tradeoff.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "images": len(x), "bundles": {}}
    for bundle in args.bundle:
        d = Defense(bundle, device="cpu")
        m = d.manifest
        det = [t for t in m.members[0].detectors if t.kind == "divergence"]
        if len(det) != 1:
            raise SystemExit(f"{bundle}: wants one divergence detector in its first member, has {len(det)}")
        name = det[0].name
        twin = classifier_twin(d)
        s_clean, lab_clean = scores_of(d, x, 0)
        attacked = {}
        for eps in args.eps:
            a = fgsm(twin, torch.from_numpy(x), torch.from_numpy(y), torch.full((len(x),), eps)).numpy()
            attacked[eps] = scores_of(d, a, 0)
        points = [("shipped", float(det[0].threshold))] + [
            (f"{r:g} % of originals rejected", float(np.quantile(s_clean[name], 1 - r / 100))) for r in args.rates]
        rows = []
        for label, t in points:
            row = {"threshold": label, "value": t, "clean_rejected": float((s_clean[name] >= t).mean()),
                   "clean_accepted_and_right": float(((s_clean[name] < t) & (lab_clean == y)).mean())}
            for eps, (s, lab) in attacked.items():
                row[f"fgsm_eps{eps}_defended"] = float(((s[name] >= t) | (lab == y)).mean())
            rows.append(row)
            print(f"{bundle} {label}: clean rejected {100 * row['clean_rejected']:.1f} %, accepted and right "
                  f"{100 * row['clean_accepted_and_right']:.1f} %; " + ", ".join(
                      f"FGSM {eps} defended {100 * row[f'fgsm_eps{eps}_defended']:.1f} %" for eps in attacked), flush=True)
        report["bundles"][str(bundle)] = rows
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
