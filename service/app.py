"""Application factory: builds the gateway from settings and (optionally) injected dependencies."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry

from service.dataplane import Gateway
from service.defense.bundle import MANIFEST, manifest_version, sha256_of
from service.defense.core import Defense
from service.errors import MagnetError, error_response, handle_magnet_error
from service.metrics import Metrics
from service.batching import MicroBatcher
from service.pipeline import Pipeline
from service.routes import router
from service.sessions import make_selector
from service.settings import Settings
from service.upstream import Upstream, make_upstream
from service.v2_front import router as v2_router

log = logging.getLogger("magnet")


def expected_rejection(defense: Defense) -> float:
    """The clean rejection rate the bundle was calibrated for (see ``magnet_expected_rejection_ratio``)."""
    measured = (defense.manifest.measurements or {}).get("defense_test_rejected")
    if isinstance(measured, (int, float)):
        return float(measured)
    per_member = [1 - float(np.prod([1 - d.fpr for d in m.detectors])) for m in defense.members]
    return float(np.mean(per_member))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error; see the gateway's log")


def create_app(settings: Settings | None = None, *, defense: Defense | None = None,
               upstream: Upstream | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the gateway. The bundle is loaded (and verified) here, so a bad bundle fails at start."""
    settings = settings or Settings()
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="magnet-infer")
    defense = defense or Defense(settings.bundle, settings.device, settings.ort_threads)
    upstream = upstream or make_upstream(settings, defense, executor)
    metrics = Metrics(registry or CollectorRegistry())
    metrics.declare_detectors(sorted({d.name for m in defense.members for d in m.detectors}))
    metrics.declare_members([m.name for m in defense.members])
    metrics.declare_mode(settings.mode == "shadow", expected_rejection(defense))
    metrics.declare_bundle(defense.manifest.name, manifest_version(defense.bundle_dir),
                           sha256_of(defense.bundle_dir / MANIFEST))
    pipeline = Pipeline(defense, upstream, metrics, executor)
    if settings.batch_rows > 0:
        pipeline = MicroBatcher(pipeline, metrics, settings.batch_rows, settings.batch_window_ms / 1000)
    gateway = Gateway(settings, defense, upstream, metrics, pipeline,
                      make_selector(settings.session_secret.get_secret_value().encode()
                                    if settings.session_secret is not None else None, len(defense.members)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await upstream.start()
        log.info("serving bundle %s (%d member(s), manifest format %s) on %s; upstream: %s; mode: %s%s",
                 defense.manifest.name, len(defense.members), manifest_version(defense.bundle_dir),
                 ", ".join(defense.providers), upstream.describe(), settings.mode,
                 " (nothing is rejected: every input goes upstream as it came)" if settings.mode == "shadow" else "")
        try:
            yield
        finally:
            await upstream.close()
            executor.shutdown(wait=False)

    app = FastAPI(title="MagNet gateway", lifespan=lifespan)
    app.state.gateway = gateway
    app.include_router(router)
    app.include_router(v2_router)
    app.add_exception_handler(MagnetError, handle_magnet_error)
    app.add_exception_handler(Exception, _unexpected)
    return app


def app_from_environment() -> FastAPI:
    """The factory each worker process calls (``magnet serve --workers N``): settings from ``MAGNET_*``."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)
