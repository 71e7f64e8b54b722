"""Differentiable torch twins of a bundle's ONNX models, for attacks that need gradients.

Attacks must target exactly the models the gateway serves, so the twins are rebuilt from the bundle's
ONNX files (the known architectures, with the ONNX initializers as weights) and checked against
onnxruntime before use. The exporter folds each BatchNorm into the convolution before it
(``<conv>.weight`` scaled, ``<conv>.weight_bias`` added): the twin gets that conv weight and a BatchNorm
that passes values through and adds the bias.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from service.defense.contract import ClassifierInput, prepare
from service.defense.runtime import CPU, OnnxModel
from service.defense.scores import as_scores
from training.onnx_torch import OnnxModule, OnnxTwinError

if TYPE_CHECKING:
    from service.defense.core import Defense
from training.nets import AE_SPECS, GuidedReformer, MagnetAE32, MnistClassifier, ResNet9, SigmoidAutoencoder


class TwinError(RuntimeError):
    """No known architecture matches the ONNX file, or the twin disagrees with onnxruntime."""


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _fill(model: nn.Module, inits: dict[str, np.ndarray]) -> nn.Module:
    state = model.state_dict()
    for key, value in state.items():
        if key in inits:
            new = inits[key]
        elif key.rsplit(".", 1)[0] + ".weight" in state and isinstance(_module(model, key), nn.BatchNorm2d):
            new = _folded_bn(model, key, inits)
        elif key.endswith(".bias") and isinstance(_module(model, key), (nn.Conv2d, nn.ConvTranspose2d)):
            new = np.zeros(value.shape, np.float32)  # the exporter drops an all-zero bias (checked below)
        else:
            raise TwinError(f"no initializer for {key}")
        if tuple(new.shape) != tuple(value.shape):
            raise TwinError(f"{key}: ONNX shape {tuple(new.shape)} != architecture's {tuple(value.shape)}")
        state[key] = torch.as_tensor(np.array(new), dtype=value.dtype)
    model.load_state_dict(state)
    return model.eval()


def _module(model: nn.Module, key: str) -> nn.Module:
    return model.get_submodule(key.rsplit(".", 1)[0])


def _folded_bn(model: nn.Module, key: str, inits: dict[str, np.ndarray]) -> np.ndarray:
    """Identity BatchNorm plus the folded bias of the conv just before it (``x.0`` -> BN ``x.1``)."""
    prefix, field = key.rsplit(".", 1)
    bn = _module(model, key)
    n = bn.num_features
    # an all-zero folded bias is dropped by the exporter; the twin is checked against onnxruntime anyway
    conv_bias = inits.get(prefix[:-1] + "0.weight_bias", np.zeros(n, np.float32))
    return {"weight": np.ones(n), "bias": conv_bias, "running_mean": np.zeros(n),
            "running_var": np.full(n, 1.0 - bn.eps), "num_batches_tracked": np.array(0)}[field]


def _candidates(dataset: str, role: str, inits: dict[str, np.ndarray]) -> list[nn.Module]:
    if role == "classifier":
        if dataset == "mnist":
            return [MnistClassifier()]
        width = inits["features.0.0.weight"].shape[0] if "features.0.0.weight" in inits else 64
        return [ResNet9(width=width)]
    if "enc.0.weight" in inits:  # the classifier-guided residual U-Net
        depth = len({k.split(".")[1] for k in inits if k.startswith("downs.")})
        return [GuidedReformer(inits["enc.0.weight"].shape[1], inits["enc.0.weight"].shape[0], depth)]
    paper = [SigmoidAutoencoder(c, spec) for c, spec in AE_SPECS.values()]
    if "layers.0.0.weight" not in inits:
        return paper
    # the paper's autoencoders and the MagNet authors' 32-channel one share their parameter names:
    # every candidate is tried and the one that reproduces onnxruntime wins
    c, w = inits["layers.0.0.weight"].shape[1], inits["layers.0.0.weight"].shape[0]
    return paper + [MagnetAE32(c, w, bottleneck=False), MagnetAE32(c, w, bottleneck=True)]


class ContractTwin(nn.Module):
    """A classifier twin that takes the bundle's images: the input contract (scale, mean/std, layout)
    in torch, then the graph; a graph that ends in a softmax is read before it, so the twin returns
    logits and attacks get gradients that a saturated softmax would hide."""

    def __init__(self, inner: nn.Module, contract: ClassifierInput) -> None:
        super().__init__()
        self.inner, self.contract = inner, contract
        self.register_buffer("mean", torch.tensor(contract.mean or (0.0,), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(contract.std or (1.0,), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * self.contract.scale - self.mean) / self.std
        if self.contract.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        out = self.inner(x)
        # N x K x 1 x 1 (a 1x1-convolution head) as N x K, as service.defense.scores.as_scores reads it
        return out.flatten(1) if out.dim() > 2 and sum(d != 1 for d in out.shape[1:]) <= 1 else out


def _logits_before_softmax(path: Path, output_name: str | None) -> tuple[str | None, bool]:
    """(the tensor to read, whether it is the input of a final Softmax rather than the output itself)."""
    graph = onnx.load(str(path)).graph
    out = output_name or graph.output[0].name
    for node in graph.node:
        if out in node.output and node.op_type == "Softmax":
            return node.input[0], True
    return out, False


class _LogOf(nn.Module):
    """Logits (up to a constant) from a graph that outputs probabilities by other means than a final Softmax."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).clamp_min(1e-12).log()


def generic_twin(path: Path, input_shape: tuple[int, int, int], contract: ClassifierInput | None = None,
                 output_name: str | None = None, tolerance: float = 1e-4, output: str = "logits") -> nn.Module:
    """Any classifier graph as a torch twin on the bundle's images (``training.onnx_torch``), checked
    against onnxruntime through the same contract; it returns logits (the softmax's input when the graph
    ends in one, the log of the output when ``output`` says it is probabilities, else what the graph outputs)."""
    contract = contract or ClassifierInput()
    read, before_softmax = _logits_before_softmax(path, output_name)
    try:
        graph = OnnxModule(path, output_name=read, input_name=contract.name)
        twin = ContractTwin(graph, contract).eval()
    except OnnxTwinError as e:
        raise TwinError(str(e)) from e
    as_log = output == "probabilities" and not before_softmax
    if as_log:
        twin = _LogOf(twin).eval()
    x = np.random.default_rng(0).uniform(size=(8, *input_shape)).astype(np.float32)
    model = OnnxModel(path, [CPU], input_name=contract.name, output_name=output_name)
    with torch.no_grad():
        ours = twin(torch.from_numpy(x))
        ours = (torch.softmax(ours, 1) if before_softmax else ours.exp() if as_log else ours).numpy()
    diff = float(np.abs(ours - as_scores(model(prepare(x, contract)))).max())
    # a half-precision graph differs from the float32 twin by its own rounding, relative to its outputs' size
    tolerance += 4 * graph.rounding * max(1.0, float(np.abs(ours).max()))
    if diff > tolerance:
        raise TwinError(f"{path}: the generic torch twin differs from onnxruntime by {diff:.2e} > {tolerance:g}")
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def torch_twin(path: Path, dataset: str, role: str, input_shape: tuple[int, int, int],
               tolerance: float = 1e-4, contract: ClassifierInput | None = None,
               output_name: str | None = None, output: str = "logits") -> nn.Module:
    """The torch module computing what ``path`` computes on the bundle's images, verified on random inputs:
    the project's own architecture when one matches, else (for a classifier, or any graph when no
    architecture is known for ``dataset``) the generic interpreter of ``training.onnx_torch``."""
    if (contract is not None and not contract.is_identity) or output_name is not None or output != "logits":
        return generic_twin(path, input_shape, contract, output_name, tolerance, output)
    inits = _initializers(path)
    closest = None
    candidates = _candidates(dataset, role, inits) if dataset in ("mnist", "cifar10") else []
    if not candidates:
        return generic_twin(path, input_shape, contract, output_name, tolerance, output)
    for model in candidates:
        try:
            model = _fill(model, inits)
        except (TwinError, RuntimeError):
            continue
        x = np.random.default_rng(0).uniform(size=(8, *input_shape)).astype(np.float32)
        try:
            with torch.no_grad():
                diff = float(np.abs(model(torch.from_numpy(x)).numpy() - OnnxModel(path, [CPU])(x)).max())
        except RuntimeError:
            continue
        if diff <= tolerance:
            return model
        closest = diff if closest is None else min(closest, diff)
    try:  # a user's model in a shipped data set's shape: read the graph itself
        return generic_twin(path, input_shape, contract, output_name, tolerance, output)
    except TwinError as e:
        known = (f"the closest known architecture differs from onnxruntime by {closest:.2e} > {tolerance:g}"
                 if closest is not None else f"no known {role} architecture for {dataset} matches its weights")
        raise TwinError(f"{path}: {known}, and the generic twin failed: {e}") from e


def classifier_twin(defense: "Defense") -> nn.Module:
    """The twin of a loaded bundle's classifier (its input contract, output name and kind), in eval mode
    with its weights frozen: what an attack against the bundle's classifier differentiates."""
    m = defense.manifest
    twin = torch_twin(defense.classifier_file, m.dataset, "classifier", m.input.shape, contract=m.classifier.input,
                      output_name=m.classifier.output_name, output=m.classifier.output).eval()
    for q in twin.parameters():
        q.requires_grad_(False)
    return twin
