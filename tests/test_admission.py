"""Admission of uploads: at most `limit` in the server (Busy at once beyond), at most `decoders` decoding at once
(the others wait without failing), and a wait for a slot that outlives its deadline is Expired
without ever decoding."""

from __future__ import annotations

import asyncio
import time

import pytest

from indexer.serve.admission import Admission
from indexer.serve.batcher import Busy, Expired

FAR = 3600.0


def test_uploads_beyond_the_limit_are_refused_at_once_and_admitted_again_after():
    gate = Admission(limit=2, decoders=1)
    with gate.admit(), gate.admit():
        assert gate.inside == 2
        with pytest.raises(Busy, match="2 uploads are already in the server"), gate.admit():
            pass
        assert gate.inside == 2
    assert gate.inside == 0
    with pytest.raises(ValueError), gate.admit():  # an error inside still frees the place
        raise ValueError
    assert gate.inside == 0


def test_at_most_decoders_decode_at_once_and_the_others_wait_their_turn():
    async def scenario() -> tuple[int, list[int]]:
        gate = Admission(limit=16, decoders=2)
        release = asyncio.Event()
        inside, peak, order = 0, 0, []

        async def upload(i: int) -> None:
            nonlocal inside, peak
            async with gate.decoding(time.monotonic() + FAR):
                inside += 1
                peak = max(peak, inside)
                order.append(i)
                await release.wait()
                inside -= 1

        tasks = [asyncio.create_task(upload(i)) for i in range(6)]
        while len(order) < 2:  # the first two hold the slots; the rest are parked on the semaphore
            await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)
        assert order == [0, 1]
        release.set()
        await asyncio.gather(*tasks)
        return peak, order

    peak, order = asyncio.run(scenario())
    assert peak == 2 and sorted(order) == list(range(6))


def test_a_wait_for_a_decode_slot_past_its_deadline_is_expired_and_never_decodes():
    async def scenario() -> list[str]:
        gate = Admission(limit=4, decoders=1)
        decoded: list[str] = []
        async with gate.decoding(time.monotonic() + FAR):  # the one slot is taken
            with pytest.raises(Expired):
                async with gate.decoding(time.monotonic() + 0.01):  # gives up when its deadline passes
                    decoded.append("waited")
        with pytest.raises(Expired):
            async with gate.decoding(time.monotonic() - 1):  # already late: refused even with a free slot
                decoded.append("late")
        async with gate.decoding(time.monotonic() + FAR):  # the expired waits left the slot free
            decoded.append("on time")
        return decoded

    assert asyncio.run(scenario()) == ["on time"]
