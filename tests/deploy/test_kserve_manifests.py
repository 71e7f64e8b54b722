"""deploy/kserve: each InferenceService is checked field by field against the ``kserve`` package's own
generated API types (and the ``kubernetes`` client's for the pod parts): an unknown or misspelt field
anywhere fails. Then the contract with the gateway: OIP v2 on the predictor, the transformer is the
gateway image on the port KServe routes to (8080), its probes are open routes, its settings exist."""

from __future__ import annotations

import re

import pytest
import yaml

from service.access import OPEN_PATHS
from service.settings import Settings
from tests.conftest import ROOT

kserve = pytest.importorskip("kserve")
k8s = pytest.importorskip("kubernetes.client")
MANIFESTS = sorted((ROOT / "deploy" / "kserve").glob("*.yaml"))
SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}


def model_class(name: str):
    return getattr(kserve, name, None) or getattr(k8s, name)


def check(value, kind: str, path: str) -> None:
    """Raise AssertionError where ``value`` does not fit the generated type ``kind``."""
    if m := re.fullmatch(r"(?:list|List)\[(.+)\]", kind):
        assert isinstance(value, list), f"{path}: expected a list"
        for i, item in enumerate(value):
            check(item, m.group(1), f"{path}[{i}]")
    elif m := re.fullmatch(r"(?:dict\(str, |Dict\[str, )(.+?)[\)\]]", kind):
        assert isinstance(value, dict), f"{path}: expected a map"
        for key, item in value.items():
            check(item, m.group(1), f"{path}.{key}")
    elif kind in SCALARS:
        assert isinstance(value, SCALARS[kind]) or (kind == "str" and isinstance(value, (int, float))), \
            f"{path}: expected {kind}, got {value!r}"
    else:
        cls = model_class(kind)
        assert isinstance(value, dict), f"{path}: expected an object ({kind})"
        by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
        for key, item in value.items():
            assert key in by_json, f"{path}: {kind} has no field {key!r}"
            check(item, cls.openapi_types[by_json[key]], f"{path}.{key}")


@pytest.fixture(params=MANIFESTS, ids=lambda p: p.name)
def isvc(request) -> dict:
    return yaml.safe_load(request.param.read_text())


def test_there_is_a_cpu_and_a_gpu_variant():
    assert {p.name for p in MANIFESTS} == {"inferenceservice.yaml", "inferenceservice-gpu.yaml"}


def test_every_field_is_one_the_kserve_api_defines(isvc):
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    check(isvc["metadata"], "V1ObjectMeta", "metadata")
    check(isvc["spec"], "V1beta1InferenceServiceSpec", "spec")


def test_the_checker_catches_a_misspelt_field(isvc):
    broken = yaml.safe_load(yaml.safe_dump(isvc))
    broken["spec"]["transformer"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(AssertionError, match="no field 'readinessProbes'"):
        check(broken["spec"], "V1beta1InferenceServiceSpec", "spec")


def test_the_transformer_is_the_gateway_speaking_v2_to_the_predictor(isvc):
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
    container = isvc["spec"]["transformer"]["containers"][0]
    assert container["image"].split(":")[0] == "magnet-gateway"
    gpu = "gpu" in isvc["metadata"]["name"]
    assert (container["image"].endswith(":cuda")) is gpu
    # KServe appends --model_name, --predictor_host and --http_port 8080; nothing here may fight them
    assert not container.get("args") and not container.get("command")
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in OPEN_PATHS and container[probe]["httpGet"]["port"] == 8080
    env = {e["name"]: e for e in container["env"]}
    fields = {f"MAGNET_{name.upper()}" for name in Settings.model_fields}
    assert {n for n in env if n.startswith("MAGNET_")} <= fields
    assert (env.get("MAGNET_DEVICE", {}).get("value") == "cuda") is gpu
    if gpu:
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert env["PROMETHEUS_MULTIPROC_DIR"]["value"].startswith("/tmp/")
