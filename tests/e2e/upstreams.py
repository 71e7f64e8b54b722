"""What the e2e tests of real model servers share: the gateway's decisions in front of one, and the core's."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pytest

from service.defense import Defense
from tests import fakes
from tests.conftest import SHIPPED_MNIST
from tests.procs import start_gateway


def gateway_decisions(upstream: str, model: str, x: np.ndarray) -> tuple[list[tuple[bool, int | None]], str]:
    """(rejected, label) per row of ``x`` from a gateway on the shipped MNIST bundle in front of ``model``
    at ``upstream`` (one /classify request), and the gateway's log."""
    proc, gateway = start_gateway("--bundle", str(SHIPPED_MNIST), "--upstream", upstream, "--upstream-model", model)
    with proc, httpx.Client(base_url=gateway, timeout=60) as client:
        answer = client.post("/classify", json={"inputs": x.tolist()})
        assert answer.status_code == 200, answer.text
        log = proc.log_text()
    return [(r["rejected"], r["label"]) for r in answer.json()["results"]], log


def core_decisions(x: np.ndarray, served_model=None) -> list[tuple[bool, int | None]]:
    """The core's (rejected, label) per row, labels from ``served_model`` (default: the bundle's classifier)
    on the reformed rows."""
    defense = Defense(SHIPPED_MNIST, device="cpu")
    verdict = defense.inspect(x)
    labels = (served_model or defense.classifier)(verdict.reformed).argmax(1)
    return [(False, int(l)) if ok else (True, None) for ok, l in zip(verdict.accepted, labels)]


def serve_mnist_and_half(folder: Path, start: Callable[[dict], tuple], server: str):
    """``start({"mnist": the shipped classifier, "half": it in half precision throughout})``, the half
    file written under ``folder`` (``proc.half``); (process, URL). The test skips, with the server's log,
    when that third-party server cannot start (nothing of the gateway's is involved yet)."""
    half = folder / "half.onnx"
    fakes.in_half_precision(SHIPPED_MNIST / "classifier.onnx", half)
    try:
        proc, url = start({"mnist": SHIPPED_MNIST / "classifier.onnx", "half": half})
    except RuntimeError as e:
        pytest.skip(f"{server} did not start: {str(e)[-1500:]}")
    proc.half = half
    return proc, url
