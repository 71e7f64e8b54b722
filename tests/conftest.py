"""Shared fixtures: toy bundles, the shipped bundle and the MNIST data used by tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import fakes

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MNIST = ROOT / "models" / "mnist"
# Tests and CI read MNIST from the shared data folder; the product itself only takes --data-dir.
DATA_DIR = Path(os.environ.get("MAGNET_TEST_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def toy_bundle(tmp_path: Path) -> Path:
    return fakes.make_bundle(tmp_path / "toy")


@pytest.fixture(scope="session")
def mnist():
    from training.data import load_mnist

    if not (DATA_DIR / "mnist").is_dir():
        pytest.skip(f"MNIST not found under {DATA_DIR} (set MAGNET_TEST_DATA)")
    return load_mnist(DATA_DIR, download=False)


SHIPPED_CIFAR10 = ROOT / "models" / "cifar10"
SHIPPED_CIFAR10_POOL = ROOT / "models" / "cifar10-pool"
SHIPPED_CIFAR10_CLEAN = ROOT / "models" / "cifar10-clean"
SHIPPED_CIFAR10_PAPER = ROOT / "models" / "cifar10-paper"
SHIPPED_MNIST_POOL = ROOT / "models" / "mnist-pool"


@pytest.fixture(scope="session")
def cifar10():
    from training.images import load_cifar10

    if not (DATA_DIR / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 not found under {DATA_DIR} (set MAGNET_TEST_DATA)")
    return load_cifar10(DATA_DIR)
