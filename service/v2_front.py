"""The gateway's own Open Inference Protocol v2 front, so Triton/KServe clients only change the URL.

``POST /v2/models/{name}/infer`` runs the same defense pipeline as ``/classify`` (same session and pool
member, same metrics). The answer always holds, per input row and in input order:

- ``probabilities`` FP32 [N, K]: the classifier's softmax; **all 0.0** for a rejected row (JSON has no
  NaN, and an all-zero row cannot be mistaken for a distribution). Only when the gateway returns
  probabilities (``MAGNET_PROBABILITIES``; by default not for pool bundles, whose probabilities would
  fingerprint the member): the metadata lists the outputs an answer can hold;
- ``label`` INT64 [N]: the argmax, **-1** for a rejected row;
- ``rejected`` BOOL [N];

and ``parameters.rejected_count``. With ``explain`` on, ``scores_<detector>`` FP64 [N] are added
(-1 where a detector did not score the row).

The binary data extension works both ways: an input tensor may come as little-endian FP32 bytes after
the JSON header (``parameters.binary_data_size`` and the ``Inference-Header-Content-Length`` header), and
outputs come as binary data when the request asks (``outputs[].parameters.binary_data`` per output, or
``parameters.binary_data_output`` for all): BOOL one byte each, INT64 and FP64 eight, FP32 four. A
request that names ``outputs`` gets those only, in its order.
"""

from __future__ import annotations

import numpy as np
from importlib.metadata import PackageNotFoundError, version as metadata_of_package

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.codecs import V2Request, decode_v2_infer_request, encode_v2_response
from service.dataplane import Gateway, answer, defend, json_response
from service.errors import UnknownModel, shown
from service.pipeline import Outcome

router = APIRouter(prefix="/v2")

PLATFORM = "magnet-gateway"
REJECTED_PROBABILITY = 0.0
REJECTED_LABEL = -1
UNSCORED = -1.0


VERSION = "1"  # the one version of the served model: /v2/models/{name}/versions/1/... as the plain routes


def _gateway_serving(request: Request, name: str, version: str | None = None) -> Gateway:
    """The gateway, if it serves model ``name`` (``MAGNET_MODEL_NAME``, else the bundle's name) and, when
    asked, ``version`` (only VERSION); else 404."""
    gw = request.app.state.gateway
    if name != served_name(gw):
        raise UnknownModel(f"model {shown(name)} is not served here; this gateway serves {served_name(gw)!r}")
    if version is not None and version != VERSION:
        raise UnknownModel(f"version {shown(version)} of model {name!r} is not served here; this gateway serves "
                           f"version {VERSION!r} (or use /v2/models/{name}/infer, without a version)")
    return gw


def served_name(gw: Gateway) -> str:
    return gw.settings.model_name or gw.defense.manifest.name


def detector_names(gw: Gateway) -> list[str]:
    return sorted({d.name for m in gw.defense.members for d in m.detectors})


def model_metadata(gw: Gateway) -> dict:
    manifest = gw.defense.manifest
    outputs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(manifest.classifier.classes)]}]
    if not gw.probabilities:
        outputs = []
    outputs += [{"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "rejected", "datatype": "BOOL", "shape": [-1]}]
    if gw.settings.explain:
        outputs += [{"name": f"scores_{d}", "datatype": "FP64", "shape": [-1]} for d in detector_names(gw)]
    return {"name": served_name(gw), "versions": [VERSION], "platform": PLATFORM,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *manifest.input.shape]}],
            "outputs": outputs}


Tensor = tuple[str, str, np.ndarray]  # name, OIP datatype, values


def score_outputs(outcome: Outcome, detectors: list[str]) -> list[Tensor]:
    """One FP64 tensor per detector, UNSCORED where it did not score the row: a detector the member
    lacks, or a divergence detector on a row that never went upstream (NaN in the core)."""
    n = len(outcome.verdict.accepted)
    return [(f"scores_{name}", "FP64", np.nan_to_num(outcome.verdict.scores.get(name, np.full(n, np.nan)),
                                                      nan=UNSCORED)) for name in detectors]


def encode_outputs(outcome: Outcome, with_probabilities: bool = True) -> list[Tensor]:
    """``probabilities`` (when returned), ``label`` and ``rejected``, rejected rows as the module's
    docstring says."""
    rejected = outcome.rejected
    labels = np.where(rejected, REJECTED_LABEL, outcome.probabilities.argmax(axis=1)).astype(np.int64)
    tensors: list[Tensor] = [("label", "INT64", labels), ("rejected", "BOOL", rejected)]
    if with_probabilities:
        probabilities = np.where(rejected[:, None], REJECTED_PROBABILITY, outcome.probabilities)
        tensors.insert(0, ("probabilities", "FP32", probabilities))
    return tensors


def output_names(gw: Gateway) -> list[str]:
    """Every output an answer can hold: the metadata's, and ``would_reject`` when explaining in shadow mode."""
    names = [o["name"] for o in model_metadata(gw)["outputs"]]
    return names + ["would_reject"] if gw.settings.explain and gw.settings.mode == "shadow" else names


def chosen(tensors: list[Tensor], wanted: tuple[str, ...] | None) -> list[Tensor]:
    """The outputs a request names, in its order (all when it names none; the decoder refused unknown names)."""
    if wanted is None:
        return tensors
    by_name = {t[0]: t for t in tensors}
    return [by_name[name] for name in wanted]


def server_version() -> str:
    try:
        return metadata_of_package("magnet-gateway")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


@router.get("")
async def server_metadata() -> Response:
    """OIP v2 server metadata: the binary data extension is the one the front speaks."""
    return json_response({"name": PLATFORM, "version": server_version(), "extensions": ["binary_tensor_data"]})


@router.get("/health/live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    upstream_ready = await request.app.state.gateway.upstream.ready()
    return json_response({"ready": upstream_ready}, 200 if upstream_ready else 503)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def metadata(name: str, request: Request, version: str | None = None) -> Response:
    return json_response(model_metadata(_gateway_serving(request, name, version)))


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None) -> Response:
    upstream_ready = await _gateway_serving(request, name, version).upstream.ready()
    return json_response({"name": name, "ready": upstream_ready}, 200 if upstream_ready else 503)


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    """Defend and classify one FP32 input tensor; outputs as in the module's docstring."""
    gw = _gateway_serving(request, name, version)
    header_length = request.headers.get("inference-header-content-length")
    defended = await defend(request, lambda body, g: decode_v2_infer_request(
        body, g.defense.manifest.input, g.settings.max_batch, header_length, output_names(g)),
        json_body=header_length is None)  # the binary extension has its own content type
    asked: V2Request = defended.extra
    content: dict = {"model_name": name, "model_version": VERSION}
    if asked.id is not None:
        content["id"] = asked.id
    content["parameters"] = {"rejected_count": int(defended.outcome.rejected.sum())}
    tensors = encode_outputs(defended.outcome, gw.probabilities)
    if gw.settings.explain:
        tensors += score_outputs(defended.outcome, detector_names(gw))
        if defended.outcome.shadow:
            tensors.append(("would_reject", "BOOL", defended.outcome.verdict.rejected))
    body, json_length = encode_v2_response(content, chosen(tensors, asked.outputs), asked)
    if json_length is None:
        return answer(request, defended, raw=Response(body, media_type="application/json"))
    return answer(request, defended, raw=Response(body, media_type="application/octet-stream",
                                                  headers={"Inference-Header-Content-Length": str(json_length)}))
