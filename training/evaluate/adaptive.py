"""An adaptive attack on MagNet (beyond the paper; after Carlini & Wagner, "MagNet and 'Efficient
Defenses Against Adversarial Attacks' are Not Robust to Adversarial Examples", 2017).

The attacker knows the defense, and optimises through it: Carlini L2 on the reformed classifier
``classifier(ae(x))`` plus a penalty on every detector score above its threshold (weighted by c like
the margin loss, so the binary search over c trades distortion against both), and counts an iterate
as a success only when every targeted member accepts it and classifies it wrongly after reforming.

With one member this is the whitebox attack. With a pool it is the expectation over members (EOT):
the logits are averaged over the members' reformed classifiers and the penalty over their
detectors, for an attacker who knows all the weights but not which member a session will get.

Every example is then judged by ``Defense.inspect`` on the ONNX graphs, member by member.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from service.defense.core import Defense
from training.attacks.carlini import carlini_l2
from training.evaluate.graybox import Judge
from training.evaluate.torch_defense import Twins


def adaptive_attack(defense: Defense, twins: Twins, targets: list[int], x: np.ndarray, y: np.ndarray, params: dict,
                    judge: Judge, *, weight: float = 10.0, margin: float = 0.05, device: str = "cpu",
                    log: Callable[[str], None] = print) -> dict:
    """Run the attack against the members ``targets`` (all together) and judge it by every member."""
    model = twins.members(targets).to(device)

    def penalty(adv: torch.Tensor) -> torch.Tensor:
        return weight * model.excess(adv, margin)

    def success(adv: torch.Tensor, _logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model.beaten(adv, labels)

    started = time.perf_counter()
    result = carlini_l2(model, x, y, device=device, penalty=penalty, success_fn=success,
                        penalty_times_const=True, **params)
    seconds = time.perf_counter() - started
    per_member = [judge(defense, result.x_adv, y, i) for i in range(len(defense.members))]
    ok = result.success
    out = {"members": [twins.specs[i].name for i in targets], "params": {**params, "penalty_weight": weight,
                                                                  "penalty_margin": margin},
           "examples": len(x), "seconds": seconds, "attack_success_twin": float(ok.mean()),
           "mean_l2": float(result.l2[ok].mean()) if ok.any() else None,
           "median_l2": float(np.median(result.l2[ok])) if ok.any() else None,
           "full_defense_per_member": [r["full_defense"] for r in per_member],
           "rejected_per_member": [r["rejected"] for r in per_member]}
    out["full_defense_random_member"] = float(np.mean(out["full_defense_per_member"]))
    out["attack_success_random_member"] = 1.0 - out["full_defense_random_member"]
    log(f"adaptive ({len(targets)} member(s)): {len(x)} examples in {seconds:.0f} s, success on the twins "
        f"{ok.mean():.3f}, mean L2 {out['mean_l2']}, full defense (random member) {out['full_defense_random_member']:.3f}")
    return out
