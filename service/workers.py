"""Worker processes: ``magnet serve --workers N`` runs N gateway processes on one listening socket.

uvicorn's supervisor (>= 0.30) spawns the workers, pings them and replaces one that dies or hangs. Three
things must hold across workers, and the parent sets them up before the first worker starts:

- **settings**: workers are spawned, not forked, so the parent hands its resolved command-line flags to
  them as ``MAGNET_*`` environment variables, which every worker's ``Settings()`` reads;
- **the session secret**: every worker must map a session to the same pool member, so when
  ``MAGNET_SESSION_SECRET`` is unset the parent generates one, once, for all of them;
- **metrics**: prometheus_client's multiprocess mode. Each worker writes its samples to files in
  ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` (on whichever worker answers) merges the files of every
  worker, those of dead workers included, so counters never go backwards when a worker is replaced.
  Unset, the parent makes a private directory and removes it at exit; set (a Kubernetes emptyDir, say),
  its old files are cleared at start.

onnxruntime's threads are split between workers: with ``MAGNET_ORT_THREADS=0`` (the default) and N workers,
each worker's sessions get ``max(1, cores // N - 1)`` intra-op threads, where cores are those this process
may use (its affinity and its container's CPU quota): each worker's share of the cores less one, which
its event loop (HTTP, JSON, the upstream calls) keeps. On 2 cores and one worker that is one thread, no
intra-op pool at all: in a same-run comparison in front of KServe, a second intra-op thread only competed
with the event loop and the model server (docs/results/bench-workers.md).

**Connections are spread over the workers by the kernel** (Linux, ``SO_REUSEPORT``): each worker listens
on a socket of its own in one reuse-port group on the same address, and the kernel hashes each new
connection to one of them. With one socket shared by every worker (uvicorn's way), whichever worker
wakes first accepts every pending connection, and keep-alive clients then stay on it: 16 connections
opened at once landed 16 / 0, 15 / 1 or 11 / 5 on two workers (``bench.connection_spread``). The parent binds (without listening) a
socket of the group on each address before any worker starts, so that a port already taken fails at
once and stays reserved; a replaced worker binds its own again. Where ``SO_REUSEPORT`` is missing, or a
port is 0, the workers share the parent's sockets as before.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import uvicorn
from uvicorn.supervisors import multiprocess

from service.settings import Settings

log = logging.getLogger("magnet")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU quota in cores (cgroup v2 ``cpu.max``, or v1's quota/period), None if unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a container's CPU quota (a pod limited to
    2 CPUs on a 64-core node counts 2, where ``os.cpu_count()`` says 64)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return max(1, min(cores, math.ceil(limit)) if limit else cores)


def default_workers(embedded: bool = False) -> int:
    """In front of a model server, one worker per two usable cores (onnxruntime and the model server use
    the others); with the classifier embedded, where the gateway does all the work, one per usable core.
    At most 8 and at least 1 (docs/results/throughput.md)."""
    return max(1, min(8, available_cpus() // (1 if embedded else 2)))


def ort_threads_per_worker(settings: Settings) -> int:
    """Intra-op threads per onnxruntime session in each worker (see the module); an explicit
    ``MAGNET_ORT_THREADS`` is kept."""
    if settings.ort_threads:
        return settings.ort_threads
    return max(1, available_cpus() // max(1, settings.workers) - 1)


def prepare_environment(settings: Settings, overrides: dict[str, object], members: int) -> Path | None:
    """Put everything a spawned worker needs into ``os.environ``; returns a metrics directory to remove
    at exit (None when the user chose the directory)."""
    for name, value in overrides.items():
        os.environ[f"MAGNET_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    os.environ["MAGNET_ORT_THREADS"] = str(ort_threads_per_worker(settings))
    if settings.session_secret is None:
        os.environ["MAGNET_SESSION_SECRET"] = secrets.token_urlsafe(32)
        if members > 1:
            log.warning("MAGNET_SESSION_SECRET is unset: generated one for this gateway's %d workers; other "
                        "replicas will pick different pool members for the same session", settings.workers)
    chosen = os.environ.get(MULTIPROC_ENV)
    if chosen:
        directory = Path(chosen)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        return None
    made = Path(tempfile.mkdtemp(prefix="magnet-metrics-"))
    os.environ[MULTIPROC_ENV] = str(made)
    return made


def serve(app, settings: Settings, factory: bool = False) -> None:
    """Serve ``app`` (an application, or with workers the import string of a factory) on the API port and
    the operator port until SIGINT/SIGTERM. Both addresses are bound here first (a taken port fails at
    once); with workers on Linux each worker then listens on sockets of its own (see the module), else
    every worker serves the parent's. The application tells the ports apart by where a request came in."""
    from service.protocol import uvicorn_http_options

    options = dict(log_level=settings.log_level.lower(), server_header=False, factory=factory,
                   timeout_graceful_shutdown=settings.shutdown_timeout_s, **uvicorn_http_options(settings))
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=settings.workers, **options)
    sockets = [config.bind_socket()]
    if settings.operator_port != settings.port:
        operator = uvicorn.Config(app, host=settings.operator_host or settings.host, port=settings.operator_port,
                                  **options)
        sockets.append(operator.bind_socket())
    if settings.workers <= 1:
        uvicorn.Server(config).run(sockets=sockets)
        return
    listeners = [s.getsockname()[:2] for s in sockets]
    if reuse_port_supported(listeners):
        for s in sockets:
            s.close()
        reserved = [reuse_port_socket(host, port) for host, port in listeners]  # a taken port fails here
        _LISTENERS[:] = listeners
        original, multiprocess.Process = multiprocess.Process, ReusePortProcess  # what the supervisor spawns
        try:
            multiprocess.Multiprocess(config, sockets=[]).run()
        finally:
            multiprocess.Process = original
            for s in reserved:
                s.close()
        return
    try:
        supervisor = multiprocess.Multiprocess(config, sockets=sockets)
    except TypeError:  # uvicorn before the supervisor lost its target argument
        supervisor = multiprocess.Multiprocess(config, target=uvicorn.Server(config).run, sockets=sockets)
    supervisor.run()


def reuse_port_supported(listeners: list[tuple[str, int]]) -> bool:
    """Whether each worker can listen on its own socket of a reuse-port group (see the module)."""
    return (sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
            and all(port for _, port in listeners)
            and list(inspect.signature(multiprocess.Process.__init__).parameters) == ["self", "config", "sockets"])


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) in the address's reuse-port group, not listening yet."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ReusePortServer(uvicorn.Server):
    """A uvicorn server that listens on a new socket in each listener's reuse-port group."""

    def __init__(self, config: uvicorn.Config, listeners: list[tuple[str, int]]) -> None:
        super().__init__(config)
        self.listeners = listeners

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[reuse_port_socket(host, port) for host, port in self.listeners])


_LISTENERS: list[tuple[str, int]] = []  # the parent's addresses, read by each ReusePortProcess it makes


class ReusePortProcess(multiprocess.Process):
    """uvicorn's worker process, with a ``ReusePortServer``; spawned workers get ``listeners`` with the
    pickled instance."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        self.listeners = list(_LISTENERS)
        super().__init__(config, sockets)

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = ReusePortServer(self.config, self.listeners)
        return self._server


def run_workers(settings: Settings, overrides: dict[str, object], members: int) -> None:
    """Serve with ``settings.workers`` processes until SIGINT/SIGTERM (uvicorn's supervisor)."""
    made = prepare_environment(settings, overrides, members)
    log.info("starting %d workers (metrics in %s, %s onnxruntime threads each)", settings.workers,
             os.environ[MULTIPROC_ENV], os.environ["MAGNET_ORT_THREADS"])
    try:
        serve("service.app:app_from_environment", settings, factory=True)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
