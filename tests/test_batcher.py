"""MicroBatcher: uploads that arrive together share one batch, a full queue says Busy at once, errors reach every
waiting caller and the worker goes on, solo calls and ticks run on the worker thread, a job past its deadline
is never run and fails with Expired."""

from __future__ import annotations

import threading
import time

import pytest

from indexer.serve.batcher import Busy, Expired, MicroBatcher


def _recording(sizes: list[int], delay: float = 0.0):
    def run(payloads):
        sizes.append(len(payloads))
        time.sleep(delay)
        return [p * 10 for p in payloads]

    return run


def test_payloads_within_the_window_share_a_batch_and_results_go_to_their_own_callers():
    sizes: list[int] = []
    batcher = MicroBatcher(_recording(sizes), max_batch=16, window_s=0.5, queue_size=32)
    try:
        barrier = threading.Barrier(8)
        results: dict[int, int] = {}

        def client(i: int) -> None:
            barrier.wait()
            results[i] = batcher.submit(i).result(timeout=10)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert results == {i: i * 10 for i in range(8)}
        assert sizes == [8], sizes  # all eight arrived well within 0.5 s of the first
    finally:
        batcher.close()


def test_max_batch_caps_a_batch_and_batching_off_runs_one_at_a_time():
    sizes: list[int] = []
    batcher = MicroBatcher(_recording(sizes), max_batch=3, window_s=0.3, queue_size=32)
    try:
        futures = [batcher.submit(i) for i in range(7)]
        assert [f.result(timeout=10) for f in futures] == [i * 10 for i in range(7)]
        assert sizes == [3, 3, 1]
    finally:
        batcher.close()
    sizes.clear()
    batcher = MicroBatcher(_recording(sizes), max_batch=1, window_s=0.3, queue_size=32)
    try:
        futures = [batcher.submit(i) for i in range(4)]
        assert [f.result(timeout=10) for f in futures] == [0, 10, 20, 30]
        assert sizes == [1, 1, 1, 1]
    finally:
        batcher.close()


def test_a_full_queue_is_busy_at_once_and_frees_up_after():
    release, running = threading.Event(), threading.Event()
    batcher = MicroBatcher(_recording([]), max_batch=4, window_s=0.0, queue_size=2)
    try:
        blocker = batcher.call(lambda: (running.set(), release.wait(10)))
        assert running.wait(10)
        queued = [batcher.submit(1), batcher.submit(2)]  # the worker is busy: these fill the queue
        start = time.monotonic()
        with pytest.raises(Busy, match="2 requests are already waiting"):
            batcher.submit(3)
        with pytest.raises(Busy):
            batcher.call(lambda: None)
        assert time.monotonic() - start < 0.5  # refused at once, not after a wait
        release.set()
        blocker.result(timeout=10)
        assert [f.result(timeout=10) for f in queued] == [10, 20]
        assert batcher.submit(4).result(timeout=10) == 40
    finally:
        release.set()
        batcher.close()


def test_an_error_reaches_every_caller_of_the_batch_and_the_worker_goes_on():
    calls = []

    def run(payloads):
        calls.append(list(payloads))
        if "bad" in payloads:
            raise ValueError("boom")
        return payloads

    batcher = MicroBatcher(run, max_batch=8, window_s=0.3, queue_size=8)
    try:
        futures = [batcher.submit("ok"), batcher.submit("bad")]
        for f in futures:
            with pytest.raises(ValueError, match="boom"):
                f.result(timeout=10)
        assert batcher.submit("later").result(timeout=10) == "later"
        assert calls == [["ok", "bad"], ["later"]]
    finally:
        batcher.close()


def test_solo_calls_and_ticks_run_on_the_worker_thread_also_when_idle():
    ticks: list[str] = []
    batcher = MicroBatcher(lambda p: p, tick_s=0.05, on_tick=lambda: ticks.append(threading.current_thread().name),
                           name="the-worker")
    try:
        assert batcher.call(lambda: threading.current_thread().name).result(timeout=10) == "the-worker"
        deadline = time.monotonic() + 10
        while len(ticks) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(ticks) >= 3 and set(ticks) == {"the-worker"}
    finally:
        batcher.close()


def test_a_job_whose_deadline_passed_while_it_waited_is_never_run_and_fails_with_expired():
    batches: list[list[int]] = []
    solos: list[str] = []

    def run(payloads):
        batches.append(list(payloads))
        return [p * 10 for p in payloads]

    release, running = threading.Event(), threading.Event()
    batcher = MicroBatcher(run, max_batch=8, window_s=0.0, queue_size=8)
    try:
        blocker = batcher.call(lambda: (running.set(), release.wait(10)))
        assert running.wait(10)
        past = time.monotonic() - 1  # already passed when the worker gets to them
        later = time.monotonic() + 3600
        late, on_time = batcher.submit(1, deadline=past), batcher.submit(2, deadline=later)
        late_solo = batcher.call(lambda: solos.append("late"), deadline=past)
        no_deadline = batcher.submit(3)
        release.set()
        blocker.result(timeout=10)
        assert on_time.result(timeout=10) == 20 and no_deadline.result(timeout=10) == 30
        for future in (late, late_solo):
            with pytest.raises(Expired, match="deadline"):
                future.result(timeout=10)
        assert issubclass(Expired, Busy)  # answered as any overload: 503 + Retry-After
        assert 1 not in [p for b in batches for p in b] and solos == []
    finally:
        release.set()
        batcher.close()
