"""Stand-in engines for Ray workers (loaded in the actor by file path: tests/ is not a package)."""

import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(__file__))
from standin import EchoEngine  # noqa: E402

CRASH_AFTER_STEPS = 3


class CrashingEcho(EchoEngine):
    """Echoes, then its process dies mid-call (as kill -9 would) on its third step."""

    def __init__(self, lm, config=None):
        super().__init__(lm, config)
        self.num_steps = 0

    def step(self):
        self.num_steps += 1
        if self.num_steps >= CRASH_AFTER_STEPS:
            os._exit(1)
        return super().step()


class PidEcho(EchoEngine):
    """Echoes its process id: the records say which worker ran each row."""

    def step(self):
        return [replace(c, text=str(os.getpid())) for c in super().step()]
