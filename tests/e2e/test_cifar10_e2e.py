"""CIFAR-10 through real processes: a KServe model server, and the gateway with divergence detectors
(x and ae(x) go upstream together) and with the diverse pool (a member per session)."""

from __future__ import annotations


import httpx
import numpy as np
import pytest

from service.defense import Defense
from service.sessions import MemberSelector
from tests.conftest import SHIPPED_CIFAR10, SHIPPED_CIFAR10_POOL
from tests.procs import start_gateway, start_model_server

pytestmark = pytest.mark.skipif(not (SHIPPED_CIFAR10 / "manifest.json").exists(),
                                reason="the CIFAR-10 bundle is not built")
SECRET = "e2e-secret-shared-by-replicas"


@pytest.fixture(scope="module")
def model_server():
    proc, url = start_model_server(Defense(SHIPPED_CIFAR10).classifier_file, "cifar10")
    yield url
    proc.stop()


def gateway(bundle, upstream):
    proc, url = start_gateway("--bundle", str(bundle), "--upstream", upstream, "--upstream-model", "cifar10",
                              env={"MAGNET_SESSION_SECRET": SECRET})
    return proc, httpx.Client(base_url=url, timeout=60)


def served(client, x, session="fixed"):
    out = []
    for i in range(0, len(x), 100):
        r = client.post("/classify", json={"inputs": x[i : i + 100].tolist()}, headers={"X-Session-ID": session})
        assert r.status_code == 200, r.text
        out += [(res["rejected"], res["label"]) for res in r.json()["results"]]
    return out


def core(defense, x, member=0):
    decisions = []
    for i in range(0, len(x), 500):
        verdict = defense.inspect(x[i : i + 500], member)
        labels = defense.classifier(verdict.reformed).argmax(1)
        decisions += [(False, int(l)) if ok else (True, None) for ok, l in zip(verdict.accepted, labels)]
    return decisions


@pytest.fixture(scope="module")
def default_gateway(model_server):
    """One gateway on the default bundle for the module's tests."""
    proc, client = gateway(SHIPPED_CIFAR10, model_server)
    yield client
    client.close()
    proc.stop()


def test_1000_test_images_get_the_cores_decisions(default_gateway, cifar10):
    x = cifar10.test.x[:1000]
    assert served(default_gateway, x) == core(Defense(SHIPPED_CIFAR10, device="cpu"), x)


@pytest.mark.skipif(not (SHIPPED_CIFAR10_POOL / "manifest.json").exists(), reason="no CIFAR-10 pool bundle")
def test_pool_gateway_defends_each_session_with_its_member(model_server, cifar10):
    defense = Defense(SHIPPED_CIFAR10_POOL, device="cpu")
    n = len(defense.members)
    x = cifar10.test.x[:300]
    per_member = [core(defense, x, m) for m in range(n)]
    # images on which members disagree tell the members apart
    split = [i for i in range(len(x)) if len({per_member[m][i] for m in range(n)}) > 1]
    assert split, "no test image on which pool members disagree"
    selector = MemberSelector(SECRET.encode(), n)
    sessions = {}
    for i in range(400):
        sessions.setdefault(selector.member(f"client-{i}"), f"client-{i}")
    assert len(sessions) == n
    proc, client = gateway(SHIPPED_CIFAR10_POOL, model_server)
    try:
        for member, session in sessions.items():
            got = served(client, x[split], session)
            assert got == [per_member[member][i] for i in split], f"session {session} is not member {member}"
    finally:
        client.close()
        proc.stop()


def test_210_adversarial_images_get_the_cores_decisions(default_gateway, cifar10):
    from tests.e2e.test_gateway_e2e import adversarial_set

    defense, x, y = adversarial_set(SHIPPED_CIFAR10, cifar10, 70, ["fgsm_eps0.025", "deepfool", "iterative_l2_eps0.25"])
    got = served(default_gateway, x)
    assert got == core(defense, x)
    rejected = np.array([rej for rej, _ in got])
    assert (defense.classifier(x).argmax(1) != y).mean() > 0.3 and rejected.any() and (~rejected).any()
