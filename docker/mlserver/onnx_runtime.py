"""An MLServer custom runtime that serves one ONNX classifier with onnxruntime (CPU).

MLServer ships no ONNX runtime; this one is enough to put the gateway in front of MLServer. The graph
must have exactly one input tensor, batch axis first (MNIST: "input" [N,1,28,28] FP32 -> "logits"
[N,10] FP32). The model's metadata (``GET /v2/models/{name}``) comes from the graph when
model-settings.json declares no ``inputs``/``outputs``, so the gateway reads the input's datatype and a
fixed batch size from it. A request whose one input has another datatype, a shape that does not fit or
a wrong element count is answered 400. A model folder holds the .onnx file and::

    {"name": "mnist", "implementation": "onnx_runtime.OnnxClassifier",
     "parameters": {"uri": "./classifier.onnx"}}

with this file beside it (or on PYTHONPATH); then ``mlserver start <folder>``. MLServer has no binary
data extension: leave MAGNET_UPSTREAM_BINARY unset (FP16 goes as JSON numbers to MLServer).
"""

from __future__ import annotations

import asyncio
from typing import List

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import get_model_uri

# onnxruntime element types -> OIP v2 datatypes (those a classifier plausibly uses)
_ORT_TO_V2 = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
              "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(uint8)": "UINT8"}
_V2_TO_NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
                "INT32": np.int32, "UINT8": np.uint8}


def _metadata(args) -> List[MetadataTensor]:
    """onnxruntime NodeArgs -> v2 tensor metadata; symbolic or unknown dimensions become -1."""
    return [MetadataTensor(name=a.name, datatype=_ORT_TO_V2.get(a.type, a.type),
                           shape=[d if isinstance(d, int) and d >= 0 else -1 for d in a.shape]) for a in args]


class OnnxClassifier(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        if len(self.session.get_inputs()) != 1:
            raise ValueError(f"{path}: expected exactly one input tensor")
        self.input = _metadata(self.session.get_inputs())[0]
        if not self.inputs:
            self.inputs = [self.input]
        if not self.outputs:
            self.outputs = _metadata(self.session.get_outputs())
        return True

    def _decode(self, payload: InferenceRequest) -> np.ndarray:
        if len(payload.inputs) != 1:
            raise InferenceError(f"expected exactly 1 input tensor, got {len(payload.inputs)}")
        tensor, want = payload.inputs[0], self.input
        if tensor.datatype != want.datatype:
            raise InferenceError(f"input datatype {tensor.datatype} != expected {want.datatype}")
        shape = list(tensor.shape)
        if len(shape) != len(want.shape) or any(s < 0 or (w >= 0 and s != w) for s, w in zip(shape, want.shape)):
            raise InferenceError(f"input shape {shape} does not fit model input shape {want.shape} (-1 = any size)")
        try:
            x = NumpyCodec.decode_input(tensor)
        except (ValueError, TypeError) as exc:
            raise InferenceError(f"cannot decode input: {exc}") from exc
        return np.ascontiguousarray(x, dtype=_V2_TO_NUMPY.get(want.datatype, np.float32))

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {self.input.name: self._decode(payload)}
        # off the event loop, so that health probes keep answering during inference
        results = await asyncio.to_thread(self.session.run, None, feed)
        outputs = [NumpyCodec.encode_output(o.name, v) for o, v in zip(self.session.get_outputs(), results)]
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs)
