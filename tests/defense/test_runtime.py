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
