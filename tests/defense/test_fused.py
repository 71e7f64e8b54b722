"""One fused graph per member (service/defense/fused.py): the same reformed output, scores, classifier
outputs and decisions as the separate sessions, for the toy bundle behind every input contract, for the
shipped MNIST and CIFAR-10 bundles on real test images, through the gateway; and when fusing is not
possible, the gateway says so or keeps the separate sessions."""

from __future__ import annotations

import asyncio
import builtins
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

pytest.importorskip("onnx")

from fastapi.testclient import TestClient  # noqa: E402

from service.app import create_app  # noqa: E402
from service.access import ConfigError  # noqa: E402
from service.defense.core import Defense  # noqa: E402
from service.defense.fused import FusionError  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.pipeline import Pipeline  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests import fakes  # noqa: E402
from tests.conftest import SHIPPED_MNIST, ROOT  # noqa: E402

JSD = {"name": "jsd", "kind": "divergence", "autoencoder": "steep.onnx", "temperature": 2.0, "fpr": 0.01,
       "threshold": 0.01}
RECON = {"name": "R", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 1, "fpr": 0.01, "threshold": 0.1}


@pytest.fixture(autouse=True)
def one_optimization_level(monkeypatch):
    """Bit-exact comparisons need one graph optimization level on both sides: 'auto' may give a fused graph
    (dominated by the classifier) another level than a small autoencoder's own session."""
    from service.defense import runtime

    monkeypatch.setattr(runtime, "PREFER_EXTENDED", 0.0)
    monkeypatch.setattr(runtime, "_chosen", {})


def same_screen(fused: Defense, separate: Defense, x: np.ndarray, member: int = 0) -> None:
    """Fused and separate screens agree exactly on the CPU, and so do the decisions."""
    a, b = fused.screen(x, member), separate.screen(x, member)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.reformed, b.reformed)
    assert a.scores.keys() == b.scores.keys()
    for name in a.scores:
        np.testing.assert_array_equal(a.scores[name], b.scores[name])
    n = len(x)
    if separate.needs_logits(member):
        want = separate.classifier(np.concatenate([b.x, b.reformed]))  # x as judged (a bundle's input step applied)
        np.testing.assert_allclose(a.logits, want, rtol=0, atol=1e-5)
        va = fused.decide(a, a.logits[:n], a.logits[n:])
        vb = separate.decide(b, want[:n], want[n:])
    else:
        np.testing.assert_allclose(a.logits, separate.classifier(b.reformed), rtol=0, atol=1e-5)
        va, vb = fused.decide(a), separate.decide(b)
    np.testing.assert_array_equal(va.accepted, vb.accepted)


@pytest.mark.parametrize("contract", [None, {"layout": "NHWC", "scale": 255.0, "mean": [120.0], "std": [60.0]},
                                      {"output": "probabilities"}])
@pytest.mark.parametrize("detectors", [[RECON], [RECON, JSD]])
def test_the_toy_bundle_fused_behind_every_contract(tmp_path, contract, detectors):
    bundle = fakes.make_bundle(tmp_path / "b", detectors=detectors, contract=contract, reformer="steep.onnx")
    fused = Defense(bundle, device="cpu", fused=True, embed_classifier=True)
    separate = Defense(bundle, device="cpu")
    assert set(fused.fused) == {0} and not separate.fused
    x = np.random.default_rng(0).uniform(size=(50, *fakes.SHAPE)).astype(np.float32)
    same_screen(fused, separate, x)


def test_without_the_classifier_the_graph_has_no_logits(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "b")
    defense = Defense(bundle, device="cpu", fused=True)
    screening = defense.screen(fakes.images(0.5, 0.0))
    assert screening.logits is None and screening.scores["R"].tolist() == [0.0, 0.25]


def test_shipped_mnist_bundle_on_test_images(mnist):
    x = mnist.test.x[:500]  # more rows than one CPU chunk (62 digits)
    same_screen(Defense(SHIPPED_MNIST, device="cpu", fused=True, embed_classifier=True),
                Defense(SHIPPED_MNIST, device="cpu"), x)


def test_shipped_cifar10_bundle_on_test_images(cifar10):
    # divergence detectors: the classifier runs on 2N rows per call; 40 images are three CPU chunks,
    # whose [x_i; reformed_i] logits are put back in order
    bundle = ROOT / "models" / "cifar10"
    same_screen(Defense(bundle, device="cpu", fused=True, embed_classifier=True), Defense(bundle, device="cpu"),
                cifar10.test.x[:40])


def test_the_pipeline_answers_the_same_without_a_second_call(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "b", detectors=[RECON, JSD], reformer="steep.onnx")
    x = np.random.default_rng(1).uniform(size=(30, *fakes.SHAPE)).astype(np.float32)

    def run(defense):
        upstream = fakes.RecordingUpstream(defense)
        pipeline = Pipeline(defense, upstream, Metrics(CollectorRegistry()), ThreadPoolExecutor(1))
        return asyncio.run(pipeline.classify(x)), upstream.batches

    (fused, calls), (separate, separate_calls) = run(Defense(bundle, device="cpu", fused=True, embed_classifier=True)), \
        run(Defense(bundle, device="cpu"))
    assert calls == [] and len(separate_calls) == 1  # the fused graph's logits were used
    np.testing.assert_array_equal(fused.rejected, separate.rejected)
    np.testing.assert_allclose(np.nan_to_num(fused.probabilities, nan=-1), np.nan_to_num(separate.probabilities, nan=-1),
                               atol=1e-6)


def test_the_gateway_setting(tmp_path, monkeypatch):
    bundle = fakes.make_bundle(tmp_path / "b")
    body = {"inputs": fakes.images(0.5, 0.0).tolist()}
    answers = {}
    for mode in ("on", "off", "auto"):  # auto: only on CUDA, so off here
        app = create_app(Settings(bundle=bundle, fused=mode), registry=CollectorRegistry())
        assert bool(app.state.gateway.defense.fused) is (mode == "on")
        with TestClient(app) as c:
            answers[mode] = c.post("/classify", json=body).json()
    assert answers["on"] == answers["off"] == answers["auto"]
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError("no onnx here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ConfigError, match="MAGNET_FUSED=on: .*onnx package"):
        create_app(Settings(bundle=bundle, fused="on"), registry=CollectorRegistry())
    with pytest.raises(FusionError):
        Defense(bundle, device="cpu", fused=True)
    assert not Defense(bundle, device="cpu", fused=None).fused  # auto on the CPU: not even tried


def test_a_graph_that_disagrees_is_not_used(tmp_path, monkeypatch, caplog):
    bundle = fakes.make_bundle(tmp_path / "b")
    monkeypatch.setattr("service.defense.core.TOLERANCE", -1.0)  # nothing passes the check
    with pytest.raises(FusionError, match="differs from the separate sessions"):
        Defense(bundle, device="cpu", fused=True)
    import service.defense.core as C

    monkeypatch.setattr(C, "CUDA", "CPUExecutionProvider")  # make 'auto' try it here
    defense = Defense(bundle, device="cpu", fused=None)
    assert not defense.fused and "separate sessions" in caplog.text


# classifiers the fused graph cannot take: (make_bundle's arguments, why, how close they judge to the plain one)
UNFUSABLE = {
    "fixed batch": ({"classifier_batch": 1}, "takes a fixed batch of 1", 0.0),  # it would feed it N or 2N rows
    "float16": ({"classifier_type": 10}, "takes FLOAT16, not FLOAT", 2e-2),  # a half-precision export
    "double": ({"classifier_type": 11}, "takes DOUBLE, not FLOAT", 1e-5),
    "1x1 head": ({"classifier_head": True}, "outputs rank-4 scores, not N x K", 0.0),  # N x K x 1 x 1 scores
}


@pytest.mark.parametrize("variant", UNFUSABLE)
def test_a_classifier_the_fused_graph_cannot_take_keeps_separate_sessions_and_judges_alike(tmp_path, monkeypatch,
                                                                                           caplog, variant):
    """A classifier with a fixed batch size, in half or double precision (input and output of that type), or
    with its scores as N x K x 1 x 1 (a 1x1-convolution head without a flatten) is not fused (asked for: an
    error that says why; on 'auto': logged). The separate sessions cast the rows to its type, read its scores
    as N x K float32, and judge as they do with the plain float32 N x K classifier."""
    kwargs, why, atol = UNFUSABLE[variant]
    bundle = fakes.make_bundle(tmp_path / "b", detectors=[RECON, JSD], reformer="steep.onnx", **kwargs)
    with pytest.raises(FusionError, match=why):
        Defense(bundle, device="cpu", fused=True, embed_classifier=True)
    import service.defense.core as C

    monkeypatch.setattr(C, "CUDA", "CPUExecutionProvider")  # make 'auto' try it here
    unfused = Defense(bundle, device="cpu", fused=None, embed_classifier=True)
    assert not unfused.fused and why in caplog.text
    plain = Defense(fakes.make_bundle(tmp_path / "d", detectors=[RECON, JSD], reformer="steep.onnx"), device="cpu")
    x = np.random.default_rng(0).uniform(size=(7, *fakes.SHAPE)).astype(np.float32)
    out = unfused.classifier(x)
    assert out.dtype == np.float32 and out.shape == (7, 3)
    np.testing.assert_allclose(out, plain.classifier(x), rtol=1e-6, atol=atol)
    np.testing.assert_array_equal(unfused.inspect(x).accepted, plain.inspect(x).accepted)
