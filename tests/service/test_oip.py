"""The OIP v2 adapter against small in-process aiohttp servers (error paths; timeouts and unreachable
servers for both HTTP adapters are in test_tfserving.py); the real model server is exercised in tests/e2e."""

import asyncio

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


@pytest.mark.parametrize("response, error, fragment", [
    (web.Response(status=500, text="boom"), UpstreamError, "answered 500: boom"),
    (web.json_response({"nope": 1}), UpstreamError, "not an OIP v2 inference response"),
    (web.json_response({"outputs": [{"name": "o", "shape": [5, 2], "data": [0.0] * 10}]}), UpstreamError,
     "shape [5, 2] for 1 inputs"),
])
def test_bad_answers_raise_upstream_error(response, error, fragment):
    async def handler(request):
        return response

    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        run(handler, lambda u: u.infer(np.zeros((1, 1, 2, 2), np.float32)))

