"""The attack registry: one entry per row of the paper's tables.

Every attack maps (torch classifier, x N x C x H x W in [0, 1], true labels, device) to x_adv of the
same shape in [0, 1]. Gradient attacks come from IBM's adversarial-robustness-toolbox (ART); Carlini's
L2, L-infinity and L0 attacks are the project's own batched PyTorch implementation (ART's are NumPy-driven
and far slower; ART's L0 stays available as ``carlini_l0_art``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from training.attacks.carlini import carlini_l0, carlini_l0_stream, carlini_l2, carlini_linf
from training.attacks.deepfool import deepfool


def cache_path(cache: Path, prefix: str, key: list) -> Path:
    """The file in ``cache`` for adversarial examples identified by ``key`` (JSON-able parts: file hashes,
    parameters, image indices or hashes): the same key, the same file, across runs and bundles."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache / f"{prefix}-{digest}.npz"


@dataclass(frozen=True)
class Attack:
    name: str
    family: str  # the paper's row group: fgsm, iterative_linf, iterative_l2, deepfool, carlini_l2, ...
    params: dict = field(default_factory=dict)
    run: Callable[..., np.ndarray] | None = None

    def __call__(self, model: nn.Module, x: np.ndarray, y: np.ndarray, device: str = "cpu",
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """x_adv for x; ``progress(done, total)`` hears how far the project's own Carlini attacks are
        (ART's attacks draw their own progress bars)."""
        extra = {"progress": progress} if progress is not None and getattr(self.run, "reports_progress", False) else {}
        out = self.run(model, x, y, device=device, **extra, **self.params)
        return np.clip(out, 0.0, 1.0).astype(np.float32)


def _art(model: nn.Module, shape: tuple[int, ...], classes: int, device: str):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=classes,
                             clip_values=(0.0, 1.0), device_type="gpu" if device.startswith("cuda") else "cpu")


def _classes(model: nn.Module, x: np.ndarray, device: str) -> int:
    with torch.no_grad():
        return int(model(torch.from_numpy(x[:1]).to(device)).shape[1])


def art_attack(cls_name: str, **defaults):
    """An ART evasion attack by class name, built on the classifier for each call."""

    def run(model, x, y, device="cpu", batch_size=250, **params):
        import art.attacks.evasion as evasion

        estimator = _art(model, x.shape[1:], _classes(model, x, device), device)
        attack = getattr(evasion, cls_name)(estimator, batch_size=batch_size, **{**defaults, **params})
        labels = np.eye(estimator.nb_classes, dtype=np.float32)[y]
        return attack.generate(x=x, y=labels)

    return run


def own_carlini(norm: str):
    fn = {"l2": carlini_l2, "linf": carlini_linf, "l0": carlini_l0}[norm]

    def run(model, x, y, device="cpu", **params):
        return fn(model, x, y, device=device, **params).x_adv

    run.reports_progress = True
    if norm == "l0":
        run.stream = carlini_l0_stream
    return run


def _deepfool(model, x, y, device="cpu", **params):
    return deepfool(model, x, y, device=device, **params)


def registry(dataset) -> dict[str, Attack]:
    """The paper's attacks and strengths for ``dataset`` (a name or a ``training.specs.DatasetSpec``; MagNet,
    Tables 3 and 4). A user's data set gets the strengths of its family (grey: MNIST's, RGB: CIFAR-10's)."""
    from training.specs import spec_for

    spec = spec_for(dataset) if isinstance(dataset, str) else dataset
    eps = spec.budgets
    # Iterative budget: 100 steps of eps/10 on MNIST; 10 steps of eps/4 on CIFAR-10, where one ResNet-9
    # gradient through ART costs ~30 ms per image on 2 CPU cores (100 steps would be most of an hour
    # per 1,000-image row). Kurakin et al.'s BIM schedule, min(eps*255 + 4, 1.25 eps*255) steps of 1/255,
    # asks for 3 and 8 steps at CIFAR's eps = 0.010 and 0.025; 10 steps of eps/4 walk 2.5 eps in all.
    iters, frac = eps["iterations"]
    attacks = [Attack(f"fgsm_eps{e:g}", "fgsm", {"eps": e}, art_attack("FastGradientMethod", norm=np.inf))
               for e in eps["fgsm"]]
    attacks += [Attack(f"iterative_linf_eps{e:g}", "iterative_linf", {"eps": e, "eps_step": e / frac, "max_iter": iters},
                       art_attack("BasicIterativeMethod")) for e in eps["linf"]]
    attacks += [Attack(f"iterative_l2_eps{e:g}", "iterative_l2",
                       {"eps": e, "eps_step": e / frac, "max_iter": iters, "num_random_init": 0, "verbose": False},
                       art_attack("ProjectedGradientDescent", norm=2)) for e in eps["l2"]]
    attacks.append(Attack("deepfool", "deepfool", {"max_iter": 50, "overshoot": 0.02}, _deepfool))
    attacks.append(Attack("carlini_l2", "carlini_l2", {"confidence": 0.0, "binary_search_steps": 9,
                                                       "max_iterations": 1000}, own_carlini("l2")))
    attacks.append(Attack("carlini_linf", "carlini_linf", {"confidence": 0.0, "max_iterations": 1000},
                          own_carlini("linf")))
    # L0: Carlini's schedule and budget (l0_attack.py's defaults) are the full-strength row; the faster
    # geometric schedule (``carlini_l0_fast``, about 1/100 of the steps on MNIST) is marked reduced.
    attacks.append(Attack("carlini_l0", "carlini_l0", {"confidence": 0.0, "schedule": "carlini", "learning_rate": 1e-2,
                                                       "max_iterations": 1000, "initial_const": 1e-3,
                                                       "const_factor": 2.0, "largest_const": 2e6}, own_carlini("l0")))
    attacks.append(Attack("carlini_l0_fast", "carlini_l0", {"confidence": 0.0, "max_iterations": 50},
                          own_carlini("l0")))
    # ART's CarliniL0Method: 79 s for 4 MNIST images on 2 CPU cores, 280 pixels changed on average against
    # our 7.5 (docs/results/carlini-l0-vs-art.json); kept for comparison, run only when named
    # (``--attacks carlini_l0_art``).
    attacks.append(Attack("carlini_l0_art", "carlini_l0", {"confidence": 0.0, "max_iter": 100, "verbose": False},
                          art_attack("CarliniL0Method")))
    return {a.name: a for a in attacks}


# Full strength: the registry's budgets (Carlini's own for his attacks) on at least this many examples.
BUDGET_KEYS = ("max_iter", "max_iterations", "binary_search_steps")


def full_examples(family: str) -> int:
    return 200 if family.startswith("carlini") else 1000


def reduced(attack: Attack, full: Attack, examples: int) -> str | None:
    """Why a row runs below full strength (fewer examples, or a smaller iteration budget than the
    registry's ``full`` entry), or None when it does not."""
    why = [f"{examples} examples < {full_examples(attack.family)}"] if examples < full_examples(attack.family) else []
    why += [f"{k} {attack.params[k]} < {full.params[k]}" for k in BUDGET_KEYS
            if k in full.params and k in attack.params and attack.params[k] < full.params[k]]
    if "schedule" in full.params and attack.params.get("schedule", "geometric") != full.params["schedule"]:
        why.append(f"{attack.params.get('schedule', 'geometric')} schedule, not {full.params['schedule']}'s")
    return "; ".join(why) or None


def full_strength(attacks: dict[str, Attack], name: str) -> Attack:
    """The registry entry that ``name``'s row is measured against: its family's (Carlini's L0 for
    ``carlini_l0_fast``) when the family has one of its own name, else its own."""
    attack = attacks[name]
    return attacks.get(attack.family, attack)


def default_names(dataset) -> list[str]:
    """What ``magnet evaluate`` runs without ``--attacks``: every row of the paper's table."""
    return [name for name in registry(dataset) if not name.endswith(("_art", "_fast"))]


def gradient_budget(attack: Attack, classes: int) -> tuple[float, str]:
    """Classifier gradients per example that ``attack`` takes, for ``magnet evaluate``'s plan: the
    estimate and how good it is ("exact", "at most": the budget, early stops make it less, or "rough":
    the number of rounds depends on the data)."""
    p, family = attack.params, attack.family
    if family == "fgsm":
        return 1.0, "exact"
    if family.startswith("iterative"):
        return float(p.get("max_iter", 1)) * max(1, p.get("num_random_init", 0) or 1), "exact"
    if family == "deepfool":
        return 3.0 * classes, "rough"  # about 3 iterations of one gradient per class (at most max_iter)
    if attack.name.endswith("_art"):
        return 100.0 * p.get("max_iter", 100), "rough"
    if family == "carlini_l2":
        return float(p.get("binary_search_steps", 9) * p.get("max_iterations", 1000)), "at most"
    if family == "carlini_linf":
        return 20.0 * p.get("max_iterations", 1000), "rough"  # tau rounds, each cut short by its success
    if family == "carlini_l0" and p.get("schedule") == "carlini":
        return 25.0 * p.get("max_iterations", 1000), "rough"  # ~200 short rounds, then c doubling to 2e6
    if family == "carlini_l0":
        return 15.0 * p.get("max_iterations", 50), "rough"  # about 15 mask rounds
    return float(p.get("max_iter", p.get("max_iterations", 1))), "rough"
