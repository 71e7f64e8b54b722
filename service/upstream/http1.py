"""A lean keep-alive HTTP/1.1 client for the upstream hop: asyncio protocols, the llhttp parser that
uvicorn serves with (``httptools``), and a pool of idle connections.

Why not aiohttp: on this hop the gateway sends one small POST and reads one answer per batch, and
aiohttp's per-request machinery (URL objects, cookie jar, tracing, multidict headers, stream readers)
is work the hop does not need (the upstream stage's mean fell from 3.0–3.3 to 2.4 ms without it:
docs/results/throughput.md). This client does only what the hop needs:

- one request in flight per connection, idle connections kept for reuse (LIFO, at most
  ``max_connections`` open at once; more requests wait for a free slot);
- ``Content-Length`` and chunked answers (and answers that end with the connection), parsed by llhttp;
- a total deadline per request (connect, send, answer), an answer-size cap checked against the declared
  length and while reading;
- a reused connection that the server closed while it sat idle (keep-alive timeouts) is detected, and a
  request whose reused connection is lost before any byte of the answer came is sent once more on a
  new connection: inference requests have no side effects.

Errors are raised as the classes below; ``service.upstream.pooled`` maps them to the gateway's 5xx.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools


class HttpError(Exception):
    """Base of the client's failures."""


class Unreachable(HttpError):
    """No connection could be made, or it was lost before any byte of the answer came."""


class BrokenAnswer(HttpError):
    """The answer is not HTTP, or broke off midway."""


class AnswerTooLarge(HttpError):
    """The answer declares, or reaches, more bytes than allowed."""


class Timeout(HttpError):
    """No complete answer within the deadline."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class _Exchange:
    """One request's answer as it is parsed."""

    waiter: asyncio.Future
    cap: int
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    started: bool = False  # a byte of the answer came
    headers_done: bool = False
    status: int = 0


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the parser calls the ``on_*`` methods."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.closed = False
        self.keep_alive = True

    # --- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ex = self.exchange
        if ex is None or ex.waiter.done():
            return
        if ex.headers_done and "content-length" not in ex.headers and "transfer-encoding" not in ex.headers:
            self._finish()  # an answer delimited by the end of the connection
        elif ex.started:
            self._fail(BrokenAnswer(f"the connection closed midway through the answer ({exc!r})"))
        else:
            self._fail(Unreachable(f"the connection closed before an answer ({exc!r})"))

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None or ex.waiter.done():  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        ex.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if not ex.waiter.done():
                self._fail(BrokenAnswer(f"the answer is not valid HTTP/1.1 ({e})"))
            self.close()

    # --- parser callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.exchange.headers[name.decode("latin-1").lower()] = value.decode("latin-1")  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        ex = self.exchange
        ex.headers_done, ex.status = True, self.parser.get_status_code()  # type: ignore[union-attr]
        declared = ex.headers.get("content-length")  # type: ignore[union-attr]
        if declared is not None and declared.isdigit() and int(declared) > ex.cap:  # type: ignore[union-attr]
            self._fail(AnswerTooLarge(f"Content-Length {declared}"))
            self.close()

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex.waiter.done():  # type: ignore[union-attr]
            return
        ex.size += len(body)  # type: ignore[union-attr]
        if ex.size > ex.cap:  # type: ignore[union-attr]
            self._fail(AnswerTooLarge(f"more than {ex.cap} bytes"))  # type: ignore[union-attr]
            self.close()  # drop the connection rather than read the rest
            return
        ex.chunks.append(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self._finish()

    # --- helpers
    def _finish(self) -> None:
        ex = self.exchange
        if ex is not None and not ex.waiter.done():
            ex.waiter.set_result(Answer(ex.status, ex.headers, b"".join(ex.chunks)))

    def _fail(self, error: HttpError) -> None:
        ex = self.exchange
        if ex is not None and not ex.waiter.done():
            ex.waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    @property
    def reusable(self) -> bool:
        return not self.closed and self.keep_alive and self.transport is not None and not self.transport.is_closing()


class Http1Client:
    """Requests to one origin (``base_url``: http or https, host, port, optional path prefix)."""

    def __init__(self, base_url: str, timeout_s: float = 10.0, max_connections: int = 64,
                 max_response_bytes: int = 32 * 2**20, user_agent: str = "magnet-gateway") -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self.ssl else 80)
        self._host_header = host if default_port else f"{host}:{self.port}"
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self.user_agent = user_agent
        self._idle: list[_Connection] = []
        self._slots: asyncio.Semaphore | None = None
        self._open: set[_Connection] = set()

    async def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    async def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                      timeout_s: float | None = None) -> Answer:
        """The answer to one request (``path`` below the base URL's prefix); raises an ``HttpError``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout_s if timeout_s is None else timeout_s)
        head = self._head(method, path, len(body), headers or {})
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        if self._slots.locked():  # every connection is busy: wait for one, within the deadline
            try:
                await asyncio.wait_for(self._slots.acquire(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise Timeout("no free connection within the deadline") from None
        else:  # a free slot is taken at once (wait_for would wrap the call in a task of its own)
            await self._slots.acquire()
        try:
            conn, reused = self._take_idle(), True
            if conn is None:
                conn, reused = await self._connect(deadline), False
            try:
                return await self._exchange(conn, head, body, deadline)
            except Unreachable:
                if not reused:
                    raise
            # the server closed the reused connection as we sent: once more, on a new connection
            return await self._exchange(await self._connect(deadline), head, body, deadline)
        finally:
            self._slots.release()

    def _head(self, method: str, path: str, length: int, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self._host_header}",
                 f"User-Agent: {self.user_agent}"]
        if length or method == "POST":
            lines.append(f"Content-Length: {length}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable:
                return conn
            self._open.discard(conn)
        return None

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl,
                                       server_hostname=self.host if self.ssl else None),
                max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            raise Timeout("no connection within the deadline") from None
        except OSError as e:
            raise Unreachable(f"cannot connect to {self.host}:{self.port} ({e!r})") from None
        self._open.add(conn)
        return conn

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes, deadline: float) -> Answer:
        loop = asyncio.get_running_loop()
        ex = _Exchange(loop.create_future(), self.max_response_bytes)
        conn.exchange = ex
        conn.transport.write(head + body if len(body) < 65536 else head)  # type: ignore[union-attr]
        if len(body) >= 65536:
            conn.transport.write(body)  # type: ignore[union-attr]

        def expire() -> None:
            if not ex.waiter.done():
                ex.waiter.set_exception(Timeout("no complete answer within the deadline"))
                conn.close()

        timer = loop.call_at(deadline, expire)
        try:
            answer = await ex.waiter
        except BaseException:
            conn.close()  # an unfinished exchange leaves the connection in an unknown state
            self._open.discard(conn)
            raise
        finally:
            timer.cancel()
            conn.exchange = None
        if conn.reusable:
            self._idle.append(conn)
        else:
            conn.close()
            self._open.discard(conn)
        return answer
