"""A bounded pool of inference threads: work runs off the event loop, and a request that
finds every worker busy and the queue full is refused at once instead of waiting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from omniseg.serve.errors import ServiceBusyError

T = TypeVar("T")


class InferencePool:
    """``workers`` threads running jobs, and room for ``queue_size`` more requests waiting.

    A request holds one of the ``workers + queue_size`` slots from admission (before its
    body is read) until its job has finished, even if the client went away meanwhile, so
    at most that many uploads and decoded images are in memory at any time. Slots are
    counted on the event loop's thread only, so no lock is needed.
    """

    def __init__(self, *, workers: int, queue_size: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be at least 0, got {queue_size}")
        self.workers = workers
        self.capacity = workers + queue_size
        self.in_use = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="omniseg-infer")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator["_Slot"]:
        """Admit a request, or raise :class:`ServiceBusyError` when all slots are taken."""
        if self.in_use >= self.capacity:
            raise ServiceBusyError(
                f"the service is busy ({self.workers} worker(s) running and "
                f"{self.capacity - self.workers} request(s) queued); retry shortly"
            )
        self.in_use += 1
        slot = _Slot(self._executor)
        try:
            yield slot
        finally:
            job = slot.job
            if job is None or job.done():
                self.in_use -= 1
            else:  # cancelled while its job runs: the slot is free only when the job ends
                loop = asyncio.get_running_loop()
                job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _release(self) -> None:
        self.in_use -= 1


class _Slot:
    """An admitted request's right to run one job on the pool."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self._executor = executor
        self.job: Future | None = None

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on a worker thread; the event loop serves others meanwhile."""
        if self.job is not None:
            raise RuntimeError("a slot runs one job")
        self.job = self._executor.submit(function, *args)
        return await asyncio.wrap_future(self.job)
