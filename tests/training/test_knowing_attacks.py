"""Attacks that know the defense: torch twins of a member's defense, the graybox table, the adaptive
attack. The twins must compute what the core computes, or every figure built on them is off."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.defense.core import Defense  # noqa: E402
from training.evaluate.adaptive import adaptive_attack  # noqa: E402
from training.evaluate.graybox import graybox_table  # noqa: E402
from training.evaluate.run import judge  # noqa: E402
from training.evaluate.torch_defense import Twins  # noqa: E402
from tests.conftest import (SHIPPED_CIFAR10, SHIPPED_CIFAR10_CLEAN, SHIPPED_CIFAR10_POOL, SHIPPED_MNIST,  # noqa: E402
                            SHIPPED_MNIST_POOL)


@pytest.fixture(scope="module")
def mnist_pool():
    defense = Defense(SHIPPED_MNIST_POOL, device="cpu")
    return defense, Twins(defense)


@pytest.mark.parametrize("members", [[0], [5], [1, 6]])
def test_twin_scores_and_logits_equal_the_cores(mnist_pool, mnist, members):
    defense, twins = mnist_pool
    x = mnist.test.x[:32]
    with torch.no_grad():
        ev = twins.members(members).evaluate(torch.from_numpy(x))
    for k, m in enumerate(members):
        verdict = defense.inspect(x, m)
        for name, score in verdict.scores.items():
            np.testing.assert_allclose(ev.scores[k][name].numpy(), score, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(ev.logits[k].numpy(), defense.classifier(verdict.reformed), atol=1e-4)


@pytest.mark.parametrize("bundle, member", [(SHIPPED_CIFAR10_POOL, 2), (SHIPPED_CIFAR10, 0), (SHIPPED_CIFAR10_CLEAN, 0)])
def test_divergence_scores_of_the_cifar_twin_equal_the_cores(cifar10, bundle, member):
    """The pool's sigmoid AEs, the default's guided U-Net and the attack-free bundle's 32-channel AE."""
    if not (bundle / "manifest.json").exists():
        pytest.skip(f"{bundle} is not built")
    defense = Defense(bundle, device="cpu")
    x = cifar10.test.x[:16]
    with torch.no_grad():
        ev = Twins(defense).members([member]).evaluate(torch.from_numpy(x))
    verdict = defense.inspect(x, member)
    assert any(d.kind == "divergence" for d in defense.members[member].detectors)
    assert set(verdict.scores) == {d.name for d in defense.members[member].detectors}
    for name, score in verdict.scores.items():
        np.testing.assert_allclose(ev.scores[0][name].numpy(), score, rtol=5e-3, atol=1e-7)


def test_graybox_table_structure_and_diagonal(mnist_pool, mnist, tmp_path):
    defense, twins = mnist_pool
    x, y = mnist.test.x[:4], mnist.test.y[:4]
    params = {"binary_search_steps": 1, "max_iterations": 60, "initial_const": 30.0, "learning_rate": 0.1}
    g = graybox_table(defense, twins, x, y, params, judge, log=lambda _: None, cache=tmp_path)
    logged = []  # a second run (a run cut short and resumed) reuses every column's examples
    again = graybox_table(defense, twins, x, y, params, judge, log=logged.append, cache=tmp_path)
    assert sum("reusing" in line for line in logged) == 8 and again["table"] == g["table"]
    table = np.array(g["table"])
    assert table.shape == (8, 8) and ((0 <= table) & (table <= 1)).all()
    np.testing.assert_allclose(g["random"], table.mean(0))
    assert len(g["columns"]) == 8 and g["examples"] == 4
    assert any(c["attack_success"] > 0 for c in g["columns"]), "no column found an example: the checks are void"
    for j, col in enumerate(g["columns"]):
        # what beat the twin of member j's reformed classifier, member j's reformer in the core gets wrong
        assert col["reformer_only_own"] == pytest.approx(1 - col["attack_success"])
        assert table[j, j] <= col["reformer_only_own"] + col["rejected_own"] + 1e-9


def test_adaptive_successes_are_accepted_and_misclassified_by_the_core(mnist):
    defense = Defense(SHIPPED_MNIST, device="cpu")
    twins = Twins(defense)
    x, y = mnist.test.x[:8], mnist.test.y[:8]
    params = {"binary_search_steps": 2, "max_iterations": 100, "initial_const": 10.0, "learning_rate": 0.1}
    seen = {}

    def spy(d, x_adv, labels, member):
        seen["x_adv"] = x_adv
        return judge(d, x_adv, labels, member)

    out = adaptive_attack(defense, twins, [0], x, y, params, spy, log=lambda _: None)
    assert out["attack_success_twin"] > 0, "the budget found no adaptive example: the check below is void"
    verdict = defense.inspect(seen["x_adv"])
    labels = defense.classifier(verdict.reformed).argmax(1)
    beaten = verdict.accepted & (labels != y)
    # what the attack counts as a success, the core lets through with a wrong label
    assert beaten.mean() == pytest.approx(out["attack_success_twin"])
    assert out["full_defense_per_member"][0] == pytest.approx(1 - beaten.mean())
