"""The paper's accounting: an adversarial example counts as defended when a detector rejects it or,
once reformed, the classifier gives its true label."""

from __future__ import annotations

import numpy as np


def columns(y: np.ndarray, plain: np.ndarray, reformed: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Accuracy on adversarial examples under four set-ups.

    Parameters
    ----------
    y : (N,) true labels
    plain : (N,) classifier labels on the adversarial examples as they are
    reformed : (N,) classifier labels on the reformed adversarial examples
    rejected : (N,) bool, True where any detector fired

    Returns
    -------
    dict with ``no_defense`` (plain right), ``detectors_only`` (rejected or plain right),
    ``reformer_only`` (reformed right) and ``full_defense`` (rejected or reformed right).
    """
    y, plain, reformed, rejected = map(np.asarray, (y, plain, reformed, rejected))
    if not len(y) == len(plain) == len(reformed) == len(rejected):
        raise ValueError("all arrays must have one entry per example")
    if len(y) == 0:
        raise ValueError("no examples to account for")
    return {
        "no_defense": float(np.mean(plain == y)),
        "detectors_only": float(np.mean(rejected | (plain == y))),
        "reformer_only": float(np.mean(reformed == y)),
        "full_defense": float(np.mean(rejected | (reformed == y))),
    }
