"""A Ctrl-C that is never lost: long loops stop at their next check even where Python swallowed it.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives; inside a finaliser
(`__del__`) or a weakref callback that exception is only printed ("Exception ignored in ...") and the program
runs on, so a fine-tuning run could go on for hours after the user pressed Ctrl-C.

    with sigint_latch() as check:
        for step in steps:
            check()        # raises KeyboardInterrupt if a SIGINT came, swallowed or not
            train(step)
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType


@contextlib.contextmanager
def sigint_latch() -> Iterator[Callable[[], None]]:
    """Within the block SIGINT still raises KeyboardInterrupt at once (through the handler installed before) and is
    also remembered; the yielded `check()` raises KeyboardInterrupt once one came.

    Where SIGINT is ignored, or handled by the C default, or this is not the main thread, nothing is installed and
    `check()` never raises: the process keeps the behaviour it was started with.
    """
    came = threading.Event()

    def check() -> None:
        if came.is_set():
            raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield check
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        came.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)
