"""Where onnxruntime runs: on the event loop when a call is cheap, on a worker thread when it is not.

A thread hop costs two wake-ups (the worker thread, then the event loop through its self-pipe); on a
few shared cores each can wait for a scheduler slice, which is more than a small autoencoder takes on one
image. So each callable's recent cost per row is kept (an exponential average of the time measured
around the call itself, wherever it ran), and a call whose predicted time is under ``budget_s`` runs
inline, blocking the loop no longer than that; anything larger, or never seen, goes to the executor and
leaves the loop free for other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any, Callable

import numpy as np

INLINE_BUDGET_S = 1e-3  # at most this long on the event loop per call (docs/results/throughput.md)
_ALPHA = 0.2  # weight of the newest measurement in the average


class Offload:
    """``await offload(fn, x, *args)``: ``fn(x, *args)`` inline or in ``executor`` (see the module)."""

    def __init__(self, executor: Executor | None, budget_s: float = INLINE_BUDGET_S) -> None:
        self.executor, self.budget_s = executor, budget_s
        self._per_row: dict[Callable, float] = {}

    def inline(self, fn: Callable, rows: int) -> bool:
        """Whether a call of ``fn`` on ``rows`` rows is predicted to fit the budget."""
        per_row = self._per_row.get(fn)
        return per_row is not None and per_row * max(rows, 1) <= self.budget_s

    def _timed(self, fn: Callable, x: np.ndarray, *args: Any) -> Any:
        started = time.perf_counter()
        out = fn(x, *args)
        per_row = (time.perf_counter() - started) / max(len(x), 1)
        old = self._per_row.get(fn)
        self._per_row[fn] = per_row if old is None else (1 - _ALPHA) * old + _ALPHA * per_row
        return out

    async def __call__(self, fn: Callable, x: np.ndarray, *args: Any) -> Any:
        if self.executor is None or self.inline(fn, len(x)):
            return self._timed(fn, x, *args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._timed, fn, x, *args)
