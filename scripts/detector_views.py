"""Which two views should a divergence detector compare? A selection round over one reformer, no training.

    python scripts/detector_views.py --bundle models/cifar10 --data-dir ../shared/data \
        --set runs/selection/set.npz --originals runs/cifar10-originals/val \
        --out docs/results/cifar10-selection-round17

MagNet's divergence detector compares the classifier's outputs on x and on the reformed ae(x). Our
CIFAR-10 is a JPEG re-encoding (quality 75, 4:2:0), and the shipped reformer takes the fine detail of an
uncompressed image for a perturbation, so on real originals the detector fires more often than on the
JPEG images its threshold was set on. With J = a JPEG round trip at the data set's settings (the
gateway's ``input.jpeg_quality`` step) and D the bundle's reformer, this scores every configuration of

- the image classified: D(x) (MagNet's) or D(J(x));
- one or two detectors, each a Jensen-Shannon divergence at temperature T between the classifier's
  outputs on two views: ``x|Dx`` (MagNet's), ``x|DJx``, ``x|Jx`` (feature squeezing by JPEG),
  ``Jx|DJx`` (both views after the step, i.e. the input step in front of the whole defense) or ``Jx|Dx``
  (the step on the classifier's side only: the reformer still sees the raw input; round 20);
- an FPR per detector, its threshold set on the clean JPEG validation images (``jpeg``) or the larger of
  that and the same FPR on the validation originals (``max``),

on validation data only: the clean JPEG validation images (5,000), the fixed selection set (FGSM and
PGD-10 at eps 0.025 from the first 2,000 of them, ``training.evaluate.selection``), FGSM at eps 0.05 from
the same 2,000, and the uncompressed validation originals (``scripts/cifar10_originals.py``) with FGSM at
0.025 and 0.05 and PGD-10 at 0.025 crafted from them against the classifier. Attack rows count the
images the classifier gets right before the attack; an attack is defended when it is rejected or the
image classified after reforming gets the right label. The rule is the round's README's, fixed before
this ran. A bundle with an input step (``input.jpeg_quality``, at the same quality) is scored without
it: the views say where J goes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from service.defense import scores as S
from service.defense.core import Defense
from service.defense.domain import jpeg_round_trip
from service.defense.thresholds import passes, threshold_at_fpr
from training.bundles import run_batched
from training.evaluate.originals import dataset_copies, load_images
from training.from_onnx import classifier_twin
from training.provenance import provenance
from training.specs import load_for_manifest

VIEWS = {"x|Dx": ("x", "dx"), "x|DJx": ("x", "dj"), "x|Jx": ("x", "j"), "Jx|DJx": ("j", "dj"), "Jx|Dx": ("j", "dx")}
TEMPERATURES = {"x|Dx": (40,), "x|DJx": (10, 40), "x|Jx": (1, 10, 40), "Jx|DJx": (40,), "Jx|Dx": (10, 40)}
FPRS = (0.005, 0.01, 0.02)
OUTPUTS = {"Dx": "dx", "DJx": "dj"}
QUALITY = 75
CLEAN_BUDGET = 0.035  # points of accepted-and-right below the classifier alone, on each domain
FGSM_FLOOR, PGD_FLOOR = 0.9323, 0.9878  # round 7's selection-set floors


def reformed(defense: Defense, x: np.ndarray) -> np.ndarray:
    """D(x), member 0's reformer, 500 images per call."""
    return np.concatenate([defense.screen(x[i : i + 500]).reformed for i in range(0, len(x), 500)])


def logits_of(defense: Defense, x: np.ndarray) -> dict[str, np.ndarray]:
    """The classifier's logits on x, J(x), D(x) and D(J(x))."""
    j = jpeg_round_trip(x, QUALITY)
    reform = lambda a: reformed(defense, a)  # noqa: E731
    f = lambda a: run_batched(defense.classifier, a, 500)  # noqa: E731
    return {"x": f(x), "j": f(j), "dx": f(reform(x)), "dj": f(reform(j))}


def detectors() -> list[tuple[str, int]]:
    return [(v, t) for v in VIEWS for t in TEMPERATURES[v]]


def score(logits: dict[str, np.ndarray], view: str, t: int) -> np.ndarray:
    a, b = VIEWS[view]
    return S.divergence_score(logits[a], logits[b], t)


def scores_of(sets: dict) -> dict:
    """Every detector's scores on every set, computed once: set -> (view, temperature) -> scores."""
    return {k: {d: score(logits, *d) for d in detectors()} for k, logits in sets.items()}


def craft(twin: torch.nn.Module, x: np.ndarray, y: np.ndarray, seed: int,
          attacks=(("fgsm", 0.025), ("fgsm05", 0.05), ("pgd", 0.025))) -> dict[str, np.ndarray]:
    """FGSM or PGD-10 (eps/4 steps, random start) at each (name, eps); names starting with pgd are PGD."""
    from training.attacks.pgd import fgsm, pgd_linf

    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    out = {}
    for name, eps in attacks:
        e = torch.full((len(xt),), eps)
        parts = []
        for i in range(0, len(xt), 250):
            xb, yb, eb = xt[i : i + 250], yt[i : i + 250], e[i : i + 250]
            parts.append(fgsm(twin, xb, yb, eb) if not name.startswith("pgd") else
                         pgd_linf(twin, xb, yb, eb, steps=10, step_size=eb / 4, generator=gen))
        out[name] = torch.cat(parts).detach().numpy()
    return out


def configurations() -> list[dict]:
    dets = detectors()
    combos = [(d,) for d in dets] + [c for c in itertools.combinations(dets, 2) if c[0][0] != c[1][0]]
    out = []
    for output in OUTPUTS:
        for combo in combos:
            for fprs in itertools.product(FPRS, repeat=len(combo)):
                for domain in ("jpeg", "max"):
                    out.append({"output": output, "detectors": [{"view": v, "temperature": t, "fpr": f}
                                                               for (v, t), f in zip(combo, fprs)],
                                "thresholds_from": domain})
    return out


def evaluate(cfg: dict, sets: dict, y: dict, mask: dict, scored: dict | None = None) -> dict:
    """One configuration's figures; ``scored``: ``scores_of(sets)``, when the caller already has it."""
    scored = scored or scores_of(sets)
    thresholds = {}
    for d in cfg["detectors"]:
        key = (d["view"], d["temperature"])
        t = threshold_at_fpr(scored["clean"][key], d["fpr"])
        if cfg["thresholds_from"] == "max":
            t = max(t, threshold_at_fpr(scored["orig_clean"][key], d["fpr"]))
        thresholds[key] = t
    row = {}
    for name, logits in sets.items():
        rejected = np.zeros(len(y[name]), bool)
        for key, t in thresholds.items():
            rejected |= ~passes(scored[name][key], t)
        right = logits[OUTPUTS[cfg["output"]]].argmax(1) == y[name]
        if name.endswith("clean"):
            row[name] = {"accepted_and_right": float((right & ~rejected).mean()), "rejected": float(rejected.mean())}
        else:
            m = mask[name]
            row[name] = {"defended": float((right | rejected)[m].mean()), "rejected": float(rejected[m].mean())}
    row["thresholds"] = {f"{v} T{t}": th for (v, t), th in thresholds.items()}
    return row


def within_jpeg_budget(r: dict, f_val: float) -> bool:
    """Clean JPEG validation images within the budget, and the PGD floor."""
    return f_val - r["clean"]["accepted_and_right"] <= CLEAN_BUDGET and r["pgd"]["defended"] >= PGD_FLOOR


def eligible(r: dict, f_val: float, f_orig: float) -> bool:
    return (within_jpeg_budget(r, f_val) and f_orig - r["orig_clean"]["accepted_and_right"] <= CLEAN_BUDGET
            and r["fgsm"]["defended"] >= FGSM_FLOOR)


def objective(r: dict) -> tuple[float, float]:
    return (min(r["fgsm"]["defended"], r["orig_fgsm"]["defended"]), r["orig_clean"]["accepted_and_right"])


def learned_combination(sets: dict, y: dict, mask: dict, seed: int = 0, fpr: float = 0.02,
                        scored: dict | None = None) -> dict:
    """Could any weighting of the views separate clean originals from attacks? A logistic regression on
    the log of every detector's score, fitted on one half of each set (clean JPEG and clean originals
    weighted alike as the negatives; FGSM and PGD from both domains as the positives) and judged on the
    other half, its threshold at ``fpr`` of the held-out clean JPEG images (``jpeg``) or of the fitting
    half of the originals (``originals``); the image classified is D(x). Not a candidate: a check of
    whether the views hold the difference at all. ``scored``: ``scores_of(sets)``, when at hand."""
    dets = detectors()
    scored = scored or scores_of(sets)
    feats = {k: np.stack([np.log(scored[k][d] + 1e-12) for d in dets], 1) for k in sets}
    rng = np.random.default_rng(seed)
    halves = {}
    for k in sets:
        p = rng.permutation(len(y[k]))
        halves[k] = (p[: len(p) // 2], p[len(p) // 2 :])
    fit = lambda k: feats[k][halves[k][0]]  # noqa: E731
    neg = [fit("clean"), fit("orig_clean")]
    pos = np.concatenate([fit(k) for k in ("fgsm", "pgd", "orig_fgsm", "orig_pgd")])
    x = np.concatenate([*neg, pos])
    target = np.r_[np.zeros(len(neg[0]) + len(neg[1])), np.ones(len(pos))]
    weight = np.r_[np.full(len(neg[0]), 0.5 / len(neg[0])), np.full(len(neg[1]), 0.5 / len(neg[1])),
                   np.full(len(pos), 1.0 / len(pos))]
    mu, sd = x.mean(0), x.std(0) + 1e-12
    z = (x - mu) / sd
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(3000):  # weighted logistic regression, plain gradient descent (the loss is convex)
        g = weight * (1 / (1 + np.exp(-(z @ w + b))) - target)
        w, b = w - 0.5 * (z.T @ g), b - 0.5 * g.sum()
    s = lambda k, half: ((feats[k][halves[k][half]] - mu) / sd) @ w + b  # noqa: E731
    out = {"weights": {f"{v} T{t}": float(c) for (v, t), c in zip(dets, w)}, "fpr": fpr,
           "held_out": {k: len(halves[k][1]) for k in sets}}
    for cal, ref in (("jpeg", s("clean", 1)), ("originals", s("orig_clean", 0))):
        th = threshold_at_fpr(ref, fpr)
        row = {}
        for k in sets:
            idx = halves[k][1]
            rejected = ~passes(s(k, 1), th)
            right = sets[k]["dx"][idx].argmax(1) == y[k][idx]
            row[k] = (float((right & ~rejected).mean()) if k.endswith("clean") else
                      float((right | rejected)[mask[k][idx]].mean()))
        out[cal] = row
    return out


def rounded(v):
    """Figures to 5 decimals (a row of views.json per configuration stays short); thresholds keep 4
    significant digits."""
    if isinstance(v, dict):
        return {k: ({t: float(f"{x:.4g}") for t, x in w.items()} if k == "thresholds" else rounded(w)) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        return [rounded(w) for w in v]
    return round(v, 5) if isinstance(v, float) else v


def frontier(rows: list[dict], f_val: float) -> list[dict]:
    """The trade-off between clean originals and FGSM: among the configurations within the JPEG clean
    budget and the PGD floor, those that no other beats on both clean originals accepted and right and
    min(selection-set FGSM, FGSM from originals); of equal pairs, the one with fewer detectors."""
    ok = [r for r in rows if within_jpeg_budget(r, f_val)]
    pair = lambda r: (r["orig_clean"]["accepted_and_right"], r["objective"][0])  # noqa: E731
    best: dict[tuple, dict] = {}
    for r in sorted(ok, key=lambda r: len(r["detectors"])):
        best.setdefault(pair(r), r)
    return sorted((r for p, r in best.items() if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in best)),
                  key=lambda r: pair(r)[0])


def label(cfg: dict) -> str:
    dets = " + ".join(f"{d['view']} T{d['temperature']} @ {d['fpr']:g}" for d in cfg["detectors"])
    return f"classify f({cfg['output']}); {dets}; thresholds {cfg['thresholds_from']}"


def round_parser(doc: str, cache: str, cache_help: str) -> argparse.ArgumentParser:
    """The arguments of a selection round on these validation sets (also scripts/residual_structure.py)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--set", type=Path, required=True, help="the selection set's .npz")
    p.add_argument("--originals", type=Path, required=True, help="validation originals, val-<row>-label-<c>.png")
    p.add_argument(cache, type=Path, default=None, help=cache_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    return p


def round_data(defense: Defense, args: argparse.Namespace):
    """The data set, the selection set and the validation originals (images, labels, file names)."""
    data = load_for_manifest(defense.manifest, args.data_dir)
    originals, oy, names = load_images(args.originals)
    if any(not n.startswith("val-") for n in names):
        raise SystemExit("--originals must hold validation originals only")
    return data, np.load(args.set), originals, oy, names


def main(argv: list[str] | None = None) -> int:
    args = round_parser(__doc__, "--cache", "keep the logits here (.npz) and reuse them").parse_args(argv)
    started = time.perf_counter()
    defense = Defense(args.bundle, device="cpu")
    step = defense.manifest.input.jpeg_quality
    if step is not None:  # the views say where J goes: the bundle's own input step comes off
        if step != QUALITY:
            raise SystemExit(f"{args.bundle}: input step at JPEG quality {step}, the views use {QUALITY}")
        defense.manifest = defense.manifest.model_copy(
            update={"input": defense.manifest.input.model_copy(update={"jpeg_quality": None})})
    data, sel, originals, oy, names = round_data(defense, args)
    copies = dataset_copies(data, names, oy)
    y = {"clean": data.val.y, "fgsm": sel["y"], "pgd": sel["y"], "fgsm05": sel["y"], "orig_clean": oy,
         "copy_clean": oy, "orig_fgsm": oy, "orig_fgsm05": oy, "orig_pgd": oy}
    if args.cache is not None and args.cache.exists():
        stored = np.load(args.cache)
        sets = {k: {v: stored[f"{k}/{v}"] for v in ("x", "j", "dx", "dj")} for k in y}
    else:
        twin = classifier_twin(defense)
        fgsm05 = craft(twin, data.val.x[sel["idx"]], sel["y"], args.seed, (("fgsm05", 0.05),))["fgsm05"]
        from_orig = craft(twin, originals, oy, args.seed)
        inputs = {"clean": data.val.x, "fgsm": sel["fgsm"], "pgd": sel["pgd"], "fgsm05": fgsm05,
                  "orig_clean": originals, "copy_clean": copies, **{f"orig_{k}": v for k, v in from_orig.items()}}
        sets = {}
        for k, x in inputs.items():
            sets[k] = logits_of(defense, x)
            print(f"{k}: {len(x)} images scored, {time.perf_counter() - started:.0f} s", flush=True)
        if args.cache is not None:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.cache, **{f"{k}/{v}": a for k, d in sets.items() for v, a in d.items()})
    right_val = sets["clean"]["x"].argmax(1) == data.val.y
    right_orig = sets["orig_clean"]["x"].argmax(1) == oy
    mask = {"fgsm": right_val[sel["idx"]], "pgd": right_val[sel["idx"]], "fgsm05": right_val[sel["idx"]],
            "orig_fgsm": right_orig, "orig_fgsm05": right_orig, "orig_pgd": right_orig}
    f_val, f_orig = float(right_val.mean()), float(right_orig.mean())
    undefended = {k: float((sets[k]["x"].argmax(1) == y[k])[mask[k]].mean()) for k in mask}
    reformer_only = {out: {k: float((sets[k][v].argmax(1) == y[k])[mask[k] if k in mask else slice(None)].mean())
                           for k in sets} for out, v in OUTPUTS.items()}
    scored = scores_of(sets)
    rows = []
    for cfg in configurations():
        r = {**cfg, **evaluate(cfg, sets, y, mask, scored)}
        r["eligible"] = eligible(r, f_val, f_orig)
        r["objective"] = objective(r)
        rows.append(r)
    shipped = next(r for r in rows if r["output"] == "Dx" and r["thresholds_from"] == "jpeg" and r["detectors"] == [
        {"view": "x|Dx", "temperature": 40, "fpr": 0.02}])
    ok = [r for r in rows if r["eligible"]]
    chosen = max(ok, key=lambda r: r["objective"]) if ok else None
    result = {"bundle": str(args.bundle), "bundle_input_step_removed": step, "classifier_right": {"val": f_val, "val_originals": f_orig},
              "undefended": undefended, "originals": len(oy), "jpeg": f"quality {QUALITY}, Pillow's 4:2:0",
              "reformer_only": reformer_only,
              "rule": f"eligible: clean cost <= {100 * CLEAN_BUDGET:g} points on the JPEG validation images and on the "
                      "validation originals (accepted and right against the classifier alone), selection-set FGSM >= "
                      f"{100 * FGSM_FLOOR:g} % and PGD >= {100 * PGD_FLOOR:g} %; among them the largest min(selection-set "
                      "FGSM, FGSM eps 0.025 from originals); ties: clean originals accepted and right",
              "as_shipped": shipped, "chosen": chosen, "eligible": len(ok), "configurations": len(rows),
              "seconds": time.perf_counter() - started}
    best_per = {}
    for r in rows:
        key = (r["output"], tuple(d["view"] for d in r["detectors"]), r["thresholds_from"])
        if key not in best_per or (r["eligible"], r["objective"]) > (best_per[key]["eligible"], best_per[key]["objective"]):
            best_per[key] = r
    result["best_per_family"] = sorted(best_per.values(), key=lambda r: (r["eligible"], r["objective"]), reverse=True)
    result["frontier"] = frontier(rows, f_val)
    result["learned_combination"] = learned_combination(sets, y, mask, args.seed, scored=scored)
    result["provenance"] = provenance(["python", "scripts/detector_views.py", *(argv or sys.argv[1:])], 0)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "views.json").write_text(json.dumps(result, indent=1)[:-2] + ',\n "rows": [\n'
                                         + ",\n".join(json.dumps(rounded(r)) for r in rows) + "\n ]\n}\n")
    (args.out / "views.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def cell(text: str) -> str:
    """``text`` for a markdown table cell (the views' "|" escaped)."""
    return text.replace("|", "\\|")


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown(result: dict) -> str:
    f = result["classifier_right"]
    lines = ["# Detector views on one reformer (validation only)", "",
             f"Classifier right: {_pct(f['val'])} % of the JPEG validation images, {_pct(f['val_originals'])} % of the "
             f"{result['originals']} validation originals. Undefended (over images it gets right): " + ", ".join(
                 f"{k} {_pct(v)}" for k, v in result["undefended"].items()) + ".", "",
             "Reformer only, no detector (clean sets: all images; attacks: those the classifier gets right): " + "; ".join(
                 f"f({out}) " + ", ".join(f"{k} {_pct(v)}" for k, v in figures.items())
                 for out, figures in result["reformer_only"].items()) + ".", "",
             f"Rule: {result['rule']}. {result['eligible']} of {result['configurations']} configurations eligible.", "",
             "| configuration | eligible | clean JPEG val: acc. and right / rejected | originals: acc. and right / rejected "
             "| copies: acc. and right | FGSM | PGD | FGSM 0.05 | from originals: FGSM / FGSM 0.05 / PGD |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    shown = [("as shipped: ", result["as_shipped"])] + [("", r) for r in result["best_per_family"]]
    for prefix, r in shown:
        mark = " **(chosen)**" if r == result["chosen"] else ""
        lines.append(f"| {prefix}{cell(label(r))}{mark} | {'yes' if r['eligible'] else 'no'} | "
                     f"{_pct(r['clean']['accepted_and_right'])} / {_pct(r['clean']['rejected'])} | "
                     f"{_pct(r['orig_clean']['accepted_and_right'])} / {_pct(r['orig_clean']['rejected'])} | "
                     f"{_pct(r['copy_clean']['accepted_and_right'])} | {_pct(r['fgsm']['defended'])} | "
                     f"{_pct(r['pgd']['defended'])} | {_pct(r['fgsm05']['defended'])} | "
                     f"{_pct(r['orig_fgsm']['defended'])} / {_pct(r['orig_fgsm05']['defended'])} / "
                     f"{_pct(r['orig_pgd']['defended'])} |")
    lines += ["", "One row per family (the image classified, the detectors' views, where thresholds come from): its "
              "best configuration by the rule.", "", "## The trade-off", "",
              "Within the JPEG clean budget and the PGD floor, the configurations that no other beats on both clean "
              "originals (accepted and right) and min(FGSM, FGSM from originals):", "",
              "| configuration | originals: acc. and right / rejected | min(FGSM, from originals) | FGSM | from originals: "
              "FGSM | clean JPEG val |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["frontier"]:
        lines.append(f"| {cell(label(r))} | {_pct(r['orig_clean']['accepted_and_right'])} / {_pct(r['orig_clean']['rejected'])} | "
                     f"{_pct(r['objective'][0])} | {_pct(r['fgsm']['defended'])} | {_pct(r['orig_fgsm']['defended'])} | "
                     f"{_pct(r['clean']['accepted_and_right'])} |")
    c = result.get("learned_combination")
    if c:
        lines += ["", "## Could a learned weighting of the views do better?", "",
                  f"A logistic regression on the log of all {len(c['weights'])} detectors' scores, fitted on half of each set, "
                  "judged on the other half (clean: accepted and right; attacks: defended), the image classified "
                  f"D(x), its threshold at FPR {c['fpr']:g} of the held-out clean JPEG images or of the fitting half "
                  "of the originals. Not a candidate: a check of whether the views hold the difference at all.", "",
                  "| threshold from | clean JPEG val | originals | copies | FGSM | PGD | FGSM 0.05 | from originals: "
                  "FGSM / FGSM 0.05 / PGD |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for cal in ("jpeg", "originals"):
            r = c[cal]
            lines.append(f"| {cal} | {_pct(r['clean'])} | {_pct(r['orig_clean'])} | {_pct(r['copy_clean'])} | "
                         f"{_pct(r['fgsm'])} | {_pct(r['pgd'])} | {_pct(r['fgsm05'])} | {_pct(r['orig_fgsm'])} / "
                         f"{_pct(r['orig_fgsm05'])} / {_pct(r['orig_pgd'])} |")
    lines += ["", "Every configuration is in `views.json` (`rows`, one per line)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
