"""Write the uncompressed originals of our CIFAR-10 images as PNG, named by their place in our splits.

    python scripts/cifar10_originals.py --batches DIR/cifar-10-batches-py --data-dir ../shared/data \\
        --out runs/cifar10-originals

Our CIFAR-10 is a JPEG re-encoding of the official batches (``train/<class>/NNNN.jpg``: the NNNN-th image
of that class in batch order). Given the official python batches (``data_batch_1`` … ``data_batch_5``,
``test_batch``), this finds each original's JPEG copy in the splits that ``training.data.load`` makes
(validation held out of train by the fixed permutation, test shuffled) and writes the original to
``OUT/<split>/<split>-<index>-label-<class>.png`` (``index``: its row in that split of the loaded data
set), so that every original is paired with the exact JPEG copy the bundles were trained and calibrated
on. ``--images`` folders (``scripts/domain_attacks.py``, ``training.evaluate.originals``) take these.

Batch files cut short (a partial download or copy) are read as far as they go: every label is at the
start of a file, and every complete image before the cut is used; missing batch files are skipped.
Each written original is checked against its JPEG copy (RMS distance in 0-255 units, reported; one above ``--max-rms`` stops the run, a
sign that the pairing is wrong).
"""

from __future__ import annotations

import argparse
import io
import json
import pickletools
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import load
from training.evaluate.originals import paired_name
from training.images import CIFAR10_CLASSES, VALIDATION, hold_out_order, member_names, test_order

ROW = 3 * 32 * 32


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(all labels, the complete images) of one python batch file, whole or cut short."""
    blob = path.read_bytes()
    labels: list[int] = []
    in_labels = False
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(blob)):
            if op.name in ("SHORT_BINSTRING", "BINUNICODE", "SHORT_BINUNICODE", "BINBYTES", "SHORT_BINBYTES"):
                in_labels = arg in (b"labels", "labels")
            elif in_labels and op.name.startswith("BININT"):
                labels.append(arg)
    except ValueError:  # the file is cut inside the pixel string
        pass
    n_labels = len(labels)
    for tag in (b"T" + struct.pack("<i", n_labels * ROW), b"B" + struct.pack("<i", n_labels * ROW)):
        at = blob.find(tag)
        if at >= 0:
            data = blob[at + len(tag):]
            n = min(len(data) // ROW, n_labels)
            return np.asarray(labels), np.frombuffer(data[: n * ROW], np.uint8).reshape(n, 3, 32, 32)
    raise SystemExit(f"{path}: no pixel string of {n_labels} images found (not a CIFAR-10 python batch?)")


def loader_positions(data_dir: Path) -> dict[str, dict[tuple[str, int], int]]:
    """Where ``training.images`` puts each ``<split>/<class>/NNNN`` file (the order it reads them in)."""
    for root in (data_dir, data_dir / "cifar10"):
        archives = sorted(root.glob("*.tar.gz")) if root.is_dir() else []
        if (root / "train").is_dir() or archives:
            break
    else:
        raise SystemExit(f"no CIFAR-10 image folders or .tar.gz under {data_dir}")
    out: dict[str, dict[tuple[str, int], int]] = {"train": {}, "test": {}}
    for name in member_names(root if (root / "train").is_dir() else archives[0]):
        split, cls, file = name.strip("/").split("/")[-3:]
        if split in out:
            out[split][(cls, int(Path(file).stem))] = len(out[split])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=Path, required=True, help="a cifar-10-batches-py folder")
    p.add_argument("--data-dir", type=Path, required=True, help="our JPEG CIFAR-10 (as training.data.load reads it)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="the loader's split seed (0, as every bundle uses)")
    p.add_argument("--max-rms", type=float, default=30.0)
    args = p.parse_args(argv)
    data = load("cifar10", args.data_dir)
    positions = loader_positions(args.data_dir)
    n_train, n_test = len(positions["train"]), len(positions["test"])
    val_rows, train_rows = hold_out_order(n_train, VALIDATION, args.seed)
    where = {int(q): ("val", i) for i, q in enumerate(val_rows)}
    where.update({int(q): ("train", i) for i, q in enumerate(train_rows)})
    test_row = {int(q): i for i, q in enumerate(test_order(n_test, args.seed))}
    splits = {"train": data.train, "val": data.val, "test": data.test}
    written: dict[str, list[float]] = {"train": [], "val": [], "test": []}
    seen = {"train": np.zeros(10, int), "test": np.zeros(10, int)}
    for source, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        for f in files:
            if not (args.batches / f).is_file():
                print(f"{f}: not in {args.batches}, skipped", flush=True)
                continue
            labels, images = read_batch(args.batches / f)
            within = seen[source]
            for i, c in enumerate(labels):
                k = within[c]
                within[c] += 1
                if i >= len(images):
                    continue
                pos = positions[source][(CIFAR10_CLASSES[c], int(k))]
                split, row = where[pos] if source == "train" else ("test", test_row[pos])
                copy = splits[split]
                if copy.y[row] != c:
                    raise SystemExit(f"{f} image {i}: label {c} but its copy {split}[{row}] has {copy.y[row]}")
                rms = float(np.sqrt(((images[i] / 255.0 - copy.x[row]) ** 2).mean()) * 255)
                if rms > args.max_rms:
                    raise SystemExit(f"{f} image {i} lies {rms:.1f}/255 from its copy {split}[{row}]: wrong pairing")
                folder = args.out / split
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i].transpose(1, 2, 0)).save(folder / paired_name(split, row, int(c)))
                written[split].append(rms)
            print(f"{f}: {len(images)} of {len(labels)} images", flush=True)
    summary = {"command": "python scripts/cifar10_originals.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "written": {k: len(v) for k, v in written.items()},
               "rms_to_copy_0_255": {k: [round(float(q), 2) for q in np.percentile(v, [50, 99])] if v else None
                                     for k, v in written.items()}}
    (args.out / "originals.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
