"""The gateway's TF Serving / KServe v1 front, in-process on a toy bundle (1 x 4 x 4 grey, 3 classes):
readiness in both servers' forms, predict in row and columnar form (same defense, session and metrics as
/classify), the image forms TF clients send, and its 4xx answers."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.errors import UpstreamUnavailable
from tests import fakes
from tests.fakes import make_client


def predict(client, body, model="toy"):
    return client.post(f"/v1/models/{model}:predict", json=body)


def png(value: float) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 4), round(value * 255), np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_readiness_in_kserve_and_tf_serving_form(client, toy_bundle):
    r = client.get("/v1/models/toy")
    assert r.status_code == 200
    body = r.json()
    assert body["name"] == "toy" and body["ready"] is True
    assert body["model_version_status"][0]["state"] == "AVAILABLE"
    assert client.get("/").json() == {"status": "alive"}
    assert client.get("/v1/models/other").status_code == 404
    down, _ = make_client(toy_bundle, fail=UpstreamUnavailable("down"))
    with down:
        r = down.get("/v1/models/toy")
        assert r.status_code == 503 and r.json()["ready"] is False
        assert r.json()["model_version_status"][0]["state"] == "UNAVAILABLE"


def test_predict_matches_classify_row_by_row(client):
    x = fakes.images(0.5, 0.0, 0.3, 1.0)  # 0.0 and 1.0 are rejected by detector R
    classify = client.post("/classify", json={"inputs": x.tolist()}).json()["results"]
    r = predict(client, {"instances": x.tolist()})
    assert r.status_code == 200
    body = r.json()
    assert body["rejected"] == [False, True, False, True] and body["labels"] == [0, -1, 0, -1]
    for i, row in enumerate(body["predictions"]):
        assert row == (classify[i]["probabilities"] if not classify[i]["rejected"] else [0.0, 0.0, 0.0])
    assert len(client.upstream.batches[-1]) == 2  # the rejected rows never went upstream


@pytest.mark.parametrize("form", ["channels first", "channels last", "no channel", "b64", "named",
                                  "named b64", "columnar", "columnar named", "mixed"])
def test_the_image_forms_tf_clients_send(client, form):
    """An image as C x H x W, H x W x C (TF's convention) or H x W numbers, ``{"b64": PNG}``, or under its
    input's name; the batch in row (``instances``) or columnar (``inputs``) form: the same answer."""
    values = (0.5, 0.4)
    x = fakes.images(*values)
    body = {"channels first": {"instances": x.tolist()},
            "channels last": {"instances": x.transpose(0, 2, 3, 1).tolist()},
            "no channel": {"instances": x[:, 0].tolist()},
            "b64": {"instances": [{"b64": png(v)} for v in values]},
            "named": {"instances": [{"image": row} for row in x.tolist()], "signature_name": "serving_default"},
            "named b64": {"instances": [{"image": {"b64": png(v)}} for v in values]},
            "columnar": {"inputs": x.transpose(0, 2, 3, 1).tolist()},
            "columnar named": {"inputs": {"image": x.tolist()}},
            "mixed": {"instances": [x[0].tolist(), {"b64": png(values[1])}]}}[form]
    want = client.post("/classify", json={"inputs": x.tolist()}).json()["results"]
    r = predict(client, body)
    assert r.status_code == 200, r.text
    rows = r.json()["outputs" if form.startswith("columnar") else "predictions"]
    np.testing.assert_allclose(rows, [w["probabilities"] for w in want], atol=2e-3)  # b64: 8-bit pixels


def test_a_pool_answers_labels_not_probabilities(tmp_path):
    c, _ = make_client(fakes.make_bundle(tmp_path / "pool", thresholds=[0.1, 0.2]))  # both reject 1.0
    with c:
        body = predict(c, {"instances": fakes.images(0.5, 1.0).tolist()}).json()
    assert body["predictions"] == body["labels"] == [0, -1] and body["rejected"] == [False, True]


@pytest.mark.parametrize("body, status, words", [
    ({"instances": [[[[0.5] * 3] * 4]]}, 400, "instances[0] has shape [1, 4, 3]; expected 4x4x1 (channels last)"),
    ({"instances": [{"b64": "%%%"}]}, 400, "instances[0] is not valid base64"),
    ({"instances": [{"b64": png(0.5), "x": 1}]}, 400, 'instances[0] is an object; expected {"b64"'),
    ({"instances": [{"a": [1], "b": [1]}]}, 400, "instances[0] names 2 inputs"),
    ({"instances": [{"picture": [1]}]}, 400, "instances[0] has shape [1]"),
    ({"instances": []}, 400, '"instances" must be a non-empty list'),
    ({"instances": [[[["a"] * 4] * 4]]}, 400, "instances[0] must be numbers"),
    ({"instances": [[[[2.0] * 4] * 4]]}, 400, "expected values in [0, 1]"),
    ({"inputs": {"a": [], "b": []}}, 400, "inputs names 2 inputs"),
    ({"instances": [], "inputs": []}, 400, 'exactly one of "instances"'),
    ({"instances": [[[0.5] * 4] * 4], "extra": 1}, 400, "unknown field(s) ['extra']"),
    ({"instances": [[[0.5] * 4] * 4]} | {"instances": [[[0.5] * 4] * 4] * 300}, 413, "at most"),
])
def test_bad_requests_are_clear_4xx_and_the_gateway_keeps_serving(client, body, status, words):
    r = predict(client, body)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert client.upstream.batches == []  # refused before any work
    assert predict(client, {"instances": fakes.images(0.5).tolist()}).status_code == 200


def test_another_model_name_is_a_404(client):
    r = predict(client, {"instances": fakes.images(0.5).tolist()}, model="mnist")
    assert r.status_code == 404 and "'mnist' is not served here" in r.json()["error"]


def test_api_keys_guard_predict_but_not_liveness(toy_bundle):
    c, _ = make_client(toy_bundle, api_keys="app:0123456789abcdef0123")
    with c:
        assert c.get("/").status_code == 200
        assert predict(c, {"instances": fakes.images(0.5).tolist()}).status_code == 401
        r = c.post("/v1/models/toy:predict", json={"instances": fakes.images(0.5).tolist()},
                   headers={"X-API-Key": "0123456789abcdef0123"})
        assert r.status_code == 200


def test_explain_adds_scores_and_shadow_would_reject(toy_bundle):
    """With MAGNET_EXPLAIN, each detector's score per row, as the v2 front's scores_<detector>; in shadow mode
    nothing is rejected and ``would_reject`` says what enforcing would have answered."""
    c, _ = make_client(toy_bundle, explain=True, mode="shadow")
    with c:
        body = predict(c, {"instances": fakes.images(0.5, 0.0).tolist()}).json()
    np.testing.assert_allclose(body["scores"]["R"], [0.0, 0.25], atol=1e-7)
    assert body["rejected"] == [False, False] and body["would_reject"] == [False, True]
    c, _ = make_client(toy_bundle)
    with c:
        assert set(predict(c, {"instances": fakes.images(0.5).tolist()}).json()) == {"predictions", "labels", "rejected"}
