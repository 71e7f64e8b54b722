"""The OIP v2 adapter against small in-process aiohttp servers (error paths; timeouts and unreachable
servers for both HTTP adapters are in test_tfserving.py); the real model server is exercised in tests/e2e."""

import asyncio
import json

import numpy as np
import pytest
from aiohttp import web

from service.errors import UpstreamError
from service.upstream.oip import OipUpstream
from tests.fakes import against_fake_server


def run(handler, body):
    routes = [("POST", "/v2/models/m/infer", handler),
              ("GET", "/v2/models/m/ready", lambda r: web.Response(status=200))]
    return asyncio.run(against_fake_server(routes, lambda url: OipUpstream(url + "/", "m", timeout_s=0.5), body))


def test_request_shape_and_response_decoding():
    seen = {}

    async def handler(request):
        seen.update(await request.json())
        n = seen["inputs"][0]["shape"][0]
        return web.json_response({"outputs": [{"name": "logits", "shape": [n, 2], "datatype": "FP32",
                                               "data": list(range(2 * n))}]})

    x = np.random.default_rng(0).uniform(size=(3, 1, 2, 2)).astype(np.float32)
    out = run(handler, lambda u: u.infer(x))
    tensor = seen["inputs"][0]
    assert tensor["name"] == "input" and tensor["datatype"] == "FP32" and tensor["shape"] == [3, 1, 2, 2]
    np.testing.assert_allclose(tensor["data"], x.ravel(), rtol=1e-6)
    np.testing.assert_array_equal(out, [[0, 1], [2, 3], [4, 5]])
    assert run(handler, lambda u: u.ready()) is True


@pytest.mark.parametrize("response, fragment, logged", [
    (web.Response(status=500, text="boom"), "answered 500", "boom"),
    (web.json_response({"nope": 1}), "not an OIP v2 inference response", "KeyError"),
    (web.json_response({"outputs": [{"name": "o", "shape": [5, 2], "data": [0.0] * 10}]}),
     "shape [5, 2] for 1 inputs", None),
])
def test_bad_answers_raise_upstream_error(response, fragment, logged):
    async def handler(request):
        return response

    with pytest.raises(UpstreamError) as e:
        run(handler, lambda u: u.infer(np.zeros((1, 1, 2, 2), np.float32)))
    assert fragment in e.value.message
    if logged:  # what the upstream said is for the log, never for the client
        assert logged in e.value.detail and logged not in e.value.message and "127.0.0.1" not in e.value.message



def binary_answer(outputs: list[tuple[str, str, np.ndarray]], json_only: tuple[str, ...] = ()) -> web.Response:
    entries, chunks = [], []
    for name, datatype, values in outputs:
        if name in json_only:
            entries.append({"name": name, "datatype": datatype, "shape": list(values.shape),
                            "data": values.ravel().tolist()})
            continue
        raw = values.astype({"FP32": "<f4", "FP64": "<f8"}[datatype]).tobytes()
        entries.append({"name": name, "datatype": datatype, "shape": list(values.shape),
                        "parameters": {"binary_data_size": len(raw)}})
        chunks.append(raw)
    header = json.dumps({"outputs": entries}).encode()
    return web.Response(body=header + b"".join(chunks), content_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(header))})


def test_binary_requests_and_answers():
    """MAGNET_UPSTREAM_BINARY: the input goes as FP32 bytes after a JSON header, outputs come back binary;
    the chosen output is found after others, binary or JSON."""
    seen = {}
    x = np.random.default_rng(0).uniform(size=(3, 1, 2, 2)).astype(np.float32)
    logits = np.arange(6, dtype=np.float32).reshape(3, 2)

    async def handler(request):
        body = await request.read()
        n = int(request.headers["Inference-Header-Content-Length"])
        seen["header"], seen["raw"] = json.loads(body[:n]), body[n:]
        return binary_answer([("aux", "FP64", np.ones((3, 4))), ("extra", "FP32", np.zeros(3)),
                              ("logits", "FP32", logits)], json_only=("extra",))

    def upstream(url):
        return OipUpstream(url + "/", "m", output_name="logits", timeout_s=0.5, binary=True)

    routes = [("POST", "/v2/models/m/infer", handler)]
    out = asyncio.run(against_fake_server(routes, upstream, lambda u: u.infer(x)))
    tensor = seen["header"]["inputs"][0]
    assert tensor["parameters"] == {"binary_data_size": x.nbytes} and "data" not in tensor
    assert seen["header"]["parameters"] == {"binary_data_output": True}
    np.testing.assert_array_equal(np.frombuffer(seen["raw"], "<f4").reshape(x.shape), x)
    np.testing.assert_array_equal(out, logits)


def test_a_binary_answer_that_does_not_add_up_is_an_upstream_error():
    async def handler(request):
        r = binary_answer([("logits", "FP32", np.zeros((3, 2)))])
        r.body = r.body[:-4]  # four bytes short
        return r

    x = np.zeros((3, 1, 2, 2), np.float32)
    with pytest.raises(UpstreamError) as e:
        asyncio.run(against_fake_server([("POST", "/v2/models/m/infer", handler)],
                                        lambda url: OipUpstream(url + "/", "m", timeout_s=0.5, binary=True),
                                        lambda u: u.infer(x)))
    assert "does not fit" in e.value.detail
