"""Open Inference Protocol v2 (REST) upstream: Triton, KServe, MLServer, over one pooled aiohttp session."""

from __future__ import annotations

from typing import Literal

import numpy as np
import orjson

from service.defense.contract import ClassifierInput, Layout, prepare
from service.errors import UpstreamError
from service.upstream.pooled import PooledHttp


class OipUpstream(PooledHttp):
    def __init__(self, url: str, model: str, input_name: str = "input", output_name: str | None = None,
                 outputs: Literal["logits", "probabilities"] = "logits", timeout_s: float = 10.0,
                 max_connections: int = 64, layout: Layout = "NCHW",
                 contract: ClassifierInput | None = None) -> None:
        super().__init__(url, timeout_s, max_connections)
        self.model = model
        self.input_name = input_name
        self.output_name = output_name
        self.outputs = outputs
        # the classifier's input contract (scale, mean/std, layout); ``layout`` alone when none is given
        self.contract = contract or ClassifierInput(layout=layout)
        self.layout = self.contract.layout

    def describe(self) -> str:
        return f"Open Inference Protocol v2 model {self.model!r} at {self.base}"

    async def ready(self) -> bool:
        answer = await self.get(f"{self.base}/v2/models/{self.model}/ready")
        return answer is not None and answer[0] == 200

    def encode(self, x: np.ndarray) -> bytes:
        x = prepare(x, self.contract)
        tensor = {"name": self.input_name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}
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
        body = await self.post(f"{self.base}/v2/models/{self.model}/infer", self.encode(x))
        return self.decode(body, len(x))
