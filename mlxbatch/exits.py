"""Work that must run before the process leaves through `os._exit`, which skips `atexit`.

Owns: a list of hooks and running them once, newest first, each on its own (one that fails
does not stop the rest). The CLI's exits and the runner's second-signal exit call `run()`;
a local Ray instance registers its shutdown here so it never outlives the driver. Does not
own: deciding when to exit (cli/__init__.py, runner.py).
"""

from __future__ import annotations

from typing import Callable

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
