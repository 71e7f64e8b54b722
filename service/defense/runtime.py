"""onnxruntime sessions: CUDA when asked for and available, CPU otherwise."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

log = logging.getLogger("magnet.runtime")

Device = Literal["auto", "cpu", "cuda"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
CPU_CHUNK_ELEMENTS = 16 * 3 * 32 * 32  # 16 CIFAR-10 images, 62 MNIST digits per call on the CPU


def choose_providers(device: Device) -> list[str]:
    """Execution providers for ``device``; 'cuda' without a CUDA build falls back to CPU with a warning."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        preload_cuda_libraries()
        return [CUDA, CPU]
    if device == "cuda":
        log.warning("CUDA was asked for but onnxruntime has no CUDA provider (install the 'gpu' "
                    "extra); using the CPU")
    return [CPU]


_preloaded = False


def preload_cuda_libraries() -> None:
    """Load the CUDA runtime and cuDNN from NVIDIA's pip wheels (``onnxruntime-gpu[cuda,cudnn]``) when they
    are installed, else from the default library path (a CUDA base image), once per process. Without
    them the CUDA provider fails to load and onnxruntime falls back to the CPU, which the sessions'
    providers (``/readyz``) then show."""
    global _preloaded
    if _preloaded or not hasattr(ort, "preload_dlls"):
        return
    _preloaded = True
    try:
        ort.preload_dlls()
    except Exception as e:  # a missing directory or library: onnxruntime reports the provider's own error later
        log.warning("could not preload the CUDA libraries: %s", e)


_shared_arena: bool | None = None


def shared_cpu_arena() -> bool:
    """Register one CPU arena allocator with onnxruntime's environment, once per process; sessions that
    ask for it share it instead of keeping an arena each. False where this onnxruntime cannot."""
    global _shared_arena
    if _shared_arena is None:
        try:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, None)
            _shared_arena = True
        except Exception as e:  # an older onnxruntime, or one registered already by the host application
            log.info("no shared onnxruntime CPU arena (%s): one arena per session", e)
            _shared_arena = False
    return _shared_arena


def make_session(model: Path | bytes, providers: list[str], threads: int = 0,
                 spinning: bool = True) -> ort.InferenceSession:
    """An onnxruntime session on a model file or a serialized model, with the gateway's options."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # spinning: idle intra-op threads busy-wait for the next call (lower latency on cores of their own,
    # stolen cycles on cores shared with a model server or the other workers)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if providers[0] == CPU and shared_cpu_arena():
        # one CPU arena for every session of the process: a pool's members do not each keep a peak
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=opts,
                                providers=providers)


def chunk_rows(on_cpu: bool, x: np.ndarray) -> int:
    """Rows per onnxruntime call: on the CPU, at most ``CPU_CHUNK_ELEMENTS`` input values, since
    onnxruntime's arena keeps the peak of every call's activations for the life of the process (a
    large batch in one call would set a worker's memory for good; ``bench.peak_memory``); on a GPU,
    the whole batch."""
    if not on_cpu:
        return len(x)
    return max(1, CPU_CHUNK_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))


class OnnxModel:
    """One ONNX graph with a single input and a single output, batch axis first."""

    def __init__(self, path: Path, providers: list[str], threads: int = 0, input_name: str | None = None,
                 output_name: str | None = None, spinning: bool = True) -> None:
        self.path = Path(path)
        self.session = make_session(self.path, providers, threads, spinning)
        inputs, outputs = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        for name, names, what in ((input_name, inputs, "input"), (output_name, outputs, "output")):
            if name is not None and name not in names:
                raise ValueError(f"{self.path.name} has no {what} named {name!r} (it has {', '.join(names)})")
        self.input_name = input_name or inputs[0]
        self.output_name = output_name or outputs[0]
        self._on_cpu = self.session.get_providers()[0] == CPU

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        rows = chunk_rows(self._on_cpu, x)
        if len(x) <= rows:
            return self.session.run([self.output_name], {self.input_name: x})[0]
        return np.concatenate([self.session.run([self.output_name], {self.input_name: x[i:i + rows]})[0]
                               for i in range(0, len(x), rows)])
