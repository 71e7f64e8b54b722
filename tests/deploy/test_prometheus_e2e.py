"""The compose topology without Docker: KServe model server, gateway and a real Prometheus.

The real KServe server (docker/kserve/serve_onnx.py) serves the shipped MNIST classifier, the gateway
forwards to it, and Prometheus (Debian's `prometheus` binary) scrapes the gateway every second. After
clean digits, uniform noise and one upstream failure (the model server is stopped), **every PromQL
expression of the Grafana dashboard** is evaluated through Prometheus's HTTP API and must return data;
the overall rejection rate must be above 0. Readiness and scrapes are awaited by polling, never by
fixed sleeps.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, SHIPPED_MNIST
from tests.procs import start_gateway, start_model_server, start_on_free_port

PROMETHEUS = shutil.which("prometheus")
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "magnet.json"
# Grafana's variables, replaced as Grafana would for a 1 s scrape interval (at least 4 scrapes).
GRAFANA_VARS = {"$__rate_interval": "1m", "${__rate_interval}": "1m", "$__interval": "15s", "${__interval}": "15s"}
N_CLEAN, N_NOISE = 50, 20

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="the `prometheus` binary is not installed "
                       "(Debian: apt-get install prometheus; `make test` installs it when run as root)"),
    pytest.mark.skipif(not (SHIPPED_MNIST / "manifest.json").exists(), reason="the shipped MNIST bundle is not built"),
]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables substituted) for every target of every panel."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
            out.append((panel["title"], expr))
    return out


class Prom:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict]:
        r = self.client.get("/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {r.text}"
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def wait_for(self, expr: str, ok=lambda result: bool(result), timeout: float = 30.0) -> list[dict]:
        """Poll `expr` until `ok(result)`; the scrape interval is 1 s, so this takes a few seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if ok(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr!r} still {result!r} after {timeout:.0f} s")
            time.sleep(0.2)  # polling pace, not synchronisation


def total(result: list[dict]) -> float:
    return sum(float(s["value"][1]) for s in result)


@pytest.fixture
def stack(tmp_path: Path):
    """KServe -> gateway <- Prometheus, each on a free port; stopped in reverse order."""
    procs = []
    try:
        model_server, ms_url = start_model_server(SHIPPED_MNIST / "classifier.onnx", "mnist",
                                                  log_path=tmp_path / "kserve.log")
        procs.append(model_server)
        gateway, gw_url = start_gateway("--bundle", str(SHIPPED_MNIST), "--upstream", ms_url,
                                        log_path=tmp_path / "gateway.log")
        procs.append(gateway)
        op_port = int(gateway.operator_url.rsplit(":", 1)[1])  # /metrics is on the operator port
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: magnet-gateway\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{op_port}']\n")
        prometheus, prom_url = start_on_free_port(
            lambda port: [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{port}"],
            "/-/ready", timeout=60, log_path=tmp_path / "prometheus.log")
        procs.append(prometheus)
        yield model_server, gw_url, Prom(prom_url)
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_every_dashboard_expression_returns_data(stack, mnist):
    model_server, gateway_url, prom = stack
    queries = dashboard_queries()
    assert len(queries) >= 8

    # The gateway exports its counters at zero from the start: wait for a first scrape of them,
    # so the traffic below shows up as an increase inside the rate window.
    prom.wait_for('magnet_inputs_total{decision="rejected"}')
    noise = np.random.default_rng(0).uniform(size=(N_NOISE, 28, 28)).astype(np.float32)
    with httpx.Client(base_url=gateway_url, timeout=30) as gw:
        r = gw.post("/classify", json={"inputs": mnist.test.x[:N_CLEAN].tolist()})
        assert r.status_code == 200, r.text
        assert sum(not x["rejected"] for x in r.json()["results"]) >= N_CLEAN - 2
        r = gw.post("/classify", json={"inputs": noise.tolist()})
        assert r.status_code == 200 and all(x["rejected"] for x in r.json()["results"]), r.text
        prom.wait_for('sum(magnet_inputs_total{decision="rejected"})', lambda res: total(res) >= N_NOISE)
        prom.wait_for("sum(magnet_inputs_total)", lambda res: total(res) >= N_CLEAN + N_NOISE)

        # An upstream failure, for the upstream-error panel: the model server goes away.
        model_server.stop()
        r = gw.post("/classify", json={"inputs": mnist.test.x[:1].tolist()})
        assert r.status_code == 503, r.text
    prom.wait_for('magnet_upstream_errors_total{reason="unavailable"}')

    # Every expression of every panel: data, not an empty vector. Newly appeared series (the upstream
    # error) need two scrapes in the window before rate() answers, hence the polling.
    for title, expr in queries:
        result = prom.wait_for(expr, timeout=20)
        assert result, f"panel {title!r}: {expr!r} returned no data"

    overall = next(e for t, e in queries if t == "Rejection rate")
    rate = total(prom.query(overall))
    assert 0 < rate < 1, rate  # 20 noise images rejected, the clean digits accepted
    per_detector = next(e for t, e in queries if t == "Rejection rate per detector")
    by_detector = {s["metric"]["detector"]: float(s["value"][1]) for s in prom.query(per_detector)}
    assert set(by_detector) == {"I", "II"} and max(by_detector.values()) > 0, by_detector  # models/mnist's
    members = next(e for t, e in queries if t.startswith("Pool-member"))
    assert {s["metric"]["member"] for s in prom.query(members)} == {"default"}
    reasons = next(e for t, e in queries if t.startswith("Upstream errors"))
    assert {s["metric"].get("reason") for s in prom.query(reasons)} == {"unavailable"}
    stages = next(e for t, e in queries if t.startswith("Latency"))
    assert {s["metric"]["stage"] for s in prom.query(stages)} == {"decode", "queue", "defense", "upstream", "total"}
    batch_rows = next(e for t, e in queries if t.startswith("Rows per micro-batch"))
    assert float(prom.query(batch_rows)[0]["value"][1]) >= 1
