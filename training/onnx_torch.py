"""A differentiable torch twin of an arbitrary ONNX graph: an interpreter that runs the graph's nodes
with torch operations, the initializers as frozen buffers.

``from_onnx`` rebuilds the project's own architectures as torch modules; a user's classifier can have
any architecture, so attacks and classifier-guided training need a twin that reads the graph itself.
The common operator set of classifiers exported by torch, tf2onnx and keras2onnx is covered (convolution,
pooling, normalisation, dense layers, activations, the shape arithmetic of dynamic batch sizes);
an unsupported operator is named at load time, and ``check_twin`` compares the twin with onnxruntime
before anyone relies on it. No torchvision, no onnx2torch (unreleased since 2024, and it imports
torchvision for two operators).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

Op = Callable[[list[Any], dict[str, Any]], Any]
OPS: dict[str, Op] = {}


class OnnxTwinError(RuntimeError):
    """The graph uses an operator or attribute this interpreter does not support."""


def op(*names: str):
    def register(fn: Op) -> Op:
        for name in names:
            OPS[name] = fn
        return fn

    return register


def _ints(t: Any) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _pads(a: dict, spatial: int) -> list[int]:
    """ONNX pads (begin..., end...) as F.pad's (last dim first)."""
    pads = a.get("pads", [0] * 2 * spatial)
    begin, end = pads[:spatial], pads[spatial:]
    out = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _auto_pad(x: torch.Tensor, a: dict, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """Explicit pads for auto_pad SAME_UPPER / SAME_LOWER (ONNX), else the pads attribute."""
    mode = a.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    spatial = len(kernel)
    if mode in ("NOTSET", "VALID"):
        return a.get("pads", [0] * 2 * spatial) if mode == "NOTSET" else [0] * 2 * spatial
    begin, end = [], []
    for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations):
        out = math.ceil(size / s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


def _pad_input(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Pad ``x`` explicitly when begin and end pads differ (torch pads symmetrically); returns the input and
    the symmetric padding left for the torch op."""
    spatial = len(pads) // 2
    begin, end = pads[:spatial], pads[spatial:]
    if begin == end:
        return x, begin
    return F.pad(x, _pads({"pads": pads}, spatial), value=value), [0] * spatial


@op("Conv")
def _conv(i, a):
    x, w = i[0], i[1]
    b = i[2] if len(i) > 2 else None
    spatial = w.dim() - 2
    strides, dilations = a.get("strides", [1] * spatial), a.get("dilations", [1] * spatial)
    x, pad = _pad_input(x, _auto_pad(x, a, list(w.shape[2:]), strides, dilations))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, b, strides, pad, dilations, a.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(i, a):
    x, w = i[0], i[1]
    b = i[2] if len(i) > 2 else None
    spatial = w.dim() - 2
    pads = a.get("pads", [0] * 2 * spatial)
    if pads[:spatial] != pads[spatial:] or "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise OnnxTwinError("ConvTranspose with asymmetric pads, auto_pad or output_shape is not supported")
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[spatial]
    return fn(x, w, b, a.get("strides", [1] * spatial), pads[:spatial], a.get("output_padding", [0] * spatial),
              a.get("group", 1), a.get("dilations", [1] * spatial))


def _pool(i, a, kind: str):
    x = i[0]
    kernel = a["kernel_shape"]
    spatial = len(kernel)
    strides, dilations = a.get("strides", [1] * spatial), a.get("dilations", [1] * spatial)
    pads = _auto_pad(x, a, kernel, strides, dilations)
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "max":
        x, pad = _pad_input(x, pads, value=-math.inf)
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
        return fn(x, kernel, strides, pad, dilations, ceil_mode=ceil)
    include = bool(a.get("count_include_pad", 0))
    if pads[:spatial] != pads[spatial:]:
        if not include:
            raise OnnxTwinError("AveragePool with asymmetric pads that exclude the padding is not supported")
        x, pad = F.pad(x, _pads({"pads": pads}, spatial)), [0] * spatial
    else:
        pad = pads[:spatial]
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
    return fn(x, kernel, strides, pad, ceil_mode=ceil, count_include_pad=include)


OPS["MaxPool"] = lambda i, a: _pool(i, a, "max")
OPS["AveragePool"] = lambda i, a: _pool(i, a, "avg")
OPS["GlobalAveragePool"] = lambda i, a: i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)
OPS["GlobalMaxPool"] = lambda i, a: i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)


@op("BatchNormalization")
def _batchnorm(i, a):
    x, scale, bias, mean, var = i[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = scale / torch.sqrt(var + a.get("epsilon", 1e-5))
    return (x - mean.view(shape)) * inv.view(shape) + bias.view(shape)


@op("InstanceNormalization")
def _instancenorm(i, a):
    return F.instance_norm(i[0], weight=i[1], bias=i[2], eps=a.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layernorm(i, a):
    x, axis = i[0], a.get("axis", -1)
    axis = axis % x.dim()
    return F.layer_norm(x, x.shape[axis:], i[1], i[2] if len(i) > 2 else None, a.get("epsilon", 1e-5))


@op("Gemm")
def _gemm(i, a):
    x, w = i[0], i[1]
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    out = a.get("alpha", 1.0) * (x @ w)
    if len(i) > 2 and i[2] is not None:
        out = out + a.get("beta", 1.0) * i[2]
    return out


OPS["MatMul"] = lambda i, a: torch.matmul(i[0], i[1])
OPS["Add"] = lambda i, a: i[0] + i[1]
OPS["Sub"] = lambda i, a: i[0] - i[1]
OPS["Mul"] = lambda i, a: i[0] * i[1]
OPS["Div"] = lambda i, a: (i[0] // i[1]) if not i[0].is_floating_point() else i[0] / i[1]
OPS["Pow"] = lambda i, a: torch.pow(i[0], i[1])
OPS["Neg"] = lambda i, a: -i[0]
OPS["Abs"] = lambda i, a: i[0].abs()
OPS["Sqrt"] = lambda i, a: torch.sqrt(i[0])
OPS["Reciprocal"] = lambda i, a: 1.0 / i[0]
OPS["Exp"] = lambda i, a: torch.exp(i[0])
OPS["Log"] = lambda i, a: torch.log(i[0])
OPS["Erf"] = lambda i, a: torch.erf(i[0])
OPS["Max"] = lambda i, a: _fold(torch.maximum, i)
OPS["Min"] = lambda i, a: _fold(torch.minimum, i)
OPS["Sum"] = lambda i, a: _fold(torch.add, i)
OPS["Relu"] = lambda i, a: F.relu(i[0])
OPS["LeakyRelu"] = lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01))
OPS["Elu"] = lambda i, a: F.elu(i[0], a.get("alpha", 1.0))
OPS["Selu"] = lambda i, a: a.get("gamma", 1.0507009873554805) * torch.where(
    i[0] > 0, i[0], a.get("alpha", 1.6732632423543772) * (torch.exp(i[0]) - 1))
OPS["Sigmoid"] = lambda i, a: torch.sigmoid(i[0])
OPS["HardSigmoid"] = lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1)
OPS["HardSwish"] = lambda i, a: F.hardswish(i[0])
OPS["Tanh"] = lambda i, a: torch.tanh(i[0])
OPS["Softplus"] = lambda i, a: F.softplus(i[0])
OPS["Gelu"] = lambda i, a: F.gelu(i[0], approximate="tanh" if a.get("approximate", b"none") in (b"tanh", "tanh") else "none")
OPS["Softmax"] = lambda i, a: torch.softmax(i[0], a.get("axis", -1))
OPS["LogSoftmax"] = lambda i, a: torch.log_softmax(i[0], a.get("axis", -1))
OPS["Identity"] = lambda i, a: i[0]
OPS["Dropout"] = lambda i, a: i[0]
OPS["Flatten"] = lambda i, a: i[0].reshape(int(np.prod(i[0].shape[: a.get("axis", 1)])), -1)
OPS["Transpose"] = lambda i, a: i[0].permute(*(a.get("perm") or list(reversed(range(i[0].dim())))))
OPS["Shape"] = lambda i, a: torch.tensor(list(i[0].shape)[a.get("start", 0): a.get("end", None)], dtype=torch.int64)
OPS["Concat"] = lambda i, a: torch.cat([t for t in i if t is not None], a["axis"])
OPS["Equal"] = lambda i, a: i[0] == i[1]
OPS["Where"] = lambda i, a: torch.where(i[0], i[1], i[2])


def _fold(fn, tensors):
    out = tensors[0]
    for t in tensors[1:]:
        out = fn(out, t)
    return out


@op("Clip")
def _clip(i, a):
    low = i[1] if len(i) > 1 and i[1] is not None else a.get("min")
    high = i[2] if len(i) > 2 and i[2] is not None else a.get("max")
    low = float(low) if low is not None else None
    high = float(high) if high is not None else None
    return torch.clamp(i[0], low, high)


@op("Reshape")
def _reshape(i, a):
    x, shape = i[0], _ints(i[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[k] if s == 0 else s for k, s in enumerate(shape)]
    return x.reshape(shape)


def _axes(i, a) -> list[int] | None:
    if len(i) > 1 and i[1] is not None:
        return _ints(i[1])
    return a.get("axes")


@op("Squeeze")
def _squeeze(i, a):
    axes = _axes(i, a)
    if axes is None:
        return i[0].squeeze()
    return i[0].squeeze(tuple(ax % i[0].dim() for ax in axes))


@op("Unsqueeze")
def _unsqueeze(i, a):
    x = i[0]
    rank = x.dim() + len(_axes(i, a))
    for ax in sorted(ax % rank for ax in _axes(i, a)):
        x = x.unsqueeze(ax)
    return x


@op("Gather")
def _gather(i, a):
    x, idx = i[0], i[1].long()
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return x.index_select(axis, idx.reshape(-1)).reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


@op("Slice")
def _slice(i, a):
    x = i[0]
    starts, ends = _ints(i[1]), _ints(i[2])
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
    steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise OnnxTwinError("Slice with negative steps is not supported")
        size = x.shape[ax]
        s = max(0, min(size, s + size if s < 0 else s))
        e = max(0, min(size, e + size if e < 0 else e))
        index[ax] = slice(s, e, st)
    return x[tuple(index)]


@op("Pad")
def _pad(i, a):
    x = i[0]
    pads = _ints(i[1]) if len(i) > 1 else a["pads"]
    value = float(i[2]) if len(i) > 2 and i[2] is not None and i[2].numel() else a.get("value", 0.0)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    rank = x.dim()
    torch_pads = []
    for d in reversed(range(rank)):
        torch_pads += [pads[d], pads[d + rank]]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:  # torch pads at most the last dims
        torch_pads = torch_pads[:-2]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
    return F.pad(x, torch_pads, mode=mode, value=value) if mode == "constant" else F.pad(x, torch_pads, mode=mode)


def _reduce(fn):
    def run(i, a):
        axes = _axes(i, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None or len(axes) == 0:
            if a.get("noop_with_empty_axes", 0):
                return i[0]
            axes = list(range(i[0].dim()))
        return fn(i[0], tuple(ax % i[0].dim() for ax in axes), keep)

    return run


OPS["ReduceMean"] = _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k))
OPS["ReduceSum"] = _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k))
OPS["ReduceMax"] = _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k))
OPS["ReduceMin"] = _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k))
OPS["ReduceL2"] = _reduce(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k)))

# every floating type computes in float32 in the twin (a half- or double-precision export: its weights are
# read as float32 too), which keeps it differentiable on the CPU and its gradients unrounded
ONNX_TO_TORCH = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float32,
                 onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
                 onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.FLOAT16: torch.float32}


@op("Cast")
def _cast(i, a):
    return i[0].to(ONNX_TO_TORCH[a["to"]])


@op("Resize", "Upsample")
def _resize(i, a):
    x = i[0]
    mode = a.get("mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    sizes = i[3] if len(i) > 3 and i[3] is not None and i[3].numel() else None
    scales = i[2] if len(i) > 2 and i[2] is not None and i[2].numel() else (i[1] if len(i) == 2 else None)
    if mode != "nearest":
        raise OnnxTwinError(f"Resize mode {mode!r} is not supported (nearest only)")
    if sizes is not None:
        return F.interpolate(x, size=_ints(sizes)[2:], mode="nearest")
    return F.interpolate(x, scale_factor=[float(s) for s in scales.tolist()[2:]], mode="nearest")


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """An initializer or constant as the twin holds it: floating types as float32 (see ``ONNX_TO_TORCH``)."""
    return torch.from_numpy(array.astype(np.float32) if array.dtype in (np.float16, np.float64) else array.copy())


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            value = _as_tensor(numpy_helper.to_array(value))
        out[attr.name] = value
    return out


class OnnxModule(nn.Module):
    """The ONNX graph at ``path`` as a torch module (single input, one chosen output), frozen weights."""

    def __init__(self, path: Path | str, output_name: str | None = None, input_name: str | None = None) -> None:
        super().__init__()
        model = onnx.load(str(path))
        graph = model.graph
        missing = sorted({n.op_type for n in graph.node if n.op_type != "Constant"} - set(OPS))
        if missing:
            raise OnnxTwinError(f"{Path(path).name}: operators not supported by the torch twin: {', '.join(missing)}")
        inits = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in inits]
        self.input_name = input_name or inputs[0]
        if self.input_name not in inputs:
            raise OnnxTwinError(f"{Path(path).name} has no input {self.input_name!r} (it has {', '.join(inputs)})")
        outputs = [o.name for o in graph.output]
        self.output_name = output_name or outputs[0]
        produced = {name for node in graph.node for name in node.output}
        if self.output_name not in produced:  # any tensor a node computes may be read (e.g. logits before a softmax)
            raise OnnxTwinError(f"{Path(path).name} computes no tensor {self.output_name!r} "
                                f"(its outputs: {', '.join(outputs)})")
        # an export without a dynamic batch axis may hard-code its batch size (a Reshape to [1, -1]): the
        # twin then runs that many rows at a time, as onnxruntime does (service.defense.runtime.OnnxModel)
        tensor = next(i for i in graph.input if i.name == self.input_name).type.tensor_type
        dims = tensor.shape.dim
        self.fixed_batch = dims[0].dim_value if dims and dims[0].dim_value > 0 else None
        # a graph that computes in half precision (its input, or a weight, is FLOAT16) differs from this
        # float32 twin by its own rounding: ``rounding`` is its relative size, for the checks against it
        half = tensor.elem_type == onnx.TensorProto.FLOAT16 or any(
            t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
        self.rounding = float(np.finfo(np.float16).eps) if half else 0.0
        # a UINT8 input takes the pixels rounded (as ``OnnxModel`` feeds it); the twin rounds them too, with
        # the identity as the rounding's gradient (straight through), so that attacks and training see one
        self.rounds_input = tensor.elem_type == onnx.TensorProto.UINT8
        self._names: dict[str, str] = {}
        for k, t in enumerate(graph.initializer):
            buffer = f"w{k}"
            self.register_buffer(buffer, _as_tensor(numpy_helper.to_array(t)))
            self._names[t.name] = buffer
        self.constants: dict[str, torch.Tensor] = {}
        self.nodes = []
        for node in graph.node:
            attrs = _attributes(node)
            if node.op_type == "Constant":
                value = attrs.get("value")
                if value is None:
                    for key in ("value_float", "value_int"):
                        if key in attrs:
                            value = torch.tensor(attrs[key])
                    for key in ("value_floats", "value_ints"):
                        if key in attrs:
                            value = torch.tensor(attrs[key])
                self.constants[node.output[0]] = value
                continue
            self.nodes.append((node.op_type, list(node.input), list(node.output), attrs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.fixed_batch
        if b is None or len(x) == b:
            return self._run(x)
        parts = list(torch.split(x, b)) or [x[:0]]
        outs = []
        for part in parts:  # the last part padded with copies of its last row (an empty x: with zeros)
            fill = (part[-1:] if len(part) else x.new_zeros((1, *x.shape[1:]))).expand(b - len(part), *x.shape[1:])
            outs.append(self._run(torch.cat([part, fill]))[:len(part)])
        return torch.cat(outs)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.rounds_input:
            x = x + (torch.round(x.clamp(0, 255)) - x).detach()
        env: dict[str, Any] = {"": None, self.input_name: x, **self.constants}
        for name, buffer in self._names.items():
            env[name] = getattr(self, buffer)
        for op_type, inputs, outputs, attrs in self.nodes:
            result = OPS[op_type]([env[n] if n else None for n in inputs], attrs)
            if isinstance(result, tuple):
                for name, value in zip(outputs, result):
                    env[name] = value
            else:
                env[outputs[0]] = result
            if self.output_name in outputs:
                return env[self.output_name]
        return env[self.output_name]


def check_twin(twin: nn.Module, path: Path | str, x: np.ndarray, output_name: str | None = None,
               input_name: str | None = None) -> float:
    """max |twin(x) - onnxruntime(x)|; ``x`` as the model takes it."""
    from service.defense.runtime import CPU, OnnxModel

    with torch.no_grad():
        ours = twin(torch.from_numpy(np.ascontiguousarray(x, np.float32))).float().numpy()
    theirs = OnnxModel(Path(path), [CPU], input_name=input_name, output_name=output_name)(x)
    return float(np.abs(ours - theirs).max())
