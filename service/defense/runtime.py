"""onnxruntime sessions: CUDA when asked for and available, CPU otherwise."""

from __future__ import annotations

import logging
import math
import time
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


Optimization = Literal["auto", "all", "extended", "basic"]
LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
PROBE_BATCHES = (1, 8)  # rows of the timing probes of ``optimization="auto"``
PROBE_RUNS = 5  # timed runs per level and batch, alternating between the levels
PREFER_EXTENDED = 0.85  # 'extended' is kept only when it takes at most this share of 'all''s time


def make_session(model: Path | bytes, providers: list[str], threads: int = 0,
                 spinning: bool = True, optimization: Optimization = "auto") -> ort.InferenceSession:
    """An onnxruntime session on a model file or a serialized model, with the gateway's options.

    ``optimization``: onnxruntime's graph optimization level. 'all' (onnxruntime's default) adds the CPU
    layout transformations (NCHWc blocked convolutions, with reorders around them): they speed up wide
    convolutions (the CIFAR-10 U-Net reformer: 1.6x) and slow down narrow ones (the MNIST autoencoders,
    a few channels: 1.45x slower at one image, 2x at 16 and more; ``bench.ort_levels``). 'auto' on the CPU builds the
    session at 'all' and at 'extended' (everything but the layout transformations), times both on
    random inputs of the model's shape, and keeps 'extended' only when it is clearly faster; on a GPU
    'auto' is 'all'."""
    if optimization == "auto":
        if providers[0] != CPU:
            return _session(model, providers, threads, spinning, "all")
        size = len(model) if isinstance(model, bytes) else Path(model).stat().st_size
        key = (size, threads)
        if key in _chosen:  # a model of the same size (a pool's members): same graph, same choice
            session = _session(model, providers, threads, spinning, _chosen[key][0])
            if _chosen[key][1] == _signature(session):
                return session
        session, level = _fastest(model, providers, threads, spinning)
        _chosen[key] = (level, _signature(session))
        return session
    return _session(model, providers, threads, spinning, optimization)


_chosen: dict[tuple[int, int], tuple[str, tuple]] = {}  # (model bytes, threads) -> (level, inputs and outputs)


def _signature(session: ort.InferenceSession) -> tuple:
    return tuple((i.name, i.type, tuple(map(str, i.shape))) for i in [*session.get_inputs(), *session.get_outputs()])


def _session(model: Path | bytes, providers: list[str], threads: int, spinning: bool,
             level: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = LEVELS[level]
    # spinning: idle intra-op threads busy-wait for the next call (lower latency on cores of their own,
    # stolen cycles on cores shared with a model server or the other workers)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if providers[0] == CPU and shared_cpu_arena():
        # one CPU arena for every session of the process: a pool's members do not each keep a peak
        opts.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=opts,
                                providers=providers)


# onnxruntime's element types -> the numpy types an image input may take (float32 is the project's own)
INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(uint8)": np.uint8}


def probe_feeds(session: ort.InferenceSession, rows: int) -> dict[str, np.ndarray] | None:
    """Random inputs of ``rows`` rows for every input of ``session`` (of its own batch size where the graph
    fixes one; in its element type), or None when an input is not of an image type (``INPUT_DTYPES``) or has
    a symbolic size other than its first (batch) axis."""
    feeds = {}
    for i in session.get_inputs():
        shape = list(i.shape)
        if i.type not in INPUT_DTYPES or not shape or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return None
        n = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else rows
        dtype = INPUT_DTYPES[i.type]
        scale = 255 if dtype == np.uint8 else 1  # pixels as the graph takes them
        feeds[i.name] = (scale * np.random.default_rng(0).uniform(size=(n, *shape[1:]))).astype(dtype)
    return feeds


def _fastest(model: Path | bytes, providers: list[str], threads: int,
             spinning: bool) -> tuple[ort.InferenceSession, str]:
    """The session at 'all' or at 'extended', whichever runs this model faster here (see ``make_session``),
    and its level."""
    levels = {level: _session(model, providers, threads, spinning, level) for level in ("all", "extended")}
    elapsed = {level: 0.0 for level in levels}
    for rows in PROBE_BATCHES:
        feeds = probe_feeds(levels["all"], rows)
        if feeds is None:
            return levels["all"], "all"
        times: dict[str, list[float]] = {level: [] for level in levels}
        for run in range(PROBE_RUNS + 1):  # the first run of each is a warm-up
            for level, session in levels.items():
                started = time.perf_counter()
                session.run(None, feeds)
                if run:
                    times[level].append(time.perf_counter() - started)
        for level in levels:
            elapsed[level] += float(np.median(times[level]))
    chosen = "extended" if elapsed["extended"] <= PREFER_EXTENDED * elapsed["all"] else "all"
    name = model.name if isinstance(model, Path) else "a serialized graph"
    log.info("%s: graph optimization '%s' (probe %.3f ms at 'all', %.3f ms at 'extended')", name, chosen,
             1e3 * elapsed["all"], 1e3 * elapsed["extended"])
    kept = levels.pop(chosen)
    levels.clear()
    _trim_heap()  # the other session's weights go back to the system, not to the peak of this worker's RSS
    return kept, chosen


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def parts_of(x: np.ndarray, rows: int, fixed: bool = False) -> list[tuple[np.ndarray, int]]:
    """``x`` in parts of at most ``rows`` rows, each with its number of real rows. ``fixed``: every part has
    exactly ``rows`` rows, the last padded with copies of its last row (an empty ``x``: one part of zeros),
    for a graph or model server that takes only that batch size."""
    parts = [x[i:i + rows] for i in range(0, len(x), rows)] or [x[:0]]
    if not fixed:
        return [(p, len(p)) for p in parts]
    return [(np.concatenate([p, np.repeat(p[-1:] if len(p) else np.zeros((1, *x.shape[1:]), x.dtype),
                                          rows - len(p), axis=0)]), len(p)) for p in parts]


def chunk_rows(on_cpu: bool, x: np.ndarray) -> int:
    """Rows per onnxruntime call: on the CPU, at most ``CPU_CHUNK_ELEMENTS`` input values, since
    onnxruntime's arena keeps the peak of every call's activations for the life of the process (a
    large batch in one call would set a worker's memory for good; ``bench.peak_memory``); on a GPU,
    the whole batch."""
    if not on_cpu:
        return len(x)
    return max(1, CPU_CHUNK_ELEMENTS // max(1, math.prod(x.shape[1:])))


class OnnxModel:
    """One ONNX graph with a single input and a single output, batch axis first."""

    def __init__(self, path: Path, providers: list[str], threads: int = 0, input_name: str | None = None,
                 output_name: str | None = None, spinning: bool = True, optimization: Optimization = "auto") -> None:
        self.path = Path(path)
        self.session = make_session(self.path, providers, threads, spinning, optimization)
        inputs, outputs = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        for name, names, what in ((input_name, inputs, "input"), (output_name, outputs, "output")):
            if name is not None and name not in names:
                raise ValueError(f"{self.path.name} has no {what} named {name!r} (it has {', '.join(names)})")
        self.input_name = input_name or inputs[0]
        self.output_name = output_name or outputs[0]
        self._outputs = [self.output_name]
        self._on_cpu = self.session.get_providers()[0] == CPU
        # a graph exported with a fixed batch size (often 1: an export without dynamic axes) is run that many
        # rows at a time, the last call padded with copies of its last row
        graph_input = next(i for i in self.session.get_inputs() if i.name == self.input_name)
        if graph_input.type not in INPUT_DTYPES:
            raise ValueError(f"{self.path.name}'s input {self.input_name!r} is {graph_input.type}; an image input "
                             f"is float, float16, double or uint8")
        # float16, double: the float32 batch cast; uint8: rounded and clipped to 0..255 (the contract gives the
        # scale: ``Classifier`` checks it)
        self.input_dtype = np.dtype(INPUT_DTYPES[graph_input.type])
        first = graph_input.shape[:1]
        self.fixed_batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else None
        if self.fixed_batch is not None:
            log.warning("%s takes a fixed batch of %d on input %r: it runs %d image(s) per call; export it with "
                        "a dynamic batch axis for throughput", self.path.name, self.fixed_batch,
                        self.input_name, self.fixed_batch)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The model's output on ``x`` (float32 whatever the graph's types)."""
        if self.input_dtype == np.uint8:
            x = np.clip(np.rint(x), 0, 255)
        if not (isinstance(x, np.ndarray) and x.dtype == self.input_dtype and x.flags.c_contiguous):
            x = np.ascontiguousarray(x, self.input_dtype)
        fixed = self.fixed_batch is not None and len(x) != self.fixed_batch
        rows = self.fixed_batch if fixed else chunk_rows(self._on_cpu, x)
        if len(x) <= rows and not fixed:
            out = self.session.run(self._outputs, {self.input_name: x})[0]
        else:
            out = np.concatenate([self.session.run(self._outputs, {self.input_name: part})[0][:n]
                                  for part, n in parts_of(x, rows, fixed)])
        return out if out.dtype == np.float32 else out.astype(np.float32)
