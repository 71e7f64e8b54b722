"""What the examples that beat an oblivious attack's row have in common.

    python -m training.evaluate.failures --bundle models/cifar10 --data-dir DATA \
        --examples runs/adv-cache/fgsm_eps0.025-5ff08040d14d801e.npz

``--examples`` is a cached ``magnet evaluate --cache`` file (``x_adv`` for the first test images the
classifier gets right, in order). Among the examples that fool the undefended classifier, it compares
those the defense lets through with a wrong label ("failures") against those it stops: how confidently
the classifier is fooled, how each detector's score sits against its threshold, and whether the
reformer keeps the adversarial label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from service.defense import Defense
from service.defense.scores import softmax
from training.bundles import run_batched
from training.data import load


def analyse(defense: Defense, x: np.ndarray, y: np.ndarray, x_adv: np.ndarray, member: int = 0) -> dict:
    if x_adv.shape != x.shape:
        raise ValueError(f"{len(x_adv)} adversarial examples for {len(x)} images: shapes {x_adv.shape} != {x.shape}")
    v = defense.inspect(x_adv, member)
    logits_adv = v.logits_x if v.logits_x is not None else run_batched(defense.classifier, x_adv)
    logits_ref = v.logits_reformed if v.logits_reformed is not None else run_batched(defense.classifier, v.reformed)
    fooled = logits_adv.argmax(1) != y
    defended = v.rejected | (logits_ref.argmax(1) == y)
    margin = logits_adv.max(1) - logits_adv[np.arange(len(y)), y]
    thresholds = {d.name: d.threshold for d in defense.members[member].detectors}

    def group(mask: np.ndarray) -> dict:
        if not mask.any():
            return {"n": 0}
        return {"n": int(mask.sum()),
                "median_logit_margin_over_true": float(np.median(margin[mask])),
                "median_p_adversarial_label": float(np.median(softmax(logits_adv[mask]).max(1))),
                "median_score_over_threshold": {k: float(np.median(v.scores[k][mask] / t)) for k, t in thresholds.items()},
                "reformer_keeps_adversarial_label": float(np.mean(
                    logits_ref[mask].argmax(1) == logits_adv[mask].argmax(1)))}

    return {"examples": len(y), "fooled": int(fooled.sum()), "defended": float(defended.mean()),
            "failures": group(fooled & ~defended), "stopped": group(fooled & defended),
            "correct_but_broken_by_the_defense": int((~fooled & ~defended).sum())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate.failures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--examples", type=Path, required=True, help="a --cache file of magnet evaluate (x_adv)")
    args = p.parse_args(argv)
    defense = Defense(args.bundle, device="cpu")
    test = load(defense.manifest.dataset, args.data_dir).test
    x_adv = np.load(args.examples)["x_adv"]
    correct = np.flatnonzero(run_batched(defense.classifier, test.x).argmax(1) == test.y)[: len(x_adv)]
    print(json.dumps(analyse(defense, test.x[correct], test.y[correct], x_adv), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
