"""The SIGINT latch: a Ctrl-C that Python swallows in a finaliser still stops the loop at its next check."""

from __future__ import annotations

import os
import signal
import time

import pytest

from retrieval.interrupt import sigint_latch
from tests.signals import ctrl_c_raises


def _sigint_and_wait() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:   # the handler runs at the next bytecode boundary, in this loop
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def _sigint_raises():
    """Each test starts from Python's own SIGINT handler, whatever pytest was started with."""
    with ctrl_c_raises():
        yield


class _SigintInFinaliser:
    def __del__(self) -> None:
        _sigint_and_wait()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_swallowed_by_a_finaliser_is_raised_at_the_next_check():
    before = signal.getsignal(signal.SIGINT)
    with sigint_latch() as check:
        check()                                   # nothing came yet
        _SigintInFinaliser()                      # dropped at once: KeyboardInterrupt raised in __del__, ignored
        with pytest.raises(KeyboardInterrupt):
            check()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_ctrl_c_still_interrupts_at_once_inside_the_latch():
    with sigint_latch() as check:
        with pytest.raises(KeyboardInterrupt):
            _sigint_and_wait()
        with pytest.raises(KeyboardInterrupt):
            check()


def test_an_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with sigint_latch() as check:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            check()                               # the process was started to ignore Ctrl-C: nothing raises
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
