"""The gateway's data plane: what every defended route shares (``Gateway`` on ``app.state``, the
session, the body limit, decoding, the pool member, the pipeline, the counters, the answer).

``routes`` (/classify, health, metrics) and ``v2_front`` (the Open Inference Protocol front) both import
this module and nothing of each other; ``app`` wires them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import zlib
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import Response

from service.access import Limits
from service.defense.core import Defense
from service.errors import BadInput, MagnetError, PayloadTooLarge, RequestTimeout, UnsupportedMediaType, shown
from service.metrics import Metrics
from service.pipeline import Outcome, Pipeline
from service.sessions import MemberSelector
from service.settings import Settings
from service.upstream.base import Upstream

if TYPE_CHECKING:
    from service.batching import MicroBatcher


@dataclass
class Gateway:
    """Everything a request handler needs, hung on ``app.state.gateway``."""

    settings: Settings
    defense: Defense
    upstream: Upstream
    metrics: Metrics
    pipeline: Pipeline | MicroBatcher
    selector: MemberSelector
    limits: Limits
    decoder: Executor  # decodes large bodies off the event loop
    member_by: str  # "key" or "session" (settings' "auto" resolved)
    probabilities: bool  # whether answers carry the classifier's probabilities ("auto" resolved)


OUTCOMES = {400: "bad_request", 401: "unauthorized", 408: "bad_request", 415: "bad_request", 429: "throttled",
            413: "too_large", 502: "upstream_error", 503: "upstream_error",
            504: "upstream_error"}


def json_response(content: object, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+


async def read_body(request: Request, limit: int, timeout_s: float = 30.0) -> bytes:
    """The request body, refused with 413 as soon as it grows past ``limit`` bytes, and with 408 when it
    has not all arrived ``timeout_s`` after the head (a client trickling its body holds nothing for long)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        if _timeout is None:  # Python 3.10: wait_for wraps the read in a task of its own
            return await asyncio.wait_for(read(), timeout_s)
        async with _timeout(timeout_s):  # a timer on this task, no new task: cheaper per request
            return await read()
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s")


ENCODINGS = ("gzip", "x-gzip", "deflate")  # Content-Encoding of request bodies, as Triton takes them


def content_codings(request: Request) -> list[str]:
    """The request body's Content-Encoding codings, in the order they were applied ('identity' dropped);
    415 for one the gateway cannot undo."""
    codings = [c.strip().lower() for c in request.headers.get("content-encoding", "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    for coding in codings:
        if coding not in ENCODINGS:
            raise UnsupportedMediaType(f"Content-Encoding {shown(coding, 32)} is not supported; send the body as "
                                       "it is, or gzip or deflate it")
    return codings


def decompressed(body: bytes, codings: list[str], limit: int) -> bytes:
    """``body`` with its gzip/deflate codings undone, last applied first; never more than ``limit`` bytes
    come out (413 past it: a small bomb cannot grow into gigabytes), and bad or truncated data is a 400."""
    for coding in reversed(codings):
        # gzip, or deflate in its zlib wrapper (RFC 9110), told apart by their headers; raw deflate as a fallback
        for wbits in (zlib.MAX_WBITS | 32, -zlib.MAX_WBITS) if coding == "deflate" else (zlib.MAX_WBITS | 32,):
            inflater = zlib.decompressobj(wbits)
            try:
                out = inflater.decompress(body, limit + 1)
            except zlib.error as e:
                error = e
                continue
            if len(out) > limit or inflater.unconsumed_tail:
                raise PayloadTooLarge(f"the {coding} body inflates past the limit of {limit} bytes")
            if not inflater.eof:
                raise BadInput(f"the {coding} body is truncated")
            body = out
            break
        else:
            raise BadInput(f"the body is not valid {coding} data ({error})")
    return body


JSON_TYPES = ("application/json",)


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (``application/json`` or ``application/<x>+json``): a browser
    page can post text/plain across origins without asking, but not JSON. A body with no type at all is
    taken as JSON when the request has no ``Origin``: tritonclient sends its JSON requests so, and a browser
    puts ``Origin`` on every POST (a page may post an untyped body across origins without asking too)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not kind and "origin" not in request.headers:
        return
    if kind not in JSON_TYPES and not (kind.startswith("application/") and kind.endswith("+json")):
        raise UnsupportedMediaType(f"Content-Type must be application/json; got {shown(kind or 'none', 48)}")


MAX_SESSION_ID = 256
INLINE_DECODE_BYTES = 64 * 1024  # bodies up to this size are decoded on the event loop


def session_of(request: Request, header: str, cookie: str) -> tuple[str, bool]:
    """The client's session id (header, else cookie), or a new one; True when newly issued."""
    session = request.headers.get(header) or request.cookies.get(cookie)
    if session is None:
        return secrets.token_urlsafe(24), True
    if not 0 < len(session) <= MAX_SESSION_ID:
        raise BadInput(f"session id must be 1 to {MAX_SESSION_ID} characters")
    return session, False


def encode_results(outcome: Outcome, explain: bool, with_probabilities: bool = True) -> list[dict]:
    """/classify's results. ``probabilities`` only ``with_probabilities`` (off for pools by default:
    they fingerprint the member). With ``explain``: the scores, the detectors that fired and, in shadow
    mode, ``would_reject`` (what enforcing would have answered); without it a shadow answer looks like a
    plain classifier's."""
    verdict, probabilities = outcome.verdict, outcome.probabilities
    results = []
    for i, rejected in enumerate(outcome.rejected.tolist()):
        row = probabilities[i]
        if not rejected:
            result = {"rejected": False, "label": int(np.argmax(row))}
            if with_probabilities:
                result["probabilities"] = row.tolist()
        else:
            result = {"rejected": True, "label": None}
            if with_probabilities:
                result["probabilities"] = None
        if explain:
            result["scores"] = {name: float(s[i]) for name, s in verdict.scores.items() if not np.isnan(s[i])}
            result["fired"] = verdict.fired_by(i)
            if outcome.shadow:
                result["would_reject"] = bool(verdict.rejected[i])
        results.append(result)
    return results


@dataclass(frozen=True)
class Defended:
    """A request after the pipeline: its outcome, the member that judged it, and its session."""

    outcome: Outcome
    member: int
    extra: Any  # whatever the decoder returned beside the batch (e.g. a v2 request id)
    session: str
    issued: bool
    started: float


async def defend(request: Request, decode: Callable[[bytes, Gateway], tuple[np.ndarray, Any]],
                 json_body: bool = True) -> Defended:
    """The bookkeeping every defended route shares: the caller's limits, session, body limit, decode,
    member, pipeline, the caller's rejections, and the request counters by outcome.

    The member is bound to the caller's API key id (``member_by`` "key": the client cannot choose it) or
    to the session id the client sends ("session")."""
    gw = request.app.state.gateway
    settings, metrics = gw.settings, gw.metrics
    started = time.perf_counter()
    principal = request.scope.get("state", {}).get("principal")
    try:
        if json_body:
            require_json(request)
        gw.limits.check(principal)
        if gw.member_by == "key":
            session, issued = "", False
            member = gw.selector.member(f"key:{principal}")
        else:
            session, issued = session_of(request, settings.session_header, settings.session_cookie)
            member = gw.selector.member(session)
        codings = content_codings(request)
        body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        if codings:  # inflated with the decoding, off the event loop: a few kB may grow to the body limit
            plain = decode
            decode = lambda raw, g: plain(decompressed(raw, codings, settings.max_body_bytes), g)  # noqa: E731
        with metrics.stage_seconds.labels("decode").time():
            if len(body) <= INLINE_DECODE_BYTES and not codings:  # a thread hop would cost more than it saves
                x, extra = decode(body, gw)
            else:  # large JSON or images: other requests keep being served meanwhile
                x, extra = await asyncio.get_running_loop().run_in_executor(gw.decoder, decode, body, gw)
        metrics.pool_selections.labels(gw.defense.members[member].name).inc()
        outcome = await gw.pipeline.classify(x, member=member, shadow=settings.mode == "shadow")
        gw.limits.rejected(principal, int(outcome.rejected.sum()))
    except MagnetError as e:
        metrics.requests.labels(OUTCOMES.get(e.status, "error")).inc()
        raise
    except Exception:
        metrics.requests.labels("error").inc()
        raise
    metrics.requests.labels("ok").inc()
    return Defended(outcome, member, extra, session, issued, started)


def answer(request: Request, defended: Defended, content: object = None, raw: Response | None = None) -> Response:
    """The JSON response of ``content`` (or ``raw``, a response already encoded), with the session cookie
    when one was issued; records the total latency."""
    gw = request.app.state.gateway
    response = raw if raw is not None else json_response(content)
    if defended.issued:  # the id is URL-safe base64: the header needs no quoting (set_cookie's Morsel is slow)
        response.raw_headers.append((b"set-cookie", f"{gw.settings.session_cookie}={defended.session}; HttpOnly; "
                                                    f"Path=/; SameSite=lax".encode("latin-1")))
    gw.metrics.stage_seconds.labels("total").observe(time.perf_counter() - defended.started)
    return response


