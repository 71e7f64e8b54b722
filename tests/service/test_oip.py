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


def batch_server(metadata_first=None, triton_max_batch=None, refuse_above=None):
    """Routes of a fake OIP server whose model answers row i's logits as [sum(x_i), i-th call]; it records
    each call's row count and each GET, and answers 400 (as Triton does) past ``refuse_above`` rows or, with
    a fixed ``metadata_first``, to any other row count."""
    calls, gets = [], []

    async def infer(request):
        tensor = (await request.json())["inputs"][0]
        n = tensor["shape"][0]
        calls.append(n)
        if (refuse_above and n > refuse_above) or (metadata_first and n != metadata_first):
            return web.Response(status=400, text=f"inference request batch-size must be <= {refuse_above}")
        x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        data = np.stack([x.reshape(n, -1).sum(1), np.full(n, len(calls))], 1)
        return web.json_response({"outputs": [{"name": "logits", "shape": [n, 2], "datatype": "FP32",
                                               "data": data.ravel().tolist()}]})

    async def metadata(request):
        gets.append(request.path)
        if metadata_first is None:
            return web.Response(status=404)
        return web.json_response({"name": "m", "inputs": [{"name": "input", "datatype": "FP32",
                                                           "shape": [metadata_first, 1, 2, 2]}]})

    async def config(request):
        gets.append(request.path)
        if triton_max_batch is None:
            return web.Response(status=404)
        return web.json_response({"name": "m", "max_batch_size": triton_max_batch})

    routes = [("POST", "/v2/models/m/infer", infer), ("GET", "/v2/models/m", metadata),
              ("GET", "/v2/models/m/config", config)]
    return routes, calls, gets


@pytest.mark.parametrize("server, max_batch, rows", [
    (dict(metadata_first=1), 0, [1] * 5),  # an export without dynamic axes: one row per call
    (dict(metadata_first=2), 0, [2, 2, 2]),  # a fixed batch of 2: the last call padded
    (dict(triton_max_batch=2, refuse_above=2), 0, [2, 2, 1]),  # Triton's max_batch_size caps the calls
    (dict(refuse_above=2), 2, [2, 2, 1]),  # MAGNET_UPSTREAM_MAX_BATCH, the server says nothing
    (dict(), 0, [5]),  # nothing said, nothing set: one call
])
def test_batches_past_the_upstream_limit_go_as_several_calls_answered_in_order(server, max_batch, rows):
    routes, calls, gets = batch_server(**server)
    x = np.random.default_rng(0).uniform(size=(5, 1, 2, 2)).astype(np.float32)

    async def twice(u):
        return await u.infer(x), await u.infer(x[:1])

    out, one = asyncio.run(against_fake_server(
        routes, lambda url: OipUpstream(url + "/", "m", timeout_s=2.0, max_batch=max_batch), twice))
    assert sorted(calls[:len(rows)]) == sorted(rows)
    np.testing.assert_allclose(out[:, 0], x.reshape(5, -1).sum(1), rtol=1e-6)  # every row its own answer, in order
    np.testing.assert_allclose(one[:, 0], x[:1].reshape(1, -1).sum(1), rtol=1e-6)
    if max_batch:
        assert gets == ["/v2/models/m"]  # set: only the metadata is asked (for the input's datatype), once
    else:  # asked once, before the first call
        assert gets in (["/v2/models/m"], ["/v2/models/m", "/v2/models/m/config"])


def test_an_unreachable_server_is_asked_for_its_batch_size_again_at_the_next_call():
    from service.errors import UpstreamUnavailable

    upstream = OipUpstream("http://127.0.0.1:9/", "m", timeout_s=0.5)  # discard port: nothing listens

    async def body():
        await upstream.start()
        try:
            with pytest.raises(UpstreamUnavailable):
                await upstream.infer(np.zeros((2, 1, 2, 2), np.float32))
            return upstream.batch_limit
        finally:
            await upstream.close()

    assert asyncio.run(body()) is None


@pytest.mark.parametrize("binary", [False, True])
def test_a_uint8_model_gets_8_bit_pixels_when_the_contract_gives_them(binary):
    """The metadata says UINT8: the batch goes as rounded 8-bit pixels (JSON ints or one byte each); with a
    contract that does not give 0..255 pixels, every call is a clear upstream error."""
    from service.defense.contract import ClassifierInput

    seen = []

    async def infer(request):
        body = await request.read()
        if binary:
            n = int(request.headers["Inference-Header-Content-Length"])
            tensor = json.loads(body[:n])["inputs"][0]
            values = np.frombuffer(body[n:], np.uint8)
        else:
            tensor = json.loads(body)["inputs"][0]
            values = np.asarray(tensor["data"])
        seen.append((tensor["datatype"], values))
        rows = tensor["shape"][0]
        return web.json_response({"outputs": [{"name": "logits", "shape": [rows, 2], "datatype": "FP32",
                                               "data": [0.0] * 2 * rows}]})

    async def metadata(request):
        return web.json_response({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 2, 2]}]})

    routes = [("POST", "/v2/models/m/infer", infer), ("GET", "/v2/models/m", metadata)]
    x = np.array([0.0, 0.5, 0.999, 1.0] * 3, np.float32).reshape(3, 1, 2, 2)
    make = lambda scale: lambda url: OipUpstream(url + "/", "m", timeout_s=2.0, binary=binary,
                                                 contract=ClassifierInput(scale=scale))
    asyncio.run(against_fake_server(routes, make(255.0), lambda u: u.infer(x)))
    datatype, values = seen[0]
    assert datatype == "UINT8" and values.tolist() == [0, 128, 255, 255] * 3  # rounded, not truncated
    with pytest.raises(UpstreamError, match="input is UINT8; set MAGNET_UPSTREAM_SCALE=255"):
        asyncio.run(against_fake_server(routes, make(1.0), lambda u: u.infer(x)))
    assert len(seen) == 1  # nothing was sent


def test_a_model_whose_input_has_another_name_is_named_in_the_log(caplog):
    import logging

    async def metadata(request):
        return web.json_response({"inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 2, 2]}]})

    async def infer(request):
        return web.Response(status=400, text="unexpected inference input 'input'")

    routes = [("POST", "/v2/models/m/infer", infer), ("GET", "/v2/models/m", metadata)]
    with caplog.at_level(logging.WARNING, logger="magnet"), pytest.raises(UpstreamError, match="answered 400"):
        asyncio.run(against_fake_server(routes, lambda url: OipUpstream(url + "/", "m", timeout_s=2.0),
                                        lambda u: u.infer(np.zeros((1, 1, 2, 2), np.float32))))
    assert "has no input named 'input' (its inputs: 'images'): set MAGNET_UPSTREAM_INPUT" in caplog.text


def server_metadata(name):
    """``GET /v2`` of a server called ``name`` (as MLServer 1.7 answers it); None: a 404, as a fake says nothing."""
    async def handler(request):
        if name is None:
            return web.Response(status=404)
        return web.json_response({"name": name, "version": "1.7.1", "extensions": []})
    return ("GET", "/v2", handler)


@pytest.mark.parametrize("binary, server", [(None, None), (False, None), (True, None), (None, "mlserver"),
                                            (True, "mlserver"), (None, "kserve")])
@pytest.mark.parametrize("datatype", ["FP16", "FP64"])
def test_a_half_or_double_model_gets_its_own_datatype(datatype, binary, server, caplog):
    """The metadata says FP16 or FP64: the batch goes in that datatype, declared so (JSON numbers, or 2 or 8
    bytes each). Unless MAGNET_UPSTREAM_BINARY says otherwise, FP16 goes as binary data (Triton and KServe
    refuse it as JSON numbers; the outputs are then asked as JSON), except to MLServer (its ``GET /v2``
    says so), which has no binary data extension and takes FP16 as JSON. Binary data asked of MLServer is
    logged as a mistake."""
    import logging

    seen = []
    dtype = {"FP16": np.float16, "FP64": np.float64}[datatype]

    async def infer(request):
        body = await request.read()
        if "Inference-Header-Content-Length" in request.headers:
            n = int(request.headers["Inference-Header-Content-Length"])
            header = json.loads(body[:n])
            tensor = header["inputs"][0]
            assert tensor["parameters"]["binary_data_size"] == len(body) - n
            assert header["parameters"]["binary_data_output"] == bool(binary)
            values = np.frombuffer(body[n:], dtype)
        else:
            tensor = json.loads(body)["inputs"][0]
            values = np.asarray(tensor["data"], np.float64).astype(dtype)  # as the server parses them
        seen.append((tensor["datatype"], values, "Inference-Header-Content-Length" in request.headers))
        rows = tensor["shape"][0]
        return web.json_response({"outputs": [{"name": "logits", "shape": [rows, 2], "datatype": "FP32",
                                               "data": [0.0] * 2 * rows}]})

    async def metadata(request):
        return web.json_response({"inputs": [{"name": "input", "datatype": datatype, "shape": [-1, 1, 2, 2]}]})

    routes = [("POST", "/v2/models/m/infer", infer), ("GET", "/v2/models/m", metadata), server_metadata(server)]
    x = np.array([0.0, 0.1, 1 / 3, 1.0] * 3, np.float32).reshape(3, 1, 2, 2)
    with caplog.at_level(logging.INFO, logger="magnet"):
        asyncio.run(against_fake_server(routes, lambda url: OipUpstream(url + "/", "m", timeout_s=2.0, binary=binary),
                                        lambda u: u.infer(x)))
    sent, values, as_binary = seen[0]
    assert sent == datatype and f"input {datatype}" in caplog.text
    half, mlserver = datatype == "FP16", server == "mlserver"
    assert as_binary == (binary is True or (binary is None and half and not mlserver))
    assert ("(input as binary data: FP16 is refused as JSON)" in caplog.text) == (binary is None and half and not mlserver)
    assert ("(input as JSON: MLServer has no binary data extension)" in caplog.text) == (binary is None and half and mlserver)
    assert ("(input as JSON, as MAGNET_UPSTREAM_BINARY=false asks" in caplog.text) == (binary is False and half)
    assert ("MLServer, which has no binary data extension" in caplog.text) == (binary is True and mlserver)
    # the values as that datatype holds them: FP16 rounds 0.1 to 0.0999755..., FP64 keeps FP32's value exactly
    assert values.dtype == dtype and values.tolist() == x.ravel().astype(dtype).tolist()


def test_a_datatype_the_gateway_cannot_send_is_named_in_the_log(caplog):
    """An input the gateway has no encoding for (INT64 here) is logged with what it sends instead (FP32)."""
    import logging

    seen = []

    async def metadata(request):
        return web.json_response({"inputs": [{"name": "input", "datatype": "INT64", "shape": [-1, 1, 2, 2]}]})

    async def infer(request):
        seen.append(json.loads(await request.read())["inputs"][0]["datatype"])
        return web.json_response({"outputs": [{"name": "logits", "shape": [1, 2], "datatype": "FP32",
                                               "data": [0.0, 1.0]}]})

    routes = [("POST", "/v2/models/m/infer", infer), ("GET", "/v2/models/m", metadata)]
    with caplog.at_level(logging.WARNING, logger="magnet"):
        asyncio.run(against_fake_server(routes, lambda url: OipUpstream(url + "/", "m", timeout_s=2.0),
                                        lambda u: u.infer(np.zeros((1, 1, 2, 2), np.float32))))
    assert seen == ["FP32"] and "its input is INT64, which the gateway does not send" in caplog.text


@pytest.mark.parametrize("server", [None, "mlserver"])
def test_an_fp16_output_is_asked_as_binary_data(server, caplog):
    """The metadata says the output is FP16 (the input FP32): the request stays JSON but asks binary
    outputs, since Triton and KServe refuse FP16 as JSON; the two-byte answer is read as float32. MLServer
    is asked nothing of the kind, and its JSON FP16 output is read."""
    import logging

    asked = []

    async def infer(request):
        body = json.loads(await request.read())
        asked.append(body.get("parameters", {}).get("binary_data_output"))
        rows = body["inputs"][0]["shape"][0]
        if not asked[-1]:
            return web.json_response({"outputs": [{"name": "logits", "datatype": "FP16", "shape": [rows, 2],
                                                   "data": [0.5, -1.25] * rows}]})
        raw = np.tile(np.array([0.5, -1.25], np.float16), rows).tobytes()
        header = json.dumps({"outputs": [{"name": "logits", "datatype": "FP16", "shape": [rows, 2],
                                          "parameters": {"binary_data_size": len(raw)}}]}).encode()
        return web.Response(body=header + raw, content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(len(header))})

    async def metadata(request):
        return web.json_response({"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 2, 2]}],
                                  "outputs": [{"name": "logits", "datatype": "FP16", "shape": [-1, 2]}]})

    routes = [("POST", "/v2/models/m/infer", infer), ("GET", "/v2/models/m", metadata), server_metadata(server)]
    with caplog.at_level(logging.INFO, logger="magnet"):
        out = asyncio.run(against_fake_server(routes, lambda url: OipUpstream(url + "/", "m", timeout_s=2.0),
                                              lambda u: u.infer(np.zeros((3, 1, 2, 2), np.float32))))
    assert asked == ([None] if server else [True]) and out.dtype == np.float32 and out.tolist() == [[0.5, -1.25]] * 3
    assert ("(outputs as binary data: FP16 is refused as JSON)" in caplog.text) == (server is None)
    assert ("(outputs as JSON: MLServer has no binary data extension)" in caplog.text) == (server == "mlserver")


def test_scores_of_a_1x1_convolution_head_are_read_as_n_by_k():
    """A model whose scores come out as N x K x 1 x 1 (a 1x1-convolution head without a flatten): read as
    N x K; an output of another shape is still a clear upstream error."""
    shapes = []

    async def infer(request):
        rows = json.loads(await request.read())["inputs"][0]["shape"][0]
        shape = shapes[-1](rows)
        return web.json_response({"outputs": [{"name": "logits", "shape": shape, "datatype": "FP32",
                                               "data": np.arange(np.prod(shape), dtype=float).tolist()}]})

    routes = [("POST", "/v2/models/m/infer", infer)]
    make = lambda url: OipUpstream(url + "/", "m", timeout_s=2.0, max_batch=8, datatype="FP32")  # noqa: E731
    x = np.zeros((3, 1, 2, 2), np.float32)
    shapes.append(lambda n: [n, 2, 1, 1])
    out = asyncio.run(against_fake_server(routes, make, lambda u: u.infer(x)))
    assert out.tolist() == [[0, 1], [2, 3], [4, 5]]
    shapes.append(lambda n: [n, 2, 2])
    with pytest.raises(UpstreamError, match=r"returned shape \[3, 2, 2\] for 3 inputs"):
        asyncio.run(against_fake_server(routes, make, lambda u: u.infer(x)))
