"""One error base, one status per error kind, one handler that answers ``{"error": "..."}``."""

from __future__ import annotations

import logging

import orjson
from fastapi import Request
from fastapi.responses import Response

log = logging.getLogger("magnet.errors")


class MagnetError(Exception):
    """Base of every error the gateway answers; ``status`` is the HTTP status sent to the client."""

    status = 500
    headers: dict[str, str] | None = None  # extra response headers (Retry-After, WWW-Authenticate)

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail  # for the log only: what the client must not see (an upstream's URL or body)


class BadInput(MagnetError):
    status = 400


class RequestTimeout(MagnetError):
    status = 408


class UnsupportedMediaType(MagnetError):
    status = 415


class UnknownModel(MagnetError):
    status = 404


class PayloadTooLarge(MagnetError):
    status = 413


class NotReady(MagnetError):
    status = 503


class UpstreamError(MagnetError):
    """The model server answered with an error or something unreadable."""

    status = 502


class UpstreamUnavailable(MagnetError):
    """The model server could not be reached."""

    status = 503


class UpstreamTimeout(MagnetError):
    status = 504


MAX_MESSAGE = 512  # error messages are cut here: they may quote what a client sent


def shown(value: object, limit: int = 64) -> str:
    """``repr`` of a client-supplied value for an error message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=headers)


async def handle_magnet_error(request: Request, exc: MagnetError) -> Response:
    if exc.status >= 500:
        log.warning("%s %s -> %d: %s%s", request.method, request.url.path, exc.status, exc.message,
                    f" ({exc.detail})" if exc.detail else "")
    return error_response(exc.status, exc.message, exc.headers)
