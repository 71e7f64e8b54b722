"""Tiny hand-made bundles: 1 x 4 x 4 inputs, affine 'autoencoders' and a linear classifier.

Their outputs can be computed by hand, so tests can check the core's and the gateway's arithmetic.
``make_client`` serves a bundle in-process in front of a ``RecordingUpstream``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.defense import Defense
from service.defense.bundle import FileEntry, Manifest, sha256_of, write_manifest
from service.settings import Settings

SHAPE = (1, 4, 4)
PIXELS = 16


def _save(path: Path, nodes: list, inits: list, out_name: str, out_shape: list) -> None:
    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *SHAPE])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", *out_shape])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def affine_autoencoder(path: Path, scale: float, shift: float) -> Path:
    """ae(x) = scale * x + shift."""
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "scale"),
             numpy_helper.from_array(np.array(shift, np.float32), "shift")]
    nodes = [helper.make_node("Mul", ["input", "scale"], ["scaled"]),
             helper.make_node("Add", ["scaled", "shift"], ["output"])]
    _save(path, nodes, inits, "output", list(SHAPE))
    return path


def brightness_classifier(path: Path, layout: str = "NCHW", scale: float = 1.0, mean: float = 0.0,
                          std: float = 1.0, probabilities: bool = False, input_name: str = "input",
                          batch: int | str = "N", elem_type: int = TensorProto.FLOAT, head: bool = False) -> Path:
    """Three classes; logits = [sum(x), 8 - sum(x), 0] for x in [0, 1]: bright images -> 0, dark -> 1.

    The other arguments give the same classifier behind another input contract: it takes
    ``(x * scale - mean) / std`` in ``layout`` (tensor ``input_name``) and, with ``probabilities``,
    ends in a softmax. ``batch``: its first axis, named (dynamic) or a fixed size (an export without
    dynamic axes). ``elem_type``: its input's element type (cast to float inside); FLOAT16 and DOUBLE give
    outputs of that type too, as a half- or double-precision export does. ``head``: the scores come out as
    N x 3 x 1 x 1, as a 1x1-convolution head without a flatten gives them."""
    k = std / scale  # undo the contract inside the model: x = (v * std + mean) / scale
    w = np.zeros((PIXELS, 3), np.float32)
    w[:, 0], w[:, 1] = k, -k
    offset = PIXELS * mean / scale
    b = np.array([offset, 8.0 - offset, 0.0], np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array([-1, PIXELS], np.int64), "flat")]
    cast = elem_type != TensorProto.FLOAT
    out_type = elem_type if elem_type in (TensorProto.FLOAT16, TensorProto.DOUBLE) else TensorProto.FLOAT
    out_name = "probabilities" if probabilities else "logits"
    nodes = [helper.make_node("Cast", [input_name], ["as_float"], to=TensorProto.FLOAT)] if cast else []
    nodes += [helper.make_node("Reshape", ["as_float" if cast else input_name, "flat"], ["x"]),  # NHWC alike
              helper.make_node("MatMul", ["x", "w"], ["xw"]),
              helper.make_node("Add", ["xw", "b"], ["scores" if probabilities else "logits_f"])]
    if probabilities:
        nodes.append(helper.make_node("Softmax", ["scores"], ["logits_f"], axis=1))
    nodes.append(helper.make_node("Cast", ["logits_f"], ["scores_flat" if head else out_name], to=out_type))
    if head:
        inits.append(numpy_helper.from_array(np.array([-1, 3, 1, 1], np.int64), "head_shape"))
        nodes.append(helper.make_node("Reshape", ["scores_flat", "head_shape"], [out_name]))
    shape = [SHAPE[1], SHAPE[2], SHAPE[0]] if layout == "NHWC" else list(SHAPE)
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info(input_name, elem_type, [batch, *shape])],
        [helper.make_tensor_value_info(out_name, out_type, [batch, 3, 1, 1] if head else [batch, 3])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def in_half_precision(path: Path, out: Path) -> Path:
    """``path``'s graph in half precision throughout, as a float16 conversion gives: its float weights and
    constants, its input and its outputs FLOAT16."""
    model = onnx.load(str(path))
    graph = model.graph

    def half(t: onnx.TensorProto) -> None:
        array = numpy_helper.to_array(t)
        if array.dtype == np.float32:
            t.CopyFrom(numpy_helper.from_array(array.astype(np.float16), t.name))

    for t in graph.initializer:
        half(t)
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.HasField("t"):
                half(attr.t)
    for value in (*graph.input, *graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del graph.value_info[:]
    onnx.save(model, str(out))
    return out


def with_input_of(model_file: Path, elem_type: int, scale: float | None = None) -> onnx.ModelProto:
    """The classifier behind an input of another element type: a Cast to FLOAT in front (and a division by
    ``scale``), as a model with its own preprocessing (UINT8 pixels) has."""
    model = onnx.load(str(model_file))
    graph = model.graph
    name = graph.input[0].name
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    graph.input[0].name = "as_float"
    for node in graph.node:
        node.input[:] = ["as_float" if i == name else i for i in node.input]
    if scale is None:
        graph.node.insert(0, helper.make_node("Cast", [name], ["as_float"], to=TensorProto.FLOAT))
    else:
        graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), "in_scale"))
        graph.node.insert(0, helper.make_node("Div", ["in_float", "in_scale"], ["as_float"]))
        graph.node.insert(0, helper.make_node("Cast", [name], ["in_float"], to=TensorProto.FLOAT))
    graph.input.remove(graph.input[0])
    graph.input.insert(0, helper.make_tensor_value_info(name, elem_type, dims))
    return model


def with_spatial_head(model_file: Path) -> onnx.ModelProto:
    """The classifier with its scores reshaped to N x K x 1 x 1 at the end, as a 1x1-convolution head
    without a flatten gives them."""
    model = onnx.load(str(model_file))
    graph = model.graph
    out = graph.output[0]
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    for node in graph.node:
        node.output[:] = ["flat_scores" if o == out.name else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.array([-1, dims[1], 1, 1], np.int64), "head_shape"))
    graph.node.append(helper.make_node("Reshape", ["flat_scores", "head_shape"], [out.name]))
    graph.output.remove(out)
    graph.output.insert(0, helper.make_tensor_value_info(out.name, out.type.tensor_type.elem_type, [dims[0], dims[1], 1, 1]))
    return model


def make_bundle(directory: Path, detectors: list[dict] | None = None, reformer: str = "half.onnx",
                members: int = 1, thresholds: list[float] | None = None, contract: dict | None = None,
                classifier_batch: int | str = "N", classifier_type: int = TensorProto.FLOAT,
                classifier_head: bool = False) -> Path:
    """A bundle whose 'half' autoencoder is ae(x) = 0.5 x + 0.25 and 'steep' is ae(x) = 2 x - 0.5.

    The default detector 'R' (reconstruction, p=1, threshold 0.1) accepts x = 0.5 everywhere (score 0)
    and rejects all-black or all-white images (score 0.25). ``thresholds`` gives member k's detectors
    the threshold ``thresholds[k]`` instead, so members can be told apart by what they reject.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    affine_autoencoder(directory / "half.onnx", 0.5, 0.25)
    affine_autoencoder(directory / "steep.onnx", 2.0, -0.5)
    # ``contract``: the classifier's input contract in the manifest (layout, scale, mean, std, name) and
    # "output"; the classifier file is built to take exactly that
    contract = dict(contract or {})
    output = contract.pop("output", "logits")
    brightness_classifier(directory / "classifier.onnx", layout=contract.get("layout", "NCHW").upper(),
                          scale=contract.get("scale", 1.0), mean=(contract.get("mean") or [0.0])[0],
                          std=(contract.get("std") or [1.0])[0], probabilities=output == "probabilities",
                          input_name=contract.get("name") or "input", batch=classifier_batch,
                          elem_type=classifier_type, head=classifier_head)
    if detectors is None:
        detectors = [{"name": "R", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 1,
                      "fpr": 0.01, "threshold": 0.1}]
    roles = {"half.onnx": "autoencoder", "steep.onnx": "autoencoder", "classifier.onnx": "classifier"}
    manifest = Manifest(
        name="toy", dataset="toy", input={"shape": SHAPE},
        files=[FileEntry(path=f, sha256=sha256_of(directory / f), role=r) for f, r in roles.items()],
        classifier={"file": "classifier.onnx", "classes": ["bright", "dark", "never"], "output": output,
                    "input": contract},
        members=[{"name": f"m{i}", "reformer": reformer,
                  "detectors": [{**d, "threshold": thresholds[i]} for d in detectors] if thresholds else detectors}
                 for i in range(len(thresholds) if thresholds else members)],
    )
    write_manifest(directory, manifest)
    return directory


def images(*values: float) -> np.ndarray:
    """One constant 1 x 4 x 4 image per value."""
    return np.stack([np.full(SHAPE, v, np.float32) for v in values])


class RecordingUpstream:
    """Wraps the toy classifier; records each batch and can be told to fail."""

    outputs = "logits"

    def __init__(self, defense, fail=None, outputs="logits"):
        self.defense, self.fail, self.batches, self.outputs = defense, fail, [], outputs

    def describe(self):
        return "recording fake"

    async def start(self):
        pass

    async def close(self):
        pass

    async def ready(self):
        return self.fail is None

    async def infer(self, x):
        self.batches.append(x.copy())
        if self.fail:
            raise self.fail
        logits = self.defense.classifier(x)
        if self.outputs == "probabilities":
            e = np.exp(logits - logits.max(1, keepdims=True))
            return e / e.sum(1, keepdims=True)
        return logits


def make_client(bundle, fail=None, outputs="logits", **settings):
    """A TestClient of the gateway on ``bundle`` (settings as keywords) and its RecordingUpstream."""
    defense = Defense(bundle, device="cpu")
    upstream = RecordingUpstream(defense, fail, outputs)
    app = create_app(Settings(bundle=bundle, **settings), defense=defense, upstream=upstream,
                     registry=CollectorRegistry())
    return TestClient(app), upstream


async def against_fake_server(routes: list[tuple[str, str, object]], make_upstream, body):
    """Run ``body(upstream)`` with ``make_upstream(base_url)`` started against an in-process aiohttp
    server that answers ``routes`` ((method, path, handler) triples); everything is closed afterwards."""
    from aiohttp import web

    from tests.procs import url_of

    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # the OS picks the port as it binds: no race
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    upstream = make_upstream(url_of(port))
    await upstream.start()
    try:
        return await body(upstream)
    finally:
        await upstream.close()
        await runner.cleanup()


def operator_get(client, path: str = "/metrics"):
    """GET ``path`` on the operator port of an in-process gateway (the API port answers 404 there)."""
    port = client.app.state.gateway.settings.operator_port
    return client.get(f"http://testserver:{port}{path}")


def json_bytes(payload) -> bytes:
    import json

    return json.dumps(payload).encode()
