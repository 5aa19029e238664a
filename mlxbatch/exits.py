"""Work that must run before the process leaves through `os._exit`, which skips `atexit`.

Owns: a list of hooks and running them once, newest first, each on its own (one that fails
does not stop the rest), and the one signal exit (`leave_now`) that the console script's
first moments, the CLI and the runner's second signal all use; a local Ray instance registers
its shutdown here so it never outlives the driver. Imports only the standard library, so the
console script can install it before any slow import. Does not own: deciding when to exit
(cli/__init__.py, runner.py).
"""

from __future__ import annotations

import os
import signal

TYPE_CHECKING = False  # no `typing` import: this module loads while a signal may already be on its way
if TYPE_CHECKING:
    from typing import Callable, NoReturn

EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_hooks: list[Callable[[], None]] = []


def register(hook: Callable[[], None]) -> Callable[[], None]:
    _hooks.append(hook)
    return hook


def unregister(hook: Callable[[], None]) -> None:
    if hook in _hooks:
        _hooks.remove(hook)


def run() -> None:
    """Each hook once; called from signal handlers too, so it never raises."""
    while _hooks:
        hook = _hooks.pop()
        try:
            hook()
        except BaseException:  # leaving anyway: a hook's failure must not keep the process alive
            pass


def leave_now(message: str = "interrupted", code: int = 130) -> NoReturn:
    """Say why, run the hooks, and leave without unwinding (committed rows are already durable)."""
    os.write(2, f"\nmlxbatch: {message}\n".encode())
    run()
    os._exit(code)


def _on_signal(signum, frame) -> None:
    leave_now()


def exit_on_signals() -> None:
    """SIGINT/SIGTERM/SIGHUP outside the job loop (which stops cleanly on its own): leave at once."""
    for s in EXIT_SIGNALS:
        signal.signal(s, _on_signal)
