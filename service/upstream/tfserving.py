"""TensorFlow Serving REST upstream: ``POST {url}/v1/models/{name}:predict`` in the row ("instances") format.

TF models usually take N x H x W x C: with ``layout="NHWC"`` the batch is transposed before it is sent.
Readiness is ``GET {url}/v1/models/{name}`` listing a version whose state is ``AVAILABLE`` (or, from
KServe's v1 protocol, which is this API, saying ``"ready": true``). The input's
datatype and a fixed batch size are read once from the model's signature (``/metadata``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import orjson

from service.defense.contract import ClassifierInput, Layout, prepare
from service.defense.scores import as_scores
from service.errors import UpstreamError
from service.upstream.pooled import PooledHttp


# TF Serving's dtypes -> OIP v2 datatype names (as the gateway's settings name them); bfloat16 takes the JSON
# numbers sent for FP32 (the server casts them)
TF_DTYPES = {"DT_FLOAT": "FP32", "DT_HALF": "FP16", "DT_DOUBLE": "FP64", "DT_UINT8": "UINT8", "DT_BFLOAT16": "FP32"}


class TfServingUpstream(PooledHttp):
    def __init__(self, url: str, model: str, output_name: str | None = None,
                 outputs: Literal["logits", "probabilities"] = "logits", timeout_s: float = 10.0,
                 max_connections: int = 64, layout: Layout = "NCHW",
                 contract: ClassifierInput | None = None, max_response_bytes: int = 32 * 2**20,
                 max_batch: int = 0, datatype: str | None = None, server: str = "TF Serving") -> None:
        super().__init__(url, timeout_s, max_connections, max_response_bytes, max_batch, datatype)
        self.server = server  # who speaks the API: TF Serving, or KServe v1 (the same REST predict API)
        self.model = model
        self.output_name = output_name
        self.outputs = outputs
        # the classifier's input contract (scale, mean/std, layout); ``layout`` alone when none is given
        self.contract = contract or ClassifierInput(layout=layout)
        self.layout = self.contract.layout

    def describe(self) -> str:
        return f"{self.server} model {self.model!r} ({self.layout}) at {self.base}"

    async def ready(self) -> bool:
        answer = await self.get(f"{self.base}/v1/models/{self.model}")
        if answer is None or answer[0] != 200:
            return False
        try:
            status = orjson.loads(answer[1])
            if isinstance(status.get("ready"), bool):  # KServe v1: {"name": ..., "ready": true}
                return status["ready"]
            return any(v.get("state") == "AVAILABLE" for v in status["model_version_status"])
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return False

    async def discover(self) -> bool:
        """What the settings leave open, from the model's signature (``GET /v1/models/{m}/metadata``,
        ``serving_default`` with one input): ``DT_UINT8`` is a UINT8 input (``DT_HALF`` FP16, ``DT_DOUBLE``
        FP64), a first dimension above 0 a fixed batch size. False while the server cannot be reached."""
        answer = await self.get(f"{self.base}/v1/models/{self.model}/metadata")
        if answer is None:
            return False
        first, dtype = 0, None
        try:
            if answer[0] == 200:
                signature = orjson.loads(answer[1])["metadata"]["signature_def"]["signature_def"]["serving_default"]
                (spec,) = signature["inputs"].values()  # the row format feeds models of one input
                dtype = spec.get("dtype")
                dims = (spec.get("tensor_shape") or {}).get("dim") or []
                first = int(dims[0]["size"]) if dims else 0
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            first, dtype = 0, None
        said = TF_DTYPES.get(dtype, dtype[3:] if isinstance(dtype, str) and dtype.startswith("DT_") else None)
        self.datatype = self.known_datatype(self.datatype, said)
        self.batch_limit = self.batch_limit or ((first, True) if first > 0 else None)
        return True

    def encode(self, x: np.ndarray) -> bytes:
        return orjson.dumps({"instances": self.as_sent(prepare(x, self.contract))}, option=orjson.OPT_SERIALIZE_NUMPY)

    def _rows(self, predictions: list) -> list:
        """Rows of a multi-output model are objects: pick the named output (or the only one)."""
        if not predictions or not isinstance(predictions[0], dict):
            return predictions
        names = sorted(predictions[0])
        name = self.output_name or (names[0] if len(names) == 1 else None)
        if name is None:
            raise UpstreamError(f"upstream returned outputs {names}; set MAGNET_UPSTREAM_OUTPUT to one of them")
        return [row[name] for row in predictions]

    def decode(self, body: bytes, rows: int) -> np.ndarray:
        try:
            answer = orjson.loads(body)
            if isinstance(answer, dict) and "error" in answer:
                raise UpstreamError("the model server answered an error", str(answer["error"])[:500])
            scores = as_scores(np.asarray(self._rows(answer["predictions"]), dtype=np.float32))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UpstreamError("the model server's answer is not a TF Serving predict response with the "
                                "expected output", f"output {self.output_name or '(only)'}: {e!r}")
        if scores.ndim != 2 or len(scores) != rows:
            raise UpstreamError(f"the model server returned shape {list(scores.shape)} for {rows} inputs; "
                                f"expected [{rows}, classes]")
        return scores

    async def call(self, x: np.ndarray) -> np.ndarray:
        body = await self.post(f"{self.base}/v1/models/{self.model}:predict", self.encode(x))
        return self.decode(body, len(x))
