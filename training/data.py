"""Dataset loading for training and evaluation.

Every loader returns float32 arrays in [0, 1] with layout N x C x H x W and int64 labels, so the
arrays can go straight into the defense core (``service.defense``) or a torch model.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Mirrors tried in order when a file is missing; the first is the one torchvision uses.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MNIST_VALIDATION = 5000


class DataError(RuntimeError):
    """A data set could not be found, fetched or parsed."""


@dataclass(frozen=True)
class Split:
    """Images (N x C x H x W float32 in [0, 1]) and labels (N int64)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def head(self, n: int) -> "Split":
        return Split(self.x[:n], self.y[:n])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]
    jpeg_quality: int | None = None  # every image came as a JPEG of this quality (training.images)


def read_idx(path: Path) -> np.ndarray:
    """Parse one gzip'd IDX file (the format of the original MNIST distribution)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {np.prod(dims)} values, found {body.size}")
    return body.reshape(dims)


def _fetch(name: str, target: Path) -> None:
    errors = []
    for mirror in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(mirror + name, timeout=30) as r, open(target, "wb") as f:
                shutil.copyfileobj(r, f)
            return
        except (urllib.error.URLError, OSError) as e:
            errors.append(f"{mirror}: {e}")
    target.unlink(missing_ok=True)
    raise DataError(
        f"MNIST file {name} is not in the data directory and could not be downloaded "
        f"({'; '.join(errors)}). Put the four IDX .gz files in the directory you pass as --data-dir."
    )


def mnist_files(data_dir: Path, download: bool = True) -> dict[str, Path]:
    """Locate the four MNIST files under ``data_dir`` (or ``data_dir/mnist``), downloading missing ones."""
    data_dir = Path(data_dir)
    root = data_dir / "mnist" if (data_dir / "mnist").is_dir() else data_dir
    paths = {key: root / name for key, name in MNIST_FILES.items()}
    missing = [p for p in paths.values() if not p.exists()]
    if missing and not download:
        raise DataError(f"MNIST files missing under --data-dir {data_dir}: {[p.name for p in missing]}")
    for p in missing:
        root.mkdir(parents=True, exist_ok=True)
        _fetch(p.name, p)
    return paths


def load_mnist(data_dir: Path, download: bool = True) -> Dataset:
    """MNIST split as the paper does: validation = first 5,000 training images, train = the other 55,000."""
    paths = mnist_files(data_dir, download)
    train_x = read_idx(paths["train_images"]).astype(np.float32)[:, None] / 255.0
    train_y = read_idx(paths["train_labels"]).astype(np.int64)
    test_x = read_idx(paths["test_images"]).astype(np.float32)[:, None] / 255.0
    test_y = read_idx(paths["test_labels"]).astype(np.int64)
    v = MNIST_VALIDATION
    return Dataset(
        name="mnist",
        train=Split(train_x[v:], train_y[v:]),
        val=Split(train_x[:v], train_y[:v]),
        test=Split(test_x, test_y),
        classes=tuple(str(i) for i in range(10)),
    )


def load(name: str, data_dir: Path) -> Dataset:
    """A data set by its bundle name ('mnist' or 'cifar10')."""
    if name == "mnist":
        return load_mnist(Path(data_dir))
    if name == "cifar10":
        from training.images import load_cifar10  # images imports this module

        return load_cifar10(Path(data_dir))
    raise DataError(f"unknown dataset {name!r}; known: mnist, cifar10")
