"""Slow, oversized and abusive clients against a real gateway process, over raw sockets: a request head
over the cap gets 431, a head or body that does not arrive in time is cut off, SIGTERM ends the process
within its shutdown timeout whatever the connections hold, and past its in-flight bound the gateway
sheds load with 503 while liveness stays fast."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import SHIPPED_MNIST
from tests.faults import FaultServer
from tests.procs import REPO, start_gateway

pytestmark = pytest.mark.skipif(not (SHIPPED_MNIST / "manifest.json").exists(), reason="no shipped MNIST bundle")
DIGIT = json.dumps({"inputs": [[0.0] * 28] * 28}).encode()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed ``s`` within ``seconds``, and what it sent before."""
    s.settimeout(seconds)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except (socket.timeout, TimeoutError):
        return False, got
    except ConnectionResetError:
        return True, got


@pytest.fixture(scope="module")
def gateway():
    proc, url = start_gateway("--bundle", str(SHIPPED_MNIST), env={
        "MAGNET_HEADER_TIMEOUT_S": "1", "MAGNET_BODY_TIMEOUT_S": "1", "MAGNET_MAX_HEADER_BYTES": "16384"})
    yield url
    proc.stop()


def test_an_oversized_head_gets_431_and_the_gateway_keeps_serving(gateway):
    s = connect(gateway)
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Big: ")
    try:
        for _ in range(64):  # up to 4 MiB of one header: the gateway must stop reading long before
            s.sendall(b"a" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass
    closed, answer = closed_within(s, 5)
    assert closed and answer.startswith(b"HTTP/1.1 431"), answer[:80]
    live = httpx.get(f"{gateway}/healthz")
    assert live.status_code == 200 and "server" not in live.headers  # no banner


@pytest.mark.parametrize("opening", [b"", b"POST /classify HTTP/1.1\r\nHost: x\r\n"])
def test_silent_and_slow_heads_are_closed_after_the_header_timeout(gateway, opening):
    s = connect(gateway)
    s.sendall(opening)
    started = time.monotonic()
    closed, _ = closed_within(s, 5)
    assert closed and time.monotonic() - started < 3


def test_a_trickled_body_gets_408(gateway):
    s = connect(gateway)
    s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(DIGIT))
    started = time.monotonic()
    for byte in DIGIT[:5]:
        s.sendall(bytes([byte]))
        time.sleep(0.3)
    s.settimeout(5)
    answer = s.recv(65536)  # the 408 comes when the body timeout (1 s) passes, not when the client goes
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert time.monotonic() - started < 4


def test_sigterm_ends_the_process_within_its_shutdown_timeout_despite_slow_bodies():
    proc, url = start_gateway("--bundle", str(SHIPPED_MNIST), env={"MAGNET_SHUTDOWN_TIMEOUT_S": "2",
                                                                  "MAGNET_BODY_TIMEOUT_S": "120"})
    sockets = []
    try:
        for _ in range(3):
            s = connect(url)
            s.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100000\r\n\r\n{")
            sockets.append(s)
        time.sleep(0.5)
        started = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        proc.popen.wait(timeout=15)
        assert time.monotonic() - started < 6
    finally:
        for s in sockets:
            s.close()
        proc.stop()


def test_past_the_in_flight_bound_requests_are_shed_and_liveness_stays_fast():
    with FaultServer(classes=10) as upstream:
        proc, url = start_gateway("--bundle", str(SHIPPED_MNIST), "--upstream", upstream.url,
                                  "--upstream-model", "hang", ready_path="/healthz",
                                  env={"MAGNET_MAX_IN_FLIGHT": "2", "MAGNET_UPSTREAM_TIMEOUT_S": "3",
                                       "MAGNET_BATCH_ROWS": "0"})
        try:
            # a real test digit, which the detectors accept, so that every request goes on to the upstream
            digit = json.loads((REPO / "examples" / "mnist-test-0.json").read_text())

            def post(_):
                return httpx.post(f"{url}/classify", json=digit, timeout=20)

            with ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(post, i) for i in range(6)]
                time.sleep(1.0)
                t = time.monotonic()
                live = httpx.get(f"{url}/healthz", timeout=5)
                live_s = time.monotonic() - t
                answers = [f.result() for f in futures]
            codes = sorted(r.status_code for r in answers)
            assert live.status_code == 200 and live_s < 0.5
            shed = [r for r in answers if r.status_code == 503]
            assert len(shed) >= 3 and all(r.headers.get("retry-after") == "1" for r in shed), codes
            assert "overloaded" in shed[0].json()["error"]
            metrics = httpx.get(f"{proc.operator_url}/metrics").text
            assert 'magnet_requests_total{outcome="overloaded"}' in metrics
        finally:
            proc.stop()
