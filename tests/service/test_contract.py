"""The classifier's input contract (layout, scale, mean/std, tensor names, logits or probabilities):
recorded in the manifest, honoured by the embedded classifier and by the upstreams, overridable for an
upstream by MAGNET_UPSTREAM_* settings."""

import numpy as np
import orjson
import pytest

from service.defense import Defense, read_manifest
from service.defense.contract import ClassifierInput, prepare
from service.settings import Settings
from service.upstream import OipUpstream, TfServingUpstream, upstream_contract
from tests import fakes
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app

CONTRACTS = {
    "default": {},
    "nhwc-255-probabilities": {"layout": "nhwc", "scale": 255.0, "output": "probabilities"},
    "mean-std": {"mean": [0.5], "std": [0.25], "name": "pixels"},
    "all": {"layout": "NHWC", "scale": 255.0, "mean": [127.5], "std": [64.0], "output": "probabilities"},
}


def test_prepare_scales_normalises_and_transposes():
    x = np.random.default_rng(0).uniform(size=(2, 3, 4, 5)).astype(np.float32)
    c = ClassifierInput(layout="nhwc", scale=255, mean=(10, 20, 30), std=(2, 4, 8))
    out = prepare(x, c)
    assert out.shape == (2, 4, 5, 3) and out.flags["C_CONTIGUOUS"] and out.dtype == np.float32
    np.testing.assert_allclose(out[1, 2, 3], (x[1, :, 2, 3] * 255 - [10, 20, 30]) / [2, 4, 8], rtol=1e-6)
    assert prepare(x, ClassifierInput()) is x  # the default contract costs nothing


def test_bad_contracts_are_refused():
    with pytest.raises(ValueError, match="std must be positive"):
        ClassifierInput(std=(0.0,))
    with pytest.raises(ValueError, match="differ in length"):
        ClassifierInput(mean=(1.0, 2.0), std=(1.0,))


def test_a_contract_whose_channels_do_not_fit_is_refused(tmp_path):
    from service.defense.bundle import BundleError

    with pytest.raises((BundleError, ValueError), match="3 values for 1 channel"):
        fakes.make_bundle(tmp_path / "b", contract={"mean": [0.1, 0.2, 0.3]})


@pytest.mark.parametrize("name", [n for n in CONTRACTS if n != "default"])
def test_the_embedded_classifier_answers_alike_under_every_contract(tmp_path, name):
    """Each bundle's classifier file computes the default toy classifier behind another contract: the
    gateway must give the same answers (a contract not applied breaks shapes or moves the scores)."""
    x = fakes.images(0.5, 0.0, 0.3, 0.9).tolist()
    answers = {}
    for key in ("default", name):
        bundle = fakes.make_bundle(tmp_path / key, contract=CONTRACTS[key])
        # the real embedded upstream (no fake injected): the bundle's classifier in-process
        with TestClient(create_app(Settings(bundle=bundle, explain=True), registry=CollectorRegistry())) as c:
            answers[key] = c.post("/classify", json={"inputs": x}).json()["results"]
    assert read_manifest(tmp_path / name).classifier.input.layout == CONTRACTS[name].get("layout", "NCHW").upper()
    for a, b in zip(answers["default"], answers[name]):
        assert a["rejected"] == b["rejected"] and a["label"] == b["label"]
        if not a["rejected"]:
            np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["all", "mean-std"])
def test_divergence_scores_do_not_depend_on_the_contract(tmp_path, name):
    detectors = [{"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0,
                  "fpr": 0.01, "threshold": 0.04}]
    x = fakes.images(0.5, 0.3, 0.9)
    scores = [Defense(fakes.make_bundle(tmp_path / k, detectors=detectors, contract=CONTRACTS[k])).inspect(x)
              .scores["jsd"] for k in ("default", name)]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-4, atol=1e-9)


def test_the_upstream_takes_the_manifests_contract_unless_a_setting_overrides_it(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "b", contract=CONTRACTS["all"])
    defense = Defense(bundle)
    values, sources = upstream_contract(Settings(bundle=bundle, upstream="http://u"), defense)
    assert values["layout"] == "NHWC" and values["scale"] == 255 and values["outputs"] == "probabilities"
    assert set(sources.values()) == {"manifest"}
    values, sources = upstream_contract(Settings(bundle=bundle, upstream="http://u", upstream_layout="nchw",
                                                 upstream_outputs="logits", upstream_input="x"), defense)
    assert (values["layout"], values["outputs"], values["input name"]) == ("NCHW", "logits", "x")
    assert sources["layout"] == "MAGNET_UPSTREAM_LAYOUT" and sources["mean"] == "manifest"


def test_oip_and_tfserving_encode_what_the_contract_says():
    x = fakes.images(0.5, 1.0)
    c = ClassifierInput(layout="NHWC", scale=255.0, mean=(127.5,), std=(64.0,))
    tensor = orjson.loads(OipUpstream("http://t", "m", input_name="pixels", contract=c).encode(x))["inputs"][0]
    assert tensor["name"] == "pixels" and tensor["shape"] == [2, 4, 4, 1]
    np.testing.assert_allclose(tensor["data"][:16], [(0.5 * 255 - 127.5) / 64] * 16, atol=1e-6)
    np.testing.assert_allclose(tensor["data"][16:], [(255 - 127.5) / 64] * 16, atol=1e-6)
    instances = orjson.loads(TfServingUpstream("http://t", "m", contract=c).encode(x))["instances"]
    assert np.asarray(instances).shape == (2, 4, 4, 1)


def test_the_gateway_in_front_of_an_oip_upstream_honours_the_manifest(tmp_path):
    """Through a real HTTP hop: an OIP v2 fake server that runs the contract-bound classifier file."""
    import asyncio

    from aiohttp import web

    bundle = fakes.make_bundle(tmp_path / "b", contract=CONTRACTS["all"])
    model = Defense(bundle).classifier.model  # the raw ONNX model: it only takes NHWC 0..255 normalised

    async def infer(request):
        tensor = (await request.json())["inputs"][0]
        x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        out = model(x)
        return web.json_response({"outputs": [{"name": "probabilities", "shape": list(out.shape),
                                               "datatype": "FP32", "data": out.ravel().tolist()}]})

    async def body(upstream):
        return await upstream.infer(fakes.images(0.5, 0.0))

    from service.upstream import make_upstream

    settings = Settings(bundle=bundle, upstream="http://placeholder")
    out = asyncio.run(fakes.against_fake_server(
        [("POST", "/v2/models/toy/infer", infer)],
        lambda url: make_upstream(settings.model_copy(update={"upstream": url}), Defense(bundle), None), body))
    expected = Defense(fakes.make_bundle(tmp_path / "d")).classifier(fakes.images(0.5, 0.0))
    np.testing.assert_allclose(np.log(out) - np.log(out).max(1, keepdims=True),
                               expected - expected.max(1, keepdims=True), atol=1e-4)
