"""deploy/k8s: the example overlay rendered with ``kubectl kustomize``, every object validated against the
Kubernetes schemas (kubernetes-validate, strict), and structural checks that tie the manifests to the
code: probes on real routes, ports and settings that exist, Secret keys that reach the settings, image
names that the docker/ files build, and the hardening every pod needs."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from service.app import create_app
from service.settings import Settings
from tests.conftest import ROOT

OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "example"


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(objects, kind, name=None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def test_every_builtin_object_passes_strict_schema_validation(objects):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    builtin = [o for o in objects if not o["apiVersion"].startswith("monitoring.coreos.com")]
    assert {o["kind"] for o in builtin} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                             "PodDisruptionBudget", "NetworkPolicy", "Secret", "Namespace"}
    for obj in builtin:
        kubernetes_validate.validate(obj, "1.30.0", strict=True)  # raises on any error


def test_probes_hit_routes_the_gateway_serves_and_ports_match_its_settings(objects, toy_bundle):
    deployment = by_kind(objects, "Deployment", "magnet-gateway")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    defaults = Settings()
    assert ports == {"http": defaults.port, "metrics": defaults.operator_port}
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    keys = "app:an-api-key-of-enough-length"  # probes must answer without a key, even when keys are set
    with TestClient(create_app(Settings(bundle=toy_bundle, api_keys=keys), registry=CollectorRegistry())) as c:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            get = container[probe]["httpGet"]
            assert get["port"] == "http" and c.get(get["path"]).status_code == 200, probe
    service = by_kind(objects, "Service", "magnet-gateway")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}
    monitor = by_kind(objects, "ServiceMonitor", "magnet-gateway")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_environment_names_are_settings_and_secret_keys_reach_them(objects):
    deployment = by_kind(objects, "Deployment", "magnet-gateway")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "gateway")
    env = {e["name"]: e for e in container["env"]}
    fields = {f"MAGNET_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in env if n.startswith("MAGNET_")} <= fields
    secret = by_kind(objects, "Secret", "magnet-gateway")
    keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
    # secrets as files: each file setting points into the mounted Secret, at a key the Secret has
    volume = next(v for v in pod["volumes"] if v["name"] == "secrets")
    assert volume["secret"]["secretName"] == "magnet-gateway"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "secrets")
    files = {f"{mount['mountPath']}/{item['path']}": item["key"] for item in volume["secret"]["items"]}
    assert set(files.values()) <= keys
    assert files[env["MAGNET_SESSION_SECRET_FILE"]["value"]] == "session-secret"
    assert files[env["MAGNET_API_KEY_FILE"]["value"]] == "api-keys"
    assert not any("valueFrom" in e for e in env.values())  # no secret in the environment
    # the example keys parse as the gateway parses them
    import base64

    from service.access import parse_keys
    assert parse_keys(base64.b64decode(secret["data"]["api-keys"]).decode(), "example")
    assert len(base64.b64decode(secret["data"]["session-secret"])) >= 16
    # the upstream is the model server's Service
    upstream = env["MAGNET_UPSTREAM"]["value"]
    model_service = by_kind(objects, "Service", "magnet-model-server")
    assert upstream == f"http://magnet-model-server:{model_service['spec']['ports'][0]['port']}"


def test_images_are_those_docker_builds(objects):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    built = {s["image"].split(":")[0] for s in compose["services"].values() if "image" in s}
    images = {c["image"].split(":")[0] for o in objects if o["kind"] == "Deployment"
              for c in o["spec"]["template"]["spec"]["containers"]}
    assert images <= built, images - built


def test_every_pod_is_hardened_and_writes_only_to_empty_dirs(objects):
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["limits"] and c["resources"]["requests"]
            for m in c.get("volumeMounts", []):
                v = volumes[m["name"]]
                assert "emptyDir" in v or m.get("readOnly"), (c["name"], m)
        gateway = next((c for c in pod["containers"] if c["name"] == "gateway"), None)
        if gateway:
            env = {e["name"]: e.get("value") for e in gateway["env"]}
            tmp = next(m["mountPath"] for m in gateway["volumeMounts"] if m["name"] == "tmp")
            assert env["PROMETHEUS_MULTIPROC_DIR"].startswith(tmp + "/")  # the workers' metrics are writable


def test_scaling_disruption_and_network_policy_select_the_right_pods(objects):
    gateway = by_kind(objects, "Deployment", "magnet-gateway")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    hpa = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "magnet-gateway"
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    policy = by_kind(objects, "NetworkPolicy", "magnet-model-server")
    model_labels = by_kind(objects, "Deployment", "magnet-model-server")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= model_labels.items()
    allowed = [f["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for f in rule["from"]]
    assert allowed and all(a.items() <= labels.items() for a in allowed)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own = by_kind(objects, "NetworkPolicy", "magnet-gateway")
    assert own["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ports = {p["port"]: rule.get("from") for rule in own["spec"]["ingress"] for p in rule["ports"]}
    assert ports[8000] is None and ports[8002]  # the API from anywhere, /metrics only from monitoring
