"""Detector calibration through the gateway's own defense core, so thresholds match what is served."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.defense import scores as S
from service.defense.runtime import CPU, OnnxModel
from service.defense.thresholds import threshold_at_fpr


def run_batched(model: OnnxModel, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    return np.concatenate([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def reconstruction_scores(ae_path: Path, x: np.ndarray, p: int) -> np.ndarray:
    """Scores exactly as the core computes them: the ONNX autoencoder, then ``reconstruction_error``."""
    return S.reconstruction_error(x, run_batched(OnnxModel(ae_path, [CPU]), x), p)


def calibrate_reconstruction(name: str, ae_path: Path, x_val: np.ndarray, p: int, fpr: float) -> dict:
    """A detector entry for the manifest, thresholded on clean validation images."""
    threshold = threshold_at_fpr(reconstruction_scores(ae_path, x_val, p), fpr)
    return {"name": name, "kind": "reconstruction", "autoencoder": ae_path.name, "p": p,
            "fpr": fpr, "threshold": threshold}
