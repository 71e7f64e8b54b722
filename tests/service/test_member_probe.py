"""The acceptance-signature probe against the shipped MNIST pool (docs/security.md).

A few shifted or occluded digits are accepted by some members and rejected by others, so the
accept/reject pattern of one request that holds them all (its "signature") tells which member answered,
even with scores and probabilities hidden. When members follow a session id the client chooses, the
probe maps sessions to members, and a client can keep the sessions of the member it attacked. With
members bound to API keys, the session id no longer matters: one key sees one member, whatever it sends.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.defense import Defense
from service.settings import Settings
from tests.conftest import SHIPPED_MNIST_POOL

pytestmark = pytest.mark.skipif(not (SHIPPED_MNIST_POOL / "manifest.json").exists(), reason="no MNIST pool bundle")
SECRET = "probe-test-secret-0123456789"
SESSIONS = [f"attacker-session-{i}" for i in range(64)]


@pytest.fixture(scope="module")
def probes(mnist):
    """Up to 5 digits whose accept/reject pattern differs most between members, chosen on the core
    (the same choice as ``python -m bench.member_probe``)."""
    from bench.member_probe import choose_probes

    probe, signatures = choose_probes(Defense(SHIPPED_MNIST_POOL, device="cpu"), mnist.test.x[:256])
    assert len(set(signatures.values())) >= 6, "the probe should tell most members apart"
    return probe, signatures


def signature(client, probe, headers) -> tuple:
    r = client.post("/classify", json={"inputs": probe.tolist()}, headers=headers)
    assert r.status_code == 200, r.text
    return tuple(res["rejected"] for res in r.json()["results"])


def gateway(**settings) -> TestClient:
    return TestClient(create_app(Settings(bundle=SHIPPED_MNIST_POOL, session_secret=SECRET, rejection_limit="0",
                                          **settings), registry=CollectorRegistry()))


def test_with_session_binding_the_probe_maps_sessions_to_members(probes):
    """The weakness, reproduced: the opt-in session mode (the open mode's default)."""
    probe, by_member = probes
    with gateway(member_by="session") as c:
        seen = [signature(c, probe, {"X-Session-ID": s}) for s in SESSIONS]
    # every signature is one member's, and the sessions spread over (nearly) every member
    assert set(seen) <= set(by_member.values())
    assert len(set(seen)) >= 6


def test_with_key_binding_sessions_no_longer_map_to_members(probes):
    probe, by_member = probes
    keys = {f"attacker{i}": f"attacker-key-{i:03d}-0123456789" for i in range(16)}
    with gateway(api_keys=",".join(f"{k}:{v}" for k, v in keys.items())) as c:
        one_key = {signature(c, probe, {"X-API-Key": keys["attacker0"], "X-Session-ID": s}) for s in SESSIONS}
        assert len(one_key) == 1  # the session id is ignored: one key, one member
        per_key = {signature(c, probe, {"X-API-Key": key}) for key in keys.values()}
    # more keys do reach other members (at random, by the HMAC of the key id): what an attacker must buy
    assert len(per_key) >= 3 and per_key <= set(by_member.values())
