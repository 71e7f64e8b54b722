"""The gateway as a KServe transformer (deploy/kserve): started with exactly the arguments KServe's
controller appends to a custom transformer container (``--model_name <isvc> --predictor_host <host>
--http_port 8080``, pkg/apis/serving/v1beta1/transformer_custom.go), in front of a real KServe predictor
process, and called with the ``kserve`` package's own v2 REST client and InferRequest/InferResponse
types, in JSON and binary. Its answers must be the defense core's."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest

from service.defense import Defense
from tests.conftest import SHIPPED_MNIST
from tests.procs import REPO, free_port, start_model_server, start_process, url_of

kserve = pytest.importorskip("kserve")
pytestmark = pytest.mark.skipif(not (SHIPPED_MNIST / "manifest.json").exists(), reason="no shipped MNIST bundle")
ISVC = "digits"  # the InferenceService's name: KServe names the predictor's model and the route after it


@pytest.fixture(scope="module")
def transformer():
    predictor, predictor_url = start_model_server(SHIPPED_MNIST / "classifier.onnx", ISVC)
    port = free_port()
    host = predictor_url.removeprefix("http://")
    # the container's command line as KServe's controller completes it (no --port, no --upstream)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(SHIPPED_MNIST),
           "--model_name", ISVC, "--predictor_host", host, "--http_port", str(port), "--workers", "1"]
    url = url_of(port)
    proc = start_process(cmd, f"{url}/v2/health/ready", timeout=60, cwd=REPO,
                         env={"MAGNET_OPERATOR_PORT": str(free_port())})
    yield url
    proc.stop()
    predictor.stop()


async def infer(url: str, x: np.ndarray, binary: bool):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    tensor = InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    return await client.infer(url, InferRequest(ISVC, [tensor]), model_name=ISVC)


@pytest.mark.parametrize("binary", [False, True])
def test_kserve_client_through_the_transformer_gets_the_cores_decisions(transformer, mnist, binary):
    x = np.concatenate([mnist.test.x[:24], np.random.default_rng(0).uniform(size=(8, 1, 28, 28))]).astype(np.float32)
    response = asyncio.run(infer(transformer, x, binary))
    assert response.model_name == ISVC
    rejected = response.get_output_by_name("rejected").as_numpy().astype(bool)
    labels = response.get_output_by_name("label").as_numpy()
    verdict = Defense(SHIPPED_MNIST, device="cpu").inspect(x)
    np.testing.assert_array_equal(rejected, verdict.rejected)
    assert rejected[24:].all()  # noise
    accepted = ~rejected
    assert (labels[accepted] == mnist.test.y[:24][accepted[:24]]).mean() >= 0.9
    assert (labels[rejected] == -1).all()


@pytest.fixture(scope="module")
def transformer_v1():
    """The same, for an InferenceService whose predictor speaks KServe's v1 protocol (its default), which
    the controller passes on as ``--predictor_protocol v1``."""
    predictor, predictor_url = start_model_server(SHIPPED_MNIST / "classifier.onnx", ISVC)
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--bundle", str(SHIPPED_MNIST), "--model_name", ISVC,
           "--predictor_host", predictor_url.removeprefix("http://"), "--http_port", str(port),
           "--predictor_protocol", "v1", "--workers", "1"]
    url = url_of(port)
    proc = start_process(cmd, f"{url}/v1/models/{ISVC}", timeout=60, cwd=REPO,
                         env={"MAGNET_OPERATOR_PORT": str(free_port())})
    yield url, proc
    proc.stop()
    predictor.stop()


def test_kserve_v1_client_through_a_v1_transformer_gets_the_cores_decisions(transformer_v1, mnist):
    """KServe's v1 REST client (liveness, readiness, ``{"instances": ...}`` channels last, as TF clients
    send) against the gateway's v1 front, which asks the predictor in v1 too: rejected rows and labels are
    the core's."""
    from kserve import InferenceRESTClient, RESTConfig

    url, proc = transformer_v1
    x = np.concatenate([mnist.test.x[:24], np.random.default_rng(1).uniform(size=(8, 1, 28, 28))]).astype(np.float32)

    async def ask():
        client = InferenceRESTClient(RESTConfig(protocol="v1"))
        try:
            return (await client.is_server_live(url), await client.is_model_ready(url, ISVC),
                    await client.infer(url, {"instances": x.transpose(0, 2, 3, 1).tolist()}, model_name=ISVC))
        finally:
            await client.close()

    live, ready, response = asyncio.run(ask())
    assert live and ready
    defense = Defense(SHIPPED_MNIST, device="cpu")
    verdict = defense.inspect(x)
    labels = defense.classifier(verdict.reformed).argmax(1)
    assert response["rejected"] == verdict.rejected.tolist() and all(response["rejected"][24:])
    assert response["labels"] == [-1 if r else int(l) for r, l in zip(verdict.rejected, labels)]
    assert len(response["predictions"]) == len(x) and all(len(p) == 10 for p in response["predictions"])
    assert "upstream: KServe v1 model 'digits'" in proc.log_text()
