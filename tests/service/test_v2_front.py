"""The gateway's Open Inference Protocol v2 front, in-process on a toy bundle: metadata, health, infer
(same defense, session and metrics as /classify) and its 4xx answers."""

import json

import numpy as np
import pytest

from service.sessions import MemberSelector
from service.errors import UpstreamUnavailable
from tests import fakes
from tests.fakes import make_client


def tensor(x, name="input", datatype="FP32", shape=None, data=None):
    x = np.asarray(x)
    return {"name": name, "datatype": datatype, "shape": list(x.shape) if shape is None else shape,
            "data": x.ravel().tolist() if data is None else data}


def infer(client, *tensors, model="toy", **extra):
    return client.post(f"/v2/models/{model}/infer", json={"inputs": list(tensors), **extra})


def outputs_of(response):
    return {o["name"]: o for o in response.json()["outputs"]}


def test_model_metadata(client):
    r = client.get("/v2/models/toy")
    assert r.status_code == 200
    assert r.json() == {
        "name": "toy", "versions": ["1"], "platform": "magnet-gateway",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 4, 4]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "rejected", "datatype": "BOOL", "shape": [-1]}],
    }
    assert client.get("/v2/models/toy/versions/1").json() == r.json()


def test_server_metadata_and_versioned_routes(client):
    """OIP v2's server metadata (``GET /v2``), and the model's routes under ``/versions/1`` (tritonclient
    with ``model_version="1"``): the same answers; another version is a 404 that names the one served."""
    server = client.get("/v2").json()
    assert server["name"] == "magnet-gateway" and server["extensions"] == ["binary_tensor_data"]
    assert isinstance(server["version"], str) and server["version"]
    assert client.get("/v2/models/toy/versions/1/ready").json() == {"name": "toy", "ready": True}
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 1, 4, 4], "data": [0.5] * 32}]}
    plain, versioned = (client.post(path, json=body) for path in ("/v2/models/toy/infer",
                                                                     "/v2/models/toy/versions/1/infer"))
    assert plain.status_code == versioned.status_code == 200
    assert versioned.json() == plain.json() and plain.json()["model_version"] == "1"
    for other in (client.post("/v2/models/toy/versions/2/infer", json=body), client.get("/v2/models/toy/versions/2"),
                  client.get("/v2/models/toy/versions/2/ready")):
        assert other.status_code == 404 and "serves version '1'" in other.json()["error"]


def test_routes_that_do_not_exist_answer_json_errors(client):
    """Routing's own 404 and 405 answer ``{"error": ...}`` as every other error does; a 405 keeps Allow."""
    missing = client.get("/v2/models/toy/stats")
    assert missing.status_code == 404 and missing.json() == {"error": "no route GET '/v2/models/toy/stats'"}
    for method, path, allow in [("PUT", "/classify", "POST"), ("DELETE", "/v2/models/toy", "GET"),
                                ("GET", "/v2/models/toy/versions/1/infer", "POST")]:
        r = client.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path)
        assert r.json() == {"error": f"{method} {path!r}: method not allowed (allowed: {allow})"}


def test_live_and_ready(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    r = client.get("/v2/models/toy/ready")
    assert r.status_code == 200 and r.json() == {"name": "toy", "ready": True}


def test_not_ready_when_the_upstream_is_not(toy_bundle):
    c, _ = make_client(toy_bundle, fail=UpstreamUnavailable("down"))
    with c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/v2/models/toy/ready").status_code == 503
        assert c.get("/readyz").status_code == 503


@pytest.mark.parametrize("method, path", [("get", "/v2/models/mnist"), ("get", "/v2/models/mnist/ready"),
                                          ("post", "/v2/models/mnist/infer")])
def test_unknown_model_is_404(client, method, path):
    kwargs = {"json": {"inputs": [tensor(fakes.images(0.5))]}} if method == "post" else {}
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == 404
    assert "'mnist' is not served here" in r.json()["error"] and "'toy'" in r.json()["error"]
    assert client.upstream.batches == []


def test_infer_matches_classify_row_by_row(client):
    x = fakes.images(0.5, 0.0, 0.3, 1.0)  # 0.0 and 1.0 are rejected by detector R
    r = infer(client, tensor(x), id="req-1")
    assert r.status_code == 200
    body = r.json()
    assert body["model_name"] == "toy" and body["id"] == "req-1"
    assert body["parameters"] == {"rejected_count": 2}
    out = outputs_of(r)
    assert set(out) == {"probabilities", "label", "rejected"}
    assert out["rejected"] == {"name": "rejected", "datatype": "BOOL", "shape": [4],
                               "data": [False, True, False, True]}
    assert out["label"] == {"name": "label", "datatype": "INT64", "shape": [4], "data": [0, -1, 0, -1]}
    probabilities = out["probabilities"]
    assert probabilities["datatype"] == "FP32" and probabilities["shape"] == [4, 3]
    rows = np.reshape(probabilities["data"], (4, 3))
    assert (rows[[1, 3]] == 0.0).all()  # rejected rows: all zeros
    # rejected rows never went upstream: one call with the two accepted rows, reformed
    assert len(client.upstream.batches) == 1
    np.testing.assert_allclose(client.upstream.batches[0][:, 0, 0, 0], [0.5, 0.4], atol=1e-6)
    classify = client.post("/classify", json={"inputs": x.tolist()}).json()["results"]
    assert [res["label"] if res["label"] is not None else -1 for res in classify] == out["label"]["data"]
    for i in (0, 2):
        assert rows[i].tolist() == classify[i]["probabilities"]


def test_infer_response_without_request_id_has_none(client):
    body = infer(client, tensor(fakes.images(0.5))).json()
    assert "id" not in body and set(body) == {"model_name", "model_version", "parameters", "outputs"}


@pytest.mark.parametrize("name", ["input", "INPUT__0", "x", "images:0"])
def test_any_input_tensor_name(client, name):
    r = infer(client, tensor(fakes.images(0.5), name=name))
    assert r.status_code == 200 and outputs_of(r)["label"]["data"] == [0]


@pytest.mark.parametrize("shape, nested", [([2, 1, 4, 4], False), ([2, 4, 4], False), ([2, 1, 4, 4], True),
                                           ([2, 4, 4], True)])
def test_shapes_and_nesting(client, shape, nested):
    x = fakes.images(0.5, 0.0).reshape(shape)
    r = infer(client, tensor(x, data=x.tolist() if nested else None))
    assert r.status_code == 200 and outputs_of(r)["rejected"]["data"] == [False, True]


@pytest.mark.parametrize("request_tensor, fragment", [
    (tensor(fakes.images(0.5), datatype="INT32"), "has datatype 'INT32'; expected FP32 (or FP16, FP64, or UINT8"),
    (tensor(np.full((1, 4, 4), 128.5), datatype="UINT8"), "is UINT8 but holds values other than integers 0..255"),
    (tensor(np.full((1, 4, 4), 256), datatype="UINT8"), "is UINT8 but holds values other than integers 0..255"),
    (tensor(np.full((1, 4, 4), -1), datatype="UINT8"), "is UINT8 but holds values other than integers 0..255"),
    (tensor(np.full((1, 1, 5, 4), 0.5)), "has shape [1, 1, 5, 4]; expected [N, 1, 4, 4] or [N, 4, 4]"),
    (tensor(np.full((1, 4, 4), 0.5), shape=[1, 16]), "has shape [1, 16]; expected"),
    (tensor(np.full((1, 4, 4), 0.5), shape=[4, 4]), "has shape [4, 4]; expected"),
    (tensor(fakes.images(0.5), shape=[2, 1, 4, 4]), "holds 16 values; shape [2, 1, 4, 4] needs 32"),
    (tensor(fakes.images(1.5)), "expected values in [0, 1]"),
    (tensor(fakes.images(-0.1)), "expected values in [0, 1]"),
    (tensor(fakes.images(0.5), data=[1e300] + [0.5] * 15), "NaN or Inf"),  # finite JSON, Inf as float32
    (tensor(fakes.images(0.5), data=["a"] * 16), "must be numbers; got text (JSON strings)"),
    (tensor(fakes.images(0.5), data=[True] * 16), "must be numbers; got booleans (true/false)"),
    (tensor(fakes.images(0.5), shape=[1, 1, 4, "4"]), "list of non-negative integers"),
    (tensor(np.zeros((0, 1, 4, 4))), "no image"),
    ({"name": "input", "data": [0.5] * 16}, 'with "name", "shape", "datatype" and "data"'),
])
def test_bad_tensors_are_a_clear_400_and_the_server_keeps_answering(client, request_tensor, fragment):
    r = infer(client, request_tensor)
    assert r.status_code == 400
    assert fragment in r.json()["error"]
    assert infer(client, tensor(fakes.images(0.5))).status_code == 200
    assert client.upstream.batches and all(len(b) == 1 for b in client.upstream.batches)


@pytest.mark.parametrize("body, fragment", [
    (b"{oops", "not valid JSON"),
    (b'{"inputs": []}', "exactly one input tensor"),
    (b'{"images": ["x"]}', "exactly one input tensor"),
    (b'{"inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 4, 4], "data": []}, '
     b'{"name": "b", "datatype": "FP32", "shape": [1, 4, 4], "data": []}]}', "exactly one input tensor"),
])
def test_bad_requests_are_400(client, body, fragment):
    r = client.post("/v2/models/toy/infer", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and fragment in r.json()["error"]


def binary_request(x, outputs=None, parameters=None, size=None, extra=b"", datatype="FP32"):
    """An OIP v2 request whose input (FP32 unless ``datatype`` says) travels as binary data after the JSON header."""
    raw = np.asarray(x, dtype={"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "UINT8": "u1"}[datatype]).tobytes()
    header = {"inputs": [{"name": "input", "datatype": datatype, "shape": list(np.shape(x)),
                          "parameters": {"binary_data_size": len(raw) if size is None else size}}]}
    if outputs is not None:
        header["outputs"] = outputs
    if parameters is not None:
        header["parameters"] = parameters
    text = json.dumps(header).encode()
    return text + raw + extra, {"Inference-Header-Content-Length": str(len(text))}


def split_response(r):
    """(JSON header, {output name: array}) of a response with binary outputs."""
    n = int(r.headers["inference-header-content-length"])
    header, rest, arrays = json.loads(r.content[:n]), r.content[n:], {}
    for o in header["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is not None:
            arrays[o["name"]] = np.frombuffer(rest[:size], dtype={"FP32": "<f4", "INT64": "<i8", "BOOL": "?",
                                                                  "FP64": "<f8"}[o["datatype"]]).reshape(o["shape"])
            rest = rest[size:]
    assert rest == b""
    return header, arrays


def test_binary_input_gives_the_json_answer(client):
    x = np.stack([np.full((4, 4), v) for v in (0.5, 0.0, 0.3)]).astype(np.float32)
    body, headers = binary_request(x)
    r = client.post("/v2/models/toy/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert outputs_of(r) == outputs_of(infer(client, tensor(x)))


def test_binary_outputs_when_asked(client):
    x = np.stack([np.full((4, 4), v) for v in (0.5, 0.0, 0.3)]).astype(np.float32)
    expected = outputs_of(infer(client, tensor(x)))
    body, headers = binary_request(x, parameters={"binary_data_output": True})
    r = client.post("/v2/models/toy/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    header, arrays = split_response(r)
    assert set(arrays) == {"probabilities", "label", "rejected"}
    assert arrays["label"].tolist() == expected["label"]["data"]
    assert arrays["rejected"].tolist() == expected["rejected"]["data"]
    assert np.allclose(arrays["probabilities"].ravel(), expected["probabilities"]["data"])
    # one output by name, binary; another as JSON; the order is the request's
    body, headers = binary_request(x, outputs=[{"name": "rejected"},
                                               {"name": "label", "parameters": {"binary_data": True}}])
    header, arrays = split_response(client.post("/v2/models/toy/infer", content=body, headers=headers))
    assert [o["name"] for o in header["outputs"]] == ["rejected", "label"]
    assert header["outputs"][0]["data"] == expected["rejected"]["data"] and set(arrays) == {"label"}


@pytest.mark.parametrize("case, fragment", [
    ("short", "runs past the end"),
    ("odd", "multiple of 4"),
    ("trailing", "bytes of binary data follow"),
    ("header", "Inference-Header-Content-Length"),
    ("unknown output", "unknown output"),
])
def test_bad_binary_requests_are_400_and_the_gateway_keeps_serving(client, case, fragment):
    x = np.full((1, 4, 4), 0.5, np.float32)
    body, headers = binary_request(x, outputs=[{"name": "nope"}] if case == "unknown output" else None,
                                   size={"short": 128, "odd": 7}.get(case), extra=b"xx" if case == "trailing" else b"")
    if case == "header":
        headers = {"Inference-Header-Content-Length": str(len(body) + 1)}
    r = client.post("/v2/models/toy/infer", content=body, headers=headers)
    assert r.status_code == 400 and fragment in r.json()["error"], r.text
    assert infer(client, tensor(x)).status_code == 200


def test_too_many_inputs_is_413(toy_bundle):
    c, _ = make_client(toy_bundle, max_batch=2)
    with c:
        r = infer(c, tensor(np.full((3, 4, 4), 0.5)))
        assert r.status_code == 413 and "at most 2" in r.json()["error"]


def test_metrics_count_v2_requests_like_classify(client):
    infer(client, tensor(fakes.images(0.5, 0.0, 1.0)))
    infer(client, tensor(fakes.images(0.5), datatype="INT32"))
    text = fakes.operator_get(client).text
    assert 'magnet_inputs_total{decision="accepted"} 1.0' in text
    assert 'magnet_inputs_total{decision="rejected"} 2.0' in text
    assert 'magnet_detector_rejections_total{detector="R"} 2.0' in text
    assert 'magnet_requests_total{outcome="ok"} 1.0' in text
    assert 'magnet_requests_total{outcome="bad_request"} 1.0' in text
    assert 'magnet_stage_seconds_count{stage="total"} 1.0' in text


def test_explain_mode_adds_score_outputs(toy_bundle):
    c, _ = make_client(toy_bundle, explain=True)
    with c:
        meta = c.get("/v2/models/toy").json()
        r = infer(c, tensor(fakes.images(0.5, 0.0)))
    assert {"name": "scores_R", "datatype": "FP64", "shape": [-1]} in meta["outputs"]
    scores = outputs_of(r)["scores_R"]
    assert scores["datatype"] == "FP64" and scores["shape"] == [2]
    np.testing.assert_allclose(scores["data"], [0.0, 0.25], atol=1e-7)


def test_explain_marks_unscored_rows_with_minus_one(tmp_path):
    detectors = [
        {"name": "R", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 1, "fpr": 0.01, "threshold": 0.1},
        {"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0, "fpr": 0.01,
         "threshold": 0.04},
    ]
    c, _ = make_client(fakes.make_bundle(tmp_path / "div", detectors=detectors), explain=True)
    with c:
        out = outputs_of(infer(c, tensor(fakes.images(0.5, 0.0))))
    # 0.0 fails R and never goes upstream, so the divergence detector has no score for it
    assert out["scores_jsd"]["data"][1] == -1.0 and out["scores_jsd"]["data"][0] >= 0.0
    assert out["rejected"]["data"] == [False, True]


def test_no_scores_without_explain(client):
    assert set(outputs_of(infer(client, tensor(fakes.images(0.5))))) == {"probabilities", "label", "rejected"}


def test_session_gets_the_same_member_as_classify(tmp_path):
    # member m0 rejects black images (score 0.25 >= 0.1), member m1 accepts them (0.25 < 0.3)
    bundle = fakes.make_bundle(tmp_path / "pool", thresholds=[0.1, 0.3])
    secret = "a-shared-secret-for-replicas"
    selector = MemberSelector(secret.encode(), 2)
    by_member = {}
    for i in range(50):
        by_member.setdefault(selector.member(f"s{i}"), f"s{i}")
    assert set(by_member) == {0, 1}
    c, _ = make_client(bundle, session_secret=secret)
    black = fakes.images(0.0)
    with c:
        for member, session in by_member.items():
            headers = {"X-Session-ID": session}
            v2 = c.post("/v2/models/toy/infer", json={"inputs": [tensor(black)]}, headers=headers)
            classify = c.post("/classify", json={"inputs": black.tolist()}, headers=headers)
            assert outputs_of(v2)["rejected"]["data"] == [member == 0]
            assert classify.json()["results"][0]["rejected"] is (member == 0)
            assert "set-cookie" not in v2.headers
        # the cookie works as for /classify: issued once, then reused
        r = c.post("/v2/models/toy/infer", json={"inputs": [tensor(black)]})
        session = r.cookies["magnet_session"]
        c.cookies.set("magnet_session", session)
        rejected = outputs_of(r)["rejected"]["data"]
        again = c.post("/v2/models/toy/infer", json={"inputs": [tensor(black)]})
        assert "set-cookie" not in again.headers
        assert outputs_of(again)["rejected"]["data"] == rejected == [selector.member(session) == 0]
        metrics = fakes.operator_get(c).text
    cookie_member = selector.member(session)
    for member in (0, 1):  # one v2 and one /classify request per member, two v2 ones with the cookie
        count = 2 + 2 * (member == cookie_member)
        assert f'magnet_pool_selections_total{{member="m{member}"}} {count:.1f}' in metrics


@pytest.mark.parametrize("datatype", ["FP16", "FP64", "UINT8"])
@pytest.mark.parametrize("binary", [False, True])
def test_half_double_and_8_bit_inputs_are_answered_as_fp32_ones(client, datatype, binary):
    """FP16 and FP64 tensors are read as their FP32 values; UINT8 as 8-bit pixels (v / 255): as JSON numbers
    or binary data, the answer is the one the same images get as FP32."""
    pixels = np.array([128, 0, 77, 255], np.uint8)
    x8 = np.stack([np.full((4, 4), v, np.uint8) for v in pixels])
    x = (x8 / 255).astype(np.float32) if datatype == "UINT8" else x8.astype(np.float32) / 255
    sent = x8 if datatype == "UINT8" else x.astype({"FP16": np.float16, "FP64": np.float64}[datatype])
    as_fp32 = sent.astype(np.float32) / 255 if datatype == "UINT8" else sent.astype(np.float32)
    want = outputs_of(infer(client, tensor(as_fp32)))
    if binary:
        body, headers = binary_request(sent, datatype=datatype)
        r = client.post("/v2/models/toy/infer", content=body, headers=headers)
    else:
        r = infer(client, tensor(sent, datatype=datatype))
    assert r.status_code == 200, r.text
    assert outputs_of(r) == want and want["rejected"]["data"] == [False, True, False, True]
