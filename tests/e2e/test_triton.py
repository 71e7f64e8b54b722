"""The gateway with a real Triton Inference Server (2.5x, the one nvidia-pytriton ships; CPU) behind it, and
NVIDIA's own client, tritonclient, in front of its v2 front. Both run from .venv-triton (``make test``
makes it), in processes of their own.

Behind: Triton enforces the model config's ``max_batch_size`` and refuses FP16 as JSON; the gateway reads
both from the server and its decisions equal the core's. In front: tritonclient's JSON requests (which
carry no Content-Type) and binary ones, FP32 and FP16, get the answers ``/classify`` gives.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.defense.runtime import CPU, OnnxModel
from tests.conftest import SHIPPED_MNIST
from tests.e2e.upstreams import core_decisions, gateway_decisions, serve_mnist_and_half
from tests.procs import REPO, TRITON_PYTHON, start_gateway, start_triton

pytestmark = [
    pytest.mark.skipif(not (SHIPPED_MNIST / "manifest.json").exists(), reason="the shipped MNIST bundle is not built"),
    pytest.mark.skipif(not TRITON_PYTHON.exists(), reason=f"no Triton environment at {TRITON_PYTHON} (make test "
                       "makes .venv-triton: nvidia-pytriton, onnxruntime; or set TRITON_PYTHON)"),
]
MAX_BATCH = 8


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """Triton with ``mnist`` (the shipped classifier) and ``half`` (it in half precision throughout), each
    with ``max_batch_size`` 8."""
    proc, url = serve_mnist_and_half(tmp_path_factory.mktemp("triton"),
                                     lambda models: start_triton(models, max_batch=MAX_BATCH), "Triton (.venv-triton)")
    yield proc, url
    proc.stop()


def test_triton_itself_refuses_what_the_gateway_must_avoid(triton):
    """The server's own rules, which the gateway's discovery is there for: more rows than max_batch_size
    and FP16 as JSON numbers are refused; its metadata names it triton, with the binary data extension."""
    _, url = triton
    server = httpx.get(f"{url}/v2").json()
    assert server["name"] == "triton" and "binary_tensor_data" in server["extensions"]
    assert httpx.get(f"{url}/v2/models/mnist/config").json()["max_batch_size"] == MAX_BATCH
    rows = MAX_BATCH + 1
    over = {"name": "input", "datatype": "FP32", "shape": [rows, 1, 28, 28], "data": [0.5] * 784 * rows}
    answer = httpx.post(f"{url}/v2/models/mnist/infer", json={"inputs": [over]})
    assert answer.status_code == 400 and "batch" in answer.text
    as_json = {"name": "input", "datatype": "FP16", "shape": [1, 1, 28, 28], "data": [0.5] * 784}
    answer = httpx.post(f"{url}/v2/models/half/infer", json={"inputs": [as_json]})
    assert answer.status_code == 400 and "FP16" in answer.text


@pytest.mark.parametrize("model", ["mnist", "half"])
def test_the_gateway_in_front_of_triton_decides_as_the_core(triton, mnist, model):
    """100 test digits in one request: the gateway sends at most 8 rows per call (Triton's max_batch_size,
    from its model config) and, for the half-precision model, FP16 as binary data both ways; decisions equal
    the core's with the served model on the rows as sent."""
    server, url = triton
    x = mnist.test.x[:100]
    got, log = gateway_decisions(url, model, x)
    served = None  # the bundle's classifier
    if model == "half":
        assert "input FP16 (input and outputs as binary data: FP16 is refused as JSON)" in log
        served = OnnxModel(server.half, [CPU])  # casts the rows to FP16, as they were sent
    assert f"at most {MAX_BATCH} row(s) per call" in log
    assert got == core_decisions(x, served)
    assert sum(r for r, _ in got) < len(got)


def tritonclient(gateway: str, rows: Path, wire: str, datatype: str, outputs: str = "", version: str = "",
                 compression: str | None = None) -> dict:
    out = subprocess.run([str(TRITON_PYTHON), str(REPO / "tests" / "triton_client.py"), gateway.split("//", 1)[1],
                          "mnist", str(rows), wire, datatype, "--outputs", outputs, "--version", version,
                          *(("--compression", compression) if compression else ())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tritonclient_in_front_of_the_gateway(tmp_path, mnist):
    """tritonclient against the gateway's v2 front (embedded classifier): JSON requests (sent with no
    Content-Type) and binary ones, FP32 and FP16 inputs, all outputs or some, with and without a model
    version, with the body gzipped or deflated; the answers equal ``/classify``'s, and a bad shape is its 400 with the reason."""
    x = np.concatenate([mnist.test.x[:12], np.random.default_rng(0).uniform(size=(4, 1, 28, 28)).astype(np.float32)])
    rows = tmp_path / "rows.npy"
    np.save(rows, x)
    proc, gateway = start_gateway("--bundle", str(SHIPPED_MNIST))
    with proc, httpx.Client(base_url=gateway, timeout=60) as client:
        want = client.post("/classify", json={"inputs": x.tolist()}).json()["results"]
        want16 = client.post("/classify", json={"inputs": x.astype(np.float16).astype(np.float32).tolist()}).json()["results"]
        answers = {(wire, dt): tritonclient(gateway, rows, wire, dt) for wire in ("json", "binary")
                   for dt in ("FP32", "FP16")}
        some = tritonclient(gateway, rows, "json", "FP32", "rejected,label")
        versioned = tritonclient(gateway, rows, "binary", "FP32", version="1")
        compressed = {c: tritonclient(gateway, rows, "json", "FP32", compression=c) for c in ("gzip", "deflate")}
        bad = tmp_path / "bad.npy"
        np.save(bad, np.zeros((1, 3, 28, 28), np.float32))
        refused = tritonclient(gateway, bad, "binary", "FP32")
    for (wire, dt), got in answers.items():
        expected = want16 if dt == "FP16" else want
        assert "error" not in got, (wire, dt, got)
        assert got["ready"] and got["metadata"]["name"] == "mnist", (wire, dt)
        assert got["rejected"] == [r["rejected"] for r in expected], (wire, dt)
        assert got["label"] == [-1 if r["rejected"] else r["label"] for r in expected], (wire, dt)
        accepted = [i for i, r in enumerate(expected) if not r["rejected"]]
        np.testing.assert_allclose(np.asarray(got["probabilities"])[accepted],
                                   [expected[i]["probabilities"] for i in accepted], rtol=1e-5, atol=1e-7)
        assert got["parameters"]["rejected_count"] == sum(r["rejected"] for r in expected)
    assert any(r["rejected"] for r in want) and not all(r["rejected"] for r in want)  # noise rows rejected
    assert some["outputs"] == ["rejected", "label"] and some["label"] == answers["json", "FP32"]["label"]
    for coding, got in compressed.items():
        assert "error" not in got and got["label"] == answers["json", "FP32"]["label"], (coding, got)
    assert versioned["model_version"] == "1" and versioned["label"] == answers["json", "FP32"]["label"]
    assert versioned["server"]["name"] == "magnet-gateway" and "binary_tensor_data" in versioned["server"]["extensions"]
    assert refused["status"] == "400" and "expected [N, 1, 28, 28]" in refused["error"]
