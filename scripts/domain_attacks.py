"""Does the defense hold when clean inputs and attacks start from uncompressed-like images?

    python scripts/domain_attacks.py --bundle models/cifar10 --data-dir ../shared/data \
        --out docs/results/cifar10-domain-attacks.json

Our CIFAR-10 is a JPEG re-encoding, while an outside check may attack the original, uncompressed images.
No such images are at hand beyond 20, so this uses the first ``--n`` validation images twice: as they
are (JPEG) and as a JPEG pre-image of each (``training.domain_sim``: spread ``--spread``, Cb and Cr at
``--spread-chroma``, plus colour detail with ``--chroma`` > 0; ``python -m training.evaluate.stand_in``
fits the three to real originals), a stand-in for the uncompressed originals. On each, FGSM and PGD-10 (L∞,
``--attacks``) are crafted against the bundle's classifier, and the core judges clean and attacked inputs:
clean accepted and right, and per attack the share defended (rejected, or accepted and right) and the
share rejected. Validation only: no test image is used.

With ``--images FOLDER`` (``*-label-<class>.png`` uncompressed images, e.g. the 20 CIFAR-10 test originals
in ``tests/data/cifar10-originals``, or the official batches written out by ``scripts/cifar10_originals.py``)
the stand-in is not needed: the attacks start from those images and from their JPEG copies, made at
``--copy-quality``, or, with ``--data-dir`` too and files named ``<split>-<row>-label-<class>.png`` (as
``cifar10_originals.py`` names them), the data set's own copies: ``split`` train, val or test, ``row``
the image's row in that split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from service.defense.core import Defense
from service.defense.domain import jpeg_round_trip
from training.attacks.pgd import fgsm, pgd_linf
from training.domain_sim import chroma_detail, jpeg_preimage
from training.evaluate.originals import dataset_copies, load_images
from training.from_onnx import classifier_twin
from training.specs import load_for_manifest


def judge(defense: Defense, x: np.ndarray, y: np.ndarray, member: int = 0) -> dict:
    accepted, labels = [], []
    for i in range(0, len(x), 500):
        v = defense.inspect(x[i : i + 500], member)
        accepted.append(v.accepted)
        labels.append(np.asarray(v.logits_reformed if v.logits_reformed is not None
                                 else defense.classifier(v.reformed)).argmax(1))
    acc, lab = np.concatenate(accepted), np.concatenate(labels)
    right = lab == y
    return {"rejected": float((~acc).mean()), "accepted_and_right": float((acc & right).mean()),
            "defended": float((~acc | right).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, nargs="+", required=True)
    p.add_argument("--data-dir", type=Path, help="the data set: its validation split for the stand-ins, or with "
                   "--images the JPEG copies of <split>-<row>-label-<class>.png originals")
    p.add_argument("--images", type=Path, help="uncompressed *-label-<class>.png images instead of validation stand-ins")
    p.add_argument("--copy-quality", type=int, default=75, help="--images: JPEG quality of their copies")
    p.add_argument("--n", type=int, default=500, help="first N validation images")
    p.add_argument("--attacks", nargs="+", default=["fgsm:0.025", "fgsm:0.05", "pgd10:0.025"],
                   help="KIND:EPS, KIND fgsm or pgd10 (10 steps of eps/4, random start)")
    p.add_argument("--spread", type=float, default=0.4)
    p.add_argument("--chroma", type=float, default=0.0)
    p.add_argument("--spread-chroma", type=float, default=None,
                   help="Cb and Cr at this spread, the luma at --spread's (default: the same)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every-member", action="store_true",
                   help="judge with each member of a pool bundle (the same attacks: they target the classifier); "
                        "the report's keys are then BUNDLE-mK")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.images is None and args.data_dir is None:
        p.error("give --data-dir (validation stand-ins) or --images (uncompressed originals)")
    report = {"command": "python scripts/domain_attacks.py " + " ".join(argv or sys.argv[1:]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bundles": {}}
    if args.images is not None:
        originals, labels, names = load_images(args.images)
        report.update(images=str(args.images), originals=len(originals),
                      copies="the data set's own" if args.data_dir is not None else f"JPEG quality {args.copy_quality}")
    else:
        report.update(validation_images=args.n, spread=args.spread, chroma=args.chroma, spread_chroma=args.spread_chroma)
    for bundle in args.bundle:
        defense = Defense(bundle, device="cpu")
        m = defense.manifest
        if args.images is not None:
            pre, y = originals, labels
            x = (dataset_copies(load_for_manifest(m, args.data_dir), names, labels) if args.data_dir is not None
                 else jpeg_round_trip(originals, args.copy_quality))
        else:
            val = load_for_manifest(m, args.data_dir).val
            x, y = val.x[: args.n], val.y[: args.n]
            rng = np.random.default_rng(args.seed)
            pre = jpeg_preimage(x, m.input.jpeg_quality or 75, args.spread, rng, chroma_spread=args.spread_chroma)
            if args.chroma > 0:
                pre = chroma_detail(pre, args.chroma, rng)
        twin = classifier_twin(defense)
        gen = torch.Generator().manual_seed(args.seed)
        members = range(len(defense.members)) if args.every_member else [0]
        names = {k: f"{bundle}-m{k}" if args.every_member else str(bundle) for k in members}
        rows = {k: {} for k in members}
        for domain, images in (("jpeg", x), ("original" if args.images is not None else "preimage", pre)):
            xt, yt = torch.from_numpy(images), torch.from_numpy(y)
            with torch.no_grad():
                right = float((twin(xt).argmax(1) == yt).float().mean())
            for k in members:
                rows[k][domain] = {"clean": judge(defense, images, y, k), "classifier_right": right}
            for attack in args.attacks:
                kind, eps = attack.split(":")
                e = torch.full((len(xt),), float(eps))
                a = (fgsm(twin, xt, yt, e) if kind == "fgsm" else
                     pgd_linf(twin, xt, yt, e, steps=10, step_size=e / 4, generator=gen)).detach().numpy()
                with torch.no_grad():
                    no_defense = float((twin(torch.from_numpy(a)).argmax(1) == yt).float().mean())
                for k in members:  # the attacks target the classifier: crafted once, judged by each member
                    rows[k][domain][f"{kind}_eps{eps}"] = {**judge(defense, a, y, k), "no_defense": no_defense}
            for k in members:
                print(f"{names[k]} {domain}: " + "; ".join(
                    f"{a} " + (f"accepted and right {100 * v['accepted_and_right']:.1f} %" if a == "clean" else
                               f"{100 * v['no_defense']:.1f} -> {100 * v['defended']:.1f} % (rejected {100 * v['rejected']:.1f})")
                    for a, v in rows[k][domain].items() if isinstance(v, dict)), flush=True)
        report["bundles"].update({names[k]: rows[k] for k in members})
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
