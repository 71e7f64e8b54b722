"""Latency of a bundle's defense on one image: the reformer alone, and the full path.

    python -m bench.defense_latency --bundle models/cifar10 models/cifar10-paper --out docs/results/bench-cifar10-latency.json

onnxruntime on the CPU with one intra-op thread, batch 1, random images in [0, 1]; medians (and p90)
over ``--calls`` calls after a warm-up. The full path is what the embedded gateway runs per image:
the member's autoencoders, the reconstruction scores, the classifier on x and on the reformed x (one
call of 2 rows when a divergence detector needs both, else one row), and the decisions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from service.defense.core import Defense


def _timed(fn, calls: int) -> dict:
    for _ in range(20):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    ms = 1000 * np.array(times)
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)), "calls": calls}


def measure(bundle: Path, calls: int, seed: int = 0) -> dict:
    defense = Defense(bundle, device="cpu", threads=1)
    x = np.random.default_rng(seed).uniform(size=(1, *defense.input_shape)).astype(np.float32)
    reformer = defense.autoencoders[defense.members[0].reformer]
    classifier = defense.classifier

    def full() -> None:
        screening = defense.screen(x)
        if defense.needs_logits():
            logits = classifier(np.concatenate([screening.x, screening.reformed]))
            defense.decide(screening, logits[:1], logits[1:])
        else:
            defense.decide(screening)
            classifier(screening.reformed)

    return {"bundle": str(bundle), "reformer_file": defense.members[0].reformer,
            "reformer": _timed(lambda: reformer(x), calls), "classifier_2_rows": _timed(
                lambda: classifier(np.concatenate([x, x])), calls), "full_path": _timed(full, calls)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.defense_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, nargs="+", required=True)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--out", type=Path, required=True, help="JSON to write (and a .md beside it)")
    args = p.parse_args(argv)
    rows = [measure(b, args.calls) for b in args.bundle]
    result = {"rows": rows, "threads": 1, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
              "date": time.strftime("%Y-%m-%d"), "command": "python -m bench.defense_latency " + " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Defense latency, one image, onnxruntime CPU, one intra-op thread", "",
             f"`{result['command']}` ({result['date']}, {result['machine']}). Medians over {args.calls} calls "
             "(p90 in brackets), in ms.", "",
             "| bundle | reformer | classifier, 2 rows | full path (autoencoders, scores, classifier on x and D(x), decisions) |",
             "| --- | --- | --- | --- |"]
    for r in rows:
        cell = lambda k: f"{r[k]['median_ms']:.2f} ({r[k]['p90_ms']:.2f})"  # noqa: E731
        lines.append(f"| `{r['bundle']}` | {cell('reformer')} | {cell('classifier_2_rows')} | {cell('full_path')} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
