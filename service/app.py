"""Application factory: builds the gateway from settings and (optionally) injected dependencies."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from service.dataplane import Gateway
from service.defense.bundle import MANIFEST, manifest_version, sha256_of
from service.defense.core import Defense
from service.defense.fused import FusionError
from service.errors import MagnetError, error_response, handle_magnet_error, shown
from service.metrics import Metrics
from service import protocol
from service.access import AccessGuard, ApiKeys, ConfigError, Limits
from service.batching import MicroBatcher
from service.pipeline import Pipeline, Speculation
from service.routes import classify, router
from service.sessions import make_selector
from service.settings import Settings
from service.upstream import Upstream, make_upstream
from service.v1_front import router as v1_router
from service.v2_front import infer, router as v2_router

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
    request.app.state.gateway.metrics.unexpected.inc()
    return error_response(500, "internal error; see the gateway's log")


def warn_exposure(settings: Settings, keys: ApiKeys | None, member_by: str, pool: bool) -> None:
    """Say at start what an operator may not have meant: an open gateway, a client-chosen pool member,
    operator endpoints on the API port."""
    if keys is None:
        log.warning("no API keys configured (MAGNET_API_KEYS, MAGNET_API_KEY_FILE): the gateway is open to "
                    "anyone who reaches its port%s", "; pool members are bound to client-chosen session ids, "
                    "which lets a client probe which member answers it (docs/security.md)" if pool else "")
    elif member_by == "session" and pool:
        log.warning("MAGNET_MEMBER_BY=session: pool members follow the session id each client chooses "
                    "(docs/security.md)")
    if settings.operator_port == settings.port:
        log.warning("MAGNET_OPERATOR_PORT equals MAGNET_PORT: /metrics is served to API clients, and its "
                    "per-member counters tell a client which pool member answered it")


def create_app(settings: Settings | None = None, *, defense: Defense | None = None,
               upstream: Upstream | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the gateway. The bundle is loaded (and verified) here, so a bad bundle fails at start."""
    settings = settings or Settings()
    protocol.configure(settings)
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="magnet-infer")
    if defense is None:
        try:
            defense = Defense(settings.bundle, settings.device, settings.ort_threads, settings.ort_spinning,
                              fused={"on": True, "off": False, "auto": None}[settings.fused],
                              embed_classifier=settings.upstream is None, optimization=settings.ort_optimization)
        except FusionError as e:
            raise ConfigError(f"MAGNET_FUSED=on: {e}") from e
    upstream = upstream or make_upstream(settings, defense, executor)
    metrics = Metrics(registry or CollectorRegistry())
    metrics.declare_detectors(sorted({d.name for m in defense.members for d in m.detectors}))
    metrics.declare_members([m.name for m in defense.members])
    clean_rejection = expected_rejection(defense)
    metrics.declare_mode(settings.mode == "shadow", clean_rejection)
    metrics.declare_bundle(defense.manifest.name, manifest_version(defense.bundle_dir),
                           sha256_of(defense.bundle_dir / MANIFEST))
    speculation = Speculation(settings.speculate, remote=getattr(upstream, "remote", False),
                              max_rejected=max(0.05, 2 * clean_rejection))
    pipeline = Pipeline(defense, upstream, metrics, executor, speculation)
    if settings.batch_rows > 0:
        pipeline = MicroBatcher(pipeline, metrics, settings.batch_rows, settings.batch_window_ms / 1000)
    keys = ApiKeys.from_settings(settings)
    member_by = settings.member_by if settings.member_by != "auto" else ("key" if keys else "session")
    if member_by == "key" and keys is None:
        raise ConfigError("MAGNET_MEMBER_BY=key needs API keys (MAGNET_API_KEYS or MAGNET_API_KEY_FILE)")
    pool = len(defense.members) > 1
    probabilities = settings.probabilities == "on" or (settings.probabilities == "auto" and not pool)
    warn_exposure(settings, keys, member_by, pool)
    gateway = Gateway(settings, defense, upstream, metrics, pipeline,
                      make_selector(settings.session_secret.get_secret_value().encode()
                                    if settings.session_secret is not None else None, len(defense.members)),
                      Limits(settings, metrics), ThreadPoolExecutor(2, thread_name_prefix="magnet-decode"),
                      member_by, probabilities)

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
            gateway.decoder.shutdown(wait=False)

    app = FastAPI(title="MagNet gateway", lifespan=lifespan, redoc_url=None,
                  docs_url="/docs" if settings.docs else None, openapi_url="/openapi.json" if settings.docs else None)
    app.state.gateway = gateway
    app.add_middleware(AccessGuard, settings=settings, keys=keys, metrics=metrics)
    if settings.cors_origins:  # outermost: preflights are answered before keys are asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", settings.session_header,
                                          "Inference-Header-Content-Length"])
    app.include_router(router)
    app.include_router(v2_router)
    app.include_router(v1_router)
    hot_routes(app)
    app.add_exception_handler(MagnetError, handle_magnet_error)
    app.add_exception_handler(StarletteHTTPException, _no_route)
    app.add_exception_handler(Exception, _unexpected)
    return app


def allowed(headers: dict[str, str] | None) -> str:
    return next((v for k, v in (headers or {}).items() if k.lower() == "allow"), "")


async def _no_route(request: Request, exc: StarletteHTTPException) -> Response:
    """Routing's own 404 and 405 (and any other HTTPException) as ``{"error": ...}``, like every other error."""
    where = f"{request.method} {shown(request.url.path)}"
    message = {404: f"no route {where}", 405: f"{where}: method not allowed (allowed: {allowed(exc.headers)})"
               }.get(exc.status_code, f"{where}: {exc.detail}")
    return error_response(exc.status_code, message, exc.headers)


async def _v2_infer(request: Request) -> Response:
    return await infer(request.path_params["name"], request, request.path_params.get("version"))


HOT_ROUTES = {"/classify": classify, "/v2/models/{name}/infer": _v2_infer,
              "/v2/models/{name}/versions/{version}/infer": _v2_infer}


def hot_routes(app: FastAPI) -> None:
    """The two defended POST routes as plain Starlette routes ahead of FastAPI's: the same handlers, minus
    FastAPI's per-request dependency solving (``bench.asgi_cost``: about 0.05 ms of CPU per /classify digit,
    medians 0.68 against 0.73 ms). FastAPI's routes stay behind them for the OpenAPI schema; other methods
    on these paths fall through to them and get the same 405. The middleware and the exception handlers
    are the app's, so errors are answered as before."""
    app.router.routes[:0] = [Route(path, endpoint, methods=["POST"], include_in_schema=False)
                             for path, endpoint in HOT_ROUTES.items()]


def app_from_environment() -> FastAPI:
    """The factory each worker process calls (``magnet serve --workers N``): settings from ``MAGNET_*``."""
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(settings)
