"""The OIP v2 adapter against small in-process aiohttp servers (error paths); the real model server
is exercised in tests/e2e."""

import asyncio

import numpy as np
import pytest
from aiohttp import web

from service.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from service.upstream.oip import OipUpstream
from tests.procs import free_port


async def _with_server(handler, body):
    app = web.Application()
    app.router.add_post("/v2/models/m/infer", handler)
    app.router.add_get("/v2/models/m/ready", lambda r: web.Response(status=200))
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    upstream = OipUpstream(f"http://127.0.0.1:{port}/", "m", timeout_s=0.5)
    await upstream.start()
    try:
        return await body(upstream)
    finally:
        await upstream.close()
        await runner.cleanup()


def run(handler, body):
    return asyncio.run(_with_server(handler, body))


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


def test_slow_upstream_times_out():
    async def handler(request):
        await asyncio.sleep(2)
        return web.json_response({})

    with pytest.raises(UpstreamTimeout, match="within 0.5 s"):
        run(handler, lambda u: u.infer(np.zeros((1, 1, 2, 2), np.float32)))


def test_unreachable_upstream():
    async def body():
        upstream = OipUpstream(f"http://127.0.0.1:{free_port()}", "m")
        await upstream.start()
        try:
            assert await upstream.ready() is False
            await upstream.infer(np.zeros((1, 1, 2, 2), np.float32))
        finally:
            await upstream.close()

    with pytest.raises(UpstreamUnavailable, match="unreachable"):
        asyncio.run(body())
