"""Image data sets: CIFAR-10's official python batches, and any ``<split>/<class>/*.{png,jpg}`` layout,
from a directory or straight from a ``.tar.gz`` (how users bring their own data).

Arrays are N x C x H x W float32 in [0, 1]; labels index the sorted class-folder names.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from service.codecs import pixels_as_served
from service.defense.domain import jpeg_quality_of
from training.data import DataError, Dataset, Split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
VALIDATION = 5000


def _members(source: Path, read: bool = True) -> Iterator[tuple[str, bytes | None]]:
    """(relative path, file bytes, or None without ``read``) for every image under a directory or inside a
    .tar.gz, in the order ``read_image_folder`` stacks them."""
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                yield path.relative_to(source).as_posix(), path.read_bytes() if read else None
        return
    with tarfile.open(source, "r:*") as tar:
        for member in tar:
            if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                yield member.name, tar.extractfile(member).read() if read else None


def member_names(source: Path) -> list[str]:
    """The image files of a folder tree or .tar.gz, in the order ``read_image_folder`` stacks them."""
    return [name for name, _ in _members(Path(source), read=False)]


class JpegSource:
    """Whether every image of a data set is a JPEG with the same standard tables, and at which quality:
    a bundle trained on such images judges its inputs after a JPEG round trip at that quality
    (``service.defense.domain``), since what it learned of "normal" includes the compression."""

    def __init__(self) -> None:
        self.tables: dict | None = None
        self.uniform = True

    def see(self, image: Image.Image) -> None:
        tables = image.quantization if image.format == "JPEG" else None
        if tables is None or (self.tables is not None and tables != self.tables):
            self.uniform = False
        elif self.tables is None:
            self.tables = tables

    @property
    def quality(self) -> int | None:
        return jpeg_quality_of(self.tables) if self.uniform and self.tables else None


def read_image_folder(source: Path, channels: int = 3,
                      jpeg: JpegSource | None = None) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Images grouped by split: ``{split: (N x C x H x W float32, class name per image)}``.

    The layout is ``[prefix/]<split>/<class>/<file>``; every image must have the same size. ``jpeg``
    notes whether they are all JPEGs of one quality.
    """
    mode = "L" if channels == 1 else "RGB"
    pixels: dict[str, list[np.ndarray]] = {}
    names: dict[str, list[str]] = {}
    for rel, blob in _members(Path(source)):
        parts = rel.strip("/").split("/")
        if len(parts) < 3:
            continue  # a file outside <split>/<class>/
        split, cls = parts[-3], parts[-2]
        try:
            opened = Image.open(io.BytesIO(blob))
            if jpeg is not None:
                jpeg.see(opened)
            image = np.asarray(opened.convert(mode), dtype=np.uint8)
        except OSError as e:
            raise DataError(f"{source}: cannot decode {rel}: {e}") from e
        pixels.setdefault(split, []).append(image)
        names.setdefault(split, []).append(cls)
    if not pixels:
        raise DataError(f"no <split>/<class>/*.png|jpg images found in {source}")
    out = {}
    for split, images in pixels.items():
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise DataError(f"{source}: images of split {split!r} differ in size: {sorted(shapes)[:3]}")
        x = np.stack(images).astype(np.float32) / 255.0
        x = x[:, None] if channels == 1 else x.transpose(0, 3, 1, 2)
        out[split] = (np.ascontiguousarray(x), names[split])
    return out


def hold_out(train: Split, n: int, seed: int) -> tuple[Split, Split]:
    """Split ``n`` validation images off a training split with a seeded permutation."""
    if not 0 < n < len(train):
        raise DataError(f"cannot hold out {n} validation images from {len(train)} training images")
    val, rest = hold_out_order(len(train), n, seed)
    return Split(train.x[rest], train.y[rest]), Split(train.x[val], train.y[val])


def hold_out_order(n_train: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, training rows) of a training split of ``n_train`` images, as ``hold_out`` takes them."""
    order = np.random.default_rng(seed).permutation(n_train)
    return order[:n], order[n:]


def test_order(n_test: int, seed: int) -> np.ndarray:
    """The rows of an image folder's test split in the order ``dataset_from_folder`` shuffles them to."""
    return np.random.default_rng(seed).permutation(n_test)


def dataset_from_folder(source: Path, name: str, channels: int = 3, validation: int = VALIDATION,
                        seed: int = 0) -> Dataset:
    """A Dataset from an image-folder tree (``train`` and ``test`` splits required)."""
    jpeg = JpegSource()
    splits = read_image_folder(source, channels, jpeg)
    missing = {"train", "test"} - splits.keys()
    if missing:
        raise DataError(f"{source}: missing split folder(s) {sorted(missing)}; found {sorted(splits)}")
    classes = tuple(sorted(set(splits["train"][1])))
    index = {c: i for i, c in enumerate(classes)}

    def split(key: str) -> Split:
        x, cls = splits[key]
        unknown = set(cls) - index.keys()
        if unknown:
            raise DataError(f"{source}: classes {sorted(unknown)} in {key} but not in train")
        return Split(x, np.array([index[c] for c in cls], dtype=np.int64))

    train, val = hold_out(split("train"), validation, seed)
    # folders list images class by class; a fixed shuffle makes every prefix of the test split (used
    # for quick figures and tests) a fair sample of all classes
    test = split("test")
    order = test_order(len(test), seed)
    return Dataset(name=name, train=train, val=val, test=Split(test.x[order], test.y[order]), classes=classes,
                   jpeg_quality=jpeg.quality)


def _cifar_batch(path: Path) -> Split:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return Split(x, np.asarray(batch[b"labels"], dtype=np.int64))


def load_cifar10(data_dir: Path, seed: int = 0) -> Dataset:
    """CIFAR-10 from ``cifar-10-batches-py`` if present under ``data_dir`` (or ``data_dir/cifar10``),
    else from an image-folder tree or ``.tar.gz`` there. Validation = 5,000 training images held out by
    a permutation with ``seed``: keep it fixed, so that every bundle calibrates on the same images."""
    data_dir = Path(data_dir)
    roots = [data_dir, data_dir / "cifar10"]
    for root in roots:
        batches = root / "cifar-10-batches-py"
        if batches.is_dir():
            parts = [_cifar_batch(batches / f"data_batch_{i}") for i in range(1, 6)]
            train = Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
            train, val = hold_out(train, VALIDATION, seed)
            return Dataset("cifar10", train, val, _cifar_batch(batches / "test_batch"), CIFAR10_CLASSES)
    for root in roots:
        if (root / "train").is_dir():
            return dataset_from_folder(root, "cifar10", seed=seed)
        archives = sorted(root.glob("*.tar.gz")) if root.is_dir() else []
        if archives:
            return dataset_from_folder(archives[0], "cifar10", seed=seed)
    raise DataError(f"no CIFAR-10 under --data-dir {data_dir}: expected cifar-10-batches-py/, "
                    f"train/ and test/ image folders, or a .tar.gz of them")


GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _kind(image: Image.Image) -> str:
    return "grey" if image.mode in GREY_MODES else "RGB"


def _resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W [x C] float32 pixels resized (bilinear, each channel as a float image) to ``size`` = (H, W)."""
    def one(channel: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(channel).resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)
    if pixels.ndim == 2:
        return np.clip(one(pixels), 0.0, 1.0)
    return np.clip(np.stack([one(np.ascontiguousarray(pixels[..., c])) for c in range(pixels.shape[2])], 2), 0.0, 1.0)


def load_folder(data: Path, size: tuple[int, int] | None = None, validation: float = 0.1, test: float = 0.1,
                seed: int = 0, name: str | None = None) -> Dataset:
    """A user's image folder as a Dataset: ``DATA/train/<class>/*`` and, optionally, ``DATA/test/<class>/*``
    (PNG or JPEG).

    - Classes: the lines of ``DATA/classes.txt`` in order when it exists, else the sorted folder names
      of ``train``; a folder not listed there is an error.
    - Size and channels are read from the data: every image must have the same size and be all grey or
      all colour, else the error names one offending file (``size`` = (H, W) resizes everything instead).
    - Pixels are read as the gateway reads an uploaded image (``service.codecs.pixels_as_served``): EXIF
      orientation applied, 16-bit grey scaled by 1/65535, alpha as the drawing or composited over black;
      so a bundle is trained on what it will be served.
    - Files of other types under ``<class>/`` are skipped, and counted in a printed note.
    - ``validation`` of the training images (seeded) become the validation split; without a ``test``
      folder, ``test`` of them become the test split too (and the dataset says so in its name).
    """
    data = Path(data)
    if not (data / "train").is_dir():
        raise DataError(f"{data}: no train/ folder (expected {data}/train/<class>/*.png|jpg)")
    listed = data / "classes.txt"
    splits = [s for s in ("train", "test") if (data / s).is_dir()]
    files = {s: sorted(p for p in (data / s).glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES) for s in splits}
    skipped = sorted(p for s in splits for p in (data / s).glob("*/*")
                     if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES and not p.name.startswith("."))
    if skipped:
        kinds = sorted({p.suffix.lower() or "(none)" for p in skipped})
        print(f"note: {len(skipped)} file(s) under {data} are not PNG or JPEG ({', '.join(kinds[:8])}) and are "
              f"skipped, e.g. {skipped[0]}", flush=True)
    if not files["train"]:
        raise DataError(f"{data}/train holds no <class>/*.png|jpg images")
    folders = sorted({p.parent.name for s in splits for p in files[s]})
    if listed.exists():
        classes = tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise DataError(f"{data}: class folder(s) {unknown} are not listed in classes.txt")
    else:
        classes = tuple(sorted({p.parent.name for p in files["train"]}))
    index = {c: k for k, c in enumerate(classes)}
    first, first_kind, first_size = None, None, None
    jpeg = JpegSource()
    arrays: dict[str, tuple[list[np.ndarray], list[int]]] = {s: ([], []) for s in splits}
    for s in splits:
        for path in files[s]:
            try:
                image = Image.open(path)
                image.load()
                kind = _kind(image)
                jpeg.see(image)
                pixels = pixels_as_served(image, 1 if kind == "grey" else 3)  # H x W [x 3], as displayed
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"cannot decode {path}: {e}") from e
            shown_size = pixels.shape[1::-1]  # W x H
            if first is None:
                first, first_kind, first_size = path, kind, shown_size
            if kind != first_kind:
                raise DataError(f"{path} is {kind} ({image.mode}) but {first} is {first_kind}: "
                                "a data set must be all grey or all colour")
            if size is None and shown_size != first_size:
                raise DataError(f"{path} is {shown_size[0]}x{shown_size[1]} (W x H, as displayed) but {first} is "
                                f"{first_size[0]}x{first_size[1]}: give --size H W to resize every image")
            if size is not None and pixels.shape[:2] != tuple(size):
                pixels = _resized(pixels, size)
            arrays[s][0].append(pixels)
            arrays[s][1].append(index[path.parent.name])

    def to_split(s: str) -> Split:
        x = np.stack(arrays[s][0])
        x = x[:, None] if first_kind == "grey" else x.transpose(0, 3, 1, 2)
        return Split(np.ascontiguousarray(x), np.array(arrays[s][1], dtype=np.int64))

    train = to_split("train")
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(round(validation * len(train))))
    n_test = 0 if "test" in splits else max(1, int(round(test * len(train))))
    if n_val + n_test >= len(train):
        raise DataError(f"{data}: {len(train)} training images are too few to hold out {n_val} for validation"
                        + (f" and {n_test} for test" if n_test else ""))
    pick = lambda idx: Split(train.x[idx], train.y[idx])  # noqa: E731
    val = pick(order[:n_val])
    held_test = pick(order[n_val:n_val + n_test]) if n_test else to_split("test")
    rest = pick(order[n_val + n_test:])
    shuffle = np.random.default_rng(seed).permutation(len(held_test))
    label = name or data.name
    return Dataset(name=label if "test" in splits else f"{label} (test split held out of train)", train=rest,
                   val=val, test=Split(held_test.x[shuffle], held_test.y[shuffle]), classes=classes,
                   jpeg_quality=jpeg.quality if size is None else None)
