"""The paper's graybox table (MagNet section 5.4, Table 5).

Column j: Carlini L2 examples crafted against the classifier behind member j's reformer,
``classifier(ae_j(x))``, as an attacker who knows the method and had member j's weights would.
Row i: those examples defended by member i (its detectors and reformer), through ``Defense.inspect``.
The diagonal is the attacker's best case; the off-diagonal cells are what diversity buys; the
"random" row is the expected accuracy when the defense picks a member uniformly at random (the
column's mean over rows), which is what a gateway with a per-session member gives an attacker who
cannot choose the session's member.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import numpy as np

from service.defense.core import Defense
from training.attacks.carlini import carlini_l2
from training.evaluate.attacks import cache_path
from training.evaluate.torch_defense import Twins

Judge = Callable[[Defense, np.ndarray, np.ndarray, int], dict]


def column_cache(cache: Path, defense: Defense, member: int, x: np.ndarray, params: dict) -> Path:
    """Where column ``member``'s adversarial examples are kept: they depend on the member's reformer, the
    classifier, the attack's parameters and the images, so a run cut short resumes column by column."""
    by_path = {f.path: f.sha256 for f in defense.manifest.files}
    spec = defense.manifest.members[member]
    return cache_path(cache, "graybox", [by_path[spec.reformer], by_path[defense.manifest.classifier.file], params,
                                         hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()])


def graybox_table(defense: Defense, twins: Twins, x: np.ndarray, y: np.ndarray, params: dict,
                  judge: Judge, device: str = "cpu", log: Callable[[str], None] = print,
                  cache: Path | None = None) -> dict:
    """The 8x8 (n x n) table of full-defense accuracy, its random row, and per-column attack figures.
    With ``cache``, each column's examples are stored as crafted and reused by a later run."""
    n = len(twins)
    table = np.zeros((n, n))
    columns = []
    for j in range(n):
        path = column_cache(cache, defense, j, x, params) if cache is not None else None
        if path is not None and path.exists():
            stored = np.load(path)
            x_adv, success, l2, seconds = stored["x_adv"], stored["success"], stored["l2"], float(stored["seconds"])
            log(f"graybox column {j}: reusing {path} (crafted in {seconds:.0f} s)")
        else:
            started = time.perf_counter()
            result = carlini_l2(twins.members([j], detectors=False).to(device), x, y, device=device, **params)
            seconds = time.perf_counter() - started
            x_adv, success, l2 = result.x_adv, result.success, result.l2
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(path, x_adv=x_adv, success=success, l2=l2, seconds=seconds)
        judged = [judge(defense, x_adv, y, i) for i in range(n)]
        table[:, j] = [r["full_defense"] for r in judged]
        ok = success
        columns.append({"member": twins.specs[j].name, "seconds": seconds, "attack_success": float(ok.mean()),
                        "reformer_only_own": judged[j]["reformer_only"], "rejected_own": judged[j]["rejected"],
                        "mean_l2": float(l2[ok].mean()) if ok.any() else None})
        log(f"graybox column {j} ({twins.specs[j].name}): {len(x)} examples in {seconds:.0f} s, attack success "
            f"{ok.mean():.3f}, diagonal {table[j, j]:.3f}, others {np.delete(table[:, j], j).mean():.3f}")
    off = table[~np.eye(n, dtype=bool)]
    return {"members": [s.name for s in twins.specs], "attack": "carlini_l2", "params": params,
            "examples": len(x), "table": table.tolist(), "random": table.mean(0).tolist(),
            "diagonal_mean": float(np.diag(table).mean()), "off_diagonal_range": [float(off.min()), float(off.max())],
            "columns": columns}
