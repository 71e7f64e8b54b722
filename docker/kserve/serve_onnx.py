"""Serve one ONNX classifier over the Open Inference Protocol v2 with KServe's ModelServer.

The model is run with onnxruntime on the CPU. It must have exactly one input tensor, batch
axis first (MNIST: "input" [N,1,28,28] FP32 -> "logits" [N,10] FP32). Routes (from KServe):
GET /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready and
POST /v2/models/{name}/infer; and KServe v1's GET /v1/models/{name} and POST /v1/models/{name}:predict
(``{"instances": [...]}`` -> ``{"predictions": [...]}``, the first output). A request whose single input has the wrong datatype, shape or
element count is answered 400 with {"error": ...}; the input's name is not checked.

    python docker/kserve/serve_onnx.py --model-file models/mnist/classifier.onnx \
        --model-name mnist --http-port 8080 [--grpc-port 8081] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, Dict, List, Optional, Union

import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer
from kserve.errors import InvalidInput
from kserve.utils.utils import generate_uuid

# onnxruntime element types -> OIP v2 datatypes (those a classifier plausibly uses).
_ORT_TO_V2 = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
              "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(uint8)": "UINT8"}


def _types(args: List[Any]) -> List[Dict[str, Any]]:
    """onnxruntime NodeArgs -> v2 tensor metadata; symbolic or unknown dimensions become -1."""
    return [{"name": a.name, "datatype": _ORT_TO_V2.get(a.type, a.type),
             "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in a.shape]} for a in args]


class OnnxModel(Model):
    """A kserve Model that runs a single-input ONNX graph with onnxruntime."""

    def __init__(self, name: str, model_file: str) -> None:
        super().__init__(name)
        self.model_file = model_file
        self.session: Optional[ort.InferenceSession] = None
        self.inputs: List[Dict[str, Any]] = []  # v2 metadata: name, datatype, shape
        self.outputs: List[Dict[str, Any]] = []
        self.load()

    def load(self) -> bool:
        self.session = ort.InferenceSession(self.model_file, providers=["CPUExecutionProvider"])
        if len(self.session.get_inputs()) != 1:
            raise ValueError(f"{self.model_file}: expected exactly one input tensor")
        self.inputs = _types(self.session.get_inputs())
        self.outputs = _types(self.session.get_outputs())
        self.ready = True
        return self.ready

    # --workers > 1 pickles the model into spawned processes; each one reopens the session.
    def __getstate__(self) -> Dict[str, Any]:
        return {**self.__dict__, "session": None}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.load()

    def get_input_types(self) -> List[Dict[str, Any]]:
        return self.inputs

    def get_output_types(self) -> List[Dict[str, Any]]:
        return self.outputs

    def _decode(self, request: InferRequest) -> np.ndarray:
        """Check the request's one input against the model's input and return it as an array."""
        if len(request.inputs) != 1:
            raise InvalidInput(f"expected exactly 1 input tensor, got {len(request.inputs)}")
        tensor, want = request.inputs[0], self.inputs[0]
        if tensor.datatype != want["datatype"]:
            raise InvalidInput(f"input datatype {tensor.datatype} != expected {want['datatype']}")
        shape = list(tensor.shape)
        if len(shape) != len(want["shape"]) or any(
                s < 0 or (w >= 0 and s != w) for s, w in zip(shape, want["shape"])):
            raise InvalidInput(f"input shape {shape} does not fit model input shape {want['shape']}"
                               " (-1 = any size)")
        try:  # reshape fails when the element count does not match the declared shape
            return tensor.as_numpy()
        except ValueError as exc:
            raise InvalidInput(f"cannot decode input: {exc}") from exc

    async def predict(self, payload: Union[InferRequest, Dict[str, Any]], headers: Optional[Dict[str, str]] = None,
                      response_headers: Optional[Dict[str, str]] = None) -> Union[InferResponse, Dict[str, Any]]:
        assert self.session is not None
        if isinstance(payload, dict):  # KServe v1 (TF Serving's REST API): {"instances": [...]}
            return await self._predict_v1(payload)
        if not isinstance(payload, InferRequest):
            raise InvalidInput("expected an Open Inference Protocol v2 or a KServe v1 request")
        feed = {self.inputs[0]["name"]: self._decode(payload)}
        # Run off the event loop so health probes keep answering during inference.
        results = await asyncio.to_thread(self.session.run, None, feed)
        outputs = []
        # JSON data unless the request asks for binary data (parameters.binary_data_output)
        binary = bool(payload.use_binary_outputs)
        for meta, value in zip(self.outputs, results):
            out = InferOutput(meta["name"], list(value.shape), meta["datatype"])
            out.set_data_from_numpy(value, binary_data=binary)
            outputs.append(out)
        return InferResponse(response_id=payload.id or generate_uuid(), model_name=self.name,
                             infer_outputs=outputs, use_binary_outputs=binary)

    async def _predict_v1(self, payload: Dict[str, Any]) -> Dict[str, Any]:
        """``{"instances": [row, ...]}`` -> ``{"predictions": [the first output's row, ...]}``."""
        instances = payload.get("instances")
        if not isinstance(instances, list) or not instances:
            raise InvalidInput('a v1 request needs "instances": a non-empty list')
        want = self.inputs[0]
        try:
            x = np.asarray(instances, dtype={"FP32": np.float32, "FP16": np.float16, "FP64": np.float64,
                                            "UINT8": np.uint8}.get(want["datatype"], np.float32))
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"cannot decode instances: {exc}") from exc
        if x.ndim != len(want["shape"]) or any(w >= 0 and s != w for s, w in zip(x.shape[1:], want["shape"][1:])):
            raise InvalidInput(f"instances shape {list(x.shape)} does not fit model input shape {want['shape']}")
        results = await asyncio.to_thread(self.session.run, None, {want["name"]: x})
        return {"predictions": results[0].astype(np.float32).tolist()}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-file", required=True, help="path of the .onnx file to serve")
    parser.add_argument("--model-name", default="mnist",
                        help="model name used in /v2/models/{name} routes (default: mnist)")
    parser.add_argument("--http-port", type=int, default=8080,
                        help="HTTP port for the v2 REST API (default: 8080)")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="gRPC port for the v2 gRPC API; gRPC is disabled when omitted")
    parser.add_argument("--workers", type=int, default=1,
                        help="number of uvicorn worker processes (default: 1)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    model = OnnxModel(args.model_name, args.model_file)
    server = ModelServer(http_port=args.http_port, grpc_port=args.grpc_port or 0,
                         enable_grpc=args.grpc_port is not None, workers=args.workers)
    server.start([model])


if __name__ == "__main__":
    main()
