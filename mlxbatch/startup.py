"""Where a run's first seconds go: marks from process start to the first decode steps.

Owns: the process-wide list of phase marks (each one ends the phase it names; a few
`perf_counter` calls a run, so always on) and the table `mlxbatch run --profile-start`
prints. Does not own: what the phases do (models/, runner.py mark them).
"""

from __future__ import annotations

import os
import sys
import time

_T0 = time.perf_counter()  # when mlxbatch was first imported
_marks: list[tuple[str, float]] = []


def _since_process_start() -> float:
    """Seconds from the process's start to `_T0` (interpreter start, site imports); 0 where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK") - (time.perf_counter() - _T0))
    except (OSError, ValueError, IndexError):
        return 0.0


_BEFORE = _since_process_start()


def mark(phase: str) -> None:
    """The phase named here ends now (it began at the previous mark)."""
    _marks.append((phase, time.perf_counter()))


def phases() -> list[tuple[str, float]]:
    """(phase, seconds) in order, the Python start first."""
    out, prev = [("python start (before mlxbatch)", _BEFORE)], _T0
    for name, t in _marks:
        out.append((name, t - prev))
        prev = t
    return out


def table(*, total: float | None = None) -> str:
    rows = phases()
    lines = [f"{'start-up phase':42s} {'seconds':>8s} {'since start':>12s}"]
    clock = 0.0
    for name, secs in rows:
        clock += secs
        lines.append(f"{name:42s} {secs:8.3f} {clock:12.3f}")
    if total is not None:
        lines.append(f"{'rest of the job':42s} {total - clock:8.3f} {total:12.3f}")
    return "\n".join(lines)


def elapsed() -> float:
    """Seconds since the process started (as far as known)."""
    return _BEFORE + time.perf_counter() - _T0


def print_table() -> None:
    print(table(total=elapsed()), file=sys.stderr)
