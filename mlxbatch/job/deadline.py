"""A wall-clock bound on pure-Python work (chat template rendering), by SIGALRM.

Owns: `time_limit(seconds)`. Only the main thread gets signals, so elsewhere the
block runs unbounded. Does not own: what to do when time runs out (the caller).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class TimeLimitExceeded(BaseException):
    """BaseException, so the `except Exception` inside libraries (Jinja, transformers) cannot swallow it."""


def _on_alarm(signum, frame) -> None:
    raise TimeLimitExceeded()


@contextmanager
def time_limit(seconds: float):
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
