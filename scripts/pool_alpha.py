"""The CIFAR-10 pool's diversity weight α, chosen on validation images (no test image is read).

    python scripts/pool_alpha.py --data-dir ../shared/data --work-dir runs/pool-alpha --steps 60 \
        --alphas 1 100 10 30 --n-val 500 --n-transfer 100 --out docs/results/cifar10-pool-alpha.json

Every run starts from the shipped ``models/cifar10-pool`` (its eight members, read back from their ONNX
files) and trains them jointly for ``--steps`` more steps with the pool's own recipe (KL + L1, FGSM / PGD-3
3 : 1 up to ε = 8/255 on the training split: this pool has seen attacks) and the given α; α = 1 is the
shipped value, so its run is the control for "more steps" against "a larger α". Then, on validation
images, per run:

- each member's reformed accuracy and, on FGSM ε = 0.025 crafted against the classifier alone, its
  reformed accuracy (the oblivious attack the selection set uses);
- diversity: the pairwise MSE between members' outputs on clean images (mean, min, max);
- transfer: PGD L∞ ε = 0.025 (10 steps) crafted through member i's reformer and the classifier, judged by
  the classifier on member i's reformed output (aimed at) and on every other member's (the graybox case);
  a pool works when the off-diagonal accuracy is well above the diagonal.

Why these α: the shipped pool's diversity term (mean squared distance of each member's output from the
members' mean) is about 3e-6 against KL ≈ 0.06 and L1 ≈ 0.025, so α = 1 adds nothing; at the retired
pool's spread (pairwise MSE 5.5e-4, about 2.4e-4 from the mean) α = 100 would make the term 0.02,
comparable to L1. The term is unbounded (only the KL and L1 terms hold the members back), and α = 100
ran away in 60 steps (members at chance), so the grid went down to 10 and 30 (runs are taken in the
order given; a finished one is kept in ``--out`` and not rerun).

The chosen α is the largest whose mean reformed accuracy stays within ``--max-drop`` points of the
control's. Training resumes from each run's ``--work-dir`` (killed runs continue).

``--variants NAME=FLAGS`` adds runs with other training flags than the pool's (α = 1 and the pool's mix
unless FLAGS say otherwise), e.g. the ``pgd_member`` mix kind, attacks crafted through a member drawn
each step (``training.reformer``):

    python scripts/pool_alpha.py --data-dir ../shared/data --work-dir runs/pool-alpha --steps 60 \
        --alphas 1 --n-val 500 --n-transfer 100 --out docs/results/cifar10-pool-alpha.json \
        --variants "member-others=--mix fgsm=3,pgd=1,pgd_member=2 --member-attack others" \
                   "member-all=--mix fgsm=3,pgd=1,pgd_member=2 --member-attack all"

A variant is eligible when its mean reformed accuracy is within ``--max-drop`` points of the α = 1
control's and its mean FGSM reformed accuracy within ``--max-fgsm-drop``; of those, the one with the
highest mean over the whole transfer grid (the graybox case: an attack aimed at one member, judged on a
member drawn at random) is chosen if that mean beats the control's by ``--min-gain`` points.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from itertools import permutations
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import build_guided  # noqa: E402
from training.attacks.pgd import fgsm, pgd_linf  # noqa: E402
from training.from_onnx import torch_twin  # noqa: E402
from training.images import load_cifar10  # noqa: E402
from training.nets import GuidedReformer  # noqa: E402
from training.reformer import _load_states  # noqa: E402

SHAPE = (3, 32, 32)


def members_of(ckpt: Path) -> list[GuidedReformer]:
    """The reformers of a training checkpoint (or ``init_checkpoint``'s), in evaluation mode."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    members = [GuidedReformer(3, 32, 2) for _ in state.get("models", [None])]
    _load_states(torch.nn.ModuleList(members), state)
    return [m.eval() for m in members]


@torch.no_grad()
def predict(model, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def measure(members: list[GuidedReformer], classifier, x: torch.Tensor, y: torch.Tensor, n_transfer: int) -> dict:
    for p in (q for m in members for q in m.parameters()):
        p.requires_grad_(False)
    x_fgsm = fgsm(classifier, x, y, 0.025)
    outs = [predict(m, x).clamp(0, 1) for m in members]
    acc = [float((predict(classifier, o).argmax(1) == y).float().mean()) for o in outs]
    acc_fgsm = [float((predict(classifier, predict(m, x_fgsm).clamp(0, 1)).argmax(1) == y).float().mean())
                for m in members]
    pair = [float((outs[i] - outs[j]).pow(2).mean()) for i, j in permutations(range(len(members)), 2) if i < j]
    xt, yt = x[:n_transfer], y[:n_transfer]
    grid = np.zeros((len(members), len(members)))
    gen = torch.Generator().manual_seed(0)
    for i, m in enumerate(members):
        through = torch.nn.Sequential(m, classifier).eval()
        adv = pgd_linf(through, xt, yt, 0.025, steps=10, generator=gen)
        for j, mj in enumerate(members):
            grid[i, j] = float((predict(classifier, predict(mj, adv).clamp(0, 1)).argmax(1) == yt).float().mean())
    off = grid[~np.eye(len(members), dtype=bool)]
    return {"reformed_acc": acc, "reformed_acc_mean": float(np.mean(acc)),
            "fgsm_0.025_reformed_acc": acc_fgsm, "fgsm_0.025_reformed_acc_mean": float(np.mean(acc_fgsm)),
            "pairwise_mse": {"mean": float(np.mean(pair)), "min": float(np.min(pair)), "max": float(np.max(pair))},
            "transfer_pgd_0.025": {"examples": n_transfer, "grid_aimed_row_judged_column": grid.round(4).tolist(),
                                   "diagonal_mean": float(np.mean(np.diag(grid))), "off_diagonal_mean": float(off.mean()),
                                   "off_diagonal_min": float(off.min())}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, default=Path("runs/pool-alpha"))
    p.add_argument("--pool", type=Path, default=REPO / "models" / "cifar10-pool")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 100.0, 10.0, 30.0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--n-val", type=int, default=1000, help="validation images measured")
    p.add_argument("--n-transfer", type=int, default=200, help="validation images in the transfer grid")
    p.add_argument("--max-drop", type=float, default=0.5, help="points of mean reformed accuracy α may cost")
    p.add_argument("--variants", nargs="*", default=[], metavar="NAME=FLAGS",
                   help="more runs: a name, then training flags replacing the pool's (quoted)")
    p.add_argument("--max-fgsm-drop", type=float, default=1.0, help="points of mean FGSM reformed accuracy a variant may cost")
    p.add_argument("--min-gain", type=float, default=5.0,
                   help="points of mean transfer-grid accuracy a variant must add to the control's to be chosen")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    ds = load_cifar10(args.data_dir)
    x, y = torch.from_numpy(ds.val.x[:args.n_val]), torch.from_numpy(ds.val.y[:args.n_val])
    classifier = torch_twin(REPO / "models" / "shared" / "cifar10-resnet9.onnx", "cifar10", "classifier", SHAPE).eval()
    for q in classifier.parameters():
        q.requires_grad_(False)
    report = {"pool": str(args.pool), "steps": args.steps, "lr": args.lr, "validation_images": args.n_val,
              "command": "python scripts/pool_alpha.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "runs": {}}
    if args.out.exists():
        report["runs"] = json.loads(args.out.read_text()).get("runs", {})
    ckpt = build_guided.init_checkpoint(args.pool, args.work_dir)
    if "shipped" not in report["runs"]:
        report["runs"]["shipped"] = {"alpha": 1.0, "steps": 0, **measure(members_of(ckpt), classifier, x, y, args.n_transfer)}
        args.out.write_text(json.dumps(report, indent=1))
    runs = [(f"alpha={alpha:g}", alpha, []) for alpha in args.alphas]
    for spec in args.variants:
        name, _, flags = spec.partition("=")
        runs.append((name.strip(), None, shlex.split(flags)))
    for name, alpha, flags in runs:
        if name in report["runs"]:
            continue
        work = args.work_dir / name
        started = time.perf_counter()
        logits = sorted(args.work_dir.glob("*/train_logits.npy"))  # f on the training split: the same for all
        if logits and not (work / "train_logits.npy").exists():
            work.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(logits[0], work / "train_logits.npy")
        pool_flags = {"--alpha": str(1.0 if alpha is None else alpha), "--mix": "fgsm=3,pgd=1"}  # unless flags say
        base = [a for k, v in pool_flags.items() if k not in flags for a in (k, v)]
        build_guided.main(["--data-dir", str(args.data_dir), "--work-dir", str(work), "--out", str(work / "unused"),
                           "--train-only", "--members", "8", *base, *flags,
                           "--steps", str(args.steps), "--lr", str(args.lr), "--init-from", str(ckpt),
                           "--device", args.device])
        history = json.loads((work / "reformer.history.json").read_text())
        if not history.get("finished"):
            print(f"{name}: stopped before {args.steps} steps; run again to continue")
            return 1
        report["runs"][name] = {"alpha": alpha, **({"flags": shlex.join(flags)} if alpha is None else {}),
                                "steps": args.steps, "train_seconds": history["seconds"],
                                "last_training_row": history["rows"][-1],
                                **measure(members_of(work / "reformer.ckpt"), classifier, x, y, args.n_transfer),
                                "wall_seconds": time.perf_counter() - started}
        args.out.write_text(json.dumps(report, indent=1))
        print(name, json.dumps({k: v for k, v in report["runs"][name].items() if k != "transfer_pgd_0.025"}))
    control = report["runs"].get("alpha=1")
    if control:
        ok = [r["alpha"] for r in report["runs"].values() if r["steps"] == args.steps and r.get("alpha") is not None
              and r["reformed_acc_mean"] >= control["reformed_acc_mean"] - args.max_drop / 100]
        report["chosen_alpha"] = max(ok)
        report["rule"] = (f"the largest alpha whose mean reformed validation accuracy is within {args.max_drop:g} "
                          f"points of the alpha = 1 control after the same {args.steps} steps")
        args.out.write_text(json.dumps(report, indent=1))
        print("chosen alpha", report["chosen_alpha"])
        variants = {n: r for n, r in report["runs"].items() if r.get("flags") is not None and r["steps"] == args.steps}
        if variants:
            def grid_mean(r: dict) -> float:
                return float(np.mean(r["transfer_pgd_0.025"]["grid_aimed_row_judged_column"]))

            eligible = {n: r for n, r in variants.items()
                        if r["reformed_acc_mean"] >= control["reformed_acc_mean"] - args.max_drop / 100
                        and r["fgsm_0.025_reformed_acc_mean"] >= control["fgsm_0.025_reformed_acc_mean"] - args.max_fgsm_drop / 100}
            best = max(eligible, key=lambda n: grid_mean(eligible[n]), default=None)
            report["variant_grid_means"] = {n: grid_mean(r) for n, r in {"alpha=1": control, **variants}.items()}
            report["chosen_variant"] = (best if best is not None and grid_mean(eligible[best]) >= grid_mean(control)
                                        + args.min_gain / 100 else None)
            report["variant_rule"] = (f"eligible: mean reformed accuracy within {args.max_drop:g} points and mean FGSM "
                                      f"reformed accuracy within {args.max_fgsm_drop:g} points of the alpha = 1 control; "
                                      f"chosen: the eligible variant with the highest mean over the transfer grid, if it "
                                      f"beats the control's by {args.min_gain:g} points")
            args.out.write_text(json.dumps(report, indent=1))
            print("chosen variant", report["chosen_variant"], report["variant_grid_means"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
