"""One worker thread that owns the model and the index, fed by a bounded queue, with micro-batching.

    batcher = MicroBatcher(run_batch, max_batch=32, window_s=0.005, queue_size=64, tick_s=1.0, on_tick=refresh)
    future = batcher.submit(payload)   # Busy when the queue is full; the future gets run_batch's result for it
    future = batcher.call(fn)          # fn() alone on the worker thread (anything that touches the same state)
    future = batcher.submit(payload, deadline=time.monotonic() + 5)  # Expired, never run, if still waiting then

Payloads that arrive within `window_s` of the first one waiting (and any already queued) go to `run_batch`
together, up to `max_batch`: on a CPU one forward of 8 images costs far less than 8 forwards of one. The queue
is bounded so that overload answers "busy" at once instead of growing memory and latency. `on_tick` runs on
the worker between jobs, at most every `tick_s` (also when idle): serve renews its index snapshot there.
A job whose `deadline` (time.monotonic()) has passed when the worker takes it is dropped with Expired: work
that waited too long is answered "busy" instead of being computed for a client that may have given up.
Everything that touches the model or the index runs on this one thread, so neither needs a lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full: the caller should answer 503 and ask the client to retry."""


class Expired(Busy):
    """The job waited past its deadline and was not run: answered as Busy."""


@dataclass
class _Job:
    future: Future
    payload: Any = None
    solo: Callable[[], Any] | None = None  # set for call(): run alone instead of batching
    deadline: float | None = None  # time.monotonic() after which the job is dropped unrun


_STOP = _Job(Future())


class MicroBatcher:
    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 32,
                 window_s: float = 0.005, queue_size: int = 64, tick_s: float = 1.0,
                 on_tick: Callable[[], None] | None = None, name: str = "batcher"):
        if max_batch < 1 or queue_size < 1 or window_s < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and window_s >= 0")
        self._run_batch = run_batch
        self.max_batch, self.window_s, self.tick_s = max_batch, window_s, tick_s
        self._on_tick = on_tick
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_size)
        self._last_tick = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, payload: Any, deadline: float | None = None) -> Future:
        """Queue `payload` for the next batch; Busy if the queue is full, Expired (in the future) if the worker
        reaches it after `deadline`."""
        return self._put(_Job(Future(), payload=payload, deadline=deadline))

    def call(self, fn: Callable[[], Any], deadline: float | None = None) -> Future:
        """Queue `fn` to run alone on the worker thread; Busy and Expired as for submit."""
        return self._put(_Job(Future(), solo=fn, deadline=deadline))

    def depth(self) -> int:
        """Jobs waiting in the queue now (approximate, as any queue size read from another thread)."""
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _put(self, job: _Job) -> Future:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} requests are already waiting") from None
        return job.future

    def _run(self) -> None:
        held: _Job | None = None  # a solo job met while gathering a batch runs right after it
        while True:
            self._tick()
            if held is not None:
                job, held = held, None
            else:
                try:
                    job = self._queue.get(timeout=self.tick_s)
                except queue.Empty:
                    continue
            if job is _STOP:
                return
            if _expired(job):
                continue
            if job.solo is not None:
                _settle(job.future, job.solo)
                continue
            batch = [job]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt.solo is not None or nxt is _STOP:
                    held = nxt
                    break
                batch.append(nxt)
            batch = [j for j in batch if not _expired(j)]  # the window may have outlived the first one's deadline
            if batch:
                self._run_one_batch(batch)

    def _run_one_batch(self, batch: list[_Job]) -> None:
        try:
            results = self._run_batch([j.payload for j in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} payloads")
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error, the worker goes on
            for j in batch:
                j.future.set_exception(exc)
            return
        for j, result in zip(batch, results, strict=True):
            j.future.set_result(result)

    def _tick(self) -> None:
        now = time.monotonic()
        if self._on_tick is None or now - self._last_tick < self.tick_s:
            return
        self._last_tick = now
        try:
            self._on_tick()
        except Exception:  # noqa: BLE001 - a failed refresh is retried at the next tick; serving goes on
            log.exception("periodic refresh failed")


def _expired(job: _Job) -> bool:
    """Fail a job whose deadline has passed with Expired (True), so that it is never run."""
    if job.deadline is None or time.monotonic() <= job.deadline:
        return False
    job.future.set_exception(Expired("waited past its deadline"))
    return True


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
        future.set_exception(exc)
