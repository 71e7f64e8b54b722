"""What the HTTP upstream adapters share: one pooled keep-alive ``aiohttp`` session, the mapping of
transport failures to the gateway's errors (the classifier's input contract is in
``service.defense.contract``).

aiohttp rather than httpx: measured here, httpx's AsyncClient reached less than half of aiohttp's
throughput on this hop (encode/httpx#3215), which is the gateway's hot path.
"""

from __future__ import annotations

import asyncio

import aiohttp

from service.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable


class PooledHttp:
    """Base of the HTTP adapters: ``start``/``close`` the session, ``post`` and ``get`` with error mapping."""

    def __init__(self, url: str, timeout_s: float = 10.0, max_connections: int = 64,
                 max_response_bytes: int = 32 * 2**20) -> None:
        self.base = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise UpstreamUnavailable("upstream client is not started")
        return self._session

    async def get(self, url: str) -> tuple[int, bytes] | None:
        """Status and body of a GET, or None when the upstream cannot be reached in time (for readiness)."""
        try:
            async with self.session.get(url) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    async def post(self, url: str, body: bytes) -> bytes:
        """The body of a 200 answer to a JSON POST; anything else raises the matching upstream error."""
        return (await self.exchange(url, body, {"Content-Type": "application/json"}))[0]

    async def exchange(self, url: str, body: bytes, headers: dict) -> tuple[bytes, dict]:
        """The body and headers of a 200 answer to a POST with ``headers``; else the matching upstream error.

        Not reachable, or the connection lost before an answer began: 503. An answer that is not a 200,
        is larger than ``max_response_bytes`` (read no further) or breaks off midway: 502. What the
        upstream said, and its URL, go to the log only (``detail``), never to the client."""
        try:
            async with self.session.post(url, data=body, headers=headers) as r:
                try:
                    answer = await self._read_capped(r)
                except aiohttp.ClientError as e:
                    raise UpstreamError("the model server's answer broke off", f"{url}: {e!r}")
                if r.status != 200:
                    raise UpstreamError(f"the model server answered {r.status}",
                                        f"{url}: {answer[:500].decode(errors='replace')}")
                return answer, {k.lower(): v for k, v in r.headers.items()}
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"the model server did not answer within {self.timeout.total:g} s", url)
        except aiohttp.ClientError as e:
            raise UpstreamUnavailable("the model server is unreachable", f"{url}: {e!r}")

    async def _read_capped(self, r: aiohttp.ClientResponse) -> bytes:
        declared = r.content_length
        if declared is not None and declared > self.max_response_bytes:
            raise UpstreamError(f"the model server's answer exceeds {self.max_response_bytes} bytes",
                                f"{r.url}: Content-Length {declared}")
        chunks, size = [], 0
        async for chunk in r.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self.max_response_bytes:
                r.close()  # drop the connection rather than read the rest
                raise UpstreamError(f"the model server's answer exceeds {self.max_response_bytes} bytes", str(r.url))
            chunks.append(chunk)
        return b"".join(chunks)
