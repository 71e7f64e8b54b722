"""``magnet train domain``: give a built bundle the input domain of its training data, without retraining.

A bundle trained on JPEG images (the CIFAR-10 data the tests use is a quality-75 re-encoding) rejects
uncompressed images of the same kind far above its false-positive rate, because its reformer learned
JPEG's loss of detail as part of "normal" (``service.defense.domain``). This step sets
``input.jpeg_quality`` in the manifest (``auto``: the quality every training image was saved at, read
from the data), recalibrates every detector at the false-positive rate it was calibrated at, on the
same validation images put through the round trip, and measures the clean test figures again through
the core. The ONNX files are not touched; the manifest keeps the thresholds it had before, under
``measurements.input_domain``.

    magnet train domain --bundle models/cifar10 --data-dir DATA            # quality read from the data
    magnet train domain --bundle models/cifar10 --data-dir DATA --jpeg-quality none   # undo
    magnet train domain --bundle models/cifar10 --data-dir DATA --jpeg-quality none --drop recon

``--drop`` removes detectors (the others are recalibrated at their FPRs as above): the CIFAR-10
reconstruction detector is the one that rejects uncompressed images (docs/results/cifar10-defense.md).
``--fpr NAME=F`` recalibrates a kept detector at another false-positive rate (one chosen on validation,
e.g. a row of ``python -m training.evaluate.selection table``):

    magnet train domain --bundle models/cifar10-pool --data-dir DATA --jpeg-quality none \
        --drop recon jsd_t10 --fpr jsd_t40=0.02

``--preimages MAX`` calibrates on both input domains a JPEG-trained bundle meets: the validation images
as they are, plus a JPEG pre-image of each (``training.domain_sim.jpeg_preimage``, spread ~ U(0, MAX),
``--preimage-seed``), a stand-in for the uncompressed images they were encoded from. Each detector's FPR
is then its rate on that mix, not on the JPEG images alone (the JPEG share is lower, the pre-image share
higher); the manifest records it:

    magnet train domain --bundle CANDIDATE --data-dir DATA --jpeg-quality none --preimages 0.5 --candidate
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from service.defense.bundle import read_manifest, verify_files, write_manifest
from service.defense.core import Defense
from training import bundles as B
from training.bundle_report import clean_figures
from training.domain_sim import jpeg_preimage
from training.provenance import provenance
from training.specs import load_for_manifest


def _fpr_arg(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        fpr = float(value)
    except ValueError:
        fpr = -1.0
    if not sep or not name or not 0 < fpr < 1:
        raise argparse.ArgumentTypeError(f"expected DETECTOR=FPR with 0 < FPR < 1, got {text!r}")
    return name, fpr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="magnet train domain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="the bundle to update in place")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="where the bundle's data set is")
    p.add_argument("--data", type=Path, help="the image folder of a bundle built by 'magnet train folder'")
    B.add_jpeg_quality(p, default="auto")
    p.add_argument("--figures-limit", type=int, default=0,
                   help="measure the clean figures on the first N test images (0: the number the bundle "
                        "recorded for a pool, else all)")
    p.add_argument("--drop", nargs="+", default=[], metavar="DETECTOR",
                   help="detectors to remove from every member (e.g. one whose scores do not hold across input "
                        "formats); the others keep their FPRs")
    p.add_argument("--fpr", nargs="+", default=[], metavar="DETECTOR=FPR", type=_fpr_arg,
                   help="recalibrate these kept detectors at a new false-positive rate (0 < FPR < 1)")
    p.add_argument("--preimages", type=float, default=None, metavar="MAX",
                   help="calibrate on the validation images plus a JPEG pre-image of each (spread ~ U(0, MAX), "
                        "at the training images' JPEG quality): FPRs on both input domains together")
    p.add_argument("--preimage-seed", type=int, default=1, help="--preimages: the draws' seed")
    p.add_argument("--candidate", action="store_true",
                   help="a candidate for selection: recalibrate, but touch no test image (no test figures)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    manifest = read_manifest(args.bundle)
    ds = load_for_manifest(manifest, args.data_dir, args.data)
    quality = B.jpeg_quality(args.jpeg_quality, ds)
    data = f"JPEG quality {ds.jpeg_quality}" if ds.jpeg_quality else "not all JPEGs of one quality"
    step = f"JPEG round trip at quality {quality}" if quality else "inputs as they come"
    print(f"{args.bundle}: training images {data}; input domain: {step}", flush=True)
    spec = manifest.classifier
    classifier_file = verify_files(args.bundle, manifest)[spec.file]
    fprs = dict(args.fpr)
    x_cal = ds.val.x
    if args.preimages is not None:
        if not 0 < args.preimages <= 1:
            raise SystemExit("--preimages takes a spread in (0, 1]")
        if not ds.jpeg_quality:
            raise SystemExit("--preimages needs training images that are JPEGs of one quality")
        rng = np.random.default_rng(args.preimage_seed)
        spread = rng.uniform(0, args.preimages, len(x_cal))
        x_cal = np.concatenate([x_cal, jpeg_preimage(x_cal, ds.jpeg_quality, spread, rng)])
    if set(fprs) & set(args.drop):
        raise SystemExit(f"--fpr names a dropped detector: {', '.join(sorted(set(fprs) & set(args.drop)))}")
    members, before = [], {}
    for member in manifest.members:
        unknown = (set(args.drop) | set(fprs)) - {d.name for d in member.detectors}
        if unknown:
            raise SystemExit(f"member {member.name} has no detector {', '.join(sorted(unknown))}")
        kept = [d for d in member.detectors if d.name not in args.drop]
        if not kept:
            raise SystemExit(f"member {member.name} would have no detector left")
        dets = [d.model_dump(exclude={"threshold"}, exclude_none=True) | ({"fpr": fprs[d.name]} if d.name in fprs else {})
                for d in kept]
        before[member.name] = {d.name: d.threshold for d in member.detectors}
        calibrated = B.calibrate(args.bundle, dets, x_cal, classifier_file, contract=spec.input,
                                 output=spec.output, output_name=spec.output_name, jpeg_quality=quality)
        members.append(member.model_copy(update={"detectors": [type(d).model_validate(c) for d, c in
                                                               zip(kept, calibrated)]}))
    measurements = dict(manifest.measurements)
    updated = manifest.model_copy(update={"input": manifest.input.model_copy(update={"jpeg_quality": quality}),
                                          "members": members})
    write_manifest(args.bundle, updated)
    defense = Defense(args.bundle, device="cpu")
    limit = args.figures_limit or int(measurements.get("figures_test_images") or 0)
    test = ds.test.head(limit) if limit else ds.test
    if args.candidate:
        figures, test = {}, test.head(0)
    elif len(defense.members) == 1:
        figures = clean_figures(defense, test)
    else:
        figures = {"member_clean_figures": {m.name: clean_figures(defense, test, k)
                                            for k, m in enumerate(defense.members)}}
    stale = {k: measurements[k] for k in figures if k in measurements}
    measurements.update(figures)
    measurements["input_domain"] = {
        "jpeg_quality": quality, "training_images_jpeg_quality": ds.jpeg_quality, "dropped_detectors": args.drop,
        "fprs_set": fprs,
        "calibration": {"validation_images": len(ds.val), "preimages": len(x_cal) - len(ds.val),
                        "preimage_spread_max": args.preimages, "preimage_seed": args.preimage_seed},
        "thresholds_before": before, "figures_before": stale, "test_images": len(test),
        "validation_images": len(ds.val), "seconds": time.perf_counter() - started,
        "provenance": provenance(["magnet", "train", "domain", *(argv if argv is not None else sys.argv[1:])], 0),
    }
    write_manifest(args.bundle, updated.model_copy(update={"measurements": measurements}))
    for member in members:
        now = {d.name: d.threshold for d in member.detectors}
        print(f"  {member.name}: " + ", ".join(f"{k} {v:.4g} -> " + (f"{now[k]:.4g}" if k in now else "dropped")
                                               for k, v in before[member.name].items()))
    print(f"  clean test figures ({len(test)} images): {figures}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
