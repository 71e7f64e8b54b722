"""API keys, the operator/API port split, the member bound to the caller's key, optional probabilities
and per-caller limits, on in-process gateways over toy bundles."""

from __future__ import annotations

import pytest

from service.access import ConfigError, Window, parse_keys
from service.sessions import MemberSelector
from tests import fakes
from tests.fakes import make_client

KEYS = "alice:alice-key-0123456789,bob:bob-key-01234567890"
BLACK = {"inputs": fakes.images(0.0).tolist()}  # rejected by detector R (and by a pool's member 0)
GREY = {"inputs": fakes.images(0.5).tolist()}  # accepted


def alice(**headers):
    return {"Authorization": "Bearer alice-key-0123456789", **headers}


def counter(text: str, series: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(series + " "))
    return float(line.split()[-1])


def test_key_lists_are_parsed_and_weak_or_repeated_keys_refused(tmp_path):
    assert parse_keys("a:0123456789abcdef, b : fedcba9876543210 # ops\n", "x") == {
        "a": "0123456789abcdef", "b": "fedcba9876543210"}
    with pytest.raises(ConfigError, match="shorter than 16"):
        parse_keys("a:short", "x")
    with pytest.raises(ConfigError, match="twice"):
        parse_keys("a:0123456789abcdef,a:fedcba9876543210", "x")
    with pytest.raises(ConfigError, match="id:key"):
        parse_keys("no-colon-here-at-all", "x")
    key_file = tmp_path / "keys"
    key_file.write_text("# id:key, one per line\ncarol:carol-key-0123456789  # the reporting app\n")
    c, _ = make_client(fakes.make_bundle(tmp_path / "b"), api_keys=KEYS, api_key_file=key_file)
    with c:
        ok = c.post("/classify", json=GREY, headers={"X-API-Key": "carol-key-0123456789"})
        assert ok.status_code == 200, ok.text


def test_without_a_valid_key_api_routes_are_401_and_probes_stay_open(toy_bundle):
    c, _ = make_client(toy_bundle, api_keys=KEYS)
    with c:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"X-API-Key": "nope"}):
            r = c.post("/classify", json=GREY, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert r.headers["www-authenticate"].startswith("Bearer")
        assert c.get("/v2/models/toy").status_code == 401
        assert c.post("/classify", json=GREY, headers=alice()).status_code == 200
        assert c.post("/classify", json=GREY, headers={"X-API-Key": "bob-key-01234567890"}).status_code == 200
        for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert c.get(probe).status_code == 200, probe
        text = fakes.operator_get(c).text
    assert counter(text, 'magnet_requests_total{outcome="unauthorized"}') == 4


def test_operator_endpoints_answer_only_on_the_operator_port(toy_bundle):
    c, _ = make_client(toy_bundle)
    with c:
        assert c.get("/metrics").status_code == 404
        assert fakes.operator_get(c).status_code == 200
        assert fakes.operator_get(c, "/docs").status_code == 404  # docs are off by default
        port = c.app.state.gateway.settings.operator_port
        assert c.post(f"http://testserver:{port}/classify", json=GREY).status_code == 404
    c, _ = make_client(toy_bundle, docs=True)
    with c:
        assert fakes.operator_get(c, "/openapi.json").status_code == 200
        assert c.get("/openapi.json").status_code == 404
    c, _ = make_client(toy_bundle, port=80, operator_port=80)  # one port for both: everything on it
    with c:
        assert c.get("/metrics").status_code == 200 and c.post("/classify", json=GREY).status_code == 200


def test_with_keys_the_member_follows_the_key_and_session_ids_are_ignored(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "pool", thresholds=[0.1, 0.3])  # m0 rejects BLACK, m1 accepts it
    secret = "a-shared-secret-for-replicas"
    selector = MemberSelector(secret.encode(), 2)
    keys = {f"k{i}": f"key-number-{i:02d}-0123456789" for i in range(12)}
    member_of = {kid: selector.member(f"key:{kid}") for kid in keys}
    assert set(member_of.values()) == {0, 1}
    c, _ = make_client(bundle, session_secret=secret, api_keys=",".join(f"{k}:{v}" for k, v in keys.items()))
    with c:
        for kid, key in keys.items():
            answers = {c.post("/classify", json=BLACK, headers={"X-API-Key": key, "X-Session-ID": f"s{s}"}
                              ).json()["results"][0]["rejected"] for s in range(6)}
            assert answers == {member_of[kid] == 0}, kid  # one member per key, whatever the session id
        r = c.post("/classify", json=GREY, headers={"X-API-Key": keys["k0"]})
        assert "set-cookie" not in r.headers  # no session is issued when the key decides


def test_session_binding_stays_available_as_an_explicit_choice(tmp_path):
    bundle = fakes.make_bundle(tmp_path / "pool", thresholds=[0.1, 0.3])
    c, _ = make_client(bundle, session_secret="a-shared-secret-for-replicas", api_keys=KEYS, member_by="session")
    with c:
        answers = {c.post("/classify", json=BLACK, headers=alice(**{"X-Session-ID": f"s{s}"})
                          ).json()["results"][0]["rejected"] for s in range(20)}
    assert answers == {True, False}
    with pytest.raises(ConfigError, match="needs API keys"):
        make_client(bundle, member_by="key")


def test_probabilities_are_off_for_pools_unless_asked_and_the_v2_front_says_so(tmp_path):
    pool = fakes.make_bundle(tmp_path / "pool", thresholds=[0.1, 0.3])
    c, _ = make_client(pool)
    with c:
        assert "probabilities" not in c.post("/classify", json=GREY).json()["results"][0]
        names = [o["name"] for o in c.get("/v2/models/toy").json()["outputs"]]
        assert names == ["label", "rejected"]
        v2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.5] * 16}]}
        assert [o["name"] for o in c.post("/v2/models/toy/infer", json=v2).json()["outputs"]] == names
        asked = {**v2, "outputs": [{"name": "probabilities"}]}
        assert c.post("/v2/models/toy/infer", json=asked).status_code == 400
    c, _ = make_client(pool, probabilities="on")
    with c:
        assert len(c.post("/classify", json=GREY).json()["results"][0]["probabilities"]) == 3
    c, _ = make_client(fakes.make_bundle(tmp_path / "single"))
    with c:
        assert "probabilities" in c.post("/classify", json=GREY).json()["results"][0]


def test_a_caller_whose_inputs_keep_being_rejected_is_throttled_alone(toy_bundle):
    c, _ = make_client(toy_bundle, api_keys=KEYS, rejection_limit="3/60")
    with c:
        assert c.post("/classify", json={"inputs": fakes.images(0.0, 1.0).tolist()}, headers=alice()).status_code == 200
        assert c.post("/classify", json=BLACK, headers=alice()).status_code == 200  # the third rejection
        r = c.post("/classify", json=GREY, headers=alice())
        assert r.status_code == 429 and 50 <= int(r.headers["retry-after"]) <= 60, r.headers
        assert "rejected inputs" in r.json()["error"]
        bob = c.post("/classify", json=GREY, headers={"X-API-Key": "bob-key-01234567890"})
        assert bob.status_code == 200  # another caller is not affected
        text = fakes.operator_get(c).text
    assert counter(text, 'magnet_throttled_total{reason="rejections"}') == 1
    assert counter(text, 'magnet_requests_total{outcome="throttled"}') == 1


def test_request_rate_limit_per_caller(toy_bundle):
    c, _ = make_client(toy_bundle, rate_limit="2/60", rejection_limit="0")
    with c:
        codes = [c.post("/classify", json=GREY).status_code for _ in range(3)]
        text = fakes.operator_get(c).text
    assert codes == [200, 200, 429]
    assert counter(text, 'magnet_throttled_total{reason="requests"}') == 1


def test_window_frees_as_events_age_out_and_forgets_the_oldest_callers():
    w = Window(limit=3, seconds=10, max_principals=2)
    w.add("a", 2, now=0.0)
    w.add("a", 1, now=4.0)
    assert w.retry_after("a", now=5.0) == pytest.approx(5.0)  # the 2 at t=0 leave at t=10
    assert w.retry_after("a", now=10.0) == 0.0
    w.add("b", 5, now=10.0)
    w.add("c", 5, now=10.0)  # a third caller: the least recently seen ("a") is forgotten
    assert "a" not in w._events and w.retry_after("b", now=11.0) == pytest.approx(9.0)


def test_json_routes_need_a_json_content_type(toy_bundle):
    c, _ = make_client(toy_bundle)
    with c:
        body = fakes.json_bytes(GREY)
        plain = c.post("/classify", content=body, headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]
        # none declared: JSON from a client that is not a browser page (tritonclient sends JSON so); a page's
        # POST always carries Origin, and it may send an untyped body across origins without a preflight
        assert c.post("/classify", content=body).status_code == 200
        untyped = c.post("/classify", content=body, headers={"Origin": "https://evil.example"})
        assert untyped.status_code == 415 and "got 'none'" in untyped.json()["error"]
        assert c.post("/classify", content=b"{not json").status_code == 400
        for kind in ("application/json; charset=utf-8", "application/vnd.example+json"):
            assert c.post("/classify", content=body, headers={"Content-Type": kind}).status_code == 200, kind
        v2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": [0.5] * 16}]}
        assert c.post("/v2/models/toy/infer", content=fakes.json_bytes(v2),
                      headers={"Content-Type": "text/plain"}).status_code == 415
        assert c.post("/v2/models/toy/infer", content=fakes.json_bytes(v2)).status_code == 200
        assert c.post("/v2/models/toy/infer", content=fakes.json_bytes(v2),
                      headers={"Origin": "null"}).status_code == 415


def test_gzip_and_deflate_bodies_are_inflated_within_the_body_limit(toy_bundle):
    """Content-Encoding gzip or deflate (zlib-wrapped or raw), as tritonclient sends with a request
    compression algorithm, on JSON and binary v2 bodies: the same answers as plain. A body that would
    inflate past MAGNET_MAX_BODY_BYTES is a 413 however small it came; bad or truncated data is a 400,
    another coding a 415; the gateway keeps serving."""
    import gzip
    import json
    import zlib

    import numpy as np

    limit = 64 * 1024
    c, _ = make_client(toy_bundle, max_body_bytes=limit)
    raw_deflate = lambda data: (lambda z: z.compress(data) + z.flush())(zlib.compressobj(wbits=-15))  # noqa: E731
    with c:
        body = fakes.json_bytes(GREY)
        want = c.post("/classify", content=body, headers={"Content-Type": "application/json"}).json()
        for coding, pack in [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
                             ("deflate", raw_deflate), ("GZIP, identity", gzip.compress)]:
            r = c.post("/classify", content=pack(body),
                       headers={"Content-Type": "application/json", "Content-Encoding": coding})
            assert r.status_code == 200 and r.json() == want, (coding, r.text)
        twice = c.post("/classify", content=gzip.compress(zlib.compress(body)),
                       headers={"Content-Type": "application/json", "Content-Encoding": "deflate, gzip"})
        assert twice.status_code == 200 and twice.json() == want
        x = np.full((2, 1, 4, 4), 0.5, np.float32)
        header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 1, 4, 4],
                                         "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        v2 = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
        plain = c.post("/v2/models/toy/infer", content=header + x.tobytes(), headers=v2)
        packed = c.post("/v2/models/toy/infer", content=gzip.compress(header + x.tobytes()),
                        headers={**v2, "Content-Encoding": "gzip"})
        assert plain.status_code == packed.status_code == 200 and packed.json() == plain.json()
        bomb = gzip.compress(b" " * (limit + 1))
        assert len(bomb) < 1024
        r = c.post("/classify", content=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert r.status_code == 413 and "inflates past the limit" in r.json()["error"]
        for data, coding, status, words in [(gzip.compress(body)[:-12], "gzip", 400, "truncated"),
                                            (body, "gzip", 400, "not valid gzip data"),
                                            (body, "deflate", 400, "not valid deflate data"),
                                            (body, "br", 415, "Content-Encoding 'br' is not supported")]:
            r = c.post("/classify", content=data, headers={"Content-Type": "application/json", "Content-Encoding": coding})
            assert r.status_code == status and words in r.json()["error"], (coding, r.text)
        assert c.post("/classify", json=GREY).json() == want


def test_cors_is_off_unless_origins_are_configured(toy_bundle):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    c, _ = make_client(toy_bundle)
    with c:
        assert "access-control-allow-origin" not in c.options("/classify", headers=preflight).headers
        assert "access-control-allow-origin" not in c.post("/classify", json=GREY, headers=preflight).headers
    c, _ = make_client(toy_bundle, cors_origins=("https://app.example",))
    with c:
        r = c.options("/classify", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"


def test_error_messages_are_bounded(toy_bundle):
    c, _ = make_client(toy_bundle)
    with c:
        r = c.get("/v2/models/" + "n" * 5000)
        assert r.status_code == 404 and len(r.json()["error"]) < 200
        v2 = {"inputs": [{"name": "x" * 5000, "datatype": "INT32", "shape": [1, 1, 4, 4], "data": [0.5] * 16}]}
        r = c.post("/v2/models/toy/infer", json=v2)
        assert r.status_code == 400 and len(r.json()["error"]) < 200
        r = c.post("/v2/models/toy/infer", json={**v2, "id": "i" * 5000})
        assert r.status_code == 400 and len(r.text) < 300
