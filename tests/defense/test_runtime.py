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
