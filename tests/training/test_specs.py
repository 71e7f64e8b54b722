"""Dataset specs: shipped and user data sets, supported sizes, attack budgets per bundle."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("torch")

from training.data import DataError  # noqa: E402
from training.evaluate.attacks import default_names, registry  # noqa: E402
from training.specs import check_size, spec_for, spec_of_manifest  # noqa: E402


def manifest(dataset: str, shape, measurements=None):
    return SimpleNamespace(dataset=dataset, input=SimpleNamespace(shape=shape), measurements=measurements or {})


def test_shipped_and_user_specs():
    assert spec_for("mnist").shipped and spec_for("mnist").family == "grey"
    user = spec_for("folder:pets", (3, 64, 64))
    assert not user.shipped and user.family == "rgb" and user.budgets == spec_for("cifar10").budgets
    assert spec_for("folder:digits", (1, 16, 16)).budgets == spec_for("mnist").budgets
    with pytest.raises(DataError, match="channels"):
        spec_for("folder:x", (4, 32, 32))
    # the registry of a user's grey set has MNIST's rows
    assert default_names(spec_for("folder:digits", (1, 16, 16))) == default_names("mnist")


@pytest.mark.parametrize("shape, ok", [((1, 28, 28), True), ((3, 32, 32), True), ((3, 128, 96), True),
                                       ((3, 30, 30), False), ((1, 4, 4), False), ((3, 256, 256), False)])
def test_supported_sizes(shape, ok):
    if ok:
        check_size(shape)
    else:
        with pytest.raises(DataError, match="multiples of 4"):
            check_size(shape)


def test_a_manifest_sets_its_own_attack_budgets():
    m = manifest("folder:pets", (3, 32, 32), {"attack_budgets": {"fgsm": [0.1], "iterations": [20, 5]}})
    spec = spec_of_manifest(m)
    attacks = registry(spec)
    assert "fgsm_eps0.1" in attacks and "fgsm_eps0.025" not in attacks
    assert attacks["iterative_linf_eps0.01"].params["max_iter"] == 20  # linf kept the family's eps
    with pytest.raises(DataError, match="unknown key"):
        spec_of_manifest(manifest("folder:pets", (3, 32, 32), {"attack_budgets": {"fgsm_eps": [0.1]}}))


def test_a_folder_bundle_needs_its_folder():
    with pytest.raises(DataError, match="--data DIR"):
        spec_for("folder:pets", (3, 32, 32)).load(data_dir="somewhere")
