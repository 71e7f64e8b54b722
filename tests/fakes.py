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
                          batch: int | str = "N") -> Path:
    """Three classes; logits = [sum(x), 8 - sum(x), 0] for x in [0, 1]: bright images -> 0, dark -> 1.

    The other arguments give the same classifier behind another input contract: it takes
    ``(x * scale - mean) / std`` in ``layout`` (tensor ``input_name``) and, with ``probabilities``,
    ends in a softmax. ``batch``: its first axis, named (dynamic) or a fixed size (an export without
    dynamic axes)."""
    k = std / scale  # undo the contract inside the model: x = (v * std + mean) / scale
    w = np.zeros((PIXELS, 3), np.float32)
    w[:, 0], w[:, 1] = k, -k
    offset = PIXELS * mean / scale
    b = np.array([offset, 8.0 - offset, 0.0], np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array([-1, PIXELS], np.int64), "flat")]
    nodes = [helper.make_node("Reshape", [input_name, "flat"], ["x"]),  # one channel: same order in NHWC
             helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["xw", "b"], ["scores" if probabilities else "logits"])]
    if probabilities:
        nodes.append(helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1))
    shape = [SHAPE[1], SHAPE[2], SHAPE[0]] if layout == "NHWC" else list(SHAPE)
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, *shape])],
        [helper.make_tensor_value_info("probabilities" if probabilities else "logits", TensorProto.FLOAT, [batch, 3])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_bundle(directory: Path, detectors: list[dict] | None = None, reformer: str = "half.onnx",
                members: int = 1, thresholds: list[float] | None = None, contract: dict | None = None,
                classifier_batch: int | str = "N") -> Path:
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
                          input_name=contract.get("name") or "input", batch=classifier_batch)
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
