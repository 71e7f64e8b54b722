"""Each upstream fault of tests/faults.py through an in-process gateway: status, time, memory growth
and the error body the client gets (docs/security.md quotes the output).

    python -m bench.upstream_faults
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import psutil
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from service.app import create_app
from service.settings import Settings
from tests import fakes
from tests.faults import FaultServer

ORDER = ["ok", "nan", "inf", "cols5", "cols1000", "huge", "huge_chunked", "broken", "error500", "garbage",
         "reset", "hang", "trickle"]


def main() -> int:
    logging.disable(logging.WARNING)
    bundle = fakes.make_bundle(Path(tempfile.mkdtemp()) / "toy")  # 3 classes, accepts mid-grey images
    print("fault | status | seconds | RSS growth MB | error body")
    with FaultServer(classes=3) as server:
        for fault in ORDER:
            before = psutil.Process().memory_info().rss
            settings = Settings(bundle=bundle, upstream=server.url, upstream_model=fault, upstream_timeout_s=1.0,
                                upstream_max_response_bytes=2**20, upstream_binary=fault == "nan")
            with TestClient(create_app(settings, registry=CollectorRegistry())) as c:
                t = time.perf_counter()
                r = c.post("/classify", json={"inputs": fakes.images(0.5).tolist()})
                seconds = time.perf_counter() - t
            grown = (psutil.Process().memory_info().rss - before) / 2**20
            print(f"{fault} | {r.status_code} | {seconds:.2f} | {grown:.0f} | {r.text[:120]}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
