"""Check the project's batched Carlini-Wagner attacks against ART's on a small set.

    python -m training.evaluate.compare_carlini --bundle models/mnist --data-dir DATA --n 10 \
        --out docs/results/carlini-vs-art.json
    python -m training.evaluate.compare_carlini --norm l0 --bundle models/mnist --data-dir DATA --n 4 \
        --steps 10 --iterations 100 --out docs/results/carlini-l0-vs-art.json

L2: both attacks get the same budget (binary-search steps, iterations, learning rate, initial constant)
on the same test images of the bundle's classifier. L0: ours runs with its defaults (its schedule has no
binary search), ART's CarliniL0Method with ``--steps`` and ``--iterations``. The report gives success
rate, mean L2 and L0 (pixels) over successes and wall time for each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from service.defense.core import Defense
from training.attacks.carlini import carlini_l0, carlini_l2
from training.bundles import run_batched
from training.data import load
from training.evaluate.attacks import _art
from training.from_onnx import torch_twin


def summary(x: np.ndarray, x_adv: np.ndarray, y: np.ndarray, model, seconds: float) -> dict:
    with torch.no_grad():
        fooled = model(torch.from_numpy(x_adv)).argmax(1).numpy() != y
    l2 = np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1)
    l0 = (np.abs(x_adv - x) > 1e-6).any(1).reshape(len(x), -1).sum(1)
    return {"success": float(fooled.mean()), "mean_l2_of_successes": float(l2[fooled].mean()) if fooled.any() else None,
            "mean_l0_of_successes": float(l0[fooled].mean()) if fooled.any() else None, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle whose classifier is attacked")
    p.add_argument("--data-dir", type=Path, required=True, help="directory with the bundle's data set")
    p.add_argument("--n", type=int, default=10, help="test images (the first ones classified correctly)")
    p.add_argument("--steps", type=int, default=5, help="binary-search steps for both attacks")
    p.add_argument("--iterations", type=int, default=200, help="optimizer iterations per step for both")
    p.add_argument("--initial-const", type=float, default=1e-3, help="initial c of the binary search for both")
    p.add_argument("--norm", choices=("l2", "l0"), default="l2", help="which attack to compare")
    p.add_argument("--out", type=Path, help="write the comparison as JSON here")
    args = p.parse_args(argv)
    defense = Defense(args.bundle, device="cpu")
    m = defense.manifest
    model = torch_twin(defense.classifier_file, m.dataset, "classifier", m.input.shape)
    test = load(m.dataset, args.data_dir).test
    idx = np.flatnonzero(run_batched(defense.classifier, test.x).argmax(1) == test.y)[: args.n]
    x, y = test.x[idx], test.y[idx]
    budget = {"binary_search_steps": args.steps, "max_iterations": args.iterations, "learning_rate": 1e-2,
              "initial_const": args.initial_const, "confidence": 0.0}
    t0 = time.perf_counter()
    ours = (carlini_l2(model, x, y, **budget) if args.norm == "l2" else carlini_l0(model, x, y)).x_adv
    ours_s = time.perf_counter() - t0

    from art.attacks.evasion import CarliniL0Method, CarliniL2Method

    estimator = _art(model, x.shape[1:], len(m.classifier.classes), "cpu")
    if args.norm == "l2":
        art_attack = CarliniL2Method(estimator, max_iter=args.iterations, batch_size=len(x), verbose=False,
                                     **{k: v for k, v in budget.items() if k != "max_iterations"})
    else:
        budget = {"ours": "carlini_l0 defaults", "art": {"binary_search_steps": args.steps, "max_iter": args.iterations}}
        art_attack = CarliniL0Method(estimator, max_iter=args.iterations, binary_search_steps=args.steps,
                                     batch_size=len(x), verbose=False)
    t0 = time.perf_counter()
    theirs = art_attack.generate(x=x, y=np.eye(len(m.classifier.classes), dtype=np.float32)[y])
    art_s = time.perf_counter() - t0
    result = {"images": len(x), "norm": args.norm, "budget": budget, "ours": summary(x, ours, y, model, ours_s),
              "art": summary(x, theirs.astype(np.float32), y, model, art_s)}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
