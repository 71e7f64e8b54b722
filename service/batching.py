"""Dynamic micro-batching: concurrent requests that the same pool member judges share one defense pass
and one upstream call, the way Triton's dynamic batcher and MLServer's adaptive batching work.

A request's rows join the queue of its (member, mode) group. A group with no batch in flight starts one
at once with what is queued (an idle gateway adds no waiting, and a request that finds its group idle
runs as its own batch in its own task; ``MAGNET_BATCH_WINDOW_MS`` waits that long
first, to gather more); while a batch runs, new requests queue, and the next batch takes them all, up to
``MAGNET_BATCH_ROWS`` rows (a request larger than that still goes whole, alone). The batch's outcome is
split back to its requests in order. Inputs are decoded and checked per request before they queue, so a
bad input fails its own request only; an upstream failure fails the requests of the batch that met it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from service.defense.core import Verdict
from service.metrics import Metrics
from service.pipeline import Outcome, Pipeline


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


def split_outcome(outcome: Outcome, sizes: list[int]) -> list[Outcome]:
    """The outcome of a concatenated batch as one outcome per request of ``sizes`` rows, in order."""
    if len(sizes) == 1:
        return [outcome]
    parts, start = [], 0
    v = outcome.verdict
    for n in sizes:
        s = slice(start, start + n)
        verdict = Verdict(accepted=v.accepted[s], reformed=v.reformed[s],
                          scores={k: a[s] for k, a in v.scores.items()}, fired={k: a[s] for k, a in v.fired.items()},
                          member=v.member, logits_x=None if v.logits_x is None else v.logits_x[s],
                          logits_reformed=None if v.logits_reformed is None else v.logits_reformed[s])
        parts.append(Outcome(verdict=verdict, probabilities=outcome.probabilities[s], shadow=outcome.shadow))
        start += n
    return parts


class MicroBatcher:
    """``classify`` as ``Pipeline.classify`` does, with concurrent calls coalesced per (member, shadow)."""

    def __init__(self, pipeline: Pipeline, metrics: Metrics, max_rows: int, window_s: float = 0.0) -> None:
        self.pipeline, self.metrics = pipeline, metrics
        self.max_rows, self.window_s = max_rows, window_s
        self._queues: dict[tuple[int, bool], deque[_Pending]] = {}
        self._draining: set[tuple[int, bool]] = set()
        self._tasks: set[asyncio.Task] = set()

    async def classify(self, x: np.ndarray, member: int = 0, shadow: bool = False) -> Outcome:
        key = (member, shadow)
        queue = self._queues.setdefault(key, deque())
        if key not in self._draining and not queue and not self.window_s:
            return await self._alone(x, key)
        pending = _Pending(x, asyncio.get_running_loop().create_future())
        queue.append(pending)
        if key not in self._draining:
            self._draining.add(key)
            self._spawn_drain(key)
        return await pending.future

    async def _alone(self, x: np.ndarray, key: tuple[int, bool]) -> Outcome:
        """An idle group: this request is the batch, run in its own task (no hand-over to a drain task and
        back); requests that arrive meanwhile queue, and a drain task takes them once it is done."""
        self._draining.add(key)
        try:
            self.metrics.stage_seconds.labels("queue").observe(0.0)
            self.metrics.batch_rows.observe(len(x))
            return await self.pipeline.classify(x, member=key[0], shadow=key[1])
        finally:
            if self._queues.get(key):
                self._spawn_drain(key)
            else:
                self._draining.discard(key)

    def _spawn_drain(self, key: tuple[int, bool]) -> None:
        task = asyncio.create_task(self._drain(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _take(self, key: tuple[int, bool]) -> list[_Pending]:
        queue, batch, rows = self._queues[key], [], 0
        while queue and (not batch or rows + len(queue[0].x) <= self.max_rows):
            item = queue.popleft()
            if item.future.done():  # the client went away while it waited
                continue
            batch.append(item)
            rows += len(item.x)
        return batch

    async def _drain(self, key: tuple[int, bool]) -> None:
        try:
            while self._queues.get(key):
                if self.window_s:
                    await asyncio.sleep(self.window_s)
                batch = self._take(key)
                if not batch:
                    continue
                now = time.perf_counter()
                for item in batch:
                    self.metrics.stage_seconds.labels("queue").observe(now - item.queued)
                sizes = [len(item.x) for item in batch]
                self.metrics.batch_rows.observe(sum(sizes))
                try:
                    x = batch[0].x if len(batch) == 1 else np.concatenate([item.x for item in batch])
                    outcome = await self.pipeline.classify(x, member=key[0], shadow=key[1])
                except Exception as e:  # the requests of this batch share its failure
                    for item in batch:
                        if not item.future.done():
                            item.future.set_exception(e)
                    continue
                for item, part in zip(batch, split_outcome(outcome, sizes)):
                    if not item.future.done():
                        item.future.set_result(part)
        finally:  # the queue is empty here: nothing awaits between the loop's last test and this line
            self._draining.discard(key)
