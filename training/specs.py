"""One description per kind of data set: what the recipes, the attacks and the evaluation need to know.

A ``DatasetSpec`` names the data set, its family (``grey``: small single-channel images, the paper's MNIST
recipe and attack strengths; ``rgb``: colour images, the CIFAR-10 recipe and strengths), the attack
budgets of ``magnet evaluate``, and how to load the data. The shipped data sets (``mnist``, ``cifar10``)
have fixed specs; a user's folder (``magnet train folder``) gets the spec of its family, with its own
image shape, and is loaded from ``--data`` with the size and split seed that its manifest records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.data import DataError, Dataset

# The paper's strengths (MagNet, Tables 3 and 4) and our iterative budgets: 100 steps of eps/10 on MNIST;
# 10 steps of eps/4 on CIFAR-10, where one ResNet-9 gradient costs ~30 ms per image on 2 CPU cores.
BUDGETS = {
    "grey": {"fgsm": (0.005, 0.010), "linf": (0.005, 0.010), "l2": (0.5, 1.0), "iterations": (100, 10)},
    "rgb": {"fgsm": (0.025, 0.050), "linf": (0.010, 0.025), "l2": (0.25, 0.50), "iterations": (10, 4)},
}
# Strengths of the FGSM / PGD rows that ``magnet train folder`` measures against the user's classifier
# (the manifest's attack rows): one moderate and one large eps per family, PGD with 10 steps of eps/4.
BUILD_EPS = {"grey": (0.1, 0.3), "rgb": (0.025, 8 / 255)}
# The images the recipes support: H and W in this range and divisible by 4 (two stride-2 stages of the
# RGB reformer; the grey autoencoders keep the size). Larger images train, but slowly on a CPU.
MIN_SIDE, MAX_SIDE = 8, 128


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # "mnist", "cifar10", or a user's folder
    family: str  # "grey" or "rgb"
    shape: tuple[int, int, int]  # C x H x W
    budgets: dict = field(default_factory=dict)
    shipped: bool = False

    def load(self, data_dir: Path | None = None, data: Path | None = None, seed: int = 0,
             validation: float = 0.1, test: float = 0.1) -> Dataset:
        """The data: a shipped set from ``data_dir``; a folder from ``data`` at this spec's size."""
        if self.shipped:
            if data_dir is None:
                raise DataError(f"{self.name}: give --data-dir, the directory holding the {self.name} data")
            from training.data import load

            return load(self.name, Path(data_dir))
        if data is None:
            raise DataError(f"the bundle was built from a user's folder ({self.name}): give --data DIR, that folder")
        from training.images import load_folder

        ds = load_folder(Path(data), size=self.shape[1:], validation=validation, test=test, seed=seed, name=self.name)
        if ds.train.x.shape[1] != self.shape[0]:
            raise DataError(f"{data} holds {ds.train.x.shape[1]}-channel images; the bundle takes {self.shape[0]}")
        return ds


def family_of(channels: int) -> str:
    if channels == 1:
        return "grey"
    if channels == 3:
        return "rgb"
    raise DataError(f"images with {channels} channels: the recipes support grey (1) and RGB (3)")


def check_size(shape: tuple[int, int, int]) -> None:
    """Raise DataError naming what is supported when ``shape`` (C, H, W) is not."""
    c, h, w = shape
    family_of(c)
    if not (MIN_SIDE <= h <= MAX_SIDE and MIN_SIDE <= w <= MAX_SIDE) or h % 4 or w % 4:
        raise DataError(f"images of {h}x{w} pixels: the recipes support heights and widths from {MIN_SIDE} to "
                        f"{MAX_SIDE} that are multiples of 4 (e.g. 28x28, 32x32, 64x64); give --size H W to resize")


SHIPPED = {
    "mnist": DatasetSpec("mnist", "grey", (1, 28, 28), BUDGETS["grey"], shipped=True),
    "cifar10": DatasetSpec("cifar10", "rgb", (3, 32, 32), BUDGETS["rgb"], shipped=True),
}


def spec_for(dataset: str, shape: tuple[int, int, int] | None = None) -> DatasetSpec:
    """The spec of a shipped data set by name, or of a user's data set by its image shape."""
    if dataset in SHIPPED:
        return SHIPPED[dataset]
    if shape is None:
        raise DataError(f"unknown dataset {dataset!r}: a user's data set needs its image shape")
    family = family_of(shape[0])
    return DatasetSpec(dataset, family, tuple(shape), BUDGETS[family])


def spec_of_manifest(manifest) -> DatasetSpec:
    """The bundle's spec; ``measurements.attack_budgets`` in its manifest (fgsm / linf / l2 eps lists and
    the iterative ``[steps, eps fraction]``) replaces the family's strengths key by key."""
    spec = spec_for(manifest.dataset, tuple(manifest.input.shape))
    override = (manifest.measurements or {}).get("attack_budgets")
    if isinstance(override, dict):
        unknown = set(override) - set(BUDGETS["grey"])
        if unknown:
            raise DataError(f"manifest attack_budgets: unknown key(s) {sorted(unknown)}; known: {sorted(BUDGETS['grey'])}")
        budgets = {**spec.budgets, **{k: tuple(v) for k, v in override.items()}}
        spec = DatasetSpec(spec.name, spec.family, spec.shape, budgets, spec.shipped)
    return spec


def load_for_manifest(manifest, data_dir: Path | None = None, data: Path | None = None) -> Dataset:
    """The data a bundle was built on, split as its build split it (the folder recipes record the seed
    and fractions in ``measurements.data``)."""
    spec = spec_of_manifest(manifest)
    rec = (manifest.measurements or {}).get("data") or {}
    if not isinstance(rec, dict):
        rec = {}
    return spec.load(data_dir, data, seed=int(rec.get("seed", 0)), validation=float(rec.get("validation", 0.1)),
                     test=float(rec.get("test", 0.1)))
