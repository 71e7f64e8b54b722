"""service.offload: cheap calls run on the event loop, costly or unknown ones on a worker thread."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.offload import Offload


def _where(record: list):
    def fn(x: np.ndarray, pause: float = 0.0) -> int:
        if pause:
            time.sleep(pause)
        record.append(threading.current_thread().name)
        return len(x)
    return fn


def test_a_first_call_goes_to_the_executor_and_cheap_ones_then_run_inline():
    record = []
    fn = _where(record)

    async def main():
        offload = Offload(ThreadPoolExecutor(1, thread_name_prefix="pool"))
        assert await offload(fn, np.zeros((2, 3))) == 2  # never seen: the executor
        assert await offload(fn, np.zeros((2, 3))) == 2  # measured far under the budget: inline
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    assert record[0].startswith("pool") and record[1] == loop_thread


def test_a_call_predicted_over_the_budget_leaves_the_loop_free():
    record = []
    fn = _where(record)

    async def main():
        offload = Offload(ThreadPoolExecutor(1, thread_name_prefix="pool"), budget_s=1e-3)
        await offload(fn, np.zeros((1, 3)), 0.005)  # 5 ms per row, measured in the thread
        ticks = []

        async def tick():
            for _ in range(3):
                ticks.append(time.perf_counter())
                await asyncio.sleep(0)

        await asyncio.gather(offload(fn, np.zeros((4, 3)), 0.02), tick())
        return ticks

    ticks = asyncio.run(main())
    assert all(name.startswith("pool") for name in record)
    assert ticks[-1] - ticks[0] < 0.015  # the loop kept running while the 20 ms call ran


def test_without_an_executor_everything_runs_inline():
    record = []

    async def main():
        offload = Offload(None)
        await offload(_where(record), np.zeros((500, 3)), 0.002)
        return threading.current_thread().name

    assert record == [asyncio.run(main())]
