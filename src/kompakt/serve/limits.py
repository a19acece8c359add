"""One model worker per server: a bounded queue of requests, one generation at a time.

A model's forward pass is not thread-safe and one CPU generation already uses every core,
so requests take turns (FIFO: asyncio.Lock wakes waiters in order). Every call into the
model runs on one dedicated thread, so a generator is only ever advanced or closed on the
thread that created it, and the event loop stays free to answer /health and to notice
disconnected clients between tokens.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFull(Exception):
    """More requests are waiting than the server accepts (answered with 503)."""


class ModelWorker:
    """Admission control + serialised execution for one model.

    Args:
        queue_size: how many requests may wait while one generates; one more is refused.
    """

    def __init__(self, queue_size: int = 16) -> None:
        if queue_size < 0:
            raise ValueError("queue_size must be >= 0")
        self.queue_size = queue_size
        self.pending = 0  # admitted requests: running + waiting
        self._lock: asyncio.Lock | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kompakt-model")

    def admit(self) -> Ticket:
        """Reserve a place in the queue now (before any response is sent), or raise QueueFull."""
        if self.pending > self.queue_size:
            raise QueueFull(f"the server is busy ({self.pending} requests running or waiting); retry shortly")
        self.pending += 1
        return Ticket(self)

    @asynccontextmanager
    async def turn(self, ticket: Ticket):
        """Wait for the model (FIFO); the ticket is released when the turn ends."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            async with self._lock:
                yield
        finally:
            ticket.release()

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """Run `function(*args)` on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def submit(self, function: Callable[..., Any], *args: Any) -> None:
        """Queue `function(*args)` on the model thread without waiting (e.g. closing a generator
        whose consumer was cancelled while a step was still running)."""
        self._executor.submit(function, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Ticket:
    """A reserved place in the queue; release() is idempotent."""

    def __init__(self, worker: ModelWorker) -> None:
        self._worker: ModelWorker | None = worker

    def release(self) -> None:
        if self._worker is not None:
            self._worker.pending -= 1
            self._worker = None
