"""The gateway's TF Serving / KServe v1 front, so clients of those REST APIs only change the URL.

``POST /v1/models/{name}:predict`` runs the same defense pipeline as ``/classify`` (same session and pool
member, same metrics). It takes ``{"instances": [...]}`` (row format) or ``{"inputs": ...}`` (columnar),
images as nested numbers in [0, 1], channels last (TF's convention) or first, or ``{"b64": "<base64 PNG or
JPEG>"}``. The answer, per input row and in input order:

- ``predictions`` (``outputs`` for a columnar request): the classifier's probabilities, K numbers per row,
  **all 0.0** for a rejected row, as the v2 front answers; where the gateway returns no probabilities (a
  pool, by default) the label instead, **-1** for a rejected row;
- ``labels``: the argmax, -1 for a rejected row; ``rejected``: booleans;
- with ``explain`` on, ``scores``: per detector, its score per row (-1 where it did not score the row),
  and in shadow mode ``would_reject``.

``GET /v1/models/{name}`` answers readiness in both servers' forms: KServe's ``ready`` and TF Serving's
``model_version_status`` (503 while the upstream is not ready). ``GET /`` is KServe v1's liveness.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.codecs import decode_v1_predict_request
from service.dataplane import answer, defend, json_response
from service.v2_front import VERSION, _gateway_serving, detector_names, encode_outputs, score_outputs

router = APIRouter(prefix="/v1")


def status(name: str, ready: bool) -> dict:
    state = "AVAILABLE" if ready else "UNAVAILABLE"
    return {"name": name, "ready": ready, "model_version_status": [
        {"version": VERSION, "state": state, "status": {"error_code": "OK" if ready else "UNAVAILABLE",
                                                         "error_message": "" if ready else "the upstream is not ready"}}]}


@router.get("/models/{name}")
async def model_status(name: str, request: Request) -> Response:
    ready = await _gateway_serving(request, name).upstream.ready()
    return json_response(status(name, ready), 200 if ready else 503)


@router.post("/models/{name}:predict")
async def predict(name: str, request: Request) -> Response:
    """Defend and classify a TF Serving / KServe v1 request; answers as in the module's docstring."""
    gw = _gateway_serving(request, name)
    defended = await defend(request, lambda body, g: decode_v1_predict_request(
        body, g.defense.manifest.input, g.settings.max_batch))
    outcome, columnar = defended.outcome, defended.extra
    # the v2 front's tensors: probabilities (when returned; 0.0 rows where rejected), label (-1), rejected
    tensors = {name: values.tolist() for name, _, values in encode_outputs(outcome, gw.probabilities)}
    content = {"outputs" if columnar else "predictions": tensors.get("probabilities", tensors["label"]),
               "labels": tensors["label"], "rejected": tensors["rejected"]}
    if gw.settings.explain:  # as the v2 front's scores_<detector>: -1 where a detector did not score the row
        content["scores"] = {name[len("scores_"):]: values.tolist()
                             for name, _, values in score_outputs(outcome, detector_names(gw))}
        if outcome.shadow:
            content["would_reject"] = outcome.verdict.rejected.tolist()
    return answer(request, defended, content)
