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
SHIPPED_CIFAR10_JPEG_INPUTS = ROOT / "models" / "cifar10-jpeg-inputs"
SHIPPED_MNIST_POOL = ROOT / "models" / "mnist-pool"


@pytest.fixture(scope="session")
def cifar10():
    from training.images import load_cifar10

    if not (DATA_DIR / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 not found under {DATA_DIR} (set MAGNET_TEST_DATA)")
    return load_cifar10(DATA_DIR)


# Markers (registered in pyproject.toml): everything under these folders starts real processes ...
E2E_DIRS = ("e2e", "deploy")
# ... and these modules train or attack for more than a few seconds on 2 CPU cores.
SLOW_MODULES = {"test_onnx_torch", "test_build_smoke", "test_evaluate", "test_knowing_attacks", "test_adaptive_pgd",
                "test_carlini", "test_reformer", "test_selection", "test_defense_latency", "test_detector_registry"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).parts
        if any(d in parts for d in E2E_DIRS):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.slow)
        if Path(str(item.fspath)).stem in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
