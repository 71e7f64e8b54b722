"""A cached Carlini L0 row (one example a chunk) split by the device that crafted each example.

Chunk files written by ``magnet evaluate --cache-slots`` record ``device``; older ones (one example at a time
on the CPU) do not and count as ``cpu``. For each group: how many examples, how many fool the classifier
alone, the time stored with them, their mean count of changed pixels (positions where any channel moved by more than 1e-4) and L2,
and the bundle's accounting columns on them, so that a row crafted partly on a GPU can be checked for a
difference in strength between the two parts. ``--drop-unfooled DEVICE`` deletes the chunk files crafted on
DEVICE whose example does not fool the classifier as the bundle runs it (float32, onnxruntime CPU): a κ = 0
example sits at the decision boundary, and one found with a GPU's TF32 convolutions can land on the wrong
side of it; a CPU shard (``magnet evaluate --cache-shard``) then crafts them again.

    python scripts/cache_by_device.py --bundle models/cifar10 --data-dir ../shared/data \
        --cache docs/results/eval-cifar10-cw-l0-full/adv-cache --out docs/results/eval-cifar10-cw-l0-full/by-device.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.defense.core import Defense  # noqa: E402
from training.bundles import run_batched  # noqa: E402
from training.evaluate.attacks import registry  # noqa: E402
from training.evaluate.run import _cache_file, judge  # noqa: E402
from training.specs import load_for_manifest, spec_of_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--attack", default="carlini_l0")
    p.add_argument("--n-carlini", type=int, default=200)
    p.add_argument("--out", type=Path)
    p.add_argument("--drop-unfooled", metavar="DEVICE",
                   help="delete the chunk files crafted on DEVICE (e.g. cuda) whose example does not fool the classifier")
    args = p.parse_args(argv)
    defense = Defense(args.bundle, device="cpu")
    test = load_for_manifest(defense.manifest, args.data_dir).test
    correct = np.flatnonzero(run_batched(defense.classifier, test.x).argmax(1) == test.y)
    idx = correct[: args.n_carlini]
    attack = registry(spec_of_manifest(defense.manifest))[args.attack]
    groups: dict[str, list[int]] = {}
    paths = []
    seconds = np.zeros(len(idx))
    x_adv = np.empty_like(test.x[idx])
    for k in range(len(idx)):
        path = _cache_file(args.cache, defense, attack, idx[k : k + 1])
        if not path.exists():
            raise SystemExit(f"example {k} is not in the cache ({path})")
        paths.append(path)
        kept = np.load(path)
        x_adv[k] = kept["x_adv"][0]
        seconds[k] = float(kept["seconds"])
        groups.setdefault(str(kept["device"]) if "device" in kept else "cpu", []).append(k)
    x, y = test.x[idx], test.y[idx]
    logits = run_batched(defense.classifier, x_adv)
    fooled = logits.argmax(1) != y
    others = logits.copy()
    others[np.arange(len(y)), y] = -np.inf
    lead = logits[np.arange(len(y)), y] - others.max(1)  # > 0: the classifier is still right
    columns = ("no_defense", "detectors_only", "reformer_only", "full_defense")
    out = {"bundle": str(args.bundle), "attack": attack.name, "params": attack.params, "groups": {}}
    for device, members in sorted(groups.items()):
        m = np.asarray(members)
        part = judge(defense, x_adv[m], y[m])
        diff = x_adv[m] - x[m]
        moved = (np.abs(diff) > 1e-4).any(1).reshape(len(m), -1).sum(1)
        ok = fooled[m]
        out["groups"][device] = {
            "examples": len(m), "fool_classifier": int(ok.sum()),
            "mean_changed_pixels": float(moved[ok].mean()) if ok.any() else None,
            "mean_l2": float(np.linalg.norm(diff.reshape(len(m), -1), axis=1)[ok].mean()) if ok.any() else None,
            **{k: part[k] for k in columns},
            # each chunk's stored time: the example's share of its run (a GPU's seconds are not a CPU core's)
            "seconds": {"sum": float(seconds[m].sum()), "min": float(seconds[m].min()),
                        "median": float(np.median(seconds[m])), "max": float(seconds[m].max())},
            "unfooled": [int(k) for k in m[~ok]],
            # how far those are from the boundary: the true class's lead in the logits, and their size
            "unfooled_lead": [round(float(lead[k]), 6) for k in m[~ok]],
            "unfooled_logit_size": [round(float(np.abs(logits[k]).max()), 3) for k in m[~ok]]}
    # the columns are means over examples: the whole row's are the groups' weighted by size
    out["all"] = {k: sum(g[k] * g["examples"] for g in out["groups"].values()) / len(idx) for k in columns}
    if args.drop_unfooled:
        dropped = out["groups"].get(args.drop_unfooled, {}).get("unfooled", [])
        for k in dropped:
            paths[k].unlink()
        out["dropped"] = {"device": args.drop_unfooled, "examples": dropped}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
