"""The gateway in front of a real MLServer (1.7, its own virtual environment: ``make test`` makes
.venv-mlserver) serving the MNIST classifier with docker/mlserver/onnx_runtime.py.

MLServer has no binary data extension (a binary request is answered 500) but takes FP16 as JSON numbers,
where Triton and KServe refuse them: the gateway tells it from its ``GET /v2`` and sends a half-precision
model JSON. Decisions must equal the core's, with the served model on the rows as sent.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from service.defense.runtime import CPU, OnnxModel
from tests.conftest import SHIPPED_MNIST
from tests.e2e.upstreams import core_decisions, gateway_decisions, serve_mnist_and_half
from tests.procs import MLSERVER, start_gateway, start_mlserver

pytestmark = [
    pytest.mark.skipif(not (SHIPPED_MNIST / "manifest.json").exists(), reason="the shipped MNIST bundle is not built"),
    pytest.mark.skipif(not MLSERVER.exists(), reason=f"MLServer is not installed at {MLSERVER} (make test installs "
                       "it in .venv-mlserver; or set MLSERVER to its mlserver command)"),
]


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory):
    """MLServer with two models: ``mnist`` (the shipped classifier) and ``half`` (it in half precision
    throughout: FP16 input, weights and output)."""
    folder = tmp_path_factory.mktemp("mlserver")
    proc, url = serve_mnist_and_half(folder, lambda models: start_mlserver(models, folder / "repository"), "MLServer")
    yield proc, url
    proc.stop()


def test_the_runtime_serves_the_graphs_metadata_and_refuses_what_does_not_fit(mlserver):
    _, url = mlserver
    assert httpx.get(f"{url}/v2").json()["name"] == "mlserver"
    meta = httpx.get(f"{url}/v2/models/half").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP16", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"][0]["datatype"] == "FP16"
    good = {"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28], "data": [0.5] * 1568}
    answer = httpx.post(f"{url}/v2/models/mnist/infer", json={"inputs": [good]})
    assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [2, 10]
    for bad, why in [({**good, "datatype": "FP64"}, "datatype FP64 != expected FP32"),
                     ({**good, "shape": [2, 3, 28, 28], "data": [0.5] * 4704}, "does not fit"),
                     ({**good, "data": [0.5] * 1567}, "cannot decode")]:
        answer = httpx.post(f"{url}/v2/models/mnist/infer", json={"inputs": [bad]})
        assert answer.status_code == 400 and why in answer.text, (answer.status_code, answer.text)
    # no binary data extension: the server cannot read such a request (which is why the gateway never sends one)
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28],
                                     "parameters": {"binary_data_size": 3136}}]}).encode()
    answer = httpx.post(f"{url}/v2/models/mnist/infer", content=header + np.zeros(784, np.float32).tobytes(),
                        headers={"Inference-Header-Content-Length": str(len(header)),
                                 "Content-Type": "application/octet-stream"})
    assert answer.status_code >= 400


@pytest.mark.parametrize("model", ["mnist", "half"])
def test_the_gateway_in_front_of_mlserver_decides_as_the_core(mlserver, mnist, model):
    """FP32, and a model in half precision throughout, whose FP16 input and output go as JSON (MLServer
    takes them so; the gateway found it from ``GET /v2``): decisions on 100 test digits equal the core's,
    with the served model on the rows as sent."""
    server, url = mlserver
    x = mnist.test.x[:100]
    got, log = gateway_decisions(url, model, x)
    served = None  # the bundle's classifier
    if model == "half":
        assert "input FP16 (input and outputs as JSON: MLServer has no binary data extension)" in log
        served = OnnxModel(server.half, [CPU])  # casts the rows to FP16, as the JSON numbers were
    else:
        assert "input FP32, any number of row(s) per call" in log
    assert got == core_decisions(x, served)
    assert sum(r for r, _ in got) < len(got)  # most clean digits are accepted and labelled


def test_binary_data_asked_of_mlserver_is_logged_and_answered_502(mlserver, mnist):
    """MAGNET_UPSTREAM_BINARY=true in front of MLServer: a warning at the first call names the mistake;
    the answer is a clear 502 and the gateway keeps serving."""
    _, url = mlserver
    proc, gateway = start_gateway("--bundle", str(SHIPPED_MNIST), "--upstream", url,
                                  env={"MAGNET_UPSTREAM_BINARY": "true"})
    with proc, httpx.Client(base_url=gateway, timeout=60) as client:
        for _ in range(2):
            answer = client.post("/classify", json={"inputs": mnist.test.x[:2].tolist()})
            assert answer.status_code == 502 and "model server" in answer.json()["error"]
        assert client.get("/readyz").status_code == 200
        log = proc.log_text()
    assert "the server is MLServer, which has no binary data extension" in log
