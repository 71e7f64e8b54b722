"""Adaptive attacks on MagNet (beyond the paper; after Carlini & Wagner, "MagNet and 'Efficient
Defenses Against Adversarial Attacks' are Not Robust to Adversarial Examples", 2017).

Two attacks that know the defense and optimise through it.

**Carlini L2** (``adaptive_attack``, minimal distortion): Carlini L2 on the reformed classifier
``classifier(ae(x))`` plus a penalty on every detector score above its threshold (weighted by c like
the margin loss, so the binary search over c trades distortion against both), and counts an iterate
as a success only when every targeted member accepts it and classifies it wrongly after reforming.

With one member this is the whitebox attack. With a pool it is the expectation over members (EOT):
the logits are averaged over the members' reformed classifiers and the penalty over their
detectors, for an attacker who knows all the weights but not which member a session will get.

**PGD in an L-infinity ball** (``adaptive_pgd``, a fixed budget ε): from a random start in the ball,
signed gradient steps that maximise

    mean over members m of CE(f(D_m(x')), y)  +  CE(f(x'), y)  -  weight * excess(x')

where ``excess`` is the members' mean summed relative excess of the detector scores over their thresholds
(0 once every score is 5 % below its threshold). The second term pulls f(x') toward the same wrong answer
as f(D(x')), which keeps the divergence detectors quiet; the Carlini-style attack, which optimises
f(D(x')) alone, leaves f(x') on the true class, where only those detectors can see it. Each iterate
that beats every targeted member on the torch twins is kept.

Every example is then judged by ``Defense.inspect`` on the ONNX graphs, member by member.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from service.defense.core import Defense
from training.attacks.carlini import carlini_l2
from training.evaluate.graybox import Judge
from training.evaluate.torch_defense import Members, Twins


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


def pgd_through_defense(model: Members, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step: float,
                        weight: float = 10.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD L-infinity through ``model``'s members (see the module's docstring). Returns the examples (the
    first iterate that beat every member, else the clean input) and which ones beat them."""
    gen = torch.Generator().manual_seed(seed)
    adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps).clamp(0, 1)
    best, won = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        adv.requires_grad_(True)
        ev = model.evaluate(adv)
        z_x = ev.logits_x if ev.logits_x is not None else model.classifier(adv)
        reformed = torch.stack([F.cross_entropy(z, y, reduction="none") for z in ev.logits]).mean(0)
        loss = reformed + F.cross_entropy(z_x, y, reduction="none") - weight * model.excess(adv)
        grad, = torch.autograd.grad(loss.sum(), adv)
        with torch.no_grad():
            beaten = model.beaten(adv, y)
            best[beaten & ~won] = adv[beaten & ~won].detach()
            won |= beaten
            adv = (adv + step * grad.sign()).clamp(x - eps, x + eps).clamp(0, 1).detach()
    with torch.no_grad():
        beaten = model.beaten(adv, y)
        best[beaten & ~won] = adv[beaten & ~won]
        won |= beaten
    return best, won


def pgd_step(eps: float, steps: int) -> float:
    """ε/4, divided by steps // 40 when that is above 1 (ε/4 at 50 steps, ε/10 at 100)."""
    return eps / 4 / max(1, steps // 40)


def adaptive_pgd(defense: Defense, twins: Twins, targets: list[int], x: np.ndarray, y: np.ndarray, eps: float,
                 steps: int, judge: Judge, *, weight: float = 10.0, batch: int = 50, device: str = "cpu",
                 log: Callable[[str], None] = print) -> dict:
    """``pgd_through_defense`` against the members ``targets`` (all together), judged by every member."""
    model = twins.members(targets).to(device)
    step = pgd_step(eps, steps)
    started = time.perf_counter()
    advs, wins = [], []
    for i in range(0, len(x), batch):
        xb, yb = torch.from_numpy(x[i:i + batch]).to(device), torch.from_numpy(y[i:i + batch]).to(device)
        adv, won = pgd_through_defense(model, xb, yb, eps, steps, step, weight, seed=0)
        advs.append(adv.cpu().numpy())
        wins.append(won.cpu().numpy())
    adv, won = np.concatenate(advs), np.concatenate(wins)
    seconds = time.perf_counter() - started
    per_member = [judge(defense, adv, y, i) for i in range(len(defense.members))]
    out = {"members": [twins.specs[i].name for i in targets], "eps": eps,
           "params": {"steps": steps, "step": step, "weight": weight, "random_start": True},
           "examples": len(x), "seconds": seconds, "attack_success_twin": float(won.mean()),
           "linf": float(np.abs(adv - x).reshape(len(x), -1).max(1).max()) if len(x) else 0.0,
           "full_defense_per_member": [r["full_defense"] for r in per_member],
           "rejected_per_member": [r["rejected"] for r in per_member]}
    out["full_defense_random_member"] = float(np.mean(out["full_defense_per_member"]))
    log(f"adaptive PGD eps {eps:g} ({len(targets)} member(s)): {len(x)} examples in {seconds:.0f} s, success on "
        f"the twins {won.mean():.3f}, full defense (random member) {out['full_defense_random_member']:.3f}")
    return out
