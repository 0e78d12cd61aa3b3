"""Admission control for uploads: how many may be in the server at once, and how many decode at once.

    gate = Admission(limit=64, decoders=2)
    with gate.admit():                        # Busy at once when `limit` uploads are already in the server
        data = await read_body()
        async with gate.decoding(deadline):   # Expired if no decode slot frees before the deadline
            pixels = await run_in_threadpool(decode, data)

Why: uploads are decoded beside the encoder's forward, on the same cores. Unbounded, 64 uploads at once meant
up to 40 pool threads decoding (each running the transform's torch ops with its own thread team) against the
encoder, and throughput fell below concurrency 8's (docs/serving.md, "Overload"). Bounded to the cores, the rest
wait on an asyncio semaphore, which costs no CPU, and uploads beyond `limit` are refused before their body is read.
All methods run on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from .batcher import Busy, Expired


def cpu_count() -> int:
    """CPUs this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Admission:
    def __init__(self, limit: int, decoders: int):
        if limit < 1 or decoders < 1:
            raise ValueError("limit and decoders must be >= 1")
        self.limit, self.decoders = limit, decoders
        self.inside = 0  # uploads admitted and not yet answered
        self._slots = asyncio.Semaphore(decoders)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count an upload in the server while the block runs; Busy at once if `limit` are already in."""
        if self.inside >= self.limit:
            raise Busy(f"{self.inside} uploads are already in the server")
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    @asynccontextmanager
    async def decoding(self, deadline: float) -> AsyncIterator[None]:
        """Hold one of `decoders` slots while the block runs; Expired if none frees before `deadline`
        (time.monotonic()), also when the deadline has already passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise Expired("waited past its deadline")
        try:
            await asyncio.wait_for(self._slots.acquire(), left)
        except TimeoutError:
            raise Expired("waited past its deadline for a decode slot") from None
        try:
            yield
        finally:
            self._slots.release()
