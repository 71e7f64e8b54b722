"""Fixtures of the in-process gateway tests."""

import pytest

from tests.fakes import make_client


@pytest.fixture
def client(toy_bundle):
    """A TestClient of the gateway on the toy bundle; ``client.upstream`` records what went upstream."""
    c, upstream = make_client(toy_bundle)
    with c:
        c.upstream = upstream
        yield c
