"""scripts/adaptive_pgd.py: the whitebox PGD through reformer and detectors stays in its ball, and what it
counts as a success is accepted and misclassified by the core."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.defense import Defense  # noqa: E402
from training.bundles import run_batched  # noqa: E402
from training.evaluate.torch_defense import Twins  # noqa: E402
from tests.conftest import SHIPPED_CIFAR10  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "adaptive_pgd.py"


def _module():
    spec = importlib.util.spec_from_file_location("adaptive_pgd", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pgd_through_the_defense_stays_in_the_ball_and_its_successes_beat_the_core(cifar10):
    defense = Defense(SHIPPED_CIFAR10, device="cpu")
    model = Twins(defense).members([0])
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = cifar10.test.x[:16], cifar10.test.y[:16]
    eps = 8 / 255
    adv, won = _module().attack(model, torch.from_numpy(x), torch.from_numpy(y), eps, steps=10, step=eps / 4,
                                weight=10.0)
    adv = adv.numpy()
    assert np.abs(adv - x).max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert won.any(), "8/255 through the CIFAR-10 default beats most examples"
    v = defense.inspect(adv[won.numpy()])
    labels = run_batched(defense.classifier, v.reformed).argmax(1)
    beaten = v.accepted & (labels != y[won.numpy()])
    assert beaten.mean() >= 0.9  # twin and core agree on nearly all
    assert np.array_equal(adv[~won.numpy()], x[~won.numpy()])  # failures stay clean
