"""Every way a model server can answer badly, through the gateway's OIP adapter to a real socket
(tests/faults.py): each fault is a 502, 503 or 504 with a JSON error that names neither the upstream's
URL nor what it said, is counted by reason, and never becomes a label."""

from __future__ import annotations

import os
import time

import psutil
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.settings import Settings
from tests import fakes
from tests.faults import LEAK, FaultServer

GREY = {"inputs": fakes.images(0.5).tolist()}  # accepted by the toy bundle: it goes upstream

EXPECTED = {  # fault -> (status, magnet_upstream_errors_total reason)
    "nan": (502, "bad_response"), "inf": (502, "bad_response"), "cols5": (502, "bad_response"),
    "cols1000": (502, "bad_response"), "huge": (502, "bad_response"), "huge_chunked": (502, "bad_response"),
    "broken": (502, "bad_response"), "error500": (502, "bad_response"), "garbage": (502, "bad_response"),
    "reset": (503, "unavailable"), "hang": (504, "timeout"), "trickle": (504, "timeout"),
}


@pytest.fixture(scope="module")
def server():
    with FaultServer(classes=3) as s:
        yield s


def gateway(toy_bundle, server, fault, **settings) -> TestClient:
    return TestClient(create_app(Settings(bundle=toy_bundle, upstream=server.url, upstream_model=fault,
                                          upstream_timeout_s=1.0, upstream_max_response_bytes=2**20,
                                          upstream_binary=fault == "nan", **settings),
                                 registry=CollectorRegistry()))


def test_a_good_answer_is_served(toy_bundle, server):
    with gateway(toy_bundle, server, "ok") as c:
        r = c.post("/classify", json=GREY)
    assert r.status_code == 200 and r.json()["results"][0]["label"] == 0


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_each_fault_is_a_clean_5xx_counted_by_reason(toy_bundle, server, fault):
    status, reason = EXPECTED[fault]
    rss_before = psutil.Process(os.getpid()).memory_info().rss
    with gateway(toy_bundle, server, fault) as c:
        started = time.perf_counter()
        r = c.post("/classify", json=GREY)
        elapsed = time.perf_counter() - started
        text = fakes.operator_get(c).text
        assert c.get("/healthz").status_code == 200  # and the gateway keeps serving
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert "10.1.2.3" not in error and "secret" not in error and server.url not in error and "127.0.0.1" not in error
    assert f'magnet_upstream_errors_total{{reason="{reason}"}} 1.0' in text
    assert 'magnet_requests_total{outcome="ok"} 0.0' in text
    assert elapsed < 5  # the 1 s timeout, or at once
    if fault.startswith("huge"):  # 512 MiB offered, at most the 1 MiB cap (and buffers) read
        assert psutil.Process(os.getpid()).memory_info().rss - rss_before < 100 * 2**20


def test_what_the_upstream_said_goes_to_the_log(toy_bundle, server, caplog):
    with gateway(toy_bundle, server, "error500") as c:
        assert c.post("/classify", json=GREY).status_code == 502
    assert LEAK in caplog.text
