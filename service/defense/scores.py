"""Detector scores (MagNet section 3), as plain functions; the detector kinds that the gateway, the
calibration and the twin use live in ``service.defense.detectors`` and compute the same.

All functions take batches: ``x`` and ``reconstruction`` are N x C x H x W float32 arrays, logits are
N x K. They return one float64 score per row; a larger score means "further from the data manifold".
"""

from __future__ import annotations

import numpy as np

from service.defense import detectors as D


def as_scores(out: np.ndarray) -> np.ndarray:
    """A classifier's output as N x K: an output whose axes past the first are all 1 but one (N x K x 1 x 1,
    as a 1x1-convolution head without a flatten gives) is reshaped; any other shape is returned as it is,
    for the caller's shape check to name."""
    if out.ndim > 2 and sum(d != 1 for d in out.shape[1:]) <= 1:
        return out.reshape(len(out), -1)
    return out


def reconstruction_error(x: np.ndarray, reconstruction: np.ndarray, p: int) -> np.ndarray:
    """Mean over pixels of ``|x - ae(x)|**p``, per row.

    Parameters
    ----------
    x, reconstruction : ndarray, shape (N, C, H, W)
    p : int
        1 or 2 (the paper uses p=2 for MNIST detector I and p=1 elsewhere).

    Returns
    -------
    ndarray, shape (N,), float64
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    return D.NUMPY.row_mean(np.abs(x.astype(np.float64) - reconstruction.astype(np.float64)) ** p)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` in float64, numerically stable.

    Parameters
    ----------
    logits : ndarray, shape (N, K)
    temperature : float > 0
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logits_from_probabilities(probabilities: np.ndarray, eps: float = 1e-30) -> np.ndarray:
    """``log p``: equal to the logits up to a per-row constant, which softmax ignores."""
    return np.log(np.clip(probabilities.astype(np.float64), eps, None))


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (natural log) between rows of two distributions.

    Parameters
    ----------
    p, q : ndarray, shape (N, K), rows summing to 1

    Returns
    -------
    ndarray, shape (N,), values in [0, ln 2]
    """
    return D.jensen_shannon(np.asarray(p, np.float64), np.asarray(q, np.float64))


def divergence_score(logits_x: np.ndarray, logits_ae: np.ndarray, temperature: float) -> np.ndarray:
    """JSD(softmax(z(x)/T), softmax(z(ae(x))/T)) per row; NaN where either row holds NaN (not scored)."""
    score = jensen_shannon(softmax(logits_x, temperature), softmax(logits_ae, temperature))
    unscored = np.isnan(logits_x).any(axis=1) | np.isnan(logits_ae).any(axis=1)
    return np.where(unscored, np.nan, score)
