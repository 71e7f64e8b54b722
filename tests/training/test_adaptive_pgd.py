"""The adaptive PGD (``magnet evaluate --adaptive-pgd``): the whitebox PGD through reformer and detectors
stays in its ball, what it counts as a success is accepted and misclassified by the core, and on a pool
the expectation over members runs through ``magnet evaluate`` into the report."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from service.defense import Defense  # noqa: E402
from training.bundles import run_batched  # noqa: E402
from training.evaluate import run  # noqa: E402
from training.evaluate.adaptive import adaptive_pgd, pgd_step, pgd_through_defense  # noqa: E402
from training.evaluate.report import _adaptive_pgd  # noqa: E402
from training.evaluate.torch_defense import Twins  # noqa: E402
from tests.conftest import DATA_DIR, SHIPPED_CIFAR10, SHIPPED_CIFAR10_POOL, SHIPPED_MNIST_POOL  # noqa: E402


def test_pgd_through_the_defense_stays_in_the_ball_and_its_successes_beat_the_core(cifar10):
    defense = Defense(SHIPPED_CIFAR10, device="cpu")
    model = Twins(defense).members([0])
    x, y = cifar10.test.x[:16], cifar10.test.y[:16]
    eps = 8 / 255
    adv, won = pgd_through_defense(model, torch.from_numpy(x), torch.from_numpy(y), eps, steps=10, step=eps / 4)
    adv = adv.numpy()
    assert np.abs(adv - x).max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert won.any(), "8/255 through the CIFAR-10 default beats most examples"
    v = defense.inspect(adv[won.numpy()])
    labels = run_batched(defense.classifier, v.reformed).argmax(1)
    beaten = v.accepted & (labels != y[won.numpy()])
    assert beaten.mean() >= 0.9  # twin and core agree on nearly all
    assert np.array_equal(adv[~won.numpy()], x[~won.numpy()])  # failures stay clean


def test_the_step_shrinks_with_many_steps():
    assert pgd_step(0.04, 50) == pytest.approx(0.01) and pgd_step(0.04, 100) == pytest.approx(0.005)


def test_eot_pgd_on_a_pool_is_judged_member_by_member(cifar10):
    defense = Defense(SHIPPED_CIFAR10_POOL, device="cpu")
    twins = Twins(defense)
    x, y = cifar10.test.x[:8], cifar10.test.y[:8]
    # 20 steps: the c15-based members (2026-12-02) held 10 steps at ε = 0.03 on 5 of these 8 twins (one of the two runs)
    runs = [adaptive_pgd(defense, twins, group, x, y, 0.03, 20, run.judge, log=lambda _: None)
            for group in ([0], list(range(8)))]
    for r in runs:
        assert r["examples"] == 8 and r["linf"] <= 0.03 + 1e-6 and len(r["full_defense_per_member"]) == 8
        assert r["full_defense_random_member"] == pytest.approx(np.mean(r["full_defense_per_member"]))
    # ε = 0.03, 20 steps, on CIFAR-10 beats the targeted members on the twins, and the core agrees with the twins
    for r in runs:
        assert r["attack_success_twin"] >= 0.5
    assert runs[0]["full_defense_per_member"][0] <= 1 - runs[0]["attack_success_twin"] + 0.125
    assert max(runs[1]["full_defense_per_member"]) <= 1 - runs[1]["attack_success_twin"] + 0.125
    md = "\n".join(_adaptive_pgd({"runs": runs}))
    assert "| 0.03 | member-0 | 8 |" in md and "| 0.03 | all 8 (EOT) | 8 |" in md


def test_evaluate_runs_the_adaptive_pgd_on_every_target_group_into_its_report(tmp_path, mnist, capsys):
    out = tmp_path / "eval"
    assert run.main(["--bundle", str(SHIPPED_MNIST_POOL), "--data-dir", str(DATA_DIR), "--out", str(out),
                     "--attacks", "--adaptive-pgd", "0.1", "0.2", "--adaptive-pgd-steps", "3", "--n-adaptive", "6"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("adaptive PGD ε 0.1 (member 0)") < printed.index("adaptive PGD ε 0.2 (EOT)")
    report = json.loads((out / "report.json").read_text())
    runs = report["adaptive_pgd"]["runs"]
    assert [(r["eps"], len(r["members"])) for r in runs] == [(0.1, 1), (0.1, 8), (0.2, 1), (0.2, 8)]
    assert all(r["params"]["steps"] == 3 and r["examples"] == 6 for r in runs)
    md = (out / "report.md").read_text()
    assert "## Adaptive PGD" in md and "| 0.2 | all 8 (EOT) | 6 |" in md


def test_the_summary_lists_the_adaptive_pgd_runs(tmp_path):
    from training.evaluate.summary import summary

    report = {"bundle": "models/x-pool", "dataset": "cifar10", "examples": "", "rows": [],
              "carlini_confidence_curve": [], "clean": {"classifier_test_accuracy": 0.9,
                                                        "defense_clean_test_accuracy": 0.88},
              "adaptive_pgd": {"runs": [{"members": [f"member-{i}" for i in range(8)], "eps": 0.03137,
                                         "params": {"steps": 50}, "examples": 30,
                                         "full_defense_random_member": 0.1}]},
              "provenance": {"command": "magnet evaluate", "git_revision": "x", "date": "d"}}
    (tmp_path / "eval-x").mkdir()
    (tmp_path / "eval-x" / "report.json").write_text(json.dumps(report))
    text = summary([tmp_path / "eval-x" / "report.json"], tmp_path / "evaluation.md")
    assert "Adaptive PGD (ε = 0.03137, 50 steps) on all 8 members (EOT) of `models/x-pool` (30 examples" in text
    assert "accuracy with the defense 10.0 % (random member)" in text
