"""What the HTTP upstream adapters share: one pool of keep-alive connections
(``service.upstream.http1``), the mapping of transport failures to the gateway's errors (the classifier's
input contract is in ``service.defense.contract``).

Neither httpx nor aiohttp: measured here, httpx's AsyncClient reached less than half of aiohttp's
throughput on this hop (encode/httpx#3215), and aiohttp's per-request work is more than the hop needs
(``service.upstream.http1``, docs/results/throughput.md).
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from service.codecs import IMAGE_DTYPES
from service.defense.runtime import parts_of
from service.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from service.upstream import http1

log = logging.getLogger("magnet")


class PooledHttp:
    """Base of the HTTP adapters: ``start``/``close`` the pool, ``post`` and ``get`` with error mapping."""

    remote = True  # a model server: the gateway's own work can overlap its calls (``MAGNET_SPECULATE``)

    def __init__(self, url: str, timeout_s: float = 10.0, max_connections: int = 64,
                 max_response_bytes: int = 32 * 2**20, max_batch: int = 0, datatype: str | None = None) -> None:
        self.base = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self._client: http1.Http1Client | None = None
        # rows per call: (limit, fixed) once known; fixed: exactly that many (the last call padded)
        self.batch_limit: tuple[int, bool] | None = (max_batch, False) if max_batch else None
        self.datatype = datatype  # of the input: one of IMAGE_DTYPES; None until set or asked
        self._discovered = False

    async def discover(self) -> bool:
        """Learn from the model server what the settings leave open (``batch_limit``, ``datatype``, each
        left None when the server does not say: then no limit, FP32); False when it cannot be asked now
        (asked again at the next call). This base asks nothing."""
        return True

    def known_datatype(self, datatype: str | None, said: str | None) -> str | None:
        """The input datatype to send: ``datatype`` when set, else the server's word ``said`` (an OIP v2
        datatype) when the gateway can send it, else None (FP32; logged when the server said something else)."""
        if datatype or said is None:
            return datatype
        if said not in IMAGE_DTYPES:
            log.warning("upstream %s: its input is %s, which the gateway does not send; it sends FP32, which the "
                        "model may refuse", self.describe(), said)
            return None
        return said

    def as_sent(self, x: np.ndarray) -> np.ndarray:
        """The prepared batch in the input's datatype: UINT8 takes 8-bit pixels, rounded; FP16 and FP64 the
        values cast."""
        if self.datatype in ("FP16", "FP64"):
            return x.astype(IMAGE_DTYPES[self.datatype])
        if self.datatype != "UINT8":
            return x
        if not self.contract.gives_8bit_pixels:
            raise UpstreamError("the model server's input is UINT8; set MAGNET_UPSTREAM_SCALE=255 and no "
                                "MAGNET_UPSTREAM_MEAN / _STD", f"contract {self.contract}")
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    def how_sent(self) -> str:
        """How the request goes when the model's datatypes decide it (for the log line); '' otherwise."""
        return ""

    async def call(self, x: np.ndarray) -> np.ndarray:
        """One upstream call on all of ``x`` (the adapters' own request and answer)."""
        raise NotImplementedError

    async def infer(self, x: np.ndarray) -> np.ndarray:
        """``x`` classified upstream in one call, or, past the batch limit, in several at once (a fixed batch
        size: each call exactly that many rows, the last padded with copies of its last row)."""
        if not self._discovered:
            settled = self.batch_limit is not None and self.datatype is not None
            self._discovered = settled or await self.discover()
            if self._discovered:
                self.batch_limit, self.datatype = self.batch_limit or (0, False), self.datatype or "FP32"
                rows, fixed = self.batch_limit
                log.info("upstream %s: input %s%s, %s row(s) per call", self.describe(), self.datatype,
                         self.how_sent(), f"{'exactly' if fixed else 'at most'} {rows}" if rows else "any number of")
        rows, fixed = self.batch_limit or (0, False)
        if not rows or not len(x) or (len(x) <= rows and not (fixed and len(x) != rows)):
            return await self.call(x)
        parts = parts_of(x, rows, fixed)
        answers = await asyncio.gather(*(self.call(part) for part, _ in parts))
        return np.concatenate([a[:n] for a, (_, n) in zip(answers, parts)])

    async def start(self) -> None:
        self._client = http1.Http1Client(self.base, self.timeout_s, self.max_connections, self.max_response_bytes)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def client(self) -> http1.Http1Client:
        if self._client is None:
            raise UpstreamUnavailable("upstream client is not started")
        return self._client

    def _path(self, url: str) -> str:
        """The part of ``url`` below the base URL (the adapters build full URLs for their logs)."""
        return url[len(self.base):] if url.startswith(self.base) else url

    async def get(self, url: str) -> tuple[int, bytes] | None:
        """Status and body of a GET, or None when the upstream cannot be reached in time (for readiness)."""
        try:
            answer = await self.client.request("GET", self._path(url))
        except http1.HttpError:
            return None
        return answer.status, answer.body

    async def post(self, url: str, body: bytes) -> bytes:
        """The body of a 200 answer to a JSON POST; anything else raises the matching upstream error."""
        return (await self.exchange(url, body, {"Content-Type": "application/json"}))[0]

    async def exchange(self, url: str, body: bytes, headers: dict) -> tuple[bytes, dict]:
        """The body and headers of a 200 answer to a POST with ``headers``; else the matching upstream error.

        Not reachable, or the connection lost before an answer began: 503. An answer that is not a 200,
        is larger than ``max_response_bytes`` (read no further) or breaks off midway: 502. No complete
        answer in time: 504. What the upstream said, and its URL, go to the log only (``detail``), never
        to the client."""
        try:
            answer = await self.client.request("POST", self._path(url), body, headers)
        except http1.Timeout:
            raise UpstreamTimeout(f"the model server did not answer within {self.timeout_s:g} s", url)
        except http1.Unreachable as e:
            raise UpstreamUnavailable("the model server is unreachable", f"{url}: {e}")
        except http1.AnswerTooLarge as e:
            raise UpstreamError(f"the model server's answer exceeds {self.max_response_bytes} bytes", f"{url}: {e}")
        except http1.BrokenAnswer as e:
            raise UpstreamError("the model server's answer broke off", f"{url}: {e}")
        if answer.status != 200:
            raise UpstreamError(f"the model server answered {answer.status}",
                                f"{url}: {answer.body[:500].decode(errors='replace')}")
        return answer.body, answer.headers
