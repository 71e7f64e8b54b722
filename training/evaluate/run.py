"""``magnet evaluate``: generate the paper's attacks against a bundle's classifier and run them through
the defense core the gateway serves.

    magnet evaluate --bundle models/mnist --data-dir DATA --out docs/results/eval-mnist

Adversarial examples are crafted against the bundle's classifier (a torch twin of its ONNX graph,
checked against onnxruntime) on the first test images it classifies correctly, then judged by
``Defense.inspect``: rejected by a detector, or the label after reforming. Writes ``report.json`` and
``report.md`` (with the paper's numbers beside ours) and ``carlini_confidence.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from service.defense.bundle import fingerprint
from service.defense.core import Defense
from training.bundle_report import clean_figures
from training.bundles import run_batched
from training.data import DataError
from training.attacks.carlini import carlini_l2
from training.evaluate.accounting import columns
from training.evaluate.adaptive import adaptive_attack, adaptive_pgd
from training.evaluate.graybox import graybox_table
from training.evaluate.torch_defense import Twins
from training.evaluate.attacks import (Attack, cache_path, default_names, full_strength, gradient_budget, reduced,
                                       registry)
from training.evaluate.report import write_reports
from training.from_onnx import torch_twin
from training.loops import duration
from training.provenance import provenance
from training.specs import load_for_manifest, spec_of_manifest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="magnet evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory to evaluate")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory holding a shipped bundle's data set (mnist, cifar10)")
    p.add_argument("--data", type=Path, default=None,
                   help="a bundle built by `magnet train folder`: its image folder (DATA/train/<class>/*, "
                        "optional DATA/test/<class>/*), split as the build split it")
    p.add_argument("--out", type=Path, required=True, help="directory for report.json, report.md and the plot")
    p.add_argument("--attacks", nargs="*", help="attack names (default: all of the paper's; none: no table rows)")
    p.add_argument("--n", type=int, default=1000, help="examples per FGSM / iterative / DeepFool row")
    p.add_argument("--n-carlini", type=int, default=200, help="examples per Carlini row")
    p.add_argument("--kappas", type=float, nargs="*", default=None,
                   help="Carlini L2 confidences for the accuracy-vs-confidence plot. Default: the paper's "
                        f"{' '.join(f'{k:g}' for k in PAPER_KAPPAS)} when --attacks is not given (the whole "
                        "evaluation), none when it is; --kappas alone: none")
    p.add_argument("--n-kappa", type=int, default=100, help="examples per confidence of the plot")
    p.add_argument("--carlini-iterations", type=int, default=1000, help="Adam steps per Carlini search step")
    p.add_argument("--carlini-steps", type=int, default=9, help="binary-search steps of Carlini L2")
    p.add_argument("--carlini-initial-const", type=float, default=1e-3, help="initial c of Carlini L2")
    p.add_argument("--carlini-learning-rate", type=float, default=1e-2,
                   help="Adam step of Carlini L2 (in tanh space; Carlini: 0.01)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="override one attack parameter, e.g. carlini_linf.max_iterations=300 (repeatable)")
    p.add_argument("--graybox", action="store_true",
                   help="the graybox table: Carlini L2 against each pool member, defended by each")
    p.add_argument("--n-graybox", type=int, default=200, help="examples per graybox column")
    p.add_argument("--graybox-confidence", type=float, default=0.0, help="Carlini kappa of the graybox attacks")
    p.add_argument("--adaptive", action="store_true",
                   help="the adaptive attack: whitebox on member 0, and EOT over all members of a pool")
    p.add_argument("--adaptive-pgd", type=float, nargs="+", default=None, metavar="EPS",
                   help="the adaptive PGD L-infinity attack at these ε (whitebox on member 0, and EOT over all "
                        "members of a pool): maximises CE(f(D(x')), y) + CE(f(x'), y) - weight * detector excess")
    p.add_argument("--adaptive-pgd-steps", type=int, default=100, help="steps of the adaptive PGD (random start)")
    p.add_argument("--n-adaptive", type=int, default=200, help="examples of the adaptive attacks")
    p.add_argument("--adaptive-weight", type=float, default=10.0,
                   help="weight of the detector penalty (relative to the margin loss, both times c)")
    p.add_argument("--device", default="cpu", help="torch device for the attacks")
    p.add_argument("--judge-device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="onnxruntime device of the defense core that judges the adversarial examples (cuda needs "
                        "onnxruntime-gpu; the report records the providers used)")
    p.add_argument("--cache", type=Path, default=None,
                   help="keep the adversarial examples here and reuse them: they depend only on the classifier "
                        "(by sha256), the attack's parameters and the images, so bundles sharing a classifier "
                        "share them")
    p.add_argument("--cache-chunk", type=int, default=None, metavar="N",
                   help="with --cache: attack the examples N at a time and keep each chunk as soon as it is done, "
                        "so that a long run cut short (a session's end, a device's time limit) picks up where it "
                        "stopped when run again with the same flags")
    p.add_argument("--cache-shard", type=_shard, default=None, metavar="I/K",
                   help="with --cache and --cache-chunk: craft only the missing chunks whose number is I modulo K, "
                        "then stop without judging, so that K processes (on one GPU, or several machines) share a "
                        "long row; a run without it then judges the row from the cache")
    p.add_argument("--cache-slots", type=int, default=1, metavar="B",
                   help="with --cache-shard and --cache-chunk 1, for Carlini L0: attack B examples side by side, "
                        "a finished one's slot refilled at once, each kept as soon as it is done (on one CPU "
                        "thread a ResNet-9 step costs 1.3-1.65 x for 2 images what it costs for 1: python -m "
                        "bench.attack_batch); the seconds kept with each are its share of the steps it was in")
    p.add_argument("--seed", type=int, default=0, help="seed for torch")
    p.add_argument("--plan", action="store_true", help="print what would run and an estimate of its time, then stop")
    return p


PAPER_KAPPAS = (0.0, 10.0, 20.0, 30.0, 40.0)


def kappas(args) -> list[float]:
    """The confidences of the Carlini curve: only when asked for, or with the whole default evaluation."""
    if args.kappas is not None:
        return list(args.kappas)
    return list(PAPER_KAPPAS) if args.attacks is None else []


def seconds_per_gradient(twin, x: np.ndarray, device: str, batch: int = 64) -> float:
    """Measured seconds of one classifier gradient per example (forward + backward on a batch)."""
    xb = torch.from_numpy(x[:batch]).to(device)
    times = []
    for _ in range(3):
        z = xb.clone().requires_grad_(True)
        started = time.perf_counter()
        twin(z).logsumexp(1).sum().backward()
        times.append(time.perf_counter() - started)
    return min(times[1:]) / len(xb)


def plan(jobs: list[dict], per_gradient: float, device: str) -> str:
    """The plan ``magnet evaluate`` prints before it starts: one line per job, with an estimate."""
    lines = [f"plan ({len(jobs)} jobs; one classifier gradient takes {per_gradient * 1e3:.2f} ms per example on "
             f"{device}, measured now; estimates for the attacks only):"]
    total = 0.0
    for job in jobs:
        if job.get("cached"):
            lines.append(f"  {job['name']:<28} {job.get('cached_examples') or job['examples']:>5} examples  "
                         "cached: the examples are reused")
            continue
        seconds = job["examples"] * job["gradients"] * per_gradient
        total += seconds
        done = f" (+ {job['cached_examples']} cached)" if job.get("cached_examples") else ""
        lines.append(f"  {job['name']:<28} {job['examples']:>5} examples{done}  {job['gradients']:>8.0f} gradients "
                     f"each ({job['quality']})  ~{duration(seconds)}")
    lines.append(f"  total: ~{duration(total)}")
    return "\n".join(lines)


def judge(defense: Defense, x_adv: np.ndarray, y: np.ndarray, member: int = 0) -> dict:
    """The accounting columns for ``x_adv`` through the core (one member)."""
    verdicts = [defense.inspect(x_adv[i : i + 500], member) for i in range(0, len(x_adv), 500)]
    rejected = np.concatenate([v.rejected for v in verdicts])
    reformed = run_batched(defense.classifier, np.concatenate([v.reformed for v in verdicts])).argmax(1)
    plain = run_batched(defense.classifier, x_adv).argmax(1)
    fired = {name: float(np.concatenate([v.fired[name] for v in verdicts]).mean()) for name in verdicts[0].fired}
    return {**columns(y, plain, reformed, rejected), "rejected": float(rejected.mean()), "fired": fired,
            "fooled": plain != y, "reformed": np.concatenate([v.reformed for v in verdicts])}


def same_size_noise(defense: Defense, x: np.ndarray, x_adv: np.ndarray, y: np.ndarray, seed: int = 0) -> dict:
    """A control: each example moved by Gaussian noise of the same L2 size as its perturbation (then
    clipped to [0, 1]), judged like the attack. What the defense does to a random change of that size."""
    n = len(x)
    size = np.linalg.norm((x_adv - x).reshape(n, -1), axis=1)
    g = np.random.default_rng(seed).standard_normal(x.shape).astype(np.float32)
    g *= (size / np.maximum(np.linalg.norm(g.reshape(n, -1), axis=1), 1e-12)).reshape(-1, *([1] * (x.ndim - 1)))
    judged = judge(defense, np.clip(x + g, 0.0, 1.0).astype(np.float32), y)
    return {k: judged[k] for k in ("no_defense", "reformer_only", "full_defense", "rejected")}


def residual(defense: Defense, x: np.ndarray, x_adv: np.ndarray, reformed_adv: np.ndarray, fooled: np.ndarray,
             member: int = 0) -> float | None:
    """Mean ||ae(x') - ae(x)|| / ||x' - x|| over the fooling examples: the share of the perturbation
    that survives the reformer."""
    if not fooled.any():
        return None
    ae_x = np.concatenate([defense.screen(x[i : i + 500], member).reformed for i in range(0, len(x), 500)])
    num = np.linalg.norm((reformed_adv - ae_x).reshape(len(x), -1)[fooled], axis=1)
    den = np.linalg.norm((x_adv - x).reshape(len(x), -1)[fooled], axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def distortion(x: np.ndarray, x_adv: np.ndarray, fooled: np.ndarray) -> dict:
    """Mean distortions over the examples that fool the undefended classifier.

    L0 counts pixels (a pixel changed in any channel), as Carlini does.
    """
    d = (x_adv - x).reshape(len(x), -1)[fooled]
    if not len(d):
        return {"mean_l2": None, "mean_linf": None, "mean_l0": None}
    pixels = (np.abs(x_adv - x)[fooled] > 1e-6).any(1).reshape(len(d), -1)
    return {"mean_l2": float(np.linalg.norm(d, axis=1).mean()), "mean_linf": float(np.abs(d).max(1).mean()),
            "mean_l0": float(pixels.sum(1).mean())}


class Progress:
    """Prints ``name: done/total images, seconds`` at most every ``every`` seconds, and at the end."""

    def __init__(self, name: str, every: float = 30.0):
        self.name, self.every, self.started, self.last = name, every, time.perf_counter(), 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter() - self.started
        if now - self.last >= self.every or done == total:
            self.last = now
            print(f"{self.name}: {done}/{total} images, {now:.0f} s", flush=True)


def _cache_file(cache: Path, defense: Defense, attack: Attack, idx: np.ndarray) -> Path:
    """Adversarial examples depend only on the classifier, the attack and the images, not on the defense:
    bundles sharing a classifier reuse them."""
    classifier = next(f.sha256 for f in defense.manifest.files if f.path == defense.manifest.classifier.file)
    return cache_path(cache, attack.name, [classifier, attack.name, attack.params, idx.tolist()])


SEEN_ATTACKS_NOTE = ("**This bundle's reformer was trained with adversarial examples** (its manifest: "
                     "`measurements.reformer.trained_on_adversarial_examples`): rows of the kinds it saw are attacks "
                     "it was trained against, on test images it has not seen.")


def seen_attacks(manifest) -> bool:
    """Whether the bundle says its reformer was trained on adversarial examples."""
    reformer = (manifest.measurements or {}).get("reformer") or {}
    return bool(reformer.get("trained_on_adversarial_examples"))


def _shard(text: str) -> tuple[int, int]:
    i, sep, k = text.partition("/")
    try:
        shard = (int(i), int(k))
    except ValueError:
        shard = (-1, 0)
    if not sep or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise argparse.ArgumentTypeError(f"want I/K with 0 <= I < K, got {text!r}")
    return shard


def craft_shard(attack: Attack, twin, defense, x, y, device, cache: Path, idx: np.ndarray, chunk: int,
                shard: tuple[int, int], slots: int = 1) -> int:
    """Craft and keep the missing chunks numbered ``shard[0]`` modulo ``shard[1]``; returns how many it made.
    With ``slots`` > 1 (chunks of one example, an attack with a streaming form), ``slots`` examples at a time."""
    if slots > 1:
        return _stream_shard(attack, twin, defense, x, y, device, cache, idx, shard, slots)
    made = 0
    for k, part in enumerate(_chunks(len(x), chunk)):
        path = _cache_file(cache, defense, attack, idx[part])
        if k % shard[1] != shard[0] or path.exists():
            continue
        _, took = _craft_chunk(attack, twin, x[part], y[part], device, path)
        made += 1
        print(f"{attack.name}: chunk {k} ({part.stop - part.start} examples) crafted in {took:.0f} s -> {path}",
              flush=True)
    return made


def streams(attack: Attack) -> bool:
    """Whether ``attack`` can craft a stream of examples side by side (``--cache-slots``)."""
    return getattr(attack.run, "stream", None) is not None


def _stream_shard(attack: Attack, twin, defense, x, y, device, cache: Path, idx: np.ndarray,
                  shard: tuple[int, int], slots: int) -> int:
    """:func:`craft_shard` for chunks of one example, ``slots`` of them attacked side by side."""
    paths = {k: _cache_file(cache, defense, attack, idx[k : k + 1]) for k in range(len(x)) if k % shard[1] == shard[0]}
    todo = [k for k, path in paths.items() if not path.exists()]

    def done(k, x_adv, _ok, seconds):
        path = paths[k]
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x_adv=x_adv[None], seconds=seconds, slots=slots, device=str(device))
        print(f"{attack.name}: chunk {k} (1 examples) crafted in {seconds:.0f} s (its share of {slots} slots) -> "
              f"{path}", flush=True)

    return attack.run.stream(twin, ((k, x[k], y[k]) for k in todo), done, slots=slots, device=device,
                             **attack.params)


def _craft_chunk(attack: Attack, twin, x, y, device, path: Path | None, progress=None) -> tuple[np.ndarray, float]:
    """Attack one chunk and keep it at ``path`` (when given) with the seconds it took."""
    started = time.perf_counter()
    x_adv = attack(twin, x, y, device=device, progress=progress)
    took = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x_adv=x_adv, seconds=took)
    return x_adv, took


def _chunks(n: int, chunk: int | None) -> list[slice]:
    size = chunk if chunk and chunk > 0 else max(n, 1)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _cached_chunks(cache: Path | None, defense, attack: Attack, idx: np.ndarray, chunk: int | None) -> int:
    """How many of ``idx``'s examples already have adversarial examples in ``cache``."""
    if cache is None:
        return 0
    return sum(part.stop - part.start for part in _chunks(len(idx), chunk)
               if _cache_file(cache, defense, attack, idx[part]).exists())


def run_attack(attack: Attack, twin, defense, x, y, device, cache: Path | None = None,
               idx: np.ndarray | None = None, chunk: int | None = None) -> dict:
    """Attack ``x`` and judge the result. With ``cache`` (and ``idx``), the examples are kept there, one file
    per ``chunk`` examples (one for the whole row without it), each written as soon as it is crafted."""
    parts = _chunks(len(x), chunk if cache is not None and idx is not None else None)
    pieces, seconds, reused_parts = [], 0.0, 0
    progress = Progress(attack.name)
    for part in parts:
        path = _cache_file(cache, defense, attack, idx[part]) if cache is not None and idx is not None else None
        if path is not None and path.exists():
            stored = np.load(path)
            pieces.append(stored["x_adv"])
            seconds += float(stored["seconds"])
            reused_parts += 1
            print(f"{attack.name}: reusing {path} ({part.stop - part.start} examples, crafted in "
                  f"{float(stored['seconds']):.0f} s)", flush=True)
            continue
        offset = lambda done, _total, start=part.start: progress(start + done, len(x))  # noqa: E731 (row's count)
        x_adv, took = _craft_chunk(attack, twin, x[part], y[part], device, path, progress=offset)
        pieces.append(x_adv)
        seconds += took
    x_adv = np.concatenate(pieces) if pieces else x.copy()
    reused = bool(parts) and reused_parts == len(parts)
    judged = judge(defense, x_adv, y)
    fooled, reformed = judged.pop("fooled"), judged.pop("reformed")
    row = {"attack": attack.name, "family": attack.family, "params": attack.params, "examples": len(x),
           "seconds": seconds, "reused_examples": reused,
           **({"cache_chunk": chunk, "chunks_reused": reused_parts} if len(parts) > 1 else {}),
           "attack_success": float(fooled.mean()), **distortion(x, x_adv, fooled),
           "residual": residual(defense, x, x_adv, reformed, fooled), **judged,
           "same_size_noise": same_size_noise(defense, x, x_adv, y)}
    print(f"{attack.name}: {len(x)} examples in {seconds:.0f} s; no defense {row['no_defense']:.3f}, "
          f"full defense {row['full_defense']:.3f}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cache_slots < 1:
        raise SystemExit(f"--cache-slots must be at least 1, not {args.cache_slots}")
    if args.cache_slots > 1 and (args.cache_shard is None or args.cache_chunk != 1):
        raise SystemExit("--cache-slots needs --cache-shard and --cache-chunk 1 (it crafts one example a chunk; "
                         "a run without it then judges)")
    torch.manual_seed(args.seed)
    exact_float32()
    defense = Defense(args.bundle, device=args.judge_device)
    manifest = defense.manifest
    twin = torch_twin(defense.classifier_file, manifest.dataset, "classifier", manifest.input.shape,
                      contract=manifest.classifier.input, output_name=manifest.classifier.output_name,
                      output=manifest.classifier.output).to(args.device)
    spec = spec_of_manifest(manifest)
    try:
        test = load_for_manifest(manifest, args.data_dir, args.data).test
    except DataError as e:
        raise SystemExit(str(e)) from e
    correct = np.flatnonzero(run_batched(defense.classifier, test.x).argmax(1) == test.y)
    attacks = registry(spec)
    names = default_names(spec) if args.attacks is None else args.attacks
    unknown = [name for name in names if name not in attacks]
    if unknown:
        raise SystemExit(f"unknown attack(s) {', '.join(unknown)}; {manifest.dataset} has: {', '.join(attacks)}")
    chosen = []
    for name in names:
        attack = attacks[name]
        if attack.family.startswith("carlini"):
            attack = Attack(attack.name, attack.family, {**attack.params, **_iterations(attack, args)}, attack.run)
        attack = Attack(attack.name, attack.family, {**attack.params, **_overrides(args.overrides, name)}, attack.run)
        chosen.append((name, attack, correct[: args.n_carlini if attack.family.startswith("carlini") else args.n]))
    base = attacks["carlini_l2"]
    curve_attacks = [Attack(f"carlini_l2_k{kappa:g}", "carlini_l2", {**base.params, "confidence": kappa,
                                                                       **_iterations(base, args)}, base.run)
                     for kappa in kappas(args)]
    budget = {"binary_search_steps": args.carlini_steps, "max_iterations": args.carlini_iterations,
              "initial_const": args.carlini_initial_const, "learning_rate": args.carlini_learning_rate}
    classes = len(manifest.classifier.classes)

    def job(name: str, examples: int, attack: Attack, times: int = 1, cached: bool = False) -> dict:
        gradients, quality = gradient_budget(attack, classes)
        return {"name": name, "examples": examples, "gradients": gradients * times, "quality": quality,
                "cached": cached}

    jobs = []
    for _, a, idx in chosen:
        done = _cached_chunks(args.cache, defense, a, idx, args.cache_chunk)
        jobs.append({**job(a.name, len(idx) - done, a, cached=bool(len(idx)) and done == len(idx)),
                     "cached_examples": done})
    jobs += [job(a.name, min(args.n_kappa, len(correct)), a) for a in curve_attacks]
    members = len(defense.members)
    if args.graybox and members < 2:
        raise SystemExit("--graybox needs a pool bundle (several members)")
    own_l2 = Attack("carlini_l2", "carlini_l2", budget)
    if args.graybox:
        jobs.append(job(f"graybox ({members} columns)", min(args.n_graybox, len(correct)) * members, own_l2))
    if args.adaptive:
        runs = 1 + (members > 1)
        jobs.append(job(f"adaptive ({runs} runs + baseline)", min(args.n_adaptive, len(correct)), own_l2, 1 + runs))
    groups = [[0]] + ([list(range(members))] if members > 1 else [])
    for eps in args.adaptive_pgd or []:
        # one step: the classifier on every targeted member's reformed batch and on x, forward and backward
        jobs += [{"name": f"adaptive PGD ε {eps:g} ({'EOT' if len(g) > 1 else 'member 0'})",
                  "examples": min(args.n_adaptive, len(correct)), "gradients": args.adaptive_pgd_steps * (len(g) + 1),
                  "quality": "exact", "cached": False} for g in groups]
    if args.cache_shard is not None:
        if args.cache is None or not args.cache_chunk:
            raise SystemExit("--cache-shard needs --cache and --cache-chunk")
        if args.cache_slots > 1:
            cannot = [attack.name for _, attack, _ in chosen if not streams(attack)]
            if cannot:
                raise SystemExit(f"--cache-slots: {', '.join(cannot)} cannot craft side by side (only carlini_l0 can)")
        for _, attack, idx in chosen:
            made = craft_shard(attack, twin, defense, test.x[idx], test.y[idx], args.device, args.cache, idx,
                               args.cache_chunk, args.cache_shard, args.cache_slots)
            print(f"{attack.name}: shard {args.cache_shard[0]}/{args.cache_shard[1]} crafted {made} chunk(s); "
                  f"{_cached_chunks(args.cache, defense, attack, idx, args.cache_chunk)} of {len(idx)} examples "
                  "now in the cache", flush=True)
        return 0
    print(plan(jobs, seconds_per_gradient(twin, test.x[correct[:64]], args.device), args.device), flush=True)
    if args.plan:
        return 0
    rows, curve = [], []
    report = {"bundle": str(args.bundle), "bundle_fingerprint": fingerprint(manifest), "dataset": manifest.dataset,
              "examples": "first test images the classifier gets right", "clean": clean_figures(defense, test),
              "rows": rows, "carlini_confidence_curve": curve, "judge_providers": defense.providers,
              **({"note": SEEN_ATTACKS_NOTE} if seen_attacks(manifest) else {}),
              "provenance": provenance(["magnet", "evaluate", *(argv if argv is not None else sys.argv[1:])],
                                       args.seed)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, attack, idx in chosen:
        rows.append(run_attack(attack, twin, defense, test.x[idx], test.y[idx], args.device, args.cache, idx,
                               chunk=args.cache_chunk))
        rows[-1]["reduced"] = reduced(attack, full_strength(attacks, name), len(idx))
        _write(report, args.out)  # after every row, so a long run that is cut short keeps what it did
    for attack in curve_attacks:
        idx = correct[: args.n_kappa]
        curve.append({"confidence": attack.params["confidence"],
                      **run_attack(attack, twin, defense, test.x[idx], test.y[idx], args.device, args.cache, idx)})
        _write(report, args.out)
    if args.graybox or args.adaptive or args.adaptive_pgd:
        twins = Twins(defense, twin)
    if args.graybox:
        idx = correct[: args.n_graybox]
        report["graybox"] = graybox_table(defense, twins, test.x[idx], test.y[idx],
                                          {**budget, "confidence": args.graybox_confidence}, judge, args.device,
                                          cache=args.cache)
        _write(report, args.out)
    if args.adaptive:
        idx = correct[: args.n_adaptive]
        x, y = test.x[idx], test.y[idx]
        started = time.perf_counter()
        plain = carlini_l2(twin, x, y, device=args.device, **budget)
        baseline = {"examples": len(x), "params": budget, "seconds": time.perf_counter() - started,
                    "attack_success": float(plain.success.mean()),
                    "mean_l2": float(plain.l2[plain.success].mean()) if plain.success.any() else None,
                    "median_l2": float(np.median(plain.l2[plain.success])) if plain.success.any() else None}
        report["adaptive"] = {"undefended_carlini_l2": baseline, "runs": []}
        groups = [[0]] + ([list(range(len(twins)))] if len(twins) > 1 else [])
        for group in groups:
            report["adaptive"]["runs"].append(adaptive_attack(defense, twins, group, x, y, budget, judge,
                                                              weight=args.adaptive_weight, device=args.device))
            _write(report, args.out)
    if args.adaptive_pgd:
        idx = correct[: args.n_adaptive]
        report["adaptive_pgd"] = {"runs": []}
        for eps in args.adaptive_pgd:
            for group in groups:
                report["adaptive_pgd"]["runs"].append(
                    adaptive_pgd(defense, twins, group, test.x[idx], test.y[idx], eps, args.adaptive_pgd_steps, judge,
                                 weight=args.adaptive_weight, device=args.device))
                _write(report, args.out)
    _write(report, args.out)
    return 0


def _write(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_reports(report, out)


def _overrides(items: list[str], name: str) -> dict:
    """``--set`` values for attack ``name`` (numbers parsed as float or int)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        attack, _, param = key.partition(".")
        if not param or not value:
            raise SystemExit(f"--set wants ATTACK.KEY=VALUE, got {item!r}")
        if attack == name:
            out[param] = json.loads(value) if value[:1].isdigit() or value[:1] in "-[{" else value
    return out


def exact_float32() -> None:
    """Full float32 for the attacks' convolutions and matrix products on a GPU. PyTorch lets cuDNN use TF32
    by default, and a κ = 0 Carlini example, which sits at the decision boundary, found with TF32 logits can
    land on the wrong side of it for the float32 classifier that judges it: 11 of 107 Carlini L0 examples
    crafted on an H200 with TF32 did not fool the classifier on onnxruntime (every one of 93 crafted on the
    CPU did). No effect on a CPU."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _iterations(attack: Attack, args) -> dict:
    """The Carlini budget from the flags (L2 and L-infinity; L0 takes ``--set carlini_l0.KEY=VALUE``)."""
    if attack.family == "carlini_l2":
        return {"max_iterations": args.carlini_iterations, "binary_search_steps": args.carlini_steps,
                "initial_const": args.carlini_initial_const, "learning_rate": args.carlini_learning_rate}
    return {"max_iterations": args.carlini_iterations} if attack.family == "carlini_linf" else {}


if __name__ == "__main__":
    raise SystemExit(main())
