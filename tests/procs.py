"""Start real server processes for end-to-end tests and stop them again.

Each process runs in its own session (so its own process group) and is stopped by signalling
the whole group, which also reaches any workers it forked. Readiness is awaited by polling an
HTTP URL until it answers 200, never by a fixed sleep. Output goes to a log file, so a chatty
server can never block on a full pipe, and the log's tail is put into any startup error.

    proc, base = start_on_free_port(lambda port: [sys.executable, "server.py", "--port", str(port)],
                                    "/health", timeout=30)
    try:
        ...
    finally:
        proc.stop()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import httpx

__all__ = ["ManagedProcess", "free_port", "start_on_free_port", "start_process"]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ManagedProcess:
    """A started process (its own process group) plus the file its output goes to."""

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.popen = popen
        self.log_path = log_path
        self.startup_s: Optional[float] = None  # process start -> ready URL answered 200
        self.operator_url: Optional[str] = None  # a gateway's operator port (/metrics), when it has one

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self, tail_chars: Optional[int] = None) -> str:
        """The process's combined stdout/stderr so far (only the last `tail_chars` if given)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text if tail_chars is None else text[-tail_chars:]

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM the process group, SIGKILL it after `timeout` s; return the exit code."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.popen.pid, sig)  # pgid == pid thanks to start_new_session
            except ProcessLookupError:
                break  # the whole group is gone already
            try:
                self.popen.wait(timeout=timeout)
                # The leader is gone; make sure no member of its group outlives it.
                try:
                    os.killpg(self.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            except subprocess.TimeoutExpired:
                continue
        return self.popen.wait(timeout=timeout)

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_ready(proc: ManagedProcess, ready_url: str, timeout: float = 30.0,
               poll_interval: float = 0.1) -> float:
    """Poll `ready_url` until it answers 200; return the seconds this took.

    Raises RuntimeError (with the log's tail) if the process exits first or `timeout` passes.
    """
    start = time.monotonic()
    deadline = start + timeout
    with httpx.Client(timeout=min(2.0, timeout)) as client:
        while True:
            code = proc.popen.poll()
            if code is not None:
                raise RuntimeError(f"process {proc.popen.args!r} exited with {code} before "
                                   f"{ready_url} was ready; log tail:\n{proc.log_text(4000)}")
            try:
                if client.get(ready_url).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{ready_url} not ready after {timeout:.0f} s; log tail:\n"
                                   f"{proc.log_text(4000)}")
            time.sleep(poll_interval)  # polling pace, not synchronisation


def start_process(cmd: Sequence[Union[str, os.PathLike[str]]], ready_url: str,
                  timeout: float = 30.0, *, env: Optional[Mapping[str, str]] = None,
                  cwd: Optional[Union[str, os.PathLike[str]]] = None,
                  log_path: Optional[Union[str, os.PathLike[str]]] = None) -> ManagedProcess:
    """Start `cmd` in a new session and return once `ready_url` answers 200.

    `env` entries are added to the current environment. Output goes to `log_path` (a temp
    file when omitted). On any startup failure the process group is stopped before raising.
    """
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="proc-", suffix=".log")
        os.close(fd)
        log_path = name
    path = Path(log_path)
    full_env = {**os.environ, **(env or {})}
    started = time.monotonic()
    with path.open("wb") as log:
        popen = subprocess.Popen([os.fspath(c) for c in cmd], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=full_env, cwd=cwd, start_new_session=True)
    proc = ManagedProcess(popen, path)
    try:
        wait_ready(proc, ready_url, timeout)
        proc.startup_s = time.monotonic() - started
    except BaseException:
        proc.stop()
        raise
    return proc


ADDRESS_IN_USE = ("address already in use", "errno 98", "eaddrinuse")


def start_on_free_port(make_cmd: Callable[[int], Sequence[Union[str, os.PathLike[str]]]], ready_path: str,
                       timeout: float = 30.0, attempts: int = 5, **kwargs) -> tuple[ManagedProcess, str]:
    """Start ``make_cmd(port)`` on a port that was free a moment ago; returns (process, base URL).

    ``free_port`` releases the port before the child binds it, so another process may take it in
    between. When the child then dies saying its address is in use, this tries again on a new port
    (``attempts`` in all); any other startup failure is raised at once."""
    for attempt in range(attempts):
        base = url_of(free_port())
        try:
            return start_process(make_cmd(int(base.rsplit(":", 1)[1])), base + ready_path, timeout, **kwargs), base
        except RuntimeError as e:
            if attempt == attempts - 1 or not any(m in str(e).lower() for m in ADDRESS_IN_USE):
                raise
    raise AssertionError("unreachable")


REPO = Path(__file__).resolve().parents[1]
MODEL_SERVER = REPO / "docker" / "kserve" / "serve_onnx.py"


def url_of(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def start_model_server(model_file: Union[str, os.PathLike[str]], name: str, timeout: float = 60.0,
                       **kwargs) -> tuple[ManagedProcess, str]:
    """The project's KServe model server on ``model_file`` at a free port; returns (process, base URL)."""
    return start_on_free_port(lambda port: [sys.executable, MODEL_SERVER, "--model-file", model_file,
                                            "--model-name", name, "--http-port", str(port)],
                              "/v2/health/ready", timeout, **kwargs)


def start_gateway(*args: str, ready_path: str = "/readyz", timeout: float = 60.0,
                  **kwargs) -> tuple[ManagedProcess, str]:
    """``magnet serve ARGS`` at a free port from the repository root; returns (process, base URL).
    One worker process unless ARGS or ``env`` say otherwise, whatever the machine's core count.
    The operator port (``/metrics``) is another free port, unless ARGS name one: ``proc.operator_url``."""
    kwargs["env"] = {"MAGNET_WORKERS": "1", **(kwargs.get("env") or {})}
    operator = None if "--operator-port" in args else free_port()
    extra = () if operator is None else ("--operator-port", str(operator))
    proc, base = start_on_free_port(lambda port: [sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                                                  *extra, *args], ready_path, timeout, cwd=REPO, **kwargs)
    if operator is not None:
        proc.operator_url = url_of(operator)
    else:
        proc.operator_url = url_of(int(args[list(args).index("--operator-port") + 1]))
    return proc, base


# MLServer pins dependencies of its own (fastapi<0.116): ``make test`` installs it in .venv-mlserver
MLSERVER = Path(os.environ.get("MLSERVER") or REPO / ".venv-mlserver" / "bin" / "mlserver")
MLSERVER_RUNTIME = REPO / "docker" / "mlserver"


def start_mlserver(models: Mapping[str, Union[str, os.PathLike[str]]], repository: Path, timeout: float = 90.0,
                   **kwargs) -> tuple[ManagedProcess, str]:
    """MLServer serving each ``name -> model file`` of ``models`` with docker/mlserver/onnx_runtime.py (its
    metadata from the graphs), from a model repository it writes under ``repository``; gRPC and metrics on
    free ports, no worker pool (``parallel_workers`` 0). Returns (process, base URL of the v2 REST API)."""
    import json
    import shutil

    for name, model_file in models.items():
        folder = repository / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file, folder / "model.onnx")
        (folder / "model-settings.json").write_text(json.dumps(
            {"name": name, "implementation": "onnx_runtime.OnnxClassifier", "parameters": {"uri": "./model.onnx"}}))

    def command(port: int) -> list[str]:
        (repository / "settings.json").write_text(json.dumps(
            {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "parallel_workers": 0}))
        return [str(MLSERVER), "start", str(repository)]

    env = {"PYTHONPATH": str(MLSERVER_RUNTIME), **(kwargs.pop("env", None) or {})}
    return start_on_free_port(command, "/v2/health/ready", timeout, env=env, **kwargs)


# Triton (the server nvidia-pytriton ships, with tritonclient) in an environment of its own: ``make test``
# makes .venv-triton
TRITON_PYTHON = Path(os.environ.get("TRITON_PYTHON") or REPO / ".venv-triton" / "bin" / "python")


def triton_env() -> dict[str, str]:
    """Triton's Python backend stub loads ``libpython3.X.so`` by name: put the one of .venv-triton's own
    interpreter first, lest another build of the same version (the system's) meet its standard library."""
    libdir = subprocess.run([str(TRITON_PYTHON), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    return {"LD_LIBRARY_PATH": os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)}


def start_triton(models: Mapping[str, Union[str, os.PathLike[str]]], max_batch: int = 64, timeout: float = 120.0,
                 **kwargs) -> tuple[ManagedProcess, str]:
    """A real Triton serving each ``name -> ONNX file`` of ``models`` (tests/pytriton_serve.py) with
    ``max_batch_size`` ``max_batch``; gRPC and metrics on free ports. Returns (process, base URL)."""
    script = REPO / "tests" / "pytriton_serve.py"
    env = {**triton_env(), **(kwargs.pop("env", None) or {})}
    return start_on_free_port(lambda port: [str(TRITON_PYTHON), str(script), "--http-port", str(port), "--grpc-port",
                                            str(free_port()), "--metrics-port", str(free_port()), "--max-batch",
                                            str(max_batch), *(f"{n}={p}" for n, p in models.items())],
                              f"/v2/models/{list(models)[-1]}/ready", timeout, env=env, **kwargs)  # bound in order
