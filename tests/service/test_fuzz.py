"""Property-based fuzzing of ``/classify``, ``/v2/models/{name}/infer`` and ``/v1/models/{name}:predict``
(Hypothesis, fixed budget).

Whatever arrives, the answer is a 200 or a 4xx with a JSON ``{"error": "..."}`` body, never a 500, and
the gateway keeps serving; well-formed inputs must get 200, so a gateway that refused everything would
fail. ``magnet_unexpected_errors_total`` must stay at zero.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fakes
from tests.fakes import make_client

BUDGET = settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLIENT_ERRORS = {400, 404, 413, 415}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=40)
pixels = st.floats(0, 1, allow_nan=False, width=32)
valid_images = st.integers(1, 4).flatmap(lambda n: st.lists(st.lists(st.lists(pixels, min_size=4, max_size=4),
                                                                     min_size=4, max_size=4),
                                                            min_size=n, max_size=n))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    c, _ = make_client(fakes.make_bundle(tmp_path_factory.mktemp("fuzz") / "toy"), max_batch=8,
                       rejection_limit="0")  # throttling is tested elsewhere; here every answer counts
    with c:
        yield c
        text = fakes.operator_get(c).text
    assert "magnet_unexpected_errors_total 0.0" in text


def check(r, valid: bool) -> None:
    assert r.status_code != 500, r.text
    if valid:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code in CLIENT_ERRORS | {200}, r.text
    if r.status_code != 200:
        assert isinstance(r.json()["error"], str)


@BUDGET
@given(body=json_values)
def test_classify_any_json(client, body):
    check(client.post("/classify", json=body), valid=False)


@BUDGET
@given(body=st.dictionaries(st.sampled_from(["inputs", "images", "x"]), json_values, max_size=2))
def test_classify_keyed_json(client, body):
    check(client.post("/classify", json=body), valid=False)


@BUDGET
@given(raw=st.binary(max_size=300), kind=st.sampled_from(["application/json", "text/plain", "application/x+json"]))
def test_classify_any_bytes(client, raw, kind):
    check(client.post("/classify", content=raw, headers={"Content-Type": kind}), valid=False)


@BUDGET
@given(images=valid_images)
def test_classify_valid_inputs_get_200(client, images):
    r = client.post("/classify", json={"inputs": images})
    check(r, valid=True)
    assert len(r.json()["results"]) == len(images)


@BUDGET
@given(tensor=st.fixed_dictionaries({"name": st.text(max_size=8) | json_values,
                                     "datatype": st.sampled_from(["FP32", "FP64", "FP16", "UINT8", "INT8", "BYTES", 3]),
                                     "shape": st.lists(st.integers(-2, 5), max_size=5) | json_values,
                                     "data": st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False) | st.integers(-9, 9), max_size=40)
                                     | json_values}),
       extra=st.dictionaries(st.sampled_from(["id", "parameters", "outputs"]), json_values, max_size=3))
def test_v2_any_tensor(client, tensor, extra):
    check(client.post("/v2/models/toy/infer", json={"inputs": [tensor], **extra}), valid=False)


@BUDGET
@given(header=json_values, raw=st.binary(max_size=200), length=st.integers(-5, 400) | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=5))
def test_v2_any_binary_body(client, header, raw, length):
    head = json.dumps(header).encode()
    check(client.post("/v2/models/toy/infer", content=head + raw,
                      headers={"Inference-Header-Content-Length": str(length), "Content-Type": "application/octet-stream"}),
          valid=False)


@BUDGET
@given(images=valid_images, binary=st.booleans())
def test_v2_valid_tensors_get_200(client, images, binary):
    x = np.asarray(images, dtype=np.float32)[:, None]
    if binary:
        raw = x.astype("<f4").tobytes()
        head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "parameters": {"binary_data_size": len(raw)}}]}).encode()
        r = client.post("/v2/models/toy/infer", content=head + raw,
                        headers={"Inference-Header-Content-Length": str(len(head))})
    else:
        r = client.post("/v2/models/toy/infer", json={"inputs": [{"name": "input", "datatype": "FP32",
                                                                   "shape": list(x.shape), "data": x.ravel().tolist()}]})
    check(r, valid=True)


def png_of(mode: str, size: tuple[int, int], fmt: str, seed: int) -> str:
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "1": 1, "P": 1, "I;16": 1}[mode]
    if mode == "I;16":
        image = Image.frombytes("I;16", size, rng.integers(0, 65535, size[::-1], dtype="<u2").tobytes())
    else:
        shape = size[::-1] + ((channels,) if channels > 1 else ())
        image = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).convert(mode)
    if fmt == "JPEG" and image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


images = st.one_of(
    st.builds(png_of, st.sampled_from(["L", "LA", "RGB", "RGBA", "1", "P", "I;16"]),
              st.tuples(st.integers(1, 9), st.integers(1, 9)), st.sampled_from(["PNG", "JPEG"]), st.integers(0, 99)),
    st.binary(max_size=80).map(lambda b: __import__("base64").b64encode(b).decode()),
    st.text(max_size=20))


@BUDGET
@given(batch=st.lists(images, min_size=1, max_size=4))
def test_classify_any_images(client, batch):
    r = client.post("/classify", json={"images": batch})
    check(r, valid=False)


v1_images = (st.lists(st.lists(st.lists(pixels, min_size=1, max_size=1), min_size=4, max_size=4), min_size=4, max_size=4)
             | st.lists(st.lists(pixels, min_size=4, max_size=4), min_size=4, max_size=4))  # H x W x 1, or H x W


@BUDGET
@given(body=st.dictionaries(st.sampled_from(["instances", "inputs", "signature_name", "x"]),
                            json_values | st.lists(st.fixed_dictionaries({"b64": json_values}), max_size=3)
                            | st.dictionaries(st.text(max_size=6), json_values, max_size=2), max_size=3))
def test_v1_any_request(client, body):
    check(client.post("/v1/models/toy:predict", json=body), valid=False)


@BUDGET
@given(images=st.lists(v1_images, min_size=1, max_size=4), columnar=st.booleans())
def test_v1_valid_requests_get_200(client, images, columnar):
    r = client.post("/v1/models/toy:predict", json={"inputs" if columnar else "instances": images})
    check(r, valid=True)
    assert len(r.json()["outputs" if columnar else "predictions"]) == len(images) == len(r.json()["rejected"])
