"""Figures of a built bundle, measured through the gateway's defense core.

    python -m training.bundle_report --bundle models/mnist --data-dir DATA --out docs/results/mnist-bundle.json

Reports the clean-data behaviour on the test set, what the defense does with uniform noise, all-black
and all-white images, and the figures recorded in the manifest when the bundle was built.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from service.defense.core import Defense
from training.data import Split


def _decisions(defense: Defense, x: np.ndarray) -> dict:
    verdict = defense.inspect(x)
    labels = defense.classifier(verdict.reformed).argmax(1)
    return {
        "rejected": float(verdict.rejected.mean()),
        "fired": {name: float(mask.mean()) for name, mask in verdict.fired.items()},
        "scores": {name: [float(s.min()), float(s.max())] for name, s in verdict.scores.items()},
        "labels_when_accepted": sorted({int(label) for label, ok in zip(labels, verdict.accepted) if ok}),
    }


def clean_figures(defense: Defense, test: Split, member: int = 0) -> dict:
    """Clean test-set figures of one member of the served defense, computed through the core."""
    fired_parts, labels, plain = [], [], []
    same_x = defense.manifest.input.jpeg_quality is None  # else the core judged a round-tripped x
    for i in range(0, len(test), 1000):
        x = test.x[i : i + 1000]
        v = defense.inspect(x, member)
        # divergence detectors already ran the classifier on x and on the reformed x: reuse those logits
        # (unless the bundle's input domain step changed x: the classifier alone sees x as it is)
        plain.append(v.logits_x if v.logits_x is not None and same_x else defense.classifier(x))
        labels.append(v.logits_reformed if v.logits_reformed is not None else defense.classifier(v.reformed))
        fired_parts.append(v.fired)
    fired = {name: np.concatenate([f[name] for f in fired_parts]) for name in fired_parts[0]}
    ok = ~np.logical_or.reduce(list(fired.values()))
    plain, labels = np.concatenate(plain).argmax(1), np.concatenate(labels).argmax(1)
    return {
        "classifier_test_accuracy": float((plain == test.y).mean()),
        "detector_test_fpr": {name: float(f.mean()) for name, f in fired.items()},
        "defense_test_rejected": float(1 - ok.mean()),
        # accepted and classified correctly after reforming, over all test images
        "defense_clean_test_accuracy": float(((labels == test.y) & ok).mean()),
        "reformer_only_test_accuracy": float((labels == test.y).mean()),
    }


def report(bundle: Path, data_dir: Path | None, noise_images: int = 1000, seed: int = 0,
           data: Path | None = None) -> dict:
    from training.specs import load_for_manifest

    defense = Defense(bundle, device="cpu")
    test = load_for_manifest(defense.manifest, data_dir, data).test
    shape = (1, *defense.input_shape)
    rng = np.random.default_rng(seed)
    return {
        "bundle": str(bundle),
        "detectors": [d.model_dump(exclude_none=True) for d in defense.members[0].detectors],
        "test_images": len(test),
        **clean_figures(defense, test),
        "uniform_noise": _decisions(defense, rng.uniform(size=(noise_images, *shape[1:])).astype(np.float32)),
        "all_black": _decisions(defense, np.zeros(shape, np.float32)),
        "all_white": _decisions(defense, np.ones(shape, np.float32)),
        "manifest_measurements": defense.manifest.measurements,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("models/mnist"), help="bundle directory")
    p.add_argument("--data-dir", type=Path, default=None, help="directory with a shipped bundle's data set")
    p.add_argument("--data", type=Path, default=None, help="the image folder of a `magnet train folder` bundle")
    p.add_argument("--out", type=Path, help="write the report as JSON here (default: print only)")
    args = p.parse_args(argv)
    result = report(args.bundle, args.data_dir, data=args.data)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
