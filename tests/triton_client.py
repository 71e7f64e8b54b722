"""NVIDIA's tritonclient (HTTP) asking the gateway's v2 front, as an application that talks to Triton would.

Run with the interpreter of .venv-triton (tritonclient comes with nvidia-pytriton):

    python tests/triton_client.py HOST:PORT MODEL rows.npy {json,binary} {FP32,FP16} [--outputs a,b] [--version 1]
        [--compression gzip]

Prints one JSON line: the server's readiness, its metadata and the model's, then ``label``, ``rejected``,
``probabilities`` (those asked) and the answer's ``parameters``; or ``error`` and ``status`` when the
server refused the request.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import tritonclient.http as http
from tritonclient.utils import InferenceServerException


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("rows")
    parser.add_argument("wire", choices=["json", "binary"])
    parser.add_argument("datatype", choices=["FP32", "FP16"])
    parser.add_argument("--outputs", default="", help="comma-separated output names to ask (default: all)")
    parser.add_argument("--version", default="", help="the model version to ask (default: none)")
    parser.add_argument("--compression", default=None, choices=["gzip", "deflate"],
                        help="compress the request body (and accept a compressed answer)")
    args = parser.parse_args()
    x = np.load(args.rows).astype({"FP32": np.float32, "FP16": np.float16}[args.datatype])
    binary = args.wire == "binary"
    client = http.InferenceServerClient(args.url)
    tensor = http.InferInput("x", list(x.shape), args.datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    names = [n for n in args.outputs.split(",") if n]
    asked = [http.InferRequestedOutput(n, binary_data=binary) for n in names] or None
    report = {"ready": client.is_server_ready() and client.is_model_ready(args.model, args.version),
              "server": client.get_server_metadata(),
              "metadata": client.get_model_metadata(args.model, args.version)}
    try:
        answer = client.infer(args.model, [tensor], model_version=args.version, outputs=asked,
                              request_compression_algorithm=args.compression,
                              response_compression_algorithm=args.compression)
    except InferenceServerException as e:
        report |= {"error": e.message(), "status": e.status()}
    else:
        response = answer.get_response()
        report["parameters"] = response.get("parameters")
        report["model_version"] = response.get("model_version")
        report["outputs"] = [o["name"] for o in response["outputs"]]
        for o in response["outputs"]:
            report[o["name"]] = answer.as_numpy(o["name"]).tolist()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
