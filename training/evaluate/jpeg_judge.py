"""Judging the divergence on a JPEG round trip of the input, on validation data only.

    python -m training.evaluate.jpeg_judge --bundle models/cifar10 --data-dir DATA \
        --set runs/selection/set.npz --out docs/results/cifar10-selection-round6/jpeg-judge.json

A bundle trained on JPEG images rejects uncompressed clean images more often than JPEG ones
(docs/results/cifar10-domain-shift.json): its reformer treats the detail JPEG removes as a
perturbation, so the divergence between f(x) and f(D(x)) grows. One way to take the domain out of the
detector is to judge a JPEG round trip J(x) (Pillow, ``--quality``) instead of x: the detector scores
JSD(f(J(x)), f(D(J(x)))), while the label still comes from the reformed input itself, f(D(x)).

This tool measures both ways side by side, with each detector's threshold set on the clean validation
images at each FPR: clean accepted-and-right and rejection (the validation images), the share defended
(right label or rejected) of the selection set's FGSM and PGD examples (``training.evaluate.selection
make-set``), and the rejection and accepted-and-right on one JPEG pre-image of each of the first
``--preimages`` validation images at ``--spread`` (``training.domain_sim``; pre-images stand in for
uncompressed images, harsher than real detail). No test image is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from service.defense import scores as S
from service.defense.core import Defense
from service.defense.domain import jpeg_round_trip
from service.defense.thresholds import passes, threshold_at_fpr
from training.bundles import run_batched
from training.domain_sim import jpeg_preimage
from training.images import load_cifar10
from training.provenance import provenance

MODES = ("x", "jpeg")  # the divergence judged on x itself, or on J(x)


def scores(defense: Defense, x: np.ndarray, quality: int, temperatures: list[float], batch: int = 500) -> dict:
    """Labels f(D(x)) and, per mode and temperature, the divergence scores of a batch of images."""
    ae = defense.autoencoders[defense.members[0].reformer]

    def reform(a: np.ndarray) -> np.ndarray:
        return np.clip(run_batched(ae, a, batch), 0, 1).astype(np.float32)

    j = jpeg_round_trip(x, quality)
    logits = {"x": run_batched(defense.classifier, x, batch), "jpeg": run_batched(defense.classifier, j, batch)}
    reformed = {"x": run_batched(defense.classifier, reform(x), batch),
                "jpeg": run_batched(defense.classifier, reform(j), batch)}
    out = {"labels": reformed["x"].argmax(1), "classifier": logits["x"].argmax(1)}
    for mode in MODES:
        for t in temperatures:
            out[f"{mode}_t{t:g}"] = S.divergence_score(logits[mode], reformed[mode], t)
    return out


def rows(judged: dict[str, dict], y: dict[str, np.ndarray], right: np.ndarray, temperatures: list[float],
         fprs: list[float]) -> list[dict]:
    """One row per mode, temperature and FPR: thresholds from the clean scores."""
    out = []
    for mode in MODES:
        for t in temperatures:
            det = f"{mode}_t{t:g}"
            for fpr in fprs:
                thr = threshold_at_fpr(judged["clean"][det], fpr)
                row = {"judged_on": "J(x)" if mode == "jpeg" else "x", "temperature": t, "fpr": fpr,
                       "threshold": float(thr)}
                for key, sc in judged.items():
                    rejected = ~passes(sc[det], thr)
                    correct = sc["labels"] == y[key]
                    if key in ("fgsm", "pgd"):  # among the examples whose clean image the classifier gets right
                        row[f"{key}_defended"] = float((correct | rejected)[right].mean())
                        row[f"{key}_rejected"] = float(rejected[right].mean())
                    else:
                        row[f"{key}_accepted_and_right"] = float((correct & ~rejected).mean())
                        row[f"{key}_rejected"] = float(rejected.mean())
                out.append(row)
    return out


def run(defense: Defense, bundle: Path, data_dir: Path, set_path: Path, quality: int, spread: float,
        n_pre: int, temperatures: list[float], fprs: list[float], seed: int = 0, n_val: int = 0) -> dict:
    started = time.perf_counter()
    val = load_cifar10(data_dir).val
    if n_val:
        val = type(val)(val.x[:n_val], val.y[:n_val])
    sel = np.load(set_path)
    pre = jpeg_preimage(val.x[:n_pre], quality, spread, np.random.default_rng(seed))
    sets = {"clean": val.x, "fgsm": sel["fgsm"], "pgd": sel["pgd"], "preimages": pre}
    y = {"clean": val.y, "fgsm": sel["y"], "pgd": sel["y"], "preimages": val.y[:n_pre]}
    judged = {key: scores(defense, x, quality, temperatures) for key, x in sets.items()}
    right = judged["clean"]["classifier"][sel["idx"]] == sel["y"]
    return {"bundle": str(bundle), "quality": quality, "spread": spread, "validation_images": len(val.y),
            "attack_examples": int(len(sel["y"])), "preimages": n_pre,
            "rows": rows(judged, y, right, temperatures, fprs), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate.jpeg_judge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a CIFAR-10 bundle without an input step")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--set", type=Path, required=True, help="the selection set's .npz (selection make-set)")
    p.add_argument("--quality", type=int, default=75, help="JPEG quality of the round trip")
    p.add_argument("--spread", type=float, default=0.4, help="pre-images' spread across each DCT bin")
    p.add_argument("--preimages", type=int, default=2000, help="pre-images of the first N validation images")
    p.add_argument("--val-images", type=int, default=0, help="clean validation images (0: all 5,000)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[10.0, 40.0])
    p.add_argument("--fprs", type=float, nargs="+", default=[0.01, 0.02, 0.03])
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    defense = Defense(args.bundle, device="cpu")
    if defense.manifest.input.jpeg_quality is not None:
        p.error(f"{args.bundle} has a JPEG input step already: this tool compares judging x with judging J(x)")
    result = run(defense, args.bundle, args.data_dir, args.set, args.quality, args.spread, args.preimages,
                 args.temperatures, args.fprs, n_val=args.val_images)
    for r in result["rows"]:
        print(f"judged on {r['judged_on']:4} T={r['temperature']:g} FPR {r['fpr']:g}: clean "
              f"{100 * r['clean_accepted_and_right']:.2f} % accepted and right, FGSM {100 * r['fgsm_defended']:.2f} %, "
              f"PGD {100 * r['pgd_defended']:.2f} %, pre-images rejected {100 * r['preimages_rejected']:.2f} %")
    result["provenance"] = provenance(["python", "-m", "training.evaluate.jpeg_judge", *(argv or sys.argv[1:])], 0)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
