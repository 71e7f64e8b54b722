"""Open Inference Protocol v2 (REST) upstream: Triton, KServe, MLServer, over one pool of keep-alive connections."""

from __future__ import annotations

from typing import Literal

import numpy as np
import orjson

from service.defense.contract import ClassifierInput, Layout, prepare
from service.defense.scores import as_scores
from service.codecs import BINARY_DTYPES, IMAGE_DTYPES
from service.errors import UpstreamError
from service.upstream.pooled import PooledHttp, log


class OipUpstream(PooledHttp):
    def __init__(self, url: str, model: str, input_name: str = "input", output_name: str | None = None,
                 outputs: Literal["logits", "probabilities"] = "logits", timeout_s: float = 10.0,
                 max_connections: int = 64, layout: Layout = "NCHW",
                 contract: ClassifierInput | None = None, binary: bool | None = None,
                 max_response_bytes: int = 32 * 2**20, max_batch: int = 0, datatype: str | None = None) -> None:
        super().__init__(url, timeout_s, max_connections, max_response_bytes, max_batch, datatype)
        # the OIP binary data extension for the input and the outputs: True always, False never (FP16 as JSON
        # numbers too), None (unset) only for FP16, which Triton and KServe refuse as JSON, unless the server
        # is one without the extension (``json_only``)
        self.binary = binary
        self.half_output = False  # the read output is FP16 (metadata): asked as binary data, as JSON is refused
        self.json_only = False  # the server metadata names MLServer, which has no binary data extension
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

    async def discover(self) -> bool:
        """What the settings leave open, from the model's metadata (``GET /v2/models/{m}``): its input's
        datatype, a fixed first dimension as a fixed batch size, and whether the read output is FP16 (then
        asked as binary data); else Triton's model config (``GET
        /v2/models/{m}/config``, absent elsewhere) may cap the batch (``max_batch_size``). False while the
        server cannot be reached (asked again next call)."""
        server = await self.get(f"{self.base}/v2")
        answer = await self.get(f"{self.base}/v2/models/{self.model}")
        if server is None or answer is None:
            return False
        try:
            name = orjson.loads(server[1]).get("name") if server[0] == 200 else None
        except (orjson.JSONDecodeError, AttributeError):
            name = None
        self.json_only = isinstance(name, str) and name.lower() == "mlserver"
        if self.json_only and self.binary:
            log.warning("upstream %s: the server is MLServer, which has no binary data extension and answers 500 "
                        "to it: unset MAGNET_UPSTREAM_BINARY", self.describe())
        try:
            model = orjson.loads(answer[1]) if answer[0] == 200 else {}
            inputs = model["inputs"] if model else []
            meta = next((i for i in inputs if i.get("name") == self.input_name), {})
            if inputs and not meta:
                log.warning("upstream model %r has no input named %r (its inputs: %s): set MAGNET_UPSTREAM_INPUT",
                            self.model, self.input_name, ", ".join(repr(i.get("name")) for i in inputs))
            first = int(meta["shape"][0]) if meta.get("shape") else 0
            datatype = meta.get("datatype")
            read = next((o for o in model.get("outputs") or [] if self.output_name in (None, o.get("name"))), {})
            self.half_output = read.get("datatype") == "FP16"
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError, AttributeError):
            first, datatype = 0, None
        self.datatype = self.known_datatype(self.datatype, datatype if isinstance(datatype, str) else None)
        if self.batch_limit is None and first > 0:
            self.batch_limit = (first, True)
        if self.batch_limit is None:
            config = await self.get(f"{self.base}/v2/models/{self.model}/config")
            if config is None:
                return False
            try:
                cap = int(orjson.loads(config[1]).get("max_batch_size") or 0) if config[0] == 200 else 0
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                cap = 0
            self.batch_limit = (cap, False) if cap > 0 else None
        return True

    @property
    def _half_as_binary(self) -> bool:
        """Unset MAGNET_UPSTREAM_BINARY: FP16 goes as binary data (Triton and KServe refuse it as JSON
        numbers), except to MLServer, which takes it as JSON and has no binary data extension."""
        return self.binary is None and not self.json_only

    @property
    def binary_input(self) -> bool:
        """Whether the input goes as binary data: when asked, and, unless told not to, for FP16."""
        return bool(self.binary) or (self.datatype == "FP16" and self._half_as_binary)

    @property
    def binary_output(self) -> bool:
        """Whether the outputs are asked as binary data: when asked, and, unless told not to, for an FP16
        output."""
        return bool(self.binary) or (self.half_output and self._half_as_binary)

    def how_sent(self) -> str:
        half = [what for what, on in (("input", self.datatype == "FP16"), ("outputs", self.half_output)) if on]
        if self.binary or not half:
            return ""
        if self._half_as_binary:
            return f" ({' and '.join(half)} as binary data: FP16 is refused as JSON)"
        if self.json_only:
            return f" ({' and '.join(half)} as JSON: MLServer has no binary data extension)"
        return (f" ({' and '.join(half)} as JSON, as MAGNET_UPSTREAM_BINARY=false asks: Triton and KServe refuse "
                "FP16 as JSON)")

    def encode(self, x: np.ndarray) -> bytes:
        x = self.as_sent(prepare(x, self.contract))
        # orjson writes no float16: FP16 values, exactly, as float32 numbers
        data = x.ravel().astype(np.float32) if x.dtype == np.float16 else x.ravel()
        tensor = {"name": self.input_name, "shape": list(x.shape), "datatype": self.datatype or "FP32", "data": data}
        request = {"inputs": [tensor], **({"parameters": {"binary_data_output": True}} if self.binary_output else {})}
        return orjson.dumps(request, option=orjson.OPT_SERIALIZE_NUMPY)

    def encode_binary(self, x: np.ndarray) -> tuple[bytes, dict]:
        """The request with the binary data extension: a JSON header, then the input's little-endian bytes in
        its datatype; the outputs are asked as binary data too when ``binary`` is set."""
        x = self.as_sent(prepare(x, self.contract))
        raw = np.ascontiguousarray(x, dtype=IMAGE_DTYPES[self.datatype or "FP32"]).tobytes()
        header = orjson.dumps({"inputs": [{"name": self.input_name, "shape": list(x.shape),
                                           "datatype": self.datatype or "FP32",
                                           "parameters": {"binary_data_size": len(raw)}}],
                               "parameters": {"binary_data_output": self.binary_output}})
        return header + raw, {"Content-Type": "application/octet-stream",
                              "Inference-Header-Content-Length": str(len(header))}

    def decode(self, body: bytes, rows: int, header_length: str | None = None) -> np.ndarray:
        """The chosen output of an answer, JSON ``data`` or (with ``header_length``) binary data."""
        try:
            n = int(header_length) if header_length is not None else len(body)
            outputs = orjson.loads(body[:n])["outputs"]
            # binary outputs follow the JSON header in the order they are listed: skip those before ours
            sizes = [int((o.get("parameters") or {}).get("binary_data_size") or 0) for o in outputs]
            k = next(i for i, o in enumerate(outputs) if self.output_name in (None, o["name"]))
            out, offset, size = outputs[k], n + sum(sizes[:k]), sizes[k]
            if "data" in out:
                scores = np.asarray(out["data"], dtype=np.float32)
            elif out["datatype"] in BINARY_DTYPES and offset + size <= len(body):
                scores = np.frombuffer(body[offset:offset + size], dtype=BINARY_DTYPES[out["datatype"]])
            else:
                raise ValueError(f"binary output {out['name']!r} of {out['datatype']} and {size} bytes does not fit")
            scores = as_scores(scores.astype(np.float32).reshape(out["shape"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, StopIteration) as e:
            raise UpstreamError("the model server's answer is not an OIP v2 inference response with the "
                                "expected output", f"output {self.output_name or '(first)'}: {e!r}")
        if scores.ndim != 2 or len(scores) != rows:
            raise UpstreamError(f"the model server returned shape {list(scores.shape)} for {rows} inputs; "
                                f"expected [{rows}, classes]")
        return scores

    async def call(self, x: np.ndarray) -> np.ndarray:
        url = f"{self.base}/v2/models/{self.model}/infer"
        if not self.binary_input and not self.binary_output:
            return self.decode(await self.post(url, self.encode(x)), len(x))
        body, headers = (self.encode_binary(x) if self.binary_input
                         else (self.encode(x), {"Content-Type": "application/json"}))
        answer, answer_headers = await self.exchange(url, body, headers)
        return self.decode(answer, len(x), answer_headers.get("inference-header-content-length"))

