"""End-to-end tests of docker/kserve/serve_onnx.py: a real KServe v2 server in a subprocess."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.procs import ManagedProcess, start_on_free_port

ROOT = Path(__file__).resolve().parents[2]
SERVER = ROOT / "docker" / "kserve" / "serve_onnx.py"
MODEL_FILE = ROOT / "models" / "mnist" / "classifier.onnx"
MODEL_NAME = "mnist"

pytestmark = pytest.mark.skipif(
    not MODEL_FILE.exists(),
    reason=f"{MODEL_FILE.relative_to(ROOT)} not built yet (run the MNIST training/export)")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Start the server on a free port (gRPC disabled); yield its base URL; stop its group."""
    proc: ManagedProcess
    proc, base = start_on_free_port(lambda port: [sys.executable, SERVER, "--model-file", MODEL_FILE, "--model-name",
                                                  MODEL_NAME, "--http-port", str(port), "--workers", "1"],
                                    "/v2/health/ready", timeout=30.0)
    print(f"serve_onnx.py ready after {proc.startup_s:.2f} s (pid {proc.pid})")
    try:
        yield base
    finally:
        proc.stop()


def _infer_body(x: np.ndarray, name: str = "input", datatype: str = "FP32",
                shape: List[int] | None = None) -> Dict[str, Any]:
    return {"inputs": [{"name": name, "shape": list(x.shape) if shape is None else shape,
                        "datatype": datatype, "data": x.ravel().tolist()}]}


def test_health_and_metadata(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10.0) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get(f"/v2/models/{MODEL_NAME}/ready").status_code == 200
        meta = client.get(f"/v2/models/{MODEL_NAME}")
        assert meta.status_code == 200
        body = meta.json()
        assert body["name"] == MODEL_NAME
        assert body["inputs"][0]["datatype"] == "FP32"
        assert body["inputs"][0]["shape"][1:] == [1, 28, 28]
        assert body["outputs"][0]["name"] == "logits"


def test_infer_batch_matches_onnxruntime(server: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 1, 28, 28), dtype=np.float32)
    session = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])
    expected = session.run(None, {session.get_inputs()[0].name: x})[0]

    # Any input name is accepted: the model has exactly one input.
    r = httpx.post(f"{server}/v2/models/{MODEL_NAME}/infer",
                   json=_infer_body(x, name="pixels"), timeout=30.0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL_NAME
    (out,) = body["outputs"]
    assert out["name"] == "logits"
    assert out["datatype"] == "FP32"
    assert out["shape"] == [3, 10]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["wrong_shape", "wrong_datatype", "wrong_element_count"])
def test_bad_request_is_4xx_and_server_survives(server: str, case: str) -> None:
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    body = {
        "wrong_shape": _infer_body(x, shape=[2, 28, 28]),
        "wrong_datatype": _infer_body(x, datatype="INT32"),
        "wrong_element_count": _infer_body(x[:, :, :27], shape=[2, 1, 28, 28]),
    }[case]
    with httpx.Client(base_url=server, timeout=30.0) as client:
        r = client.post(f"/v2/models/{MODEL_NAME}/infer", json=body)
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert "error" in r.json()
        # The server still answers, and still infers correctly-shaped requests.
        assert client.get("/v2/health/ready").status_code == 200
        ok = client.post(f"/v2/models/{MODEL_NAME}/infer", json=_infer_body(x[:1]))
        assert ok.status_code == 200, ok.text
        assert ok.json()["outputs"][0]["shape"] == [1, 10]
