"""The test harness's process starter: a port taken between ``free_port`` and the child's bind is
retried on a new port instead of failing the test."""

import socket
import sys

import httpx
import pytest

from tests import procs

SERVE = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1"]


def test_a_port_taken_before_the_child_binds_it_is_retried_on_a_new_one(monkeypatch, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    real = procs.free_port
    picks = iter([busy])
    monkeypatch.setattr(procs, "free_port", lambda host="127.0.0.1": next(picks, None) or real(host))
    tried = []

    def cmd(port):
        tried.append(port)
        return [*SERVE, str(port)]

    try:
        proc, base = procs.start_on_free_port(cmd, "/", timeout=30, cwd=tmp_path)
        with proc:
            assert tried[0] == busy and len(tried) == 2 and base.endswith(f":{tried[1]}")
            assert httpx.get(base + "/").status_code == 200
    finally:
        taken.close()


def test_other_startup_failures_are_not_retried(tmp_path):
    tried = []

    def cmd(port):
        tried.append(port)
        return [sys.executable, "-c", "raise SystemExit('broken config')"]

    with pytest.raises(RuntimeError, match="broken config"):
        procs.start_on_free_port(cmd, "/", timeout=10, cwd=tmp_path)
    assert len(tried) == 1
