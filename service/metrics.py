"""Every Prometheus metric of the gateway, on an injected registry (tests get a fresh one each)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

STAGES = ("decode", "defense", "upstream", "total")
OUTCOMES = ("ok", "bad_request", "unauthorized", "throttled", "overloaded", "too_large", "upstream_error", "error")
# Latency buckets from 0.5 ms to 10 s: the defense stage is sub-millisecond per digit on a CPU.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Labelled:
    """A labelled metric whose children are looked up once per label values: prometheus_client's
    ``labels`` takes a lock and builds its key on every call, a measurable share of a single digit's
    request. The label values here come from small fixed sets (stages, outcomes, detectors, members)."""

    def __init__(self, metric) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], object] = {}

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child

    def __getattr__(self, name: str):
        return getattr(self.metric, name)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = _Labelled(Counter(
            "magnet_requests", "Classify requests by outcome "
            "(ok, bad_request, unauthorized, throttled, overloaded, too_large, upstream_error, error).",
            ["outcome"], registry=registry))
        self.inputs = _Labelled(Counter("magnet_inputs", "Inputs by decision (accepted, rejected).",
                                        ["decision"], registry=registry))
        self.detector_rejections = _Labelled(Counter(
            "magnet_detector_rejections", "Inputs each detector flagged "
            "(an input flagged by two detectors counts for both).", ["detector"], registry=registry))
        self.stage_seconds = _Labelled(Histogram(
            "magnet_stage_seconds", "Latency of each stage of a classify request.", ["stage"], buckets=BUCKETS,
            registry=registry))
        self.batch_rows = Histogram("magnet_batch_rows", "Rows per defense pass and upstream call (micro-batching "
                                    "coalesces concurrent requests of one pool member).",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=registry)
        self.upstream_errors = _Labelled(Counter(
            "magnet_upstream_errors", "Failed upstream calls by reason (timeout, unavailable, bad_response).",
            ["reason"], registry=registry))
        self.rows_discarded = Counter(
            "magnet_upstream_rows_discarded", "Rows sent to the model server ahead of the verdict (speculative "
            "forwarding, MAGNET_SPECULATE) that a detector then rejected: the model server's answers to them were "
            "dropped. The extra work speculation gives the model server.", registry=registry)
        self.unexpected = Counter("magnet_unexpected_errors", "Requests that raised an error the gateway did not "
                                  "expect (answered 500); any is a bug worth a report.", registry=registry)
        self.throttled = _Labelled(Counter(
            "magnet_throttled", "Requests refused with 429 because their caller was over a "
            "limit (reason: rejections, requests).", ["reason"], registry=registry))
        self.pool_selections = _Labelled(Counter("magnet_pool_selections", "Requests defended by each pool member.",
                                                 ["member"], registry=registry))
        self.bundle_info = Gauge("magnet_bundle_info", "The bundle served: its name, the manifest's format "
                                 "version as written (before migration) and the manifest file's sha256; always 1.",
                                 ["bundle", "version", "sha256"], registry=registry, multiprocess_mode="max")
        self.expected_rejection = Gauge(
            "magnet_expected_rejection_ratio", "Share of clean inputs the bundle rejects by calibration: the "
            "clean test rejection measured when it was built, else 1 - prod(1 - fpr) over each member's detectors, "
            "averaged over members. The drift alert compares traffic with it.", registry=registry,
            multiprocess_mode="max")
        self.shadow_mode = Gauge("magnet_shadow_mode", "1 when the gateway only watches (MAGNET_MODE=shadow): "
                                 "inputs it counts as rejected were answered anyway.", registry=registry,
                                 multiprocess_mode="max")
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for stage in STAGES:  # export every series from the start, so dashboards have data at zero
            self.stage_seconds.labels(stage)
        for decision in ("accepted", "rejected"):
            self.inputs.labels(decision)
        for reason in ("rejections", "requests"):
            self.throttled.labels(reason)

    def exposition(self) -> bytes:
        """The text ``/metrics`` serves: this registry, or with worker processes (PROMETHEUS_MULTIPROC_DIR
        set) the merged samples of every worker, whichever one answers."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)

    def declare_detectors(self, names: list[str]) -> None:
        for name in names:
            self.detector_rejections.labels(name)

    def declare_members(self, names: list[str]) -> None:
        for name in names:
            self.pool_selections.labels(name)

    def declare_bundle(self, name: str, version: int | None, sha256: str) -> None:
        self.bundle_info.labels(name, str(version), sha256).set(1)

    def declare_mode(self, shadow: bool, expected_rejection: float) -> None:
        self.shadow_mode.set(1 if shadow else 0)
        self.expected_rejection.set(expected_rejection)
