"""A second whitebox attack on a bundle: PGD in an L-infinity ball through the reformer and detectors.

Complements the Carlini-style adaptive attack of ``magnet evaluate --adaptive`` (minimal L2): here the
budget is a fixed ε and the attacker maximises, by signed gradient steps from a random start,

    CE(f(D(x')), y) + CE(f(x'), y) - weight * excess(x')

where ``excess`` is the detectors' summed relative excess over their thresholds (0 once every score is
5 % below its threshold). The second term pulls f(x') toward the same wrong answer as f(D(x')), which is
what keeps the divergence detectors quiet. Each iterate that beats the defense on the torch twins is
kept; every example is then judged by the ONNX core the gateway serves.

    python scripts/adaptive_pgd.py --bundle models/cifar10 --data-dir ../shared/data --n 100 \
        --eps 0.01 0.025 0.03137 --steps 50 --out docs/results/eval-cifar10-adaptive-pgd.json

The step is ε/4, divided by steps // 40 when that is above 1 (ε/4 at 50 steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.defense import Defense  # noqa: E402
from training.bundles import run_batched  # noqa: E402
from training.data import load  # noqa: E402
from training.evaluate.torch_defense import Twins  # noqa: E402


def attack(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step: float, weight: float,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
    best, won = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    for _ in range(steps):
        adv.requires_grad_(True)
        ev = model.evaluate(adv)
        z_ref = ev.logits[0]
        z_x = ev.logits_x if ev.logits_x is not None else model.classifier(adv)
        loss = F.cross_entropy(z_ref, y, reduction="none") + F.cross_entropy(z_x, y, reduction="none") \
            - weight * model.excess(adv)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--n", type=int, default=100, help="first test images the classifier gets right")
    p.add_argument("--eps", type=float, nargs="+", default=[8 / 255])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--weight", type=float, default=10.0, help="weight of the detectors' excess")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    defense = Defense(args.bundle, device="cpu")
    test = load(defense.manifest.dataset, args.data_dir).test
    idx = np.flatnonzero(run_batched(defense.classifier, test.x).argmax(1) == test.y)[: args.n]
    x_all, y_all = test.x[idx], test.y[idx]
    model = Twins(defense).members([0])
    for param in model.parameters():
        param.requires_grad_(False)
    rows = []
    for eps in args.eps:
        started = time.perf_counter()
        advs, wins = [], []
        for i in range(0, len(x_all), args.batch):
            x, y = torch.from_numpy(x_all[i:i + args.batch]), torch.from_numpy(y_all[i:i + args.batch])
            adv, won = attack(model, x, y, eps, args.steps, eps / 4 / max(1, args.steps // 40), args.weight)
            advs.append(adv.numpy())
            wins.append(won.numpy())
        adv, won = np.concatenate(advs), np.concatenate(wins)
        v = defense.inspect(adv)
        labels = run_batched(defense.classifier, v.reformed).argmax(1)
        defended = v.rejected | (labels == y_all)
        rows.append({"eps": eps, "examples": len(idx), "steps": args.steps, "weight": args.weight,
                     "success_on_twin": float(won.mean()), "full_defense_onnx": float(defended.mean()),
                     "rejected": float(v.rejected.mean()),
                     "linf": float(np.abs(adv - x_all).reshape(len(adv), -1).max(1).max()),
                     "seconds": time.perf_counter() - started})
        print(json.dumps(rows[-1]), flush=True)
    out = {"bundle": str(args.bundle), "rows": rows,
           "command": "python scripts/adaptive_pgd.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
