"""Thin HTTP handlers: /classify, health and metrics (the shared steps live in ``dataplane``)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.codecs import decode_classify_request
from service.dataplane import answer, defend, encode_results, json_response

router = APIRouter()


@router.post("/classify")
async def classify(request: Request) -> Response:
    """Defend and classify ``{"inputs": ...}`` or ``{"images": [...]}``; results in input order."""
    defended = await defend(request, lambda body, gw: (
        decode_classify_request(body, gw.defense.manifest.input, gw.settings.max_batch), None))
    gw = request.app.state.gateway
    return answer(request, defended, {"results": encode_results(defended.outcome, gw.settings.explain,
                                                                gw.probabilities)})


@router.get("/healthz")
async def healthz() -> Response:
    return json_response({"status": "live"})


@router.get("/")
async def alive() -> Response:
    """KServe v1's liveness (its clients' ``is_server_live``)."""
    return json_response({"status": "alive"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    gw = request.app.state.gateway
    upstream_ready = await gw.upstream.ready()
    body = {"ready": upstream_ready, "bundle": gw.defense.manifest.name, "providers": gw.defense.providers,
            "upstream": gw.upstream.describe(), "upstream_ready": upstream_ready,
            "members": len(gw.defense.members)}
    return json_response(body, 200 if upstream_ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.gateway.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
