"""The TF Serving REST adapter against small in-process aiohttp servers, the factory that picks an adapter,
and the layout setting both HTTP adapters honour."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest
from aiohttp import web

from service.defense import Defense
from service.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from service.settings import Settings
from service.upstream import OipUpstream, TfServingUpstream, make_upstream
from tests.fakes import against_fake_server
from tests.procs import free_port, url_of

AVAILABLE = {"model_version_status": [{"version": "2", "state": "AVAILABLE",
                                       "status": {"error_code": "OK", "error_message": ""}}]}


def run(predict, body, status=AVAILABLE, **options):
    routes = [("POST", "/v1/models/m:predict", predict), ("GET", "/v1/models/m", lambda r: web.json_response(status))]
    return asyncio.run(against_fake_server(
        routes, lambda url: TfServingUpstream(url + "/", "m", timeout_s=0.5, **options), body))


def recording(seen, k=2):
    async def predict(request):
        seen.update(await request.json())
        n = len(seen["instances"])
        return web.json_response({"predictions": np.arange(n * k).reshape(n, k).tolist()})
    return predict


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_request_layout_and_response_decoding(layout):
    seen = {}
    x = np.random.default_rng(0).uniform(size=(3, 2, 4, 5)).astype(np.float32)  # N, C, H, W
    out = run(recording(seen), lambda u: u.infer(x), layout=layout)
    instances = np.asarray(seen["instances"], np.float32)
    expected = x.transpose(0, 2, 3, 1) if layout == "NHWC" else x
    assert instances.shape == ((3, 4, 5, 2) if layout == "NHWC" else (3, 2, 4, 5))
    np.testing.assert_allclose(instances, expected, rtol=1e-6)
    np.testing.assert_array_equal(out, [[0, 1], [2, 3], [4, 5]])
    assert out.dtype == np.float32


def test_named_outputs_of_a_multi_output_model():
    async def predict(request):
        n = len((await request.json())["instances"])
        return web.json_response({"predictions": [{"logits": [i, 0.0], "classes": i} for i in range(n)]})

    x = np.zeros((2, 1, 2, 2), np.float32)
    out = run(predict, lambda u: u.infer(x), output_name="logits")
    np.testing.assert_array_equal(out, [[0, 0], [1, 0]])
    with pytest.raises(UpstreamError, match="set MAGNET_UPSTREAM_OUTPUT"):
        run(predict, lambda u: u.infer(x))


@pytest.mark.parametrize("status, ready", [
    (AVAILABLE, True),
    ({"model_version_status": [{"version": "1", "state": "END"}, {"version": "2", "state": "AVAILABLE"}]}, True),
    ({"model_version_status": [{"version": "1", "state": "LOADING"}]}, False),
    ({"model_version_status": []}, False),
    ({"error": "Could not find any versions of model m"}, False),
    ({"name": "m", "ready": True}, True),  # KServe's v1 protocol
    ({"name": "m", "ready": False}, False),
])
def test_readiness_from_model_status(status, ready):
    assert run(recording({}), lambda u: u.ready(), status=status) is ready


def test_not_ready_when_the_status_route_fails():
    routes = [("GET", "/v1/models/m", lambda r: web.json_response({"error": "not found"}, status=404))]
    assert asyncio.run(against_fake_server(routes, lambda url: TfServingUpstream(url, "m"),
                                           lambda u: u.ready())) is False


@pytest.mark.parametrize("response, fragment", [
    (web.json_response({"error": "Input to reshape is a tensor with 16 values"}, status=400), "answered 400"),
    (web.json_response({"error": "Servable not found"}), "answered an error"),
    (web.Response(status=500, text="boom"), "answered 500"),
    (web.json_response({"outputs": [[0.0, 1.0]]}), "not a TF Serving predict response"),
    (web.Response(text="not json"), "not a TF Serving predict response"),
    (web.json_response({"predictions": [[0.0, 1.0], [1.0, 0.0]]}), "shape [2, 2] for 1 inputs"),
    (web.json_response({"predictions": [0.0, 1.0]}), "shape [2] for 1 inputs"),
])
def test_bad_answers_raise_upstream_error(response, fragment):
    async def predict(request):
        return response

    with pytest.raises(UpstreamError) as e:
        run(predict, lambda u: u.infer(np.zeros((1, 1, 2, 2), np.float32)))
    assert fragment in e.value.message
    # what the upstream said goes to the log (detail), not to the client
    assert not any(w in e.value.message for w in ("reshape", "Servable", "boom"))


ADAPTERS = [(OipUpstream, "/v2/models/m/infer"), (TfServingUpstream, "/v1/models/m:predict")]


@pytest.mark.parametrize("kind, path", ADAPTERS)
def test_slow_upstream_times_out(kind, path):
    async def predict(request):
        await asyncio.sleep(2)
        return web.json_response({})

    with pytest.raises(UpstreamTimeout, match="within 0.5 s"):
        asyncio.run(against_fake_server([("POST", path, predict)], lambda url: kind(url, "m", timeout_s=0.5),
                                        lambda u: u.infer(np.zeros((1, 1, 2, 2), np.float32))))


@pytest.mark.parametrize("kind, path", ADAPTERS)
def test_unreachable_upstream(kind, path):
    async def body():
        upstream = kind(url_of(free_port()), "m")
        await upstream.start()
        try:
            assert await upstream.ready() is False
            await upstream.infer(np.zeros((1, 1, 2, 2), np.float32))
        finally:
            await upstream.close()

    with pytest.raises(UpstreamUnavailable, match="unreachable"):
        asyncio.run(body())


@pytest.mark.parametrize("protocol, kind", [("v2", OipUpstream), ("tfserving", TfServingUpstream)])
def test_factory_picks_the_adapter_and_passes_the_settings(toy_bundle, protocol, kind):
    settings = Settings(bundle=toy_bundle, upstream="http://tf:8501", upstream_protocol=protocol,
                        upstream_layout="NHWC", upstream_outputs="probabilities", upstream_timeout_s=3)
    with ThreadPoolExecutor(1) as executor:
        upstream = make_upstream(settings, Defense(toy_bundle, device="cpu"), executor)
    assert type(upstream) is kind
    assert (upstream.base, upstream.model, upstream.layout, upstream.outputs, upstream.timeout_s) == \
        ("http://tf:8501", "toy", "NHWC", "probabilities", 3)


def test_the_v2_adapter_sends_nhwc_too():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    tensor = orjson.loads(OipUpstream("http://t", "m", layout="NHWC").encode(x))["inputs"][0]
    assert tensor["shape"] == [2, 2, 2, 3]
    np.testing.assert_array_equal(tensor["data"], x.transpose(0, 2, 3, 1).ravel())
    assert orjson.loads(OipUpstream("http://t", "m").encode(x))["inputs"][0]["shape"] == [2, 3, 2, 2]


def test_max_batch_splits_a_tf_serving_batch_into_calls_answered_in_order():
    sizes = []

    async def predict(request):
        rows = np.asarray((await request.json())["instances"], np.float32)
        sizes.append(len(rows))
        return web.json_response({"predictions": np.stack([rows.reshape(len(rows), -1).sum(1),
                                                           np.zeros(len(rows))], 1).tolist()})

    x = np.random.default_rng(1).uniform(size=(7, 1, 2, 2)).astype(np.float32)
    out = run(predict, lambda u: u.infer(x), max_batch=3)
    assert sorted(sizes) == [1, 3, 3]
    np.testing.assert_allclose(out[:, 0], x.reshape(7, -1).sum(1), rtol=1e-6)
    sizes.clear()
    run(predict, lambda u: u.infer(x))  # unset, and the server has no metadata to say otherwise: one call
    assert sizes == [7]


def test_the_factory_passes_the_upstream_batch_limit(toy_bundle):
    defense = Defense(toy_bundle)
    with ThreadPoolExecutor(1) as pool:
        for protocol in ("v2", "tfserving"):
            u = make_upstream(Settings(bundle=toy_bundle, upstream="http://m:8000", upstream_protocol=protocol,
                                       upstream_max_batch=16), defense, pool)
            assert u.batch_limit == (16, False)
        assert make_upstream(Settings(bundle=toy_bundle, upstream="http://m:8000"), defense, pool).batch_limit is None


def test_a_uint8_upstream_is_set_by_hand_and_needs_8_bit_pixels(toy_bundle):
    from service.access import ConfigError

    defense = Defense(toy_bundle)
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ConfigError, match="UINT8 takes 8-bit pixels: set MAGNET_UPSTREAM_SCALE=255"):
            make_upstream(Settings(bundle=toy_bundle, upstream="http://m:8000", upstream_datatype="uint8"),
                          defense, pool)
        u = make_upstream(Settings(bundle=toy_bundle, upstream="http://m:8000", upstream_protocol="tfserving",
                                   upstream_datatype="UINT8", upstream_scale=255), defense, pool)
        assert u.datatype == "UINT8"
    seen = {}
    x = np.full((2, 1, 2, 2), 0.2, np.float32)
    from service.defense.contract import ClassifierInput

    run(recording(seen), lambda u: u.infer(x), datatype="UINT8", contract=ClassifierInput(scale=255.0))
    assert seen["instances"] == [[[[51, 51], [51, 51]]]] * 2  # ints: 0.2 * 255 = 51


def tf_metadata(dtype: str, first: str):
    """A TF Serving ``/metadata`` answer for a model of one input (sizes are strings, as TF Serving writes)."""
    spec = {"dtype": dtype, "tensor_shape": {"dim": [{"size": first}, {"size": "2"}, {"size": "2"}, {"size": "1"}],
                                             "unknown_rank": False}, "name": "serving_default_pixels:0"}
    return {"model_spec": {"name": "m", "version": "2"}, "metadata": {"signature_def": {"signature_def": {
        "serving_default": {"inputs": {"pixels": spec}, "outputs": {}, "method_name": "tensorflow/serving/predict"}}}}}


@pytest.mark.parametrize("dtype, first, sent_sizes, sent_type", [
    ("DT_UINT8", "-1", [5], int),  # 8-bit pixels, any batch
    ("DT_FLOAT", "2", [2, 2, 2], float),  # a fixed batch of 2: the last call padded
])
def test_tf_serving_metadata_gives_the_datatype_and_a_fixed_batch(dtype, first, sent_sizes, sent_type):
    from service.defense.contract import ClassifierInput

    sent, asked = [], []

    async def predict(request):
        rows = (await request.json())["instances"]
        sent.append(rows)
        return web.json_response({"predictions": [[float(np.sum(r)), 0.0] for r in rows]})

    async def metadata(request):
        asked.append(1)
        return web.json_response(tf_metadata(dtype, first))

    routes = [("POST", "/v1/models/m:predict", predict), ("GET", "/v1/models/m/metadata", metadata)]
    x = np.random.default_rng(2).uniform(size=(5, 1, 2, 2)).astype(np.float32)

    async def twice(u):
        return await u.infer(x), await u.infer(x)

    out, _ = asyncio.run(against_fake_server(routes, lambda url: TfServingUpstream(
        url + "/", "m", timeout_s=2.0, contract=ClassifierInput(scale=255.0)), twice))
    assert asked == [1] and sorted(len(r) for r in sent[:len(sent_sizes)]) == sorted(sent_sizes)
    assert all(isinstance(v, sent_type) for v in np.ravel(sent[0]).tolist())
    want = np.rint(x * 255).reshape(5, -1).sum(1) if sent_type is int else (x * 255).reshape(5, -1).sum(1)
    np.testing.assert_allclose(out[:, 0], want, rtol=1e-5)



@pytest.mark.parametrize("dtype, datatype, warned", [
    ("DT_HALF", "FP16", False), ("DT_DOUBLE", "FP64", False), ("DT_BFLOAT16", "FP32", False),
    ("DT_INT32", "FP32", True)])
def test_tf_serving_half_and_double_inputs_are_named_and_sent_so(dtype, datatype, warned, caplog):
    """DT_HALF and DT_DOUBLE are the gateway's FP16 and FP64 (values cast: FP16 rounds them); a dtype it
    cannot send (int32) is logged and sent as FP32 numbers; bfloat16 takes those numbers without a word."""
    import logging

    sent = []

    async def predict(request):
        rows = (await request.json())["instances"]
        sent.append(np.asarray(rows, np.float64))
        return web.json_response({"predictions": [[0.0, 1.0]] * len(rows)})

    async def metadata(request):
        return web.json_response(tf_metadata(dtype, "-1"))

    routes = [("POST", "/v1/models/m:predict", predict), ("GET", "/v1/models/m/metadata", metadata)]
    x = np.full((2, 1, 2, 2), 0.1, np.float32)

    async def run(u):
        await u.infer(x)
        return u.datatype

    with caplog.at_level(logging.INFO, logger="magnet"):
        got = asyncio.run(against_fake_server(routes, lambda url: TfServingUpstream(url + "/", "m", timeout_s=2.0), run))
    assert got == datatype and f"input {datatype}" in caplog.text
    assert ("its input is INT32, which the gateway does not send" in caplog.text) == warned
    as_sent = {"FP16": np.float16, "FP64": np.float64, "FP32": np.float32}[datatype]
    assert sent[0].astype(as_sent).tolist() == x.astype(as_sent).tolist()
    assert (abs(sent[0].flat[0] - 0.1) > 1e-5) == (datatype == "FP16")  # FP16: 0.099975586 on the wire


def test_tf_serving_scores_of_a_1x1_convolution_head_are_read_as_n_by_k():
    async def predict(request):
        rows = (await request.json())["instances"]
        return web.json_response({"predictions": [[[[float(k)]], [[0.5]]] for k in range(len(rows))]})

    routes = [("POST", "/v1/models/m:predict", predict)]
    out = asyncio.run(against_fake_server(routes, lambda url: TfServingUpstream(
        url + "/", "m", timeout_s=2.0, max_batch=8, datatype="FP32"), lambda u: u.infer(np.zeros((3, 1, 2, 2), np.float32))))
    assert out.tolist() == [[0.0, 0.5], [1.0, 0.5], [2.0, 0.5]]
