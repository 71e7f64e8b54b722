"""Threshold calibration at a target false-positive rate (MagNet's rule)."""

from __future__ import annotations

import numpy as np


def validate_fpr(fpr: float, n: int) -> int:
    """Number of validation scores that the rule lets sit at or above the threshold.

    Raises ValueError when ``fpr`` is outside (0, 1) or ``n * fpr < 1`` (the rule would then pick the
    smallest score and reject everything).
    """
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
    # The small epsilon keeps e.g. 100 * 0.29 = 28.999999999999996 from rounding down to 28.
    k = int(n * fpr + 1e-9)
    if k < 1:
        raise ValueError(f"fpr {fpr} on {n} validation scores keeps no score above the threshold; "
                         f"use at least {int(np.ceil(1 / fpr))} validation images or a larger fpr")
    return k


def threshold_at_fpr(scores: np.ndarray, fpr: float) -> float:
    """``sorted(scores)[-int(N * fpr)]``; an input passes iff its score is strictly below it.

    Parameters
    ----------
    scores : ndarray, shape (N,)
        Detector scores on clean validation data.
    fpr : float
        Target false-positive rate in (0, 1).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("scores must be a non-empty array of finite values")
    k = validate_fpr(fpr, scores.size)
    return float(np.sort(scores)[-k])


def passes(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask: True where a score is below the threshold (the input is accepted)."""
    return np.asarray(scores) < threshold
