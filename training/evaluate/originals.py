"""How bundles judge uncompressed images: each bundle with its input domain step and without it.

    python -m training.evaluate.originals --bundle models/cifar10 models/cifar10-clean models/cifar10-paper \\
        --images tests/data/cifar10-originals --out docs/results/cifar10-originals.json

``--images`` holds ``*-label-<class index>.png`` files (the 20 original CIFAR-10 test images that ship
with the tests). Per bundle (every member of a pool) and per setting, the number of images rejected,
what fired, and how many are accepted and classified correctly after reforming.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from service.defense.core import Defense


def load_images(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    files = sorted(Path(folder).glob("*-label-*.png"))
    if not files:
        raise SystemExit(f"{folder}: no *-label-<class>.png images")
    x = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float32) / 255
    y = np.array([int(re.search(r"-label-(\d+)", f.name).group(1)) for f in files])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y, [f.name for f in files]


PAIRED = re.compile(r"(train|val|test)-(\d+)-label-(\d+)\.png$")


def paired_name(split: str, row: int, label: int) -> str:
    """The file name of an original whose JPEG copy is row ``row`` of ``split`` in the loaded data set
    (``scripts/cifar10_originals.py`` writes them, ``paired_rows`` reads them back)."""
    return f"{split}-{row:05d}-label-{label}.png"


def paired_rows(names: list[str], labels: np.ndarray, data, only: str | None = None) -> tuple[list[str], np.ndarray]:
    """(split, row) of each ``paired_name`` in ``names`` within ``data`` (a Dataset), each label checked
    against its row's, so that files made for another split seed fail here; ``only``: the one split
    allowed."""
    splits, rows = [], []
    for name, label in zip(names, labels):
        found = PAIRED.match(name)
        if found is None or (only is not None and found.group(1) != only):
            raise SystemExit(f"{name} is not named {only or '<split>'}-<row>-label-<class>.png")
        split, row = found.group(1), int(found.group(2))
        part = getattr(data, split)
        if row >= len(part) or int(part.y[row]) != int(label):
            raise SystemExit(f"{name} does not match row {row} of the {split} split (another seed or data set?)")
        splits.append(split)
        rows.append(row)
    return splits, np.asarray(rows, np.int64)



def dataset_copies(data, names: list[str], labels: np.ndarray) -> np.ndarray:
    """The data set's own JPEG copy of each ``paired_name`` original (``data``: a Dataset)."""
    splits, rows = paired_rows(names, labels, data)
    return np.stack([getattr(data, split).x[row] for split, row in zip(splits, rows)])

def judge(defense: Defense, x: np.ndarray, y: np.ndarray, member: int) -> dict:
    verdict = defense.inspect(x, member)
    labels = defense.classifier(verdict.reformed).argmax(1)
    return {"rejected": int(verdict.rejected.sum()), "fired": {k: int(m.sum()) for k, m in verdict.fired.items()},
            "accepted_and_right": int((verdict.accepted & (labels == y)).sum()),
            "classifier_alone_right": int((defense.classifier(x).argmax(1) == y).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, nargs="+", required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    x, y, names = load_images(args.images)
    report = {"images": len(x), "source": str(args.images), "bundles": {}}
    for bundle in args.bundle:
        defense = Defense(bundle, device="cpu")
        quality = defense.manifest.input.jpeg_quality
        rows = {}
        for setting, q in (("as served", quality), ("without the input domain step", None)):
            if setting != "as served" and quality is None:
                continue
            defense.manifest = defense.manifest.model_copy(
                update={"input": defense.manifest.input.model_copy(update={"jpeg_quality": q})})
            rows[setting] = [judge(defense, x, y, m) for m in range(len(defense.members))]
            for m, r in enumerate(rows[setting]):
                print(f"{bundle} member {m}, {setting} (jpeg_quality {q}): rejected {r['rejected']}/{len(x)} "
                      f"{r['fired']}, accepted and right {r['accepted_and_right']}/{len(x)}", flush=True)
        report["bundles"][str(bundle)] = {"jpeg_quality": quality, **rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
