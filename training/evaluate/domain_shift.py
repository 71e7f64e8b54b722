"""How often a bundle trained on JPEG images would reject clean *uncompressed* images: an estimate
from paired originals.

    python -m training.evaluate.domain_shift --bundle models/cifar10 --data-dir DATA \\
        --images tests/data/cifar10-originals --out docs/results/cifar10-domain-shift.json
    python -m training.evaluate.domain_shift --bundle CANDIDATE ... --data-dir DATA --simulate 0.4

The CIFAR-10 data this project trains and measures on is a JPEG (quality 75) re-encoding; the
original images are lossless. Only a handful of originals are at hand (``--images``: the 20 that
Foolbox ships), too few to measure a false-positive rate of a few percent directly. But each of them
comes with its JPEG copy (the original encoded at ``--copy-quality``, within 0.56/255 of the data
set's copy: docs/results/jpeg-step.json), so each pair tells how much the domain alone moves a
detector's score: the ratio r = score(original) / score(copy). Applied to the scores of the JPEG test
set, pair by pair (every test score times r_i, against the detector's threshold), those ratios give an
estimate of each detector's false-positive rate, of the share rejected by any detector, and of the
share accepted and classified right, on uncompressed test images; the interval is a bootstrap over the
pairs (which pairs, not which test images, dominates the uncertainty).

Two estimates, both assuming that the reformed image's label does not change with the domain (on the 20
originals the classifier alone is right on all of them, as on their copies):

- ``factor``: the domain multiplies a score by a factor that does not depend on the score (each pair's
  ratio applied to every test score). It overstates: a score near the threshold moves by a smaller
  factor than a small one (on validation pre-images, where the rate can be counted, the factor estimate
  from 20 pairs gave a median 9.6 % against 3.60 % counted for ``models/cifar10``, the log-linear one
  5.1 %: docs/results/cifar10-domain-estimator-check.json).
- ``loglinear``: log score(original) = a + b log score(copy) + e, fitted on the pairs (per detector);
  each pair's residual e_i applied, with the fit, to every test score. The factor estimate is the case
  b = 1. Its interval refits on pairs drawn with replacement. ``--simulate`` checks both estimators
  against the counted rate on validation pre-images (``estimator_check``).

Either is a warning light, not a measurement: the count of originals rejected is given beside it.

``--simulate SPREAD`` compares bundles (candidates too) without any test image: the share of validation
images rejected, and of a pre-image of each (``training.domain_sim``: an image that JPEG would have
compressed to it, at a spread whose uniform draws are harsher than natural detail), so it ranks reformers
by how they take the domain, it does not estimate a rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from service.defense import detectors as D
from service.defense.core import Defense, Verdict
from service.defense.domain import jpeg_round_trip
from training.data import load
from training.domain_sim import chroma_detail, jpeg_preimage
from training.evaluate.originals import load_images


def scores_of(defense: Defense, x: np.ndarray, member: int, batch: int = 500) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every detector's scores on ``x`` for ``member``, and the labels of the reformed images."""
    parts: dict[str, list[np.ndarray]] = {}
    labels = []
    for i in range(0, len(x), batch):
        v = defense.inspect(x[i:i + batch], member)
        for name, s in v.scores.items():
            parts.setdefault(name, []).append(np.asarray(s, np.float64))
        logits = v.logits_reformed if v.logits_reformed is not None else defense.classifier(v.reformed)
        labels.append(np.asarray(logits).argmax(1))
    return {k: np.concatenate(v) for k, v in parts.items()}, np.concatenate(labels)


def estimate(ratios: dict[str, np.ndarray], test: dict[str, np.ndarray], thresholds: dict[str, float],
             right: np.ndarray) -> dict:
    """Per pair i: the test set's rejections with every score times ratio_i. Returns per detector the
    estimated false-positive rate per pair, and per pair the share rejected by any detector and the share
    accepted and right."""
    pairs = len(next(iter(ratios.values())))
    fired = {k: np.stack([test[k] * ratios[k][i] >= thresholds[k] for i in range(pairs)]) for k in thresholds}
    rejected = np.logical_or.reduce(list(fired.values()))
    return {"fpr": {k: f.mean(axis=1) for k, f in fired.items()}, "rejected": rejected.mean(axis=1),
            "accepted_and_right": (~rejected & right[None, :]).mean(axis=1)}


def _floor(s: np.ndarray, threshold: float) -> np.ndarray:
    """Scores for a log: a divergence can be exactly 0; floored at a millionth of the threshold."""
    return np.maximum(np.asarray(s, np.float64), 1e-6 * threshold)


def fit_loglinear(s_copy: np.ndarray, s_orig: np.ndarray, threshold: float) -> tuple[float, float, np.ndarray]:
    """Least squares log s_orig = a + b log s_copy; returns (a, b, residuals)."""
    x, y = np.log(_floor(s_copy, threshold)), np.log(_floor(s_orig, threshold))
    if np.ptp(x) == 0:  # no spread to fit a slope on: the factor model
        b = 1.0
        a = float(np.mean(y - x))
    else:
        b, a = np.polyfit(x, y, 1)
    return float(a), float(b), y - (a + b * x)


def estimate_loglinear(s_copy: dict[str, np.ndarray], s_orig: dict[str, np.ndarray], test: dict[str, np.ndarray],
                       thresholds: dict[str, float], right: np.ndarray) -> dict:
    """Like ``estimate``, with the fitted log-linear map in place of a fixed factor: per pair i, every test
    score s goes to exp(a + b log s + e_i), e_i that pair's residual (per detector, the same pair for all
    detectors, so that their joint behaviour is kept)."""
    fits = {k: fit_loglinear(s_copy[k], s_orig[k], t) for k, t in thresholds.items()}
    pairs = len(next(iter(s_copy.values())))
    fired = {}
    for k, t in thresholds.items():
        a, b, e = fits[k]
        base = a + b * np.log(_floor(test[k], t))
        fired[k] = np.stack([base + e[i] >= np.log(t) for i in range(pairs)])
    rejected = np.logical_or.reduce(list(fired.values()))
    return {"fpr": {k: f.mean(axis=1) for k, f in fired.items()}, "rejected": rejected.mean(axis=1),
            "accepted_and_right": (~rejected & right[None, :]).mean(axis=1),
            "fits": {k: {"intercept": a, "slope": b, "residual_sd": float(np.std(e))} for k, (a, b, e) in fits.items()}}


def interval_refit(s_copy: dict[str, np.ndarray], s_orig: dict[str, np.ndarray], test: dict[str, np.ndarray],
                   thresholds: dict[str, float], right: np.ndarray, rng: np.random.Generator, rounds: int = 400,
                   level: float = 0.9) -> dict[str, list[float]]:
    """Bootstrap intervals of the log-linear estimate: pairs drawn with replacement and the fit redone."""
    n = len(next(iter(s_copy.values())))
    draws: dict[str, list[float]] = {"rejected": [], "accepted_and_right": [], **{f"fpr:{k}": [] for k in thresholds}}
    for _ in range(rounds):
        i = rng.integers(0, n, size=n)
        est = estimate_loglinear({k: v[i] for k, v in s_copy.items()}, {k: v[i] for k, v in s_orig.items()},
                                 test, thresholds, right)
        draws["rejected"].append(est["rejected"].mean())
        draws["accepted_and_right"].append(est["accepted_and_right"].mean())
        for k in thresholds:
            draws[f"fpr:{k}"].append(est["fpr"][k].mean())
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return {k: [float(np.quantile(v, lo)), float(np.quantile(v, hi))] for k, v in draws.items()}


def interval(per_pair: np.ndarray, rng: np.random.Generator, rounds: int = 2000, level: float = 0.9) -> list[float]:
    """Bootstrap interval (over pairs) of the mean of ``per_pair``."""
    means = per_pair[rng.integers(0, len(per_pair), size=(rounds, len(per_pair)))].mean(axis=1)
    return [float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))]


def divergence_shifts(defense: Defense, member: int, vo: Verdict, vc: Verdict) -> dict[str, dict]:
    """For each divergence detector, where the domain moves its score: the divergence (over the
    detector's threshold, median and max over pairs) between the classifier's outputs on an original and
    on its copy ("classifier"), and on their reformed images ("reformed"); ``vo`` and ``vc`` are the
    member's verdicts on the originals and on their copies."""
    if vo.logits_x is None:
        return {}
    out = {}
    for d in defense.members[member].detectors:
        if not D.kind_of(d).needs_logits:
            continue
        row = {}
        for name, a, b in (("classifier", vo.logits_x, vc.logits_x), ("reformed", vo.logits_reformed, vc.logits_reformed)):
            ratio = np.asarray(D.score(d, vo.reformed, vo.reformed, a, b), np.float64) / d.threshold
            row[name] = {"median": float(np.median(ratio)), "max": float(ratio.max())}
        out[d.name] = row
    return out


def judge_member(defense: Defense, member: int, x: np.ndarray, copies: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, rng: np.random.Generator) -> dict:
    thresholds = {d.name: float(d.threshold) for d in defense.members[member].detectors}
    vo, vc = defense.inspect(x, member), defense.inspect(copies, member)  # 20 images each: one call
    s_orig, s_copy = ({k: np.asarray(v, np.float64) for k, v in verdict.scores.items()} for verdict in (vo, vc))
    s_test, labels = scores_of(defense, test_x, member)
    right = labels == test_y
    tiny = np.finfo(np.float64).tiny
    ratios = {k: np.maximum(s_orig[k], tiny) / np.maximum(s_copy[k], tiny) for k in thresholds}
    est = estimate(ratios, s_test, thresholds, right)
    lin = estimate_loglinear(s_copy, s_orig, s_test, thresholds, right)
    lin_90 = interval_refit(s_copy, s_orig, s_test, thresholds, right, rng)
    shifts = divergence_shifts(defense, member, vo, vc)
    rejected_test = np.logical_or.reduce([s_test[k] >= t for k, t in thresholds.items()])
    out = {"detectors": {}, "test_images": len(test_x),
           "measured_on_jpeg_test": {"rejected": float(rejected_test.mean()),
                                     "accepted_and_right": float((~rejected_test & right).mean())}}
    for k, t in thresholds.items():
        log_r = np.log(ratios[k])
        out["detectors"][k] = {
            "threshold": t, "originals_over_threshold": int((s_orig[k] >= t).sum()),
            "copies_over_threshold": int((s_copy[k] >= t).sum()),
            "log_ratio": {"median": float(np.median(log_r)), "mean": float(log_r.mean()),
                          "min": float(log_r.min()), "max": float(log_r.max())},
            "fpr_on_jpeg_test": float((s_test[k] >= t).mean()),
            "fpr_estimated_uncompressed": float(est["fpr"][k].mean()),
            "fpr_estimated_uncompressed_90": interval(est["fpr"][k], rng),
            "loglinear_fit": lin["fits"][k],
            "fpr_estimated_uncompressed_loglinear": float(lin["fpr"][k].mean()),
            "fpr_estimated_uncompressed_loglinear_90": lin_90[f"fpr:{k}"],
            **({"shift_over_threshold": shifts[k]} if k in shifts else {})}
    out["estimated_uncompressed"] = {
        "rejected": float(est["rejected"].mean()), "rejected_90": interval(est["rejected"], rng),
        "accepted_and_right": float(est["accepted_and_right"].mean()),
        "accepted_and_right_90": interval(est["accepted_and_right"], rng), "model": "factor"}
    out["estimated_uncompressed_loglinear"] = {
        "rejected": float(lin["rejected"].mean()), "rejected_90": lin_90["rejected"],
        "accepted_and_right": float(lin["accepted_and_right"].mean()),
        "accepted_and_right_90": lin_90["accepted_and_right"], "model": "loglinear"}
    return out


def estimator_check(s_jpeg: dict[str, np.ndarray], s_pre: dict[str, np.ndarray], thresholds: dict[str, float],
                    right: np.ndarray, rng: np.random.Generator, pairs: int = 20, draws: int = 200) -> dict:
    """How well each estimator predicts a rate that can be counted: the images and their pre-images play
    originals and copies; ``draws`` random sets of ``pairs`` pairs each give both estimates for the JPEG
    images' scores, against the share of pre-images actually rejected."""
    rejected = np.logical_or.reduce([s_pre[k] >= t for k, t in thresholds.items()])
    n = len(rejected)
    pairs = min(pairs, n)
    factor, loglin = [], []
    for _ in range(draws):
        i = rng.choice(n, size=pairs, replace=False)
        ratios = {k: _floor(s_pre[k][i], t) / _floor(s_jpeg[k][i], t) for k, t in thresholds.items()}
        factor.append(estimate(ratios, s_jpeg, thresholds, right)["rejected"].mean())
        loglin.append(estimate_loglinear({k: v[i] for k, v in s_jpeg.items()}, {k: v[i] for k, v in s_pre.items()},
                                         s_jpeg, thresholds, right)["rejected"].mean())

    def summary(v: list[float]) -> dict:
        return {"median": float(np.median(v)), "p05": float(np.quantile(v, 0.05)), "p95": float(np.quantile(v, 0.95))}

    return {"counted_rejected": float(rejected.mean()), "pairs_per_estimate": pairs, "draws": draws,
            "factor": summary(factor), "loglinear": summary(loglin)}


def simulate_member(defense: Defense, member: int, x: np.ndarray, y: np.ndarray, quality: int, spread: float,
                    seed: int, chroma: float = 0.0, chroma_spread: float | None = None) -> dict:
    """Rejections on ``x`` (JPEG images) and on one pre-image of each (``training.domain_sim``); with
    ``chroma`` > 0, full-resolution colour detail (``chroma_detail``, gain up to ``chroma``) added to it;
    ``chroma_spread``: the spread of Cb and Cr apart from the luma's (``training.evaluate.stand_in`` fits both)."""
    rng = np.random.default_rng(seed)
    pre = jpeg_preimage(x, quality, spread, rng, chroma_spread=chroma_spread)
    if chroma > 0:
        pre = chroma_detail(pre, chroma, rng)
    thresholds = {d.name: float(d.threshold) for d in defense.members[member].detectors}
    out, scores = {}, {}
    for name, images in (("jpeg", x), ("preimages", pre)):
        s, labels = scores_of(defense, images, member)
        fired = {k: s[k] >= t for k, t in thresholds.items()}
        rejected = np.logical_or.reduce(list(fired.values()))
        out[name] = {"rejected": float(rejected.mean()), "fpr": {k: float(f.mean()) for k, f in fired.items()},
                     "accepted_and_right": float((~rejected & (labels == y)).mean())}
        scores[name] = (s, labels == y)
    out["mean_abs_pixel_change_255"] = float(255 * np.abs(pre - x).mean())
    out["estimator_check"] = estimator_check(scores["jpeg"][0], scores["preimages"][0], thresholds, scores["jpeg"][1],
                                             np.random.default_rng(seed))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate.domain_shift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, nargs="+", required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--images", type=Path, help="*-label-<class>.png originals (lossless)")
    p.add_argument("--simulate", type=float, metavar="SPREAD", default=None,
                   help="instead of originals: the first --val-images validation images and a pre-image of each "
                        "at this spread (training.domain_sim; no test image is used, so candidates can be compared)")
    p.add_argument("--val-images", type=int, default=2000, help="--simulate: validation images")
    p.add_argument("--chroma", type=float, default=0.0, metavar="GAIN",
                   help="--simulate: also add full-resolution colour detail (training.domain_sim.chroma_detail, gain "
                        "~ U(0, GAIN)), which 4:2:0 JPEG pre-images lack")
    p.add_argument("--spread-chroma", type=float, default=None, metavar="SPREAD",
                   help="--simulate: Cb and Cr at this spread, the luma at --simulate's (default: the same; "
                        "python -m training.evaluate.stand_in fits both to real originals)")
    p.add_argument("--copy-quality", type=int, default=75, help="JPEG quality of the data set's copies (75)")
    p.add_argument("--test-images", type=int, default=10000, help="first N test images (default: all)")
    p.add_argument("--members", type=int, default=None, help="first N members of a pool (default: all)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if (args.images is None) == (args.simulate is None):
        p.error("give --images (paired originals) or --simulate SPREAD (validation pre-images)")
    report = {"command": "python -m training.evaluate.domain_shift " + " ".join(argv or sys.argv[1:]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "copy_quality": args.copy_quality, "bundles": {}}
    if args.simulate is not None:
        report.update(simulated_spread=args.simulate, simulated_chroma=args.chroma, validation_images=args.val_images)
        if args.spread_chroma is not None:
            report.update(simulated_chroma_spread=args.spread_chroma)
    else:
        x, _, _ = load_images(args.images)
        copies = jpeg_round_trip(x, args.copy_quality)
        report.update(originals=len(x), source=str(args.images))
    for bundle in args.bundle:
        defense = Defense(bundle, device="cpu")
        if args.simulate is None and defense.manifest.input.jpeg_quality is not None:
            raise SystemExit(f"{bundle} has a JPEG input step (input.jpeg_quality): it judges originals in the "
                             "JPEG domain already; run this on bundles without one")
        data = load(defense.manifest.dataset, args.data_dir)
        rows = []
        for m in range(min(args.members or len(defense.members), len(defense.members))):
            if args.simulate is not None:
                vx, vy = data.val.x[: args.val_images], data.val.y[: args.val_images]
                row = simulate_member(defense, m, vx, vy, args.copy_quality, args.simulate, args.seed, args.chroma,
                                      args.spread_chroma)
                c = row["estimator_check"]
                print(f"{bundle} member {m}: rejected {100 * row['jpeg']['rejected']:.2f} % of {len(vx)} validation "
                      f"images, {100 * row['preimages']['rejected']:.2f} % of their pre-images (spread {args.simulate}, "
                      f"{row['mean_abs_pixel_change_255']:.2f}/255 away); accepted and right "
                      f"{100 * row['jpeg']['accepted_and_right']:.2f} -> {100 * row['preimages']['accepted_and_right']:.2f} %; "
                      f"estimated from {c['pairs_per_estimate']} pairs (median, 5-95 % of {c['draws']} draws): factor "
                      f"{100 * c['factor']['median']:.1f} % ({100 * c['factor']['p05']:.1f}-{100 * c['factor']['p95']:.1f}), "
                      f"loglinear {100 * c['loglinear']['median']:.1f} % ({100 * c['loglinear']['p05']:.1f}-"
                      f"{100 * c['loglinear']['p95']:.1f})", flush=True)
            else:
                tx, ty = data.test.x[: args.test_images], data.test.y[: args.test_images]
                row = judge_member(defense, m, x, copies, tx, ty, np.random.default_rng(args.seed))
                jpeg = row["measured_on_jpeg_test"]
                line = f"{bundle} member {m}: rejected on the JPEG test set {100 * jpeg['rejected']:.2f} %"
                for model in ("loglinear", "factor"):
                    e = row["estimated_uncompressed" + ("_loglinear" if model == "loglinear" else "")]
                    line += (f"; {model}: rejected uncompressed {100 * e['rejected']:.1f} % (90 %: "
                             f"{100 * e['rejected_90'][0]:.1f}-{100 * e['rejected_90'][1]:.1f}), accepted and right "
                             f"{100 * jpeg['accepted_and_right']:.2f} -> {100 * e['accepted_and_right']:.1f} % (90 %: "
                             f"{100 * e['accepted_and_right_90'][0]:.1f}-{100 * e['accepted_and_right_90'][1]:.1f})")
                print(line + "; originals rejected: "
                      + ", ".join(f"{k} {d['originals_over_threshold']}/{len(x)}" for k, d in row["detectors"].items()),
                      flush=True)
            rows.append(row)
        report["bundles"][str(bundle)] = rows
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
