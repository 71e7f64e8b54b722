"""A real Triton Inference Server (the one PyTriton ships) serving ONNX classifiers run by onnxruntime.

Run with the interpreter of .venv-triton (``make test`` makes it: nvidia-pytriton, onnxruntime), as
tests/procs.start_triton does:

    python tests/pytriton_serve.py --http-port 8000 --grpc-port 8001 --metrics-port 8002 \
        --max-batch 8 mnist=models/mnist/classifier.onnx [half=half.onnx ...]

Triton's own HTTP front answers (v2 REST, the binary data extension, its refusal of FP16 as JSON, the
model config with ``max_batch_size``, which it enforces); the model itself is a Python function bound
with PyTriton. Each graph needs one input, batch axis first.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
          "tensor(uint8)": np.uint8}


def bind(triton: Triton, name: str, path: str, max_batch: int) -> None:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (given,), outputs = session.get_inputs(), session.get_outputs()

    @batch
    def infer(**inputs):
        return dict(zip([o.name for o in outputs], session.run(None, {given.name: inputs[given.name]})))

    triton.bind(model_name=name, infer_func=infer,
                inputs=[Tensor(name=given.name, dtype=DTYPES[given.type], shape=tuple(given.shape[1:]))],
                outputs=[Tensor(name=o.name, dtype=DTYPES[o.type], shape=(-1,)) for o in outputs],
                config=ModelConfig(max_batch_size=max_batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=64, help="each model's max_batch_size")
    parser.add_argument("models", nargs="+", help="NAME=PATH.onnx")
    args = parser.parse_args()
    config = TritonConfig(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port)
    with Triton(config=config) as triton:
        for model in args.models:
            name, path = model.split("=", 1)
            bind(triton, name, path, args.max_batch)
        triton.serve()


if __name__ == "__main__":
    main()
