"""The gateway in-process on a toy bundle: behaviour of /classify, health, metrics and errors."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.errors import UpstreamTimeout, UpstreamUnavailable
from tests import fakes
from tests.fakes import make_client


JSON = {"Content-Type": "application/json"}


def post(client, payload):
    return client.post("/classify", json=payload)


def test_results_in_input_order_and_rejected_never_go_upstream(client):
    x = fakes.images(0.5, 0.0, 0.3, 1.0)  # 0.0 and 1.0 are rejected by detector R
    r = post(client, {"inputs": x.tolist()})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [res["rejected"] for res in results] == [False, True, False, True]
    assert results[1] == {"rejected": True, "label": None, "probabilities": None}
    # reformed 0.5 -> sum 8 -> logits (8, 0, 0) -> class 0; reformed 0.3 -> 0.4, sum 6.4 -> (6.4, 1.6, 0)
    assert results[0]["label"] == 0 and results[2]["label"] == 0
    p = np.exp([6.4, 1.6, 0.0]) / np.exp([6.4, 1.6, 0.0]).sum()
    np.testing.assert_allclose(results[2]["probabilities"], p, rtol=1e-5)
    # one upstream call holding only the two accepted inputs, reformed
    assert len(client.upstream.batches) == 1
    np.testing.assert_allclose(client.upstream.batches[0][:, 0, 0, 0], [0.5, 0.4], atol=1e-6)
    assert "scores" not in results[0]


def test_all_rejected_makes_no_upstream_call(client):
    r = post(client, {"inputs": fakes.images(0.0, 1.0).tolist()})
    assert [res["rejected"] for res in r.json()["results"]] == [True, True]
    assert client.upstream.batches == []


@pytest.mark.parametrize("shape", [(4, 4), (1, 4, 4), (3, 4, 4), (2, 1, 4, 4)])
def test_accepted_layouts(client, shape):
    x = np.full(shape, 0.5)
    r = post(client, {"inputs": x.tolist()})
    assert r.status_code == 200
    n = shape[0] if len(shape) == 4 or shape == (3, 4, 4) else 1
    assert len(r.json()["results"]) == n


def png_b64(value, size=(4, 4), mode="L", fmt="PNG"):
    buf = io.BytesIO()
    Image.new(mode, size, color=value).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_base64_images(client):
    r = post(client, {"images": [png_b64(128), png_b64(0, fmt="JPEG")]})
    assert r.status_code == 200
    assert [res["rejected"] for res in r.json()["results"]] == [False, True]


@pytest.mark.parametrize("payload, fragment", [
    ({"inputs": [[0.5, 0.5]]}, "expected H x W = 4x4"),
    ({"inputs": "abc"}, "must be numbers; got text (JSON strings)"),
    ({"inputs": [[True] * 4] * 4}, "must be numbers; got booleans"),
    ({"inputs": [[0.5] * 4] * 3 + [[0.5, 0.5, 0.5, "x"]]}, "must be numbers; got text"),
    ({"inputs": [[0.5] * 4] * 3 + [[0.5] * 3]}, "rectangular"),
    ({"inputs": np.full((4, 4), 1.5).tolist()}, "expected values in [0, 1]"),
    ({"inputs": np.full((4, 4), -0.1).tolist()}, "expected values in [0, 1]"),
    ({"images": ["not base64!"]}, "not valid base64"),
    ({"images": [base64.b64encode(b"hello").decode()]}, "could not be decoded"),
    ({"images": [png_b64(1, size=(5, 4))]}, "expected 4x4"),
    ({"images": []}, "non-empty list"),
    ({"something": 1}, 'exactly one of "inputs"'),
    ({"inputs": [], }, "shape [0]"),
])
def test_bad_input_is_a_clear_400_and_the_server_keeps_serving(client, payload, fragment):
    r = post(client, payload)
    assert r.status_code == 400
    assert fragment in r.json()["error"]
    assert post(client, {"inputs": fakes.images(0.5).tolist()}).status_code == 200


def test_nan_is_refused(client):
    body = '{"inputs": [' + ",".join(["[NaN, 0.5, 0.5, 0.5]"] * 4) + "]}"
    r = client.post("/classify", content=body, headers=JSON)
    assert r.status_code == 400  # NaN is not JSON: refused as such


def test_value_overflowing_float32_is_refused(client):
    body = '{"inputs": [' + ",".join(["[1e300, 0.5, 0.5, 0.5]"] * 4) + "]}"  # finite JSON, inf in float32
    r = client.post("/classify", content=body, headers=JSON)
    assert r.status_code == 400 and "NaN or Inf" in r.json()["error"]


def test_invalid_json_is_400(client):
    r = client.post("/classify", content=b"{oops", headers=JSON)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_body_too_large_is_413(toy_bundle):
    c, _ = make_client(toy_bundle, max_body_bytes=2048)
    with c:
        r = post(c, {"inputs": np.full((200, 4, 4), 0.5).tolist()})
        assert r.status_code == 413 and "limit of 2048 bytes" in r.json()["error"]
        assert post(c, {"inputs": fakes.images(0.5).tolist()}).status_code == 200


def test_too_many_inputs_is_413(toy_bundle):
    c, _ = make_client(toy_bundle, max_batch=2)
    with c:
        r = post(c, {"inputs": np.full((3, 4, 4), 0.5).tolist()})
        assert r.status_code == 413 and "at most 2" in r.json()["error"]


def test_explain_mode_adds_scores(toy_bundle):
    c, _ = make_client(toy_bundle, explain=True)
    with c:
        results = post(c, {"inputs": fakes.images(0.5, 0.0).tolist()}).json()["results"]
    assert results[0]["scores"]["R"] == pytest.approx(0.0, abs=1e-7) and results[0]["fired"] == []
    assert results[1]["scores"]["R"] == pytest.approx(0.25) and results[1]["fired"] == ["R"]


def test_upstream_returning_probabilities(toy_bundle):
    c, _ = make_client(toy_bundle, outputs="probabilities")
    with c:
        results = post(c, {"inputs": fakes.images(0.3).tolist()}).json()["results"]
    p = np.exp([6.4, 1.6, 0.0]) / np.exp([6.4, 1.6, 0.0]).sum()
    np.testing.assert_allclose(results[0]["probabilities"], p, rtol=1e-5)


@pytest.mark.parametrize("error, status, reason", [
    (UpstreamTimeout("slow"), 504, "timeout"),
    (UpstreamUnavailable("down"), 503, "unavailable"),
])
def test_upstream_failures_map_to_5xx_and_are_counted(toy_bundle, error, status, reason):
    c, _ = make_client(toy_bundle, fail=error)
    with c:
        r = post(c, {"inputs": fakes.images(0.5).tolist()})
        assert r.status_code == status and r.json()["error"]
        assert c.get("/readyz").status_code == 503
        metrics = fakes.operator_get(c).text
    assert f'magnet_upstream_errors_total{{reason="{reason}"}} 1.0' in metrics
    assert 'magnet_requests_total{outcome="upstream_error"} 1.0' in metrics


def test_health_ready_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "live"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["providers"] == ["CPUExecutionProvider"]
    post(client, {"inputs": fakes.images(0.5, 0.0, 1.0).tolist()})
    post(client, {"inputs": [[1]]})
    text = fakes.operator_get(client).text
    assert 'magnet_inputs_total{decision="accepted"} 1.0' in text
    assert 'magnet_inputs_total{decision="rejected"} 2.0' in text
    assert 'magnet_detector_rejections_total{detector="R"} 2.0' in text
    assert 'magnet_requests_total{outcome="ok"} 1.0' in text
    assert 'magnet_requests_total{outcome="bad_request"} 1.0' in text
    assert 'magnet_stage_seconds_count{stage="upstream"} 1.0' in text
    assert 'magnet_stage_seconds_count{stage="defense"} 1.0' in text


def test_bundle_info_names_the_manifests_format_version_and_sha256(toy_bundle):
    import json

    from service.defense.bundle import sha256_of

    path = toy_bundle / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 1  # an old manifest: served after migration, reported as written
    path.write_text(json.dumps(data))
    c, _ = make_client(toy_bundle)
    with c:
        text = fakes.operator_get(c).text
    assert f'magnet_bundle_info{{bundle="toy",sha256="{sha256_of(path)}",version="1"}} 1.0' in text


def test_session_picks_the_member_that_defends_it(tmp_path):
    from service.sessions import MemberSelector

    # member m0 rejects black images (score 0.25 >= 0.1), member m1 accepts them (0.25 < 0.3)
    bundle = fakes.make_bundle(tmp_path / "pool", thresholds=[0.1, 0.3])
    secret = "a-shared-secret-for-replicas"
    selector = MemberSelector(secret.encode(), 2)
    by_member = {}
    for i in range(50):
        by_member.setdefault(selector.member(f"s{i}"), f"s{i}")
    c, _ = make_client(bundle, session_secret=secret)
    with c:
        for member, session in by_member.items():
            for _ in range(3):  # sticky
                r = c.post("/classify", json={"inputs": fakes.images(0.0).tolist()},
                           headers={"X-Session-ID": session})
                assert r.json()["results"][0]["rejected"] is (member == 0)
                assert "set-cookie" not in r.headers
        metrics = fakes.operator_get(c).text
    assert 'magnet_pool_selections_total{member="m0"} 3.0' in metrics
    assert 'magnet_pool_selections_total{member="m1"} 3.0' in metrics


def test_responses_carry_no_member_identity(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "pool", thresholds=[0.1, 0.3])
    c, _ = make_client(bundle)
    with c:
        r = c.post("/classify", json={"inputs": fakes.images(0.5).tolist()})
        session = r.cookies["magnet_session"]
        assert len(session) >= 24
        assert set(r.json()) == {"results"}
        # a pool returns no probabilities by default: they would fingerprint the member
        assert set(r.json()["results"][0]) == {"rejected", "label"}
        # no header names the member; the session cookie is a random token, so its value is left out
        # (a random token may contain "m0" by chance)
        named = {k: v for k, v in r.headers.items() if k.lower() != "set-cookie"}
        assert not any("member" in k.lower() for k in r.headers.keys())
        assert not any("m0" in v or "m1" in v or "member" in v.lower() for v in named.values())
        # the cookie is reused: no new session is issued
        c.cookies.set("magnet_session", session)
        assert "set-cookie" not in c.post("/classify", json={"inputs": fakes.images(0.5).tolist()}).headers


def test_overlong_session_id_is_400(client):
    r = client.post("/classify", json={"inputs": fakes.images(0.5).tolist()}, headers={"X-Session-ID": "x" * 300})
    assert r.status_code == 400 and "session id" in r.json()["error"]


def test_divergence_member_sends_x_and_reformed_in_one_call(tmp_path):
    detectors = [
        {"name": "R", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 1, "fpr": 0.01, "threshold": 0.1},
        {"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0, "fpr": 0.01,
         "threshold": 0.04},
    ]
    c, upstream = make_client(fakes.make_bundle(tmp_path / "div", detectors=detectors))
    with c:
        results = c.post("/classify", json={"inputs": fakes.images(0.5, 0.0, 0.3).tolist()}).json()["results"]
    # 0.0 fails R and never goes upstream; 0.5 and 0.3 go up as x and ae(x): 4 rows in one call
    assert len(upstream.batches) == 1 and upstream.batches[0].shape[0] == 4
    np.testing.assert_allclose(upstream.batches[0][:, 0, 0, 0], [0.5, 0.3, 0.5, 0.4], atol=1e-6)
    # JSD of 0.3 vs its reconstruction is 0.0487 >= 0.04: rejected; 0.5 is its own reconstruction
    assert [r["rejected"] for r in results] == [False, True, True]
    assert results[0]["label"] == 0


def test_shadow_mode_rejects_nothing_sends_inputs_as_they_came_and_counts_what_it_would_do(toy_bundle):
    c, upstream = make_client(toy_bundle, mode="SHADOW")  # the vocabulary is case-insensitive
    with c:
        results = post(c, {"inputs": fakes.images(0.5, 0.0, 0.3, 1.0).tolist()}).json()["results"]
        text = fakes.operator_get(c).text
    # every input answered, none reformed: one upstream call with the four inputs as they came
    assert [r["rejected"] for r in results] == [False] * 4 and all("would_reject" not in r for r in results)
    assert len(upstream.batches) == 1
    np.testing.assert_allclose(upstream.batches[0][:, 0, 0, 0], [0.5, 0.0, 0.3, 1.0], atol=1e-6)
    # 0.3 unreformed: sum 4.8 -> logits (4.8, 3.2, 0) -> class 0 (reformed it would be 6.4, 1.6, 0)
    p = np.exp([4.8, 3.2, 0.0]) / np.exp([4.8, 3.2, 0.0]).sum()
    np.testing.assert_allclose(results[2]["probabilities"], p, rtol=1e-5)
    assert results[1]["label"] == 1  # a black image, which enforcing rejects, gets the classifier's answer
    # the metrics count what enforcing would have done
    assert 'magnet_inputs_total{decision="rejected"} 2.0' in text and "magnet_shadow_mode 1.0" in text
    assert 'magnet_detector_rejections_total{detector="R"} 2.0' in text


def test_shadow_mode_with_explain_says_what_enforcing_would_have_answered(tmp_path):
    detectors = [
        {"name": "R", "kind": "reconstruction", "autoencoder": "half.onnx", "p": 1, "fpr": 0.01, "threshold": 0.1},
        {"name": "jsd", "kind": "divergence", "autoencoder": "half.onnx", "temperature": 1.0, "fpr": 0.01,
         "threshold": 0.04},
    ]
    c, upstream = make_client(fakes.make_bundle(tmp_path / "div", detectors=detectors), mode="shadow", explain=True)
    with c:
        results = post(c, {"inputs": fakes.images(0.5, 0.0, 0.3).tolist()}).json()["results"]
        v2 = c.post("/v2/models/toy/infer", json={"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32",
                                                               "data": [0.0] * 16}]}).json()
    # x and ae(x) of all three rows in one call (enforcing would have kept the black image back)
    assert upstream.batches[0].shape[0] == 6
    assert [r["would_reject"] for r in results] == [False, True, True]
    # in shadow mode every row is scored by every detector (the black image also went upstream)
    assert [r["rejected"] for r in results] == [False] * 3 and results[1]["fired"] == ["R", "jsd"]
    outputs = {o["name"]: o["data"] for o in v2["outputs"]}
    assert outputs["rejected"] == [False] and outputs["would_reject"] == [True] and outputs["label"] == [1]
    assert v2["parameters"]["rejected_count"] == 0


def test_expected_rejection_is_exported_from_the_manifest_or_the_detectors_fprs(toy_bundle):
    c, _ = make_client(toy_bundle)
    with c:
        text = fakes.operator_get(c).text
    # the toy bundle measured nothing: 1 - (1 - 0.01) for its one detector at FPR 0.01
    assert "magnet_expected_rejection_ratio 0.01" in text and "magnet_shadow_mode 0.0" in text


def test_the_defended_routes_skip_fastapi_but_keep_its_schema_and_its_405(toy_bundle):
    from fastapi.routing import APIRoute

    c, _ = make_client(toy_bundle, docs=True)
    with c:
        first = c.app.router.routes[:2]  # the plain routes answer POST before FastAPI's are tried
        assert [(r.path, type(r) is APIRoute) for r in first] == [("/classify", False),
                                                                   ("/v2/models/{name}/infer", False)]
        paths = fakes.operator_get(c, "/openapi.json").json()["paths"]
        assert "post" in paths["/classify"] and "post" in paths["/v2/models/{name}/infer"]
        for path in ("/classify", "/v2/models/toy/infer"):
            r = c.get(path)
            assert r.status_code == 405 and r.headers["allow"] == "POST", path
        assert c.post("/v2/models/nope/infer", json={"inputs": []}).status_code == 404
        ok = c.post("/v2/models/toy/infer", json={"inputs": [{"name": "x", "shape": [1, 1, 4, 4], "datatype": "FP32",
                                                              "data": fakes.images(0.5).ravel().tolist()}]})
        assert ok.status_code == 200, ok.text
        assert c.post("/classify", json={"inputs": fakes.images(0.5).tolist()}).status_code == 200


@pytest.mark.parametrize("bad, fragment", [
    (np.nan, "NaN or Inf"), (np.inf, "NaN or Inf"), (-np.inf, "NaN or Inf"),
    (1.5, "expected values in [0, 1]"), (-0.1, "expected values in [0, 1]"),
])
def test_input_check_names_the_fault_wherever_it_sits(bad, fragment):
    """check_values looks for NaN or Inf only when min or max leave the range: one bad value among good ones,
    first or last, is still found and named."""
    from service.codecs import check_values
    from service.defense.bundle import InputSpec
    from service.errors import BadInput

    spec = InputSpec(shape=(1, 4, 4))
    for where in (0, -1):
        batch = np.full((2, 1, 4, 4), 0.5, np.float32)
        batch.reshape(-1)[where] = bad
        with pytest.raises(BadInput, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            check_values(batch, spec)
    check_values(np.zeros((0, 1, 4, 4), np.float32), spec)  # nothing to check
    check_values(np.full((2, 1, 4, 4), 1.0, np.float32), spec)  # the range's ends are in it
