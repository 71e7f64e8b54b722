"""The HTTP/1.1 protocol the gateway serves with: uvicorn's httptools protocol plus the two limits it
lacks, a cap on the size of a request's head (request line and headers) and a deadline to receive it.

Without them one client could send a 64 MiB header (held in memory until complete) or keep many
connections open by sending a byte now and then, or nothing at all. A head over the cap gets 431 and
the connection is closed; a head not complete within the deadline (counted from the connection, or from
the first byte of a later request on a kept-alive connection) has its connection closed. Body reads are
bounded by the application (``MAGNET_BODY_TIMEOUT_S``), idle kept-alive connections by uvicorn.

A response's head leaves in the same write as its body (uvicorn writes them separately): one send, one
segment and one wake-up of the client per answer instead of two (``HeadWithBody``).

Where httptools is missing, uvicorn's h11 protocol is used with its own incomplete-event cap.
"""

from __future__ import annotations

import asyncio
import socket

from service.settings import Settings

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn without the httptools extra
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

LIMITS = {"max_head_bytes": 64 * 1024, "head_timeout_s": 10.0}


def configure(settings: Settings) -> None:
    """Set the limits from settings, in the process that serves (every worker calls it)."""
    LIMITS["max_head_bytes"] = settings.max_header_bytes
    LIMITS["head_timeout_s"] = settings.header_timeout_s


def uvicorn_http_options(settings: Settings) -> dict:
    """The ``http`` option (and h11's cap) for ``uvicorn.Config``."""
    if GuardedHttpTools is None:  # pragma: no cover
        return {"http": "h11", "h11_max_incomplete_event_size": settings.max_header_bytes}
    return {"http": GuardedHttpTools}


class HeadWithBody:
    """A transport that holds a response head (a write that starts ``HTTP/1.1 `` and ends with the blank
    line, not an interim 1xx) until the next write, the body, and sends both at once. A head that no write
    follows in this turn of the event loop is sent by itself at the next, so nothing is ever held back
    longer; ``close`` sends it first. Everything else is the wrapped transport's."""

    __slots__ = ("_transport", "_loop", "_head", "_flush")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self._head: bytes | None = None
        self._flush: asyncio.Handle | None = None

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data = self._head + data
            self._head = None
            self._flush.cancel()  # type: ignore[union-attr]
        elif data[:9] == b"HTTP/1.1 " and data[9:10] != b"1" and data[-4:] == b"\r\n\r\n":
            self._head = data
            self._flush = self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():  # the client went away meanwhile: nothing to send it
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str):  # is_closing, get_extra_info, pause_reading, abort, ...
        return getattr(self._transport, name)


if HttpToolsProtocol is not None:

    class GuardedHttpTools(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                try:  # uvloop sets it, asyncio's own loop does not on sockets handed to it (no Nagle waits)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            super().connection_made(HeadWithBody(transport, self.loop))  # type: ignore[arg-type]
            self._head_timer: asyncio.TimerHandle | None = None
            self._arm_head()

        def _arm_head(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(LIMITS["head_timeout_s"], self._head_expired)

        def _disarm_head(self) -> None:
            self._in_head = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self._in_head and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            counting = self._in_head  # a head begun in an earlier chunk (a new one is counted from its next)
            super().data_received(data)
            if counting and self._in_head and not self.transport.is_closing():
                # the whole chunk went into a head that is still incomplete: all of it was head
                self._head_bytes += len(data)
                if self._head_bytes > LIMITS["max_head_bytes"]:
                    self._refuse_head()

        def _refuse_head(self) -> None:
            self._disarm_head()
            msg = b"request head too large"
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(msg), msg))
            self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_head:  # a later request on a kept-alive connection
                self._arm_head()

        def on_headers_complete(self) -> None:
            self._disarm_head()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head()
            super().connection_lost(exc)
else:  # pragma: no cover
    GuardedHttpTools = None  # type: ignore[assignment,misc]
