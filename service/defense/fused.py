"""One onnxruntime graph per pool member: the member's autoencoders, the clipped reformed output and,
when the classifier runs in the gateway, the classifier on what the member needs, all in one call.

On a GPU, separate sessions copy each autoencoder's output to the host and the reformed batch back to
the device for the classifier, and each call pays its own launch and synchronisation; one graph per
member copies the input in once and the outputs out once. The scores and decisions stay in numpy, on
the autoencoders' outputs, exactly as with separate sessions.

The graph is built when the gateway loads the bundle, with the ``onnx`` package (in the ``gpu`` extra):

- input ``x``: N x C x H x W float32 in [0, 1], what the autoencoders take;
- ``ae_<k>``: the member's k-th distinct autoencoder on ``x`` (``FusedMember.outputs`` maps files to
  these names);
- ``reformed``: Clip(reformer(x), 0, 1);
- with the classifier: ``logits``, the classifier (its input contract applied in the graph: scale, mean,
  std, layout) on ``concat(x, reformed)`` (2N rows) when a divergence detector needs both, else on
  ``reformed`` (N rows).

Every graph is checked against the separate sessions on a few random inputs when it is built; one that
differs by more than ``TOLERANCE`` is not used (the gateway logs why and keeps the separate sessions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.defense.contract import ClassifierInput
from service.defense.runtime import CPU, chunk_rows

TOLERANCE = 1e-4  # largest |fused - separate| accepted on the check inputs (CPU: expected 0)


class FusionError(RuntimeError):
    """The member's graphs cannot be fused (a missing ``onnx`` package, mismatched opsets, a failed check)."""


def fuse_member(autoencoders: list[Path], reformer: Path, classifier: Path | None = None,
                contract: ClassifierInput | None = None, classifier_output: str | None = None,
                both_rows: bool = False) -> bytes:
    """The serialized fused model of one member (see the module); ``autoencoders`` lists the member's
    distinct autoencoder files in the order of their ``ae_<k>`` outputs, ``reformer`` among them."""
    try:
        import onnx
        from onnx import compose, helper, numpy_helper
    except ImportError as e:
        raise FusionError("fusing graphs needs the onnx package (pip install 'magnet-defense[gpu]')") from e
    if reformer not in autoencoders:
        raise FusionError(f"the reformer {reformer.name} is not among the member's autoencoders")
    parts = [(f"a{k}_", onnx.load(str(p))) for k, p in enumerate(autoencoders)]
    if classifier is not None:
        parts.append(("c_", onnx.load(str(classifier))))
        graph = parts[-1][1].graph
        tensor = next(i for i in graph.input if i.name not in {t.name for t in graph.initializer}).type.tensor_type
        dims = tensor.shape.dim
        if dims and dims[0].dim_value > 0:  # the fused graph feeds it N or 2N rows in one call
            raise FusionError(f"the classifier {classifier.name} takes a fixed batch of {dims[0].dim_value}")
        if tensor.elem_type != onnx.TensorProto.FLOAT:  # the fused graph feeds it the reformed float32 rows
            raise FusionError(f"the classifier {classifier.name} takes "
                              f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}, not FLOAT")
    parts = _same_opset(parts)
    nodes, inits, outputs = [], [], []

    def take(prefix: str, model, source: str, output_name: str | None = None):
        """Add ``model``'s nodes with names prefixed, its (only used) input fed from ``source``; returns the
        chosen output's value info in the fused graph."""
        g = compose.add_prefix(model, prefix).graph
        graph_input = next(i.name for i in g.input if i.name not in {t.name for t in g.initializer})
        for node in g.node:
            node.input[:] = [source if name == graph_input else name for name in node.input]
        nodes.extend(g.node)
        inits.extend(g.initializer)
        wanted = prefix + output_name if output_name is not None else g.output[0].name
        for info in g.output:
            if info.name == wanted:
                return info
        raise FusionError(f"the model has no output {output_name!r}")

    def output(info, name: str, rows: str | None = None) -> None:
        """Expose ``info``'s tensor as ``name`` (with ``rows`` as its first dimension's name when given)."""
        nodes.append(helper.make_node("Identity", [info.name], [name]))
        out = onnx.ValueInfoProto()
        out.CopyFrom(info)
        out.name = name
        if rows is not None and len(out.type.tensor_type.shape.dim):
            out.type.tensor_type.shape.dim[0].dim_param = rows
        outputs.append(out)

    first = parts[0][1]
    x_info = onnx.ValueInfoProto()
    x_info.CopyFrom(next(i for i in first.graph.input if i.name not in {t.name for t in first.graph.initializer}))
    x_info.name = "x"
    ae_out = {}
    for k, (prefix, model) in enumerate(parts[: len(autoencoders)]):
        ae_out[autoencoders[k]] = take(prefix, model, "x")
        output(ae_out[autoencoders[k]], f"ae_{k}")
    inits += [numpy_helper.from_array(np.array(0.0, np.float32), "fused_zero"),
              numpy_helper.from_array(np.array(1.0, np.float32), "fused_one")]
    nodes.append(helper.make_node("Clip", [ae_out[reformer].name, "fused_zero", "fused_one"], ["fused_clipped"]))
    clipped = onnx.ValueInfoProto()
    clipped.CopyFrom(x_info)
    clipped.name = "fused_clipped"
    output(clipped, "reformed")
    if classifier is not None:
        source = "reformed"
        if both_rows:
            nodes.append(helper.make_node("Concat", ["x", "reformed"], ["fused_both"], axis=0))
            source = "fused_both"
        source = _contract_nodes(contract or ClassifierInput(), source, nodes, inits, helper, numpy_helper)
        scores = take("c_", parts[-1][1], source, classifier_output)
        rank = len(scores.type.tensor_type.shape.dim)
        if rank not in (0, 2):  # the fused graph's logits are N x K (0: a shape the graph does not say)
            raise FusionError(f"the classifier {classifier.name} outputs rank-{rank} scores, not N x K")
        output(scores, "logits", rows="logit_rows")
    graph = helper.make_graph(nodes, "magnet_member", [x_info], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(first.opset_import),
                              ir_version=max(m.ir_version for _, m in parts), producer_name="magnet-gateway")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise FusionError(f"the fused graph is not valid ONNX: {e}") from e
    return model.SerializeToString()


def _same_opset(parts: list) -> list:
    """The models on one opset: those on an older default-domain opset are converted up to the newest
    (``onnx.version_converter``); other domains must agree as they are."""
    from onnx import version_converter

    def default(m) -> int:
        return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)

    others = {tuple(sorted((o.domain, o.version) for o in m.opset_import if o.domain not in ("", "ai.onnx")))
              for _, m in parts}
    if len(others) != 1:
        raise FusionError(f"the member's graphs import different operator domains ({sorted(others)})")
    target = max(default(m) for _, m in parts)
    out = []
    for prefix, m in parts:
        if default(m) != target:
            try:
                m = version_converter.convert_version(m, target)
            except Exception as e:  # the converter raises several kinds; any means: not fused
                raise FusionError(f"cannot bring a graph from opset {default(m)} to {target}: {e}") from e
        out.append((prefix, m))
    return out


def _contract_nodes(contract: ClassifierInput, source: str, nodes: list, inits: list, helper, numpy_helper) -> str:
    """Nodes applying ``contract`` (scale, mean, std, layout) to ``source``; returns the output's name."""
    def constant(name: str, values) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values, np.float32), name))
        return name

    if contract.scale != 1.0:
        nodes.append(helper.make_node("Mul", [source, constant("fused_scale", contract.scale)], ["fused_scaled"]))
        source = "fused_scaled"
    if contract.mean is not None:
        mean = constant("fused_mean", np.asarray(contract.mean, np.float32).reshape(1, -1, 1, 1))
        nodes.append(helper.make_node("Sub", [source, mean], ["fused_centred"]))
        source = "fused_centred"
    if contract.std is not None:
        std = constant("fused_std", np.asarray(contract.std, np.float32).reshape(1, -1, 1, 1))
        nodes.append(helper.make_node("Div", [source, std], ["fused_normalised"]))
        source = "fused_normalised"
    if contract.layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [source], ["fused_nhwc"], perm=[0, 2, 3, 1]))
        source = "fused_nhwc"
    return source


class FusedMember:
    """A member's fused graph in one onnxruntime session: ``member(x)`` -> {output name: array};
    ``outputs`` maps each autoencoder (its manifest path) to its output's name."""

    def __init__(self, session, autoencoders: list[str]) -> None:
        self.session = session
        self.outputs = {path: f"ae_{k}" for k, path in enumerate(autoencoders)}
        self.names = [o.name for o in session.get_outputs()]
        self.has_logits = "logits" in self.names
        self._on_cpu = session.get_providers()[0] == CPU

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        rows = chunk_rows(self._on_cpu, x)
        if len(x) <= rows:
            return dict(zip(self.names, self.session.run(self.names, {"x": x})))
        parts = [self.session.run(self.names, {"x": x[i:i + rows]}) for i in range(0, len(x), rows)]
        out = {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(self.names)}
        if self.has_logits and len(out["logits"]) == 2 * len(x):  # each chunk's logits are [x_i; reformed_i]
            k, sizes = self.names.index("logits"), [len(p[0]) for p in parts]
            out["logits"] = np.concatenate([p[k][:n] for p, n in zip(parts, sizes)]
                                           + [p[k][n:] for p, n in zip(parts, sizes)])
        return out
