import logging

from service.defense import runtime


def test_cuda_is_used_when_available_and_not_refused(monkeypatch):
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    assert runtime.choose_providers("auto") == [runtime.CUDA, runtime.CPU]
    assert runtime.choose_providers("cuda") == [runtime.CUDA, runtime.CPU]
    assert runtime.choose_providers("cpu") == [runtime.CPU]


def test_cuda_asked_for_but_missing_falls_back_to_cpu_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CPU])
    with caplog.at_level(logging.WARNING, logger="magnet.runtime"):
        assert runtime.choose_providers("cuda") == [runtime.CPU]
    assert "no CUDA provider" in caplog.text
    caplog.clear()
    assert runtime.choose_providers("auto") == [runtime.CPU]
    assert caplog.text == ""


def test_the_cuda_libraries_are_preloaded_once_when_cuda_is_chosen_and_never_for_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "_preloaded", False)
    monkeypatch.setattr(runtime.ort, "preload_dlls", lambda: calls.append(1), raising=False)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    runtime.choose_providers("cpu")
    assert calls == []
    runtime.choose_providers("cuda")
    runtime.choose_providers("auto")
    assert calls == [1]


def test_a_failed_preload_is_a_warning_and_cuda_is_still_tried(monkeypatch, caplog):
    def broken():
        raise RuntimeError("Invalid parameter of directory")

    monkeypatch.setattr(runtime, "_preloaded", False)
    monkeypatch.setattr(runtime.ort, "preload_dlls", broken, raising=False)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CUDA, runtime.CPU])
    with caplog.at_level(logging.WARNING, logger="magnet.runtime"):
        assert runtime.choose_providers("cuda") == [runtime.CUDA, runtime.CPU]
    assert "could not preload the CUDA libraries" in caplog.text


def test_large_batches_run_in_chunks_on_the_cpu_with_the_same_outputs(monkeypatch):
    import numpy as np

    from tests.conftest import SHIPPED_MNIST

    model = runtime.OnnxModel(SHIPPED_MNIST / "classifier.onnx", [runtime.CPU], threads=1)
    x = np.random.default_rng(0).random((150, 1, 28, 28), dtype=np.float32)
    whole = model(x)
    calls = []
    run = model.session.run
    monkeypatch.setattr(model.session, "run", lambda names, feed: calls.append(len(next(iter(feed.values())))) or run(names, feed))
    monkeypatch.setattr(runtime, "CPU_CHUNK_ELEMENTS", 64 * 28 * 28)
    chunked = model(x)
    assert calls == [64, 64, 22]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_cpu_sessions_share_one_arena_with_the_same_outputs():
    import numpy as np

    from tests.conftest import SHIPPED_MNIST

    assert runtime.shared_cpu_arena()  # this onnxruntime registers an environment arena
    x = np.random.default_rng(1).random((8, 1, 28, 28), dtype=np.float32)
    shared = runtime.OnnxModel(SHIPPED_MNIST / "classifier.onnx", [runtime.CPU], threads=1)
    assert shared.session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    plain = runtime.ort.InferenceSession(str(SHIPPED_MNIST / "classifier.onnx"), providers=[runtime.CPU])
    np.testing.assert_allclose(shared(x), plain.run(None, {plain.get_inputs()[0].name: x})[0], rtol=1e-5, atol=1e-5)


def _level(session):
    return session.get_session_options().graph_optimization_level


def test_auto_optimization_keeps_extended_only_when_it_is_clearly_faster(monkeypatch, caplog):
    """'auto' on the CPU times 'all' against 'extended' and keeps 'extended' only under PREFER_EXTENDED
    of 'all''s time; the outputs are the same graph's either way; a model of the same size reuses the
    choice without probing again."""
    import numpy as np

    from tests.conftest import SHIPPED_MNIST

    ae = SHIPPED_MNIST / "ae_i.onnx"
    x = np.random.default_rng(2).random((4, 1, 28, 28), dtype=np.float32)
    fixed = runtime.OnnxModel(ae, [runtime.CPU], threads=1, optimization="all")
    assert _level(fixed.session) == runtime.LEVELS["all"]
    outputs = {}
    for share, level in ((100.0, "extended"), (0.0, "all")):  # any time passes 100x; none passes 0x
        monkeypatch.setattr(runtime, "_chosen", {})
        monkeypatch.setattr(runtime, "PREFER_EXTENDED", share)
        with caplog.at_level(logging.INFO, logger="magnet.runtime"):
            model = runtime.OnnxModel(ae, [runtime.CPU], threads=1)
        assert _level(model.session) == runtime.LEVELS[level]
        assert f"graph optimization '{level}'" in caplog.text
        outputs[level] = model(x)
        caplog.clear()
        probes = []
        monkeypatch.setattr(runtime, "_fastest", lambda *a: probes.append(a))
        again = runtime.OnnxModel(ae, [runtime.CPU], threads=1)  # same size: the recorded choice, no probe
        assert _level(again.session) == runtime.LEVELS[level] and not probes
        monkeypatch.undo()
    np.testing.assert_allclose(outputs["extended"], outputs["all"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fixed(x), outputs["all"], rtol=1e-6, atol=1e-7)


def test_auto_optimization_is_all_on_a_gpu_and_when_the_input_cannot_be_probed(monkeypatch):
    from tests.conftest import SHIPPED_MNIST

    made = []
    monkeypatch.setattr(runtime, "_session", lambda model, providers, threads, spinning, level: made.append(level))
    runtime.make_session(SHIPPED_MNIST / "ae_i.onnx", [runtime.CUDA, runtime.CPU])
    assert made == ["all"]
    monkeypatch.undo()
    session = runtime.make_session(SHIPPED_MNIST / "ae_i.onnx", [runtime.CPU], threads=1, optimization="basic")
    assert _level(session) == runtime.LEVELS["basic"]
    feeds = runtime.probe_feeds(session, 3)
    assert [v.shape for v in feeds.values()] == [(3, 1, 28, 28)]

    class Input:
        def __init__(self, shape, type="tensor(float)"):
            self.name, self.shape, self.type = "x", shape, type

    class Fake:
        def __init__(self, *inputs):
            self.inputs = inputs

        def get_inputs(self):
            return self.inputs

    assert runtime.probe_feeds(Fake(Input(["N", 3, "H", "W"])), 1) is None  # symbolic image size
    assert runtime.probe_feeds(Fake(Input(["N", 4], "tensor(int64)")), 1) is None
    # image inputs of other types: half-precision values in [0, 1], 8-bit pixels in 0..255
    import numpy as np

    half = runtime.probe_feeds(Fake(Input(["N", 1, 4, 4], "tensor(float16)")), 2)["x"]
    assert half.dtype == np.float16 and half.shape == (2, 1, 4, 4) and 0 <= half.min() and half.max() <= 1
    u8 = runtime.probe_feeds(Fake(Input(["N", 1, 4, 4], "tensor(uint8)")), 2)["x"]
    assert u8.dtype == np.uint8 and u8.max() > 1


def _fixed_batch_graph(path, batch: int | str) -> None:
    """y = each image's channel means (times a weight of ones), with ``batch`` as the first axis: a size, or
    a name for a dynamic axis."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0), helper.make_node("Mul", ["m", "w"], ["y"])]
    graph = helper.make_graph(nodes, "fixed", [x], [y], initializer=[w, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))


def test_a_graph_with_a_fixed_batch_size_runs_any_batch_with_the_same_outputs(tmp_path, caplog):
    """An export without a dynamic batch axis (batch 1, or 2 here) takes any number of images: that many at
    a time, the last call padded; the gateway warns once per model that this costs throughput."""
    import numpy as np

    x = np.random.default_rng(0).uniform(size=(5, 3, 4, 4)).astype(np.float32)
    want = x.mean(axis=(2, 3))
    for batch in (1, 2):
        _fixed_batch_graph(tmp_path / f"b{batch}.onnx", batch)
        with caplog.at_level(logging.WARNING, logger="magnet.runtime"):
            model = runtime.OnnxModel(tmp_path / f"b{batch}.onnx", [runtime.CPU])
        assert model.fixed_batch == batch and f"fixed batch of {batch}" in caplog.text
        for n in (0, 1, 2, 5):
            np.testing.assert_allclose(model(x[:n]), want[:n], rtol=1e-6)
        assert model(x[:0]).shape == (0, 3)
        caplog.clear()
    _fixed_batch_graph(tmp_path / "dynamic.onnx", "N")  # a batch axis by name: one call, no warning
    with caplog.at_level(logging.WARNING, logger="magnet.runtime"):
        dynamic = runtime.OnnxModel(tmp_path / "dynamic.onnx", [runtime.CPU])
    assert dynamic.fixed_batch is None and caplog.text == ""
    np.testing.assert_allclose(dynamic(x), want, rtol=1e-6)
