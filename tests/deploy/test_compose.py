"""Static checks of the docker compose deployment (Docker itself does not run on our machines).

docker-compose.yml is parsed with PyYAML: the services and their ports, a healthcheck on every
service, health-gated depends_on, and every file or directory it (or a Dockerfile) refers to exists
in the repository, the shipped classifier ONNX included. The Grafana dashboard must parse and each
panel carry a PromQL target; `promtool check config` must accept the Prometheus config.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install -e '.[dev]'")

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "magnet.json"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
TRITON_CONFIG = ROOT / "docker" / "triton" / "models" / "mnist" / "config.pbtxt"
CLASSIFIER = ROOT / "models" / "mnist" / "classifier.onnx"
METRICS = ("magnet_requests_total", "magnet_inputs_total", "magnet_detector_rejections_total",
           "magnet_stage_seconds_bucket", "magnet_upstream_errors_total", "magnet_pool_selections_total",
           "magnet_throttled_total", "magnet_upstream_rows_discarded_total")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def host_ports(service: dict) -> dict[int, int]:
    """Published ports as {container port: host port}."""
    out = {}
    for spec in service.get("ports", []):
        host, container = str(spec).rsplit(":", 1) if ":" in str(spec) else (spec, spec)
        out[int(container)] = int(str(host).rsplit(":", 1)[-1])
    return out


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """Short-syntax bind mounts (source starts with . or /) as (source, target)."""
    mounts = []
    for spec in service.get("volumes", []):
        parts = str(spec).split(":")
        if parts[0].startswith((".", "/")):
            mounts.append((parts[0], parts[1]))
    return mounts


def test_services_profiles_and_ports(services):
    assert set(services) == {"gateway", "triton", "kserve", "gateway-cpu", "prometheus", "grafana"}
    # Default (GPU) profile: no `profiles`; the CPU variant only under --profile cpu.
    for name in ("gateway", "triton", "prometheus", "grafana"):
        assert "profiles" not in services[name], name
    for name in ("kserve", "gateway-cpu"):
        assert services[name]["profiles"] == ["cpu"], name
    assert host_ports(services["gateway"]) == {8000: 8000}
    assert set(host_ports(services["triton"])) == {8000, 8001, 8002}
    assert host_ports(services["prometheus"]) == {9090: 9090}
    assert host_ports(services["grafana"]) == {3000: 3000}
    assert 8000 in host_ports(services["gateway-cpu"]) and 8080 in host_ports(services["kserve"])
    published = [p for s in services.values() for p in host_ports(s).values()]
    assert len(published) == len(set(published)), f"two services publish the same host port: {published}"


def test_gateways_point_at_their_model_servers(services):
    assert services["gateway"]["environment"]["MAGNET_UPSTREAM"] == "http://triton:8000"
    assert services["gateway-cpu"]["environment"]["MAGNET_UPSTREAM"] == "http://kserve:8080"
    for name in ("gateway", "gateway-cpu"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
    assert services["kserve"]["build"]["dockerfile"] == "docker/Dockerfile.kserve"
    assert services["triton"]["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_every_service_has_a_healthcheck(services):
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_depends_on_is_health_gated(services):
    expected = {"gateway": {"triton"}, "gateway-cpu": {"kserve"}, "grafana": {"prometheus"}}
    for name, service in services.items():
        deps = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must be the long form with a condition"
        assert set(deps) == expected.get(name, set()), name
        for dep, spec in deps.items():
            assert spec == {"condition": "service_healthy"}, f"{name} -> {dep}: {spec}"
            assert "healthcheck" in services[dep], f"{name} waits on {dep}, which has no healthcheck"
            # A default-profile service may not wait on one that exists only under a profile.
            assert set(services[dep].get("profiles", [])) <= set(service.get("profiles", [])) or \
                not services[dep].get("profiles"), f"{name} -> {dep}"


def test_every_referenced_path_exists(services):
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (ROOT / build["context"]).is_dir(), name
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for source, _target in bind_mounts(service):
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_triton_serves_the_shipped_classifier(services):
    mounts = dict((t, s) for s, t in bind_mounts(services["triton"]))
    assert Path(mounts["/models/mnist/1/model.onnx"]) == Path("./models/mnist/classifier.onnx")
    assert CLASSIFIER.is_file() and CLASSIFIER.stat().st_size > 0
    assert Path(mounts["/models/mnist/config.pbtxt"]) == Path("./docker/triton/models/mnist/config.pbtxt")
    assert "--model-repository=/models" in services["triton"]["command"]
    assert (TRITON_CONFIG.parent / "1" / ".gitkeep").is_file()  # the placeholder version dir


def test_triton_config_matches_the_classifier():
    text = TRITON_CONFIG.read_text()
    assert re.search(r'^name:\s*"mnist"', text, re.M)
    assert re.search(r'^platform:\s*"onnxruntime_onnx"', text, re.M)
    assert re.search(r"^max_batch_size:\s*256\b", text, re.M)
    assert re.search(r'name:\s*"input"\s+data_type:\s*TYPE_FP32\s+dims:\s*\[\s*1,\s*28,\s*28\s*\]', text)
    assert re.search(r'name:\s*"logits"\s+data_type:\s*TYPE_FP32\s+dims:\s*\[\s*10\s*\]', text)
    assert "dynamic_batching" in text
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(CLASSIFIER), providers=["CPUExecutionProvider"])
    (inp,), outs = session.get_inputs(), session.get_outputs()
    assert inp.name == "input" and list(inp.shape[1:]) == [1, 28, 28] and inp.type == "tensor(float)"
    assert outs[0].name == "logits" and list(outs[0].shape[1:]) == [10]


def test_grafana_provisioning_and_mounts(services):
    mounts = dict((t, s) for s, t in bind_mounts(services["grafana"]))
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    dashboards_dir = ROOT / mounts["/var/lib/grafana/dashboards"]
    assert (dashboards_dir / "magnet.json").resolve() == DASHBOARD.resolve()
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "magnet.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    # Every panel's datasource is the provisioned one.
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]


def test_dashboard_panels_all_have_promql_over_the_gateway_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert panels
    seen = set()
    for panel in panels:
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        assert exprs and all(e.strip() for e in exprs), f"panel {panel.get('title')!r} has no PromQL target"
        seen.update(m for m in METRICS for e in exprs if m in e)
    assert seen == set(METRICS), f"metrics without a panel: {set(METRICS) - seen}"
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs


def test_prometheus_config_scrapes_the_gateways_and_triton():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", [])
               for t in sc["targets"]}
    # the gateways' /metrics is on their operator port (8002), which compose does not publish to the host
    assert {"gateway:8002", "gateway-cpu:8002", "triton:8002"} <= targets
    gateway_job = next(j for j in config["scrape_configs"] if "gateway:8002" in
                       [t for sc in j["static_configs"] for t in sc["targets"]])
    assert gateway_job.get("metrics_path", "/metrics") == "/metrics"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("gateway", "gateway-cpu"):
        published = [str(p) for p in compose["services"][name].get("ports", [])]
        assert published and not any(p.endswith(":8002") or p == "8002" for p in published), published


def test_promtool_accepts_the_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; `make test` does it as root)")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfiles_install_the_gateway_without_torch():
    cpu = (ROOT / "docker" / "Dockerfile").read_text()
    cuda = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    kserve = (ROOT / "docker" / "Dockerfile.kserve").read_text()
    # the base is a build argument whose default is the public image (local builds swap it)
    assert cpu.startswith("#") and re.search(r"^ARG BASE=python:3\.11-slim$", cpu, re.M)
    assert re.search(r"^ARG BASE=nvidia/cuda:13\.", cuda, re.M)
    assert re.search(r"^ARG BASE=python:3\.11-slim$", kserve, re.M)
    for text in (cpu, cuda, kserve):
        assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    for text in (cpu, cuda):
        assert "torch" not in re.sub(r"#.*", "", text).replace("find_spec('torch')", "")
        assert re.search(r"^USER (?!root)\S+", text, re.M), "runs as root"
        assert re.search(r"^HEALTHCHECK .*urllib\.request.*/healthz", text, re.M | re.S)
        assert re.search(r"^EXPOSE 8000 8002$", text, re.M)  # API, operator (/metrics)
        assert "MAGNET_HOST=0.0.0.0" in text
        assert re.search(r'^ENTRYPOINT \["magnet", "serve"\]$', text, re.M)
        assert re.search(r"^COPY models/ ", text, re.M)
    assert "pip install ." in cpu
    assert "'.[gpu]'" in cuda and "pip uninstall -y onnxruntime" in cuda and "MAGNET_DEVICE=cuda" in cuda
    assert "serve_onnx.py" in kserve and "kserve" in kserve and re.search(r"^USER (?!root)\S+", kserve, re.M)
    # Every COPY source exists (the build context is the repository root).
    for text in (cpu, cuda, kserve):
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            for source in line.split()[:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), source
