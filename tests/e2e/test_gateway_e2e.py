"""The gateway and a real KServe model server as separate processes on free ports.

The gateway's decisions on MNIST test digits must equal the defense core's, computed in this process
on the same bundle: the numbers we publish are the numbers the gateway serves.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from service.defense import Defense
from tests import fakes
from tests.conftest import SHIPPED_MNIST
from tests.procs import free_port, start_gateway, start_model_server, url_of

pytestmark = pytest.mark.skipif(not (SHIPPED_MNIST / "manifest.json").exists(),
                                reason="the shipped MNIST bundle is not built")
N_COMPARE = 1000


@pytest.fixture(scope="module")
def model_server():
    proc, url = start_model_server(SHIPPED_MNIST / "classifier.onnx", "mnist")
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def gateway(model_server):
    proc, url = start_gateway("--bundle", str(SHIPPED_MNIST), "--upstream", model_server)
    with httpx.Client(base_url=url, timeout=30) as client:
        client.operator_url = proc.operator_url
        yield client
    proc.stop()


def classify(client, payload):
    r = client.post("/classify", json=payload)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def core_decisions(defense, x):
    verdict = defense.inspect(x)
    labels = defense.classifier(verdict.reformed).argmax(1)
    return [(False, int(l)) if ok else (True, None) for ok, l in zip(verdict.accepted, labels)]


def test_gateway_decisions_equal_the_core_on_1000_test_digits(gateway, mnist):
    defense = Defense(SHIPPED_MNIST, device="cpu")
    x, y = mnist.test.x[:N_COMPARE], mnist.test.y[:N_COMPARE]
    served = []
    for i in range(0, N_COMPARE, 100):
        served += [(r["rejected"], r["label"]) for r in classify(gateway, {"inputs": x[i : i + 100].tolist()})]
    assert served == core_decisions(defense, x)
    correct = np.mean([not rej and label == t for (rej, label), t in zip(served, y)])
    assert correct >= 0.98  # 0.9924 over all 10,000 (docs/results/mnist-bundle.md)


def test_uniform_noise_is_rejected(gateway):
    noise = np.random.default_rng(0).uniform(size=(20, 28, 28)).astype(np.float32)
    assert all(r["rejected"] for r in classify(gateway, {"inputs": noise.tolist()}))


def test_binary_v2_request_and_answer_match_json(gateway, mnist):
    """The OIP binary data extension through the real gateway process: same decisions as JSON."""
    import json

    x = mnist.test.x[:16]
    raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    r = gateway.post("/v2/models/mnist/infer", content=header + raw,
                     headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    outputs = json.loads(r.content[:n])["outputs"]
    sizes = [o["parameters"]["binary_data_size"] for o in outputs]
    assert [o["name"] for o in outputs] == ["probabilities", "label", "rejected"] and sum(sizes) == len(r.content) - n
    labels = np.frombuffer(r.content[n + sizes[0]: n + sizes[0] + sizes[1]], "<i8")
    as_json = gateway.post("/v2/models/mnist/infer", json={"inputs": [{"name": "input", "datatype": "FP32",
                                                                        "shape": list(x.shape),
                                                                        "data": x.ravel().tolist()}]}).json()
    assert labels.tolist() == next(o for o in as_json["outputs"] if o["name"] == "label")["data"]


def test_binary_upstream_to_the_real_kserve_server_gives_the_same_decisions(gateway, model_server, mnist):
    """MAGNET_UPSTREAM_BINARY: the gateway speaks the OIP binary data extension to KServe's server."""
    x = mnist.test.x[:64]
    proc, url = start_gateway("--bundle", str(SHIPPED_MNIST), "--upstream", model_server,
                              env={"MAGNET_UPSTREAM_BINARY": "true"})
    with proc, httpx.Client(base_url=url, timeout=30) as binary:
        got = classify(binary, {"inputs": x.tolist()})
    want = classify(gateway, {"inputs": x.tolist()})
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert [r["rejected"] for r in got] == [r["rejected"] for r in want]
    for a, b in zip(got, want):
        if a["probabilities"] is not None:
            assert np.allclose(a["probabilities"], b["probabilities"], atol=1e-6)


def test_png_upload_gives_the_same_answer_as_floats(gateway, mnist):
    digit = mnist.test.x[0, 0]
    buf = io.BytesIO()
    Image.fromarray(np.round(digit * 255).astype(np.uint8)).save(buf, format="PNG")
    via_png = classify(gateway, {"images": [base64.b64encode(buf.getvalue()).decode()]})[0]
    via_floats = classify(gateway, {"inputs": digit.tolist()})[0]
    assert via_png == via_floats and via_png["label"] == mnist.test.y[0]


def test_bad_input_keeps_the_gateway_serving(gateway, mnist):
    assert gateway.post("/classify", content=b"[", headers={"Content-Type": "application/json"}).status_code == 400
    assert gateway.post("/classify", json={"inputs": [[2.0] * 28] * 28}).status_code == 400
    assert classify(gateway, {"inputs": mnist.test.x[:1].tolist()})[0]["label"] == mnist.test.y[0]


def test_metrics_count_what_was_served(gateway):
    classify(gateway, {"inputs": np.ones((3, 28, 28)).tolist()})
    assert gateway.get("/metrics").status_code == 404  # operator endpoints are not on the API port
    text = httpx.get(f"{gateway.operator_url}/metrics").text
    assert 'magnet_inputs_total{decision="rejected"}' in text
    rejected = float(text.split('magnet_inputs_total{decision="rejected"} ')[1].split()[0])
    assert rejected >= 3


def test_embedded_default_serves_the_shipped_bundle(mnist):
    proc, url = start_gateway()  # no bundle, no upstream: the shipped MNIST bundle, in-process
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            ready = client.get("/readyz").json()
            assert ready["bundle"] == "mnist" and ready["upstream"].startswith("embedded")
            results = classify(client, {"inputs": mnist.test.x[:50].tolist()})
        labels = [r["label"] for r in results]
        assert np.mean(np.array(labels, dtype=object) == mnist.test.y[:50]) >= 0.96
    finally:
        proc.stop()


def test_upstream_down_gives_503_and_not_ready(mnist):
    # nothing listens on the upstream's port, so the gateway is live but not ready
    proc, url = start_gateway("--upstream", url_of(free_port()), ready_path="/healthz")
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/readyz").status_code == 503
            r = client.post("/classify", json={"inputs": mnist.test.x[:1].tolist()})  # accepted digit
            assert r.status_code == 503 and "unreachable" in r.json()["error"]
            assert client.get("/healthz").status_code == 200
    finally:
        proc.stop()


def adversarial_set(bundle, data, per_attack, names):
    """Adversarial examples from the evaluation's own attacks against the bundle's classifier."""
    from training.evaluate.attacks import registry
    from training.from_onnx import torch_twin

    defense = Defense(bundle, device="cpu")
    m = defense.manifest
    twin = torch_twin(defense.classifier_file, m.dataset, "classifier", m.input.shape)
    attacks = registry(m.dataset)
    xs, ys = [], []
    for k, name in enumerate(names):
        sl = slice(k * per_attack, (k + 1) * per_attack)
        x, y = data.test.x[sl], data.test.y[sl]
        xs.append(attacks[name](twin, x, y))
        ys.append(y)
    return defense, np.concatenate(xs), np.concatenate(ys)


def test_gateway_decisions_equal_the_core_on_210_adversarial_digits(gateway, mnist):
    defense, x, y = adversarial_set(SHIPPED_MNIST, mnist, 70, ["deepfool", "iterative_l2_eps1", "fgsm_eps0.01"])
    served = []
    for i in range(0, len(x), 70):
        served += [(r["rejected"], r["label"]) for r in classify(gateway, {"inputs": x[i : i + 70].tolist()})]
    assert served == core_decisions(defense, x)
    rejected = np.array([rej for rej, _ in served])
    wrong = np.array([not rej and label != t for (rej, label), t in zip(served, y)])
    plain = defense.classifier(x).argmax(1)
    # the set exercises all three outcomes: fooled undefended, rejected, and reformed
    assert (plain != y).mean() > 0.3 and rejected.any() and (~rejected).any(), (plain != y).mean()
    assert wrong.mean() < 0.1


def test_a_model_server_with_a_fixed_batch_of_one_gets_one_row_per_call(tmp_path, mnist):
    """A classifier exported without a dynamic batch axis, behind KServe's server (which refuses any other
    batch size): the gateway reads the fixed size from the model's metadata and sends one row per call,
    with the same decisions as the core; the server's metadata says 1, and a batch of 2 is refused there."""
    import onnx

    model = onnx.load(str(SHIPPED_MNIST / "classifier.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(model, str(fixed))
    server, server_url = start_model_server(fixed, "mnist")
    with server:
        meta = httpx.get(f"{server_url}/v2/models/mnist").json()
        assert meta["inputs"][0]["shape"][0] == 1
        two = httpx.post(f"{server_url}/v2/models/mnist/infer", json={"inputs": [
            {"name": meta["inputs"][0]["name"], "shape": [2, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 1568}]})
        assert two.status_code >= 400
        proc, url = start_gateway("--bundle", str(SHIPPED_MNIST), "--upstream", server_url)
        with proc, httpx.Client(base_url=url, timeout=30) as client:
            x = mnist.test.x[:24]
            got = classify(client, {"inputs": x.tolist()})
            assert "exactly 1 row(s) per call" in proc.log_text()
    want = core_decisions(Defense(SHIPPED_MNIST, device="cpu"), x)
    assert [(r["rejected"], r["label"]) for r in got] == want


def test_a_model_server_that_takes_uint8_pixels_gets_them(tmp_path, mnist):
    """A classifier that takes UINT8 pixels (its own Cast and /255 inside), behind KServe's server, which
    refuses any other datatype: the gateway reads UINT8 from the model's metadata and sends the reformed
    rows as rounded 8-bit pixels (MAGNET_UPSTREAM_SCALE=255); its decisions equal the core's with the
    classifier on those rounded pixels."""
    import onnx
    from onnx import TensorProto

    model = fakes.with_input_of(SHIPPED_MNIST / "classifier.onnx", TensorProto.UINT8, 255.0)
    u8 = tmp_path / "u8.onnx"
    onnx.save(model, str(u8))
    server, server_url = start_model_server(u8, "mnist")
    with server:
        assert httpx.get(f"{server_url}/v2/models/mnist").json()["inputs"][0]["datatype"] == "UINT8"
        proc, url = start_gateway("--bundle", str(SHIPPED_MNIST), "--upstream", server_url,
                                  env={"MAGNET_UPSTREAM_SCALE": "255"})
        with proc, httpx.Client(base_url=url, timeout=30) as client:
            x = mnist.test.x[:48]
            got = classify(client, {"inputs": x.tolist()})
            assert "input UINT8" in proc.log_text()
    defense = Defense(SHIPPED_MNIST, device="cpu")
    verdict = defense.inspect(x)
    labels = defense.classifier(np.rint(verdict.reformed * 255) / 255).argmax(1)
    assert [(r["rejected"], r["label"]) for r in got] == [
        (False, int(l)) if ok else (True, None) for ok, l in zip(verdict.accepted, labels)]


@pytest.mark.parametrize("throughout, binary", [(False, False), (False, True), (True, False)])
def test_a_model_server_that_takes_half_precision_gets_it(tmp_path, mnist, throughout, binary):
    """A classifier with an FP16 input (a Cast in front, or half precision throughout: weights and output
    FP16 too), behind KServe's server, which refuses any other datatype and FP16 as JSON: the gateway reads
    the datatypes from the model's metadata and sends the reformed rows as FP16, two bytes each with the
    binary extension even when it is not asked, and asks an FP16 output as binary data; its decisions equal
    the core's with the classifier on those rounded values."""
    import onnx
    from onnx import TensorProto

    half = tmp_path / "half.onnx"
    if throughout:
        fakes.in_half_precision(SHIPPED_MNIST / "classifier.onnx", half)
    else:
        onnx.save(fakes.with_input_of(SHIPPED_MNIST / "classifier.onnx", TensorProto.FLOAT16), str(half))
    server, server_url = start_model_server(half, "mnist")
    with server:
        meta = httpx.get(f"{server_url}/v2/models/mnist").json()
        assert meta["inputs"][0]["datatype"] == "FP16"
        assert meta["outputs"][0]["datatype"] == ("FP16" if throughout else "FP32")
        env = {"MAGNET_UPSTREAM_BINARY": "true"} if binary else {}
        proc, url = start_gateway("--bundle", str(SHIPPED_MNIST), "--upstream", server_url, env=env)
        with proc, httpx.Client(base_url=url, timeout=30) as client:
            x = mnist.test.x[:48]
            got = classify(client, {"inputs": x.tolist()})
            log = proc.log_text()
    assert "input FP16" in log
    forced = "input and outputs" if throughout else "input"
    assert (f"({forced} as binary data: FP16 is refused as JSON)" in log) == (not binary)
    from service.defense.runtime import CPU, OnnxModel

    defense = Defense(SHIPPED_MNIST, device="cpu")
    verdict = defense.inspect(x)
    labels = OnnxModel(half, [CPU])(verdict.reformed).argmax(1)  # the served model, on FP16-cast rows
    assert [(r["rejected"], r["label"]) for r in got] == [
        (False, int(l)) if ok else (True, None) for ok, l in zip(verdict.accepted, labels)]
