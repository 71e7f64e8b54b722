"""torch -> ONNX export with a dynamic batch axis, and the torch-vs-onnxruntime parity check."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.defense.runtime import CPU, OnnxModel

OPSET = 18
# The exporter logs a warning per torchvision operator it cannot register; we do not use torchvision.
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, int, int], output_name: str) -> Path:
    """Write ``model`` as one self-contained ONNX file with input 'input' (N x C x H x W)."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    example = torch.rand(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=[output_name],
            dynamic_shapes={"x": {0: batch}}, opset_version=OPSET, external_data=False, dynamo=True,
            verbose=False,
        )
    return Path(path)


@torch.no_grad()
def parity(model: nn.Module, path: Path, x: np.ndarray) -> float:
    """Max absolute difference between torch and onnxruntime (CPU) outputs on ``x``."""
    model.eval()
    expected = model(torch.from_numpy(x)).float().numpy()
    actual = OnnxModel(path, [CPU])(x)
    return float(np.abs(expected - actual).max())
