"""Speculative forwarding (``MAGNET_SPECULATE``): the reformed rows go upstream right after the reformer,
the rest of the screen runs while the call is out, and the verdicts and answers are those of the
sequential order; 'auto' speculates only in front of a model server and only while few rows are rejected."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.defense.core import Defense
from service.errors import UpstreamUnavailable
from service.metrics import Metrics
from service.pipeline import Pipeline, Speculation
from service.settings import Settings
from service.upstream import EmbeddedUpstream, OipUpstream
from tests import fakes

DIVERGENCE = [
    {"name": "R", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 1, "fpr": 0.01, "threshold": 0.1},
    {"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0, "fpr": 0.01,
     "threshold": 0.04},
]
TWO_AUTOENCODERS = [
    {"name": "R", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 1, "fpr": 0.01, "threshold": 0.1},
    {"name": "S", "kind": "reconstruction", "autoencoder": "steep.onnx", "p": 2, "fpr": 0.01, "threshold": 0.2},
]
MIXED = [0.5, 0.0, 0.3, 1.0, 0.45, 0.55]  # accepted and rejected rows side by side


class RemoteUpstream(fakes.RecordingUpstream):
    """The toy classifier, as if behind a model server; ``order`` notes when each call came."""

    remote = True

    def __init__(self, defense, fail=None, order=None):
        super().__init__(defense, fail)
        self.order = order if order is not None else []

    async def infer(self, x):
        self.order.append("upstream")
        self.batches.append(x.copy())  # sent: noted before the model server's time passes
        await asyncio.sleep(0.01)
        if self.fail:
            raise self.fail
        return self.defense.classifier(x)


def pipeline_of(tmp_path, mode, detectors=None, fail=None, name="b", **speculation):
    defense = Defense(fakes.make_bundle(tmp_path / name, detectors=detectors), device="cpu")
    upstream = RemoteUpstream(defense, fail)
    pipeline = Pipeline(defense, upstream, Metrics(CollectorRegistry()), ThreadPoolExecutor(2),
                        Speculation(mode, remote=True, **speculation))
    return pipeline, upstream


def same(a, b):
    assert a.verdict.accepted.tolist() == b.verdict.accepted.tolist()
    assert a.verdict.scores.keys() == b.verdict.scores.keys()
    for k in a.verdict.scores:
        np.testing.assert_allclose(a.verdict.scores[k], b.verdict.scores[k], equal_nan=True)
        assert a.verdict.fired[k].tolist() == b.verdict.fired[k].tolist()
    np.testing.assert_allclose(a.probabilities, b.probabilities, equal_nan=True, atol=1e-7)


@pytest.mark.parametrize("detectors", [None, TWO_AUTOENCODERS, DIVERGENCE], ids=["one", "two-aes", "divergence"])
def test_speculation_answers_as_the_sequential_order_does(tmp_path, detectors):
    on, up_on = pipeline_of(tmp_path, "on", detectors, name="on")
    off, up_off = pipeline_of(tmp_path, "off", detectors, name="off")
    x = fakes.images(*MIXED)
    got, want = asyncio.run(on.classify(x)), asyncio.run(off.classify(x))
    same(got, want)
    assert got.verdict.accepted.any() and not got.verdict.accepted.all()  # both kinds of rows in the batch
    # the difference: speculating, every row went upstream (twice, x and ae(x), for a divergence member);
    # in order, only the rows that passed the reconstruction detectors
    assert len(up_on.batches) == len(up_off.batches) == 1
    factor = 2 if detectors is DIVERGENCE else 1
    assert len(up_on.batches[0]) == factor * len(x)
    assert len(up_off.batches[0]) < len(up_on.batches[0])
    # the rows sent beyond the sequential order's are counted as discarded, on the speculating side only
    assert on.metrics.rows_discarded._value.get() == len(up_on.batches[0]) - len(up_off.batches[0])
    assert off.metrics.rows_discarded._value.get() == 0


def test_the_upstream_call_goes_out_before_the_rest_of_the_screen(tmp_path):
    pipeline, upstream = pipeline_of(tmp_path, "on", TWO_AUTOENCODERS)
    complete = pipeline.defense.complete

    def noted(screening):
        upstream.order.append("rest of the screen")
        return complete(screening)

    pipeline.defense.complete = noted
    asyncio.run(pipeline.classify(fakes.images(0.5, 0.45)))
    assert upstream.order == ["upstream", "rest of the screen"]


def test_all_rejected_answers_at_once_even_when_the_upstream_fails(tmp_path):
    pipeline, upstream = pipeline_of(tmp_path, "on", fail=UpstreamUnavailable("down"))

    async def run():
        outcome = await pipeline.classify(fakes.images(0.0, 1.0))
        answered_before_the_upstream = bool(pipeline._background)
        await asyncio.sleep(0.05)  # the call finishes in the background
        return outcome, answered_before_the_upstream

    outcome, early = asyncio.run(run())
    assert outcome.rejected.all() and np.isnan(outcome.probabilities).all()
    assert early and not pipeline._background
    assert len(upstream.batches) == 1  # it was sent; its failure concerns no answered row
    errors = {s.labels["reason"]: s.value for s in pipeline.metrics.upstream_errors.metric.collect()[0].samples
              if s.name.endswith("_total")}
    assert errors.get("unavailable") == 1  # and is still counted


def test_an_upstream_failure_fails_a_batch_with_accepted_rows(tmp_path):
    pipeline, _ = pipeline_of(tmp_path, "on", fail=UpstreamUnavailable("down"))
    with pytest.raises(UpstreamUnavailable):
        asyncio.run(pipeline.classify(fakes.images(0.5, 0.0)))


def test_auto_stops_speculating_under_a_flood_of_rejected_rows_and_comes_back(tmp_path):
    pipeline, upstream = pipeline_of(tmp_path, "auto", max_rejected=0.05, window=32)

    async def run():
        rejected_sent = []
        for values in [[0.5]] * 4 + [[0.0]] * 20 + [[0.5]] * 80:
            before = len(upstream.batches)
            await pipeline.classify(fakes.images(*values))
            rejected_sent.append(values == [0.0] and len(upstream.batches) > before)
        return rejected_sent

    sent = asyncio.run(run())
    flood = sent[4:24]
    assert flood[0] and not any(flood[5:])  # the first rejected rows went up, then speculation stopped
    assert pipeline.speculation()  # 80 accepted rows later it is back on
    assert pipeline.speculation.rejected_share <= 0.05


def test_auto_never_speculates_with_an_embedded_classifier(tmp_path):
    assert not Speculation("auto", remote=False)()
    assert Speculation("auto", remote=True)() and Speculation("on", remote=False)()
    assert not Speculation("off", remote=True)()
    with pytest.raises(ValueError):
        Speculation("sometimes")


def test_the_app_speculates_only_when_asked_and_in_front_of_a_model_server(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "b")

    def speculates(**settings) -> bool:
        gw = create_app(Settings(bundle=bundle, **settings), registry=CollectorRegistry()).state.gateway
        assert isinstance(gw.upstream, OipUpstream if settings.get("upstream") else EmbeddedUpstream)
        return getattr(gw.pipeline, "pipeline", gw.pipeline).speculation()  # behind the micro-batcher

    remote = "http://127.0.0.1:9"
    # the default keeps the API's promise: a rejected input never goes upstream
    assert not speculates(upstream=remote) and not speculates(upstream=None)
    assert speculates(upstream=remote, speculate="auto") and not speculates(upstream=None, speculate="auto")
    assert speculates(upstream=remote, speculate="on")


def test_by_default_rejected_inputs_never_reach_the_model_server(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "b")
    defense = Defense(bundle, device="cpu")
    upstream = RemoteUpstream(defense)
    app = create_app(Settings(bundle=bundle), defense=defense, upstream=upstream, registry=CollectorRegistry())
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        for values in ([0.0, 1.0], [0.5, 0.0, 0.3]):
            assert client.post("/classify", json={"inputs": fakes.images(*values).tolist()}).status_code == 200
    sent = np.concatenate(upstream.batches)[:, 0, 0, 0]
    # only the two accepted rows of the second request went, reformed (0.5 -> 0.5, 0.3 -> 0.4)
    np.testing.assert_allclose(sorted(sent), [0.4, 0.5], atol=1e-6)
