"""Open Inference Protocol v2 (REST) upstream: Triton, KServe, MLServer.

One pooled keep-alive ``aiohttp`` session: measured here, httpx's AsyncClient reached less than half
of aiohttp's throughput on this hop (encode/httpx#3215), which is the gateway's hot path.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import aiohttp
import numpy as np
import orjson

from service.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable


class OipUpstream:
    def __init__(self, url: str, model: str, input_name: str = "input", output_name: str | None = None,
                 outputs: Literal["logits", "probabilities"] = "logits", timeout_s: float = 10.0,
                 max_connections: int = 64) -> None:
        self.base = url.rstrip("/")
        self.model = model
        self.input_name = input_name
        self.output_name = output_name
        self.outputs = outputs
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def describe(self) -> str:
        return f"Open Inference Protocol v2 model {self.model!r} at {self.base}"

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

    async def ready(self) -> bool:
        try:
            async with self.session.get(f"{self.base}/v2/models/{self.model}/ready") as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    def encode(self, x: np.ndarray) -> bytes:
        tensor = {"name": self.input_name, "shape": list(x.shape), "datatype": "FP32",
                  "data": np.ascontiguousarray(x, np.float32).ravel()}
        return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)

    def decode(self, body: bytes, rows: int) -> np.ndarray:
        try:
            outputs = orjson.loads(body)["outputs"]
            out = next(o for o in outputs if self.output_name in (None, o["name"]))
            scores = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, StopIteration) as e:
            raise UpstreamError(f"upstream answer is not an OIP v2 inference response with output "
                                f"{self.output_name or '(first)'}: {e!r}")
        if scores.ndim != 2 or len(scores) != rows:
            raise UpstreamError(f"upstream returned shape {list(scores.shape)} for {rows} inputs; "
                                f"expected [{rows}, classes]")
        return scores

    async def infer(self, x: np.ndarray) -> np.ndarray:
        url = f"{self.base}/v2/models/{self.model}/infer"
        try:
            async with self.session.post(url, data=self.encode(x),
                                         headers={"Content-Type": "application/json"}) as r:
                body = await r.read()
                if r.status != 200:
                    raise UpstreamError(f"upstream answered {r.status}: {body[:300].decode(errors='replace')}")
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"upstream did not answer within {self.timeout.total:g} s")
        except aiohttp.ClientError as e:
            raise UpstreamUnavailable(f"upstream {self.base} unreachable: {e}")
        return self.decode(body, len(x))
