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

import time
from typing import Callable

import numpy as np

from service.defense.core import Defense
from training.attacks.carlini import carlini_l2
from training.evaluate.torch_defense import Twins

Judge = Callable[[Defense, np.ndarray, np.ndarray, int], dict]


def graybox_table(defense: Defense, twins: Twins, x: np.ndarray, y: np.ndarray, params: dict,
                  judge: Judge, device: str = "cpu", log: Callable[[str], None] = print) -> dict:
    """The 8x8 (n x n) table of full-defense accuracy, its random row, and per-column attack figures."""
    n = len(twins)
    table = np.zeros((n, n))
    columns = []
    for j in range(n):
        started = time.perf_counter()
        result = carlini_l2(twins.members([j], detectors=False).to(device), x, y, device=device, **params)
        seconds = time.perf_counter() - started
        judged = [judge(defense, result.x_adv, y, i) for i in range(n)]
        table[:, j] = [r["full_defense"] for r in judged]
        ok = result.success
        columns.append({"member": twins.specs[j].name, "seconds": seconds, "attack_success": float(ok.mean()),
                        "reformer_only_own": judged[j]["reformer_only"], "rejected_own": judged[j]["rejected"],
                        "mean_l2": float(result.l2[ok].mean()) if ok.any() else None})
        log(f"graybox column {j} ({twins.specs[j].name}): {len(x)} examples in {seconds:.0f} s, attack success "
            f"{ok.mean():.3f}, diagonal {table[j, j]:.3f}, others {np.delete(table[:, j], j).mean():.3f}")
    off = table[~np.eye(n, dtype=bool)]
    return {"members": [s.name for s in twins.specs], "attack": "carlini_l2", "params": params,
            "examples": len(x), "table": table.tolist(), "random": table.mean(0).tolist(),
            "diagonal_mean": float(np.diag(table).mean()), "off_diagonal_range": [float(off.min()), float(off.max())],
            "columns": columns}
