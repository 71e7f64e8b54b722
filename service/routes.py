"""Thin HTTP handlers: read the body, decode, run the pipeline, encode."""

from __future__ import annotations

import secrets
import time

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.codecs import decode_classify_request
from service.errors import BadInput, MagnetError, PayloadTooLarge
from service.pipeline import Outcome

router = APIRouter()

OUTCOMES = {400: "bad_request", 413: "too_large", 502: "upstream_error", 503: "upstream_error",
            504: "upstream_error"}


def json_response(content: object, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


MAX_SESSION_ID = 256


def session_of(request: Request, header: str, cookie: str) -> tuple[str, bool]:
    """The client's session id (header, else cookie), or a new one; True when newly issued."""
    session = request.headers.get(header) or request.cookies.get(cookie)
    if session is None:
        return secrets.token_urlsafe(24), True
    if not 0 < len(session) <= MAX_SESSION_ID:
        raise BadInput(f"session id must be 1 to {MAX_SESSION_ID} characters")
    return session, False


def encode_results(outcome: Outcome, explain: bool) -> list[dict]:
    verdict, probabilities = outcome.verdict, outcome.probabilities
    results = []
    for i, accepted in enumerate(verdict.accepted.tolist()):
        row = probabilities[i]
        if accepted:
            result = {"rejected": False, "label": int(np.argmax(row)), "probabilities": row.tolist()}
        else:
            result = {"rejected": True, "label": None, "probabilities": None}
        if explain:
            result["scores"] = {name: float(s[i]) for name, s in verdict.scores.items() if not np.isnan(s[i])}
            result["fired"] = verdict.fired_by(i)
        results.append(result)
    return results


@router.post("/classify")
async def classify(request: Request) -> Response:
    """Defend and classify ``{"inputs": ...}`` or ``{"images": [...]}``; results in input order."""
    gw = request.app.state.gateway
    metrics = gw.metrics
    t0 = time.perf_counter()
    settings = gw.settings
    try:
        session, issued = session_of(request, settings.session_header, settings.session_cookie)
        body = await read_body(request, settings.max_body_bytes)
        with metrics.stage_seconds.labels("decode").time():
            x = decode_classify_request(body, gw.defense.manifest.input, settings.max_batch)
        member = gw.selector.member(session)
        metrics.pool_selections.labels(gw.defense.members[member].name).inc()
        outcome = await gw.pipeline.classify(x, member=member)
    except MagnetError as e:
        metrics.requests.labels(OUTCOMES.get(e.status, "error")).inc()
        raise
    except Exception:
        metrics.requests.labels("error").inc()
        raise
    metrics.requests.labels("ok").inc()
    response = json_response({"results": encode_results(outcome, settings.explain)})
    if issued:
        response.set_cookie(settings.session_cookie, session, httponly=True, samesite="lax")
    metrics.stage_seconds.labels("total").observe(time.perf_counter() - t0)
    return response


@router.get("/healthz")
async def healthz() -> Response:
    return json_response({"status": "live"})


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
    return Response(generate_latest(request.app.state.gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
