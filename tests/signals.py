"""Signal dispositions the tests set up themselves instead of inheriting them from whoever started pytest.

A shell that starts a job in the background without job control (`cmd &` in a script, `nohup ... &`) starts it
with SIGINT ignored, every child inherits that through exec, and Python then installs no KeyboardInterrupt
handler: a test that sends SIGINT would see nothing happen.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def ctrl_c_raises() -> Iterator[None]:
    """In this process: SIGINT raises KeyboardInterrupt (Python's own handler) inside the block, then restored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def default_sigint() -> None:
    """A `preexec_fn` for children: SIGINT back to its default before exec, so the child's Python handles it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
