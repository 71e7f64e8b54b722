"""Does the structure of the residual x - D(x) tell an attack from an uncompressed image? (validation only)

    python scripts/residual_structure.py --bundle models/cifar10 --data-dir ../shared/data \
        --set runs/selection/set.npz --originals runs/cifar10-originals/val \
        --logits runs/round17-logits.npz --out docs/results/cifar10-selection-round18

The shipped reformer D takes the fine detail of an uncompressed image for a perturbation, so MagNet's
detectors fire more often on real originals than on the JPEG images their thresholds were set on (rounds
14-17). Natural detail sits at edges and in texture; an L-inf attack such as FGSM moves every pixel by
about eps. This scores statistics of the residual r = x - D(x) that weigh the two differently, besides
MagNet's mean |r|:

- ``q25``, ``q50``: a quantile of |r| over the pixels (insensitive to a few large residuals at edges);
- ``frac3``: the share of pixels with |r| > 3/255;
- ``flat_l1``: mean |r| over the flatter half of D(x) (by its luma gradient), where photographs hold little
  detail and a dense perturbation as much as anywhere;
- ``r_lapmad``: median |Laplacian(r)| (the residual's finest-scale noise level);
- ``x_lapmad``: median |Laplacian(x)| of the input itself, no autoencoder (a noise-level estimate).

Each alone, at an FPR of the clean JPEG validation images, and each with the shipped divergence detector
(JSD between f(x) and f(D(x)) at T = 40, its threshold at FPR 0, 0.005, 0.01 or 0.02 of the same
images), on the sets of round 17 (the clean JPEG validation images, the fixed selection set, the 467
validation originals, FGSM at 0.025 and 0.05 and PGD-10 crafted from them against the classifier). Attack
rows count the images the classifier gets right; an attack is defended when it is rejected or D(x) is
classified right. ``separation`` says, per statistic, what share of FGSM from originals it would reject
at a threshold set on the clean originals themselves (2 %): how far the statistic tells the two apart
within the uncompressed domain, whatever the shift from JPEG.

``--logits``: round 17's cached logits (``scripts/detector_views.py --cache``), reused when present
(they must have been made from the same sets: checked on the crafted attacks); otherwise computed.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import detector_views as V  # noqa: E402  (the same sets, attacks and rule as round 17)
from service.defense import scores as S  # noqa: E402
from service.defense.core import Defense  # noqa: E402
from service.defense.thresholds import passes, threshold_at_fpr  # noqa: E402
from training.bundles import run_batched  # noqa: E402
from training.from_onnx import classifier_twin  # noqa: E402
from training.provenance import provenance  # noqa: E402

FPRS = (0.005, 0.01, 0.02)
JSD_FPRS = (0.0, 0.005, 0.01, 0.02)
SETS = ("clean", "fgsm", "pgd", "orig_clean", "orig_fgsm", "orig_fgsm05", "orig_pgd")


def laplacian(a: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian of each channel of (N, C, H, W), borders replicated."""
    p = np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    return 4 * a - p[:, :, :-2, 1:-1] - p[:, :, 2:, 1:-1] - p[:, :, 1:-1, :-2] - p[:, :, 1:-1, 2:]


def luma_gradient(a: np.ndarray) -> np.ndarray:
    """|d/dy| + |d/dx| of the channel mean, (N, 1, H, W)."""
    g = np.pad(a.mean(1, keepdims=True), ((0, 0), (0, 0), (0, 1), (0, 1)), mode="edge")
    return np.abs(g[:, :, 1:, :-1] - g[:, :, :-1, :-1]) + np.abs(g[:, :, :-1, 1:] - g[:, :, :-1, :-1])


def statistics(x: np.ndarray, dx: np.ndarray) -> dict[str, np.ndarray]:
    """One score per image for each statistic (larger = further from clean); see the module."""
    n = len(x)
    r = np.abs(x - dx)
    flat = luma_gradient(dx).reshape(n, -1)
    flat = (flat <= np.median(flat, axis=1, keepdims=True)).reshape(n, 1, *x.shape[2:])
    a = r.reshape(n, -1)
    return {"l1": a.mean(1), "q25": np.quantile(a, 0.25, axis=1), "q50": np.median(a, axis=1),
            "frac3": (a > 3 / 255).mean(1),
            "flat_l1": (r * flat).reshape(n, -1).sum(1) / (x.shape[1] * flat.reshape(n, -1).sum(1)),
            "r_lapmad": np.median(np.abs(laplacian(x - dx)).reshape(n, -1), axis=1),
            "x_lapmad": np.median(np.abs(laplacian(x)).reshape(n, -1), axis=1)}


def judge(rejected: dict, right: dict, mask: dict) -> dict:
    """Clean sets: accepted and right; attacks: defended (rejected, or right after reforming), over ``mask``."""
    return {k: float((right[k] & ~rej).mean()) if k.endswith("clean") else float((right[k] | rej)[mask[k]].mean())
            for k, rej in rejected.items()}


def tables(stats: dict, jsd: dict, right: dict, mask: dict) -> dict:
    """Every statistic alone and with the divergence detector (see the module)."""
    alone, combined, separation = [], [], {}
    for s in stats["clean"]:
        cut = threshold_at_fpr(stats["orig_clean"][s], 0.02)
        separation[s] = float((~passes(stats["orig_fgsm"][s], cut))[mask["orig_fgsm"]].mean())
        for f in FPRS:
            t = threshold_at_fpr(stats["clean"][s], f)
            rejected = {k: ~passes(stats[k][s], t) for k in stats}
            alone.append({"statistic": s, "fpr": f, "rejected": {
                k: float(rej[mask[k]].mean() if k in mask else rej.mean()) for k, rej in rejected.items()}})
    for s, fj, fs in itertools.product([None, *stats["clean"]], JSD_FPRS, FPRS):
        if s is None and fs != FPRS[0]:
            continue
        tj = threshold_at_fpr(jsd["clean"], fj) if fj else np.inf
        ts = threshold_at_fpr(stats["clean"][s], fs) if s else None
        rejected = {k: (~passes(jsd[k], tj) if fj else np.zeros(len(right[k]), bool))
                    | (~passes(stats[k][s], ts) if s else False) for k in stats}
        combined.append({"statistic": s, "fpr": fs if s else None, "jsd_fpr": fj, **judge(rejected, right, mask)})
    return {"alone": alone, "combined": combined, "separation_at_2pct_of_clean_originals": separation}


def eligible(row: dict, f_val: float, f_orig: float) -> bool:
    """Round 17's rule (``detector_views``' budget and floors) on a row of ``tables``' ``combined``."""
    return (f_val - row["clean"] <= V.CLEAN_BUDGET and f_orig - row["orig_clean"] <= V.CLEAN_BUDGET
            and row["fgsm"] >= V.FGSM_FLOOR and row["pgd"] >= V.PGD_FLOOR)


def markdown(result: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    f = result["classifier_right"]
    lines = ["# Structure of the residual x - D(x) (validation only)", "",
             f"Classifier right: {pct(f['val'])} % of the JPEG validation images, {pct(f['val_originals'])} % of the "
             f"{result['originals']} validation originals. Eligible (round 17's rule): "
             f"{result['eligible']} of {len(result['combined'])} configurations.", "",
             "## Each statistic alone (threshold at an FPR of the clean JPEG validation images): rejected %", "",
             "| statistic | FPR | " + " | ".join(SETS) + " |", "| --- | --- | " + " | ".join("---" for _ in SETS) + " |"]
    for r in result["alone"]:
        lines.append(f"| {r['statistic']} | {r['fpr']:g} | " + " | ".join(pct(r["rejected"][k]) for k in SETS) + " |")
    lines += ["", "FGSM ε = 0.025 from originals rejected at a threshold set at 2 % of the clean originals "
              "themselves: " + ", ".join(f"{s} {pct(v)} %" for s, v in result["separation_at_2pct_of_clean_originals"].items())
              + ".", "", "## With the divergence detector (x|Dx, T = 40): clean accepted and right %, attacks defended %",
              "", "| statistic | its FPR | JSD FPR | " + " | ".join(SETS) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in SETS) + " |"]
    for r in result["combined"]:
        own = "" if r["fpr"] is None else f"{r['fpr']:g}"
        lines.append(f"| {r['statistic'] or '(JSD only)'} | {own} | {r['jsd_fpr']:g} | "
                     + " | ".join(pct(r[k]) for k in SETS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = V.round_parser(__doc__, "--logits", "round 17's cached logits (.npz), reused when present").parse_args(argv)
    started = time.perf_counter()
    defense = Defense(args.bundle, device="cpu")
    data, sel, originals, oy, _ = V.round_data(defense, args)
    twin = classifier_twin(defense)
    crafted = V.craft(twin, originals, oy, args.seed)
    inputs = {"clean": data.val.x, "fgsm": sel["fgsm"], "pgd": sel["pgd"], "orig_clean": originals,
              **{f"orig_{k}": v for k, v in crafted.items()}}
    y = {"clean": data.val.y, "fgsm": sel["y"], "pgd": sel["y"], **{k: oy for k in inputs if k.startswith("orig_")}}
    stored = np.load(args.logits) if args.logits is not None and args.logits.exists() else None
    stats, logits = {}, {}
    for k in SETS:
        dx = V.reformed(defense, inputs[k])
        stats[k] = statistics(inputs[k], dx)
        if stored is not None:
            logits[k] = {"x": stored[f"{k}/x"], "dx": stored[f"{k}/dx"]}
        else:
            logits[k] = {"x": run_batched(defense.classifier, inputs[k], 500), "dx": run_batched(defense.classifier, dx, 500)}
        print(f"{k}: {len(dx)} images, {time.perf_counter() - started:.0f} s", flush=True)
    if stored is not None:  # the cache must be of these very inputs
        for k in ("orig_fgsm", "orig_pgd", "fgsm"):
            fresh = run_batched(defense.classifier, inputs[k][:64], 64)
            if not np.allclose(fresh, logits[k]["x"][:64], atol=1e-3):
                raise SystemExit(f"{args.logits}: its {k} logits are not those of the inputs crafted now")
    jsd = {k: S.divergence_score(logits[k]["x"], logits[k]["dx"], 40) for k in SETS}
    right = {k: logits[k]["dx"].argmax(1) == y[k] for k in SETS}
    right_val = logits["clean"]["x"].argmax(1) == y["clean"]
    right_orig = logits["orig_clean"]["x"].argmax(1) == oy
    mask = {"fgsm": right_val[sel["idx"]], "pgd": right_val[sel["idx"]],
            **{k: right_orig for k in SETS if k.startswith("orig_") and k != "orig_clean"}}
    f_val, f_orig = float(right_val.mean()), float(right_orig.mean())
    result = {"bundle": str(args.bundle), "classifier_right": {"val": f_val, "val_originals": f_orig},
              "originals": len(oy), "medians": {s: {k: float(np.median(stats[k][s])) for k in SETS} for s in stats["clean"]},
              **tables(stats, jsd, right, mask)}
    result["eligible"] = sum(eligible(r, f_val, f_orig) for r in result["combined"])
    result["seconds"] = time.perf_counter() - started
    result["provenance"] = provenance(["python", "scripts/residual_structure.py", *(argv or sys.argv[1:])], 0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "residual.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "residual.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
