"""``magnet serve --workers 2`` as a real process tree: the workers share the session secret (generated
once by the parent when none is set) and their metrics, and a worker that is killed is replaced.

Which worker answers is the kernel's choice, so the test reads each worker's own metric files
(prometheus_client's multiprocess mode names them by pid) to know that both workers served.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SHIPPED_MNIST_POOL as POOL
from tests.procs import start_gateway

pytestmark = pytest.mark.skipif(not (POOL / "manifest.json").exists(), reason="the MNIST pool bundle is absent")
DIGIT = {"inputs": [[[[0.0] * 28] * 28]]}


def samples(text: str, name: str) -> dict[tuple, float]:
    """{labels: value} of one metric family in an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def classify_fresh(url: str, session: str) -> int:
    """One request on a new connection (so the kernel may hand it to either worker)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.post("/classify", json=DIGIT, headers={"X-Session-ID": session}).status_code


def burst(url: str, session: str, n: int) -> list[int]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: classify_fresh(url, session), range(n)))


def worker_pids(metrics_dir: Path) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in metrics_dir.glob("counter_*.db")}


def served_by(metrics_dir: Path, pid: int, scratch: Path) -> float:
    """Requests answered 200 by worker ``pid``, from its own files alone."""
    one = scratch / str(pid)
    one.mkdir(parents=True, exist_ok=True)
    shutil.copy(metrics_dir / f"counter_{pid}.db", one)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(one))
    return sum(s.value for m in registry.collect() for s in m.samples
               if s.name == "magnet_requests_total" and s.labels.get("outcome") == "ok")


def test_workers_share_the_secret_and_metrics_and_a_dead_worker_is_replaced(tmp_path, monkeypatch):
    metrics_dir = tmp_path / "metrics"
    monkeypatch.delenv("MAGNET_SESSION_SECRET", raising=False)  # the parent must generate one for both
    proc, url = start_gateway("--bundle", str(POOL), "--workers", "2",
                              env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}, timeout=120)
    try:
        # both workers are up once the parent's ready answer came (each writes its files at start)
        deadline = time.monotonic() + 60
        while len(worker_pids(metrics_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        first = worker_pids(metrics_dir)
        assert len(first) == 2, f"expected 2 workers' metric files, found {sorted(first)}"

        sent = 0
        for session in ("alice", "bob", "carol", "dave"):
            before = samples(httpx.get(f"{proc.operator_url}/metrics").text, "magnet_pool_selections_total")
            codes = burst(url, session, 24)
            sent += len(codes)
            assert codes == [200] * 24
            after = samples(httpx.get(f"{proc.operator_url}/metrics").text, "magnet_pool_selections_total")
            grew = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
            # one member for the whole session, whichever worker answered each request
            assert list(grew.values()) == [24], f"session {session} was split across members: {grew}"

        per_worker = {pid: served_by(metrics_dir, pid, tmp_path / "one") for pid in first}
        assert sum(per_worker.values()) == sent
        assert all(v > 0 for v in per_worker.values()), f"one worker served nothing: {per_worker}"
        ok = samples(httpx.get(f"{proc.operator_url}/metrics").text, "magnet_requests_total")
        assert ok[(("outcome", "ok"),)] == sent  # merged over workers, whichever answered /metrics

        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            alive = {pid for pid in worker_pids(metrics_dir) - {victim} if os.path.exists(f"/proc/{pid}")}
            if len(alive) == 2:
                break
            time.sleep(0.2)
        replacement = alive - first
        assert len(replacement) == 1, f"no replacement worker: alive {sorted(alive)}, first {sorted(first)}"

        codes = burst(url, "erin", 16)
        assert codes == [200] * 16
        ok = samples(httpx.get(f"{proc.operator_url}/metrics").text, "magnet_requests_total")
        # the dead worker's counts are kept: counters never go backwards when a worker is replaced
        assert ok[(("outcome", "ok"),)] == sent + 16
        assert f"Child process [{victim}] died" in proc.log_text()
    finally:
        proc.stop()


def listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN on ``port`` (IPv4 and IPv6), each counted once (by inode)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":
                inodes.add(f[9])
    return len(inodes)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
def test_each_worker_listens_on_its_own_socket_and_connections_are_spread(tmp_path):
    """SO_REUSEPORT: one listening socket per worker on each port, so the kernel spreads connections;
    with one shared socket, the first worker awake accepted a burst of connections alone."""
    import psutil

    proc, url = start_gateway("--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, timeout=120)
    try:
        port, operator = int(url.rsplit(":", 1)[1]), int(proc.operator_url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while listening_sockets(port) < 2 and time.monotonic() < deadline:  # the second worker may lag
            time.sleep(0.2)
        assert listening_sockets(port) == 2 and listening_sockets(operator) == 2
        clients = [httpx.Client(base_url=url, timeout=30) for _ in range(32)]
        try:
            with ThreadPoolExecutor(32) as pool:  # 32 connections opened at once, each kept alive
                assert set(pool.map(lambda c: c.get("/healthz").status_code, clients)) == {200}
            held = {p.pid: sum(1 for c in p.connections("tcp") if c.laddr.port == port and c.status == "ESTABLISHED")
                    for p in psutil.Process(proc.pid).children(recursive=True)}
        finally:
            for c in clients:
                c.close()
        counts = sorted(n for n in held.values() if n)
        # the kernel's hash: Binomial(32, 1/2) per worker; below 4 on either side has odds of about 3e-6
        assert len(counts) == 2 and sum(counts) == 32 and counts[0] >= 4, held
        assert httpx.post(f"{url}/classify", json=DIGIT, timeout=30).status_code == 200
    finally:
        proc.stop()
