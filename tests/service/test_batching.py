"""Dynamic micro-batching: concurrent requests coalesce per pool member into one defense pass and one
upstream call, answers go back to their requests in order, and failures stay with their batch."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.batching import MicroBatcher
from service.defense.core import Defense
from service.errors import UpstreamUnavailable
from service.metrics import Metrics
from service.pipeline import Pipeline
from tests import fakes


class SlowUpstream(fakes.RecordingUpstream):
    """Takes a while per call, so that concurrent requests queue behind the batch in flight."""

    async def infer(self, x):
        await asyncio.sleep(0.05)
        return await super().infer(x)


def setup(tmp_path, max_rows=256, window_s=0.0, fail=None, **bundle_args):
    bundle = fakes.make_bundle(tmp_path / "b", **bundle_args)
    defense = Defense(bundle, device="cpu")
    upstream = SlowUpstream(defense, fail)
    metrics = Metrics(CollectorRegistry())
    pipeline = Pipeline(defense, upstream, metrics, ThreadPoolExecutor(2))
    return MicroBatcher(pipeline, metrics, max_rows, window_s), pipeline, upstream, metrics


def requests_of(n, rows=2, seed=0):
    rng = np.random.default_rng(seed)
    return [fakes.images(*rng.choice([0.5, 0.4, 0.3, 0.0, 1.0], rows)) for _ in range(n)]


def same(a, b):
    assert a.rejected.tolist() == b.rejected.tolist()
    np.testing.assert_allclose(np.nan_to_num(a.probabilities, nan=-1), np.nan_to_num(b.probabilities, nan=-1),
                               atol=1e-6)
    assert a.verdict.scores.keys() == b.verdict.scores.keys()


def test_concurrent_requests_share_calls_and_get_their_own_answers(tmp_path):
    batcher, pipeline, upstream, metrics = setup(tmp_path)
    xs = requests_of(12)

    async def run():
        return await asyncio.gather(*(batcher.classify(x) for x in xs))

    outcomes = asyncio.run(run())
    calls = len(upstream.batches)
    assert calls < len(xs)  # coalesced: the first goes alone, the rest queue behind it
    for x, got in zip(xs, outcomes):
        same(got, asyncio.run(pipeline.classify(x)))
    counts = metrics.batch_rows.collect()[0].samples
    batches = next(s.value for s in counts if s.name == "magnet_batch_rows_count")
    assert 1 <= batches < len(xs) and calls <= batches


def test_a_lone_request_is_a_batch_of_its_own_rows(tmp_path):
    batcher, pipeline, upstream, metrics = setup(tmp_path)
    x = requests_of(1)[0]
    outcome = asyncio.run(batcher.classify(x))
    samples = {s.name: s.value for s in metrics.batch_rows.collect()[0].samples if not s.name.endswith("_bucket")}
    assert samples["magnet_batch_rows_count"] == 1 and samples["magnet_batch_rows_sum"] == len(x)
    assert len(upstream.batches) <= 1
    same(outcome, asyncio.run(pipeline.classify(x)))


def test_members_never_share_a_batch_and_rows_stay_under_the_limit(tmp_path):
    batcher, pipeline, upstream, _ = setup(tmp_path, max_rows=4, thresholds=[0.1, 0.3])  # a pool of 2
    xs = requests_of(10)
    seen = []
    inner = pipeline.classify

    async def spy(x, member=0, shadow=False):
        seen.append((member, len(x)))
        return await inner(x, member=member, shadow=shadow)

    pipeline.classify = spy

    async def run():
        return await asyncio.gather(*(batcher.classify(x, member=k % 2) for k, x in enumerate(xs)))

    outcomes = asyncio.run(run())
    assert all(rows <= 4 for _, rows in seen)
    assert sum(rows for _, rows in seen) == sum(len(x) for x in xs)
    assert {m for m, _ in seen} == {0, 1}
    assert all(len(o.rejected) == len(x) for o, x in zip(outcomes, xs))


def test_a_request_larger_than_the_limit_goes_whole(tmp_path):
    batcher, _, _, _ = setup(tmp_path, max_rows=2)
    x = requests_of(1, rows=5)[0]
    assert len(asyncio.run(batcher.classify(x)).rejected) == 5


def test_an_upstream_failure_fails_its_batch_only(tmp_path):
    batcher, _, upstream, _ = setup(tmp_path)
    xs = [fakes.images(0.5, 0.4) for _ in range(4)]

    async def run():
        upstream.fail = UpstreamUnavailable("down")
        first = await asyncio.gather(*(batcher.classify(x) for x in xs), return_exceptions=True)
        upstream.fail = None
        second = await asyncio.gather(*(batcher.classify(x) for x in xs), return_exceptions=True)
        return first, second

    first, second = asyncio.run(run())
    assert all(isinstance(r, UpstreamUnavailable) for r in first)
    assert not any(isinstance(r, Exception) for r in second)


def test_divergence_members_batch_too(tmp_path):
    detectors = [
        {"name": "R", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 1, "fpr": 0.01, "threshold": 0.1},
        {"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0, "fpr": 0.01,
         "threshold": 0.04},
    ]
    batcher, pipeline, upstream, _ = setup(tmp_path, detectors=detectors)
    xs = requests_of(6, seed=3)

    async def run():
        return await asyncio.gather(*(batcher.classify(x) for x in xs))

    outcomes = asyncio.run(run())
    assert len(upstream.batches) < len(xs)
    for x, got in zip(xs, outcomes):
        same(got, asyncio.run(pipeline.classify(x)))


def test_through_the_app_a_bad_request_does_not_fail_its_neighbours(tmp_path):
    c, upstream = fakes.make_client(fakes.make_bundle(tmp_path / "app"), batch_rows=64)
    with c:
        good = c.post("/classify", json={"inputs": fakes.images(0.5, 0.4).tolist()})
        bad = c.post("/classify", json={"inputs": [[["nan"]]]})
        again = c.post("/classify", json={"inputs": fakes.images(0.5).tolist()})
        metrics = fakes.operator_get(c).text
    assert good.status_code == 200 and bad.status_code == 400 and again.status_code == 200
    assert "magnet_batch_rows_count" in metrics and 'magnet_stage_seconds_count{stage="queue"}' in metrics


@pytest.mark.parametrize("rows", [0, 8])
def test_the_setting_turns_it_off_or_sizes_it(tmp_path, rows):
    from service.app import create_app
    from service.settings import Settings

    bundle = fakes.make_bundle(tmp_path / "s")
    app = create_app(Settings(bundle=bundle, batch_rows=rows), defense=Defense(bundle, device="cpu"),
                     upstream=fakes.RecordingUpstream(Defense(bundle, device="cpu")), registry=CollectorRegistry())
    pipeline = app.state.gateway.pipeline
    assert isinstance(pipeline, MicroBatcher) == (rows > 0)
    if rows:
        assert pipeline.max_rows == rows


def test_requests_queued_behind_a_lone_request_are_served_even_when_it_is_cancelled(tmp_path):
    batcher, pipeline, upstream, _ = setup(tmp_path)
    xs = [fakes.images(0.5, 0.4) for _ in range(4)]  # accepted by the toy bundle: they go upstream

    async def run():
        first = asyncio.create_task(batcher.classify(xs[0]))  # an idle group: it runs in its own task
        await asyncio.sleep(0.01)  # its upstream call is in flight
        assert not first.done() and batcher._draining
        behind = [asyncio.create_task(batcher.classify(x)) for x in xs[1:]]
        await asyncio.sleep(0)
        first.cancel()  # its client went away
        outcomes = await asyncio.wait_for(asyncio.gather(*behind), 10)  # not stranded in the queue
        with pytest.raises(asyncio.CancelledError):
            await first
        later = await batcher.classify(xs[0])  # the group is idle again, not stuck
        return outcomes, later

    outcomes, later = asyncio.run(run())
    for x, got in zip(xs[1:], outcomes):
        same(got, asyncio.run(pipeline.classify(x)))
    same(later, asyncio.run(pipeline.classify(xs[0])))
    assert sum(len(b) for b in upstream.batches[1:]) >= sum(len(x) for x in xs[1:])
