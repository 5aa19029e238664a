"""The Ray session of a `--workers` job: join a cluster or start a local one, place actors, leave.

Owns: importing Ray (only here and in cluster/pool.py, only when `--workers` is used), the message
when it is missing, starting a small quiet local instance or joining one by address, what each
worker actor asks for (a GPU each where the cluster has enough, an even share where it has fewer,
else a CPU; spread over nodes), and ending a local instance on every exit path, signals and
`os._exit` included (exits.py). Does not own: the actors' work (cluster/actor.py) or routing rows to
them (cluster/pool.py).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess

from mlxbatch import exits
from mlxbatch.errors import UsageError, WorkerError

INSTALL_HINT = "pip install 'mlxbatch[ray]'"
_STORE_BYTES = 128 << 20  # requests and completions are small; the object store need not take 30% of memory


def require_ray():
    """The ray module, or a usage error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--workers needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class Session:
    """A connection to Ray; `close()` (or any exit through exits.py) ends it and what it started."""

    def __init__(self, address: str | None, *, num_workers: int):
        self.ray = require_ray()
        self.is_local = address is None
        self.was_connected = self.ray.is_initialized()  # a caller's own session: used, never shut down
        self._before = set(descendants(os.getpid()))  # what a local Ray starts is what appears after this
        self._roots: list[int] | None = None  # its node's processes (GCS, raylet, ...), once started
        self._hook = exits.register(self._kill_local)  # before init: a signal while Ray starts stops it too
        if not self.was_connected:
            self._init(address, num_workers)
            self._roots = [p for p in _children(os.getpid()) if p not in self._before]

    def _init(self, address: str | None, num_workers: int) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local batch job reports nothing home
        kwargs = dict(logging_level=logging.ERROR, log_to_driver=False)
        if self.is_local:  # "local": a fresh instance, never a leftover or a user's running cluster
            kwargs.update(address="local", num_cpus=max(num_workers, os.cpu_count() or 1),
                          include_dashboard=False, object_store_memory=_STORE_BYTES)
        else:
            kwargs.update(address=address)
        saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.ray.init(**kwargs)
        except Exception as exc:
            self.close()
            where = "start a local Ray instance" if self.is_local else f"join the Ray cluster at {address!r}"
            raise WorkerError(f"could not {where}: {exc}") from exc
        finally:
            for s, h in saved.items():  # ray.init installs its own SIGTERM handler; ours stop cleanly
                signal.signal(s, h)

    def actor_options(self, num_workers: int) -> dict:
        """A GPU per worker where the cluster has enough (else an even share of them), else a CPU; spread over machines."""
        res = self.ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if gpus:  # Ray sets each actor's CUDA_VISIBLE_DEVICES: workers never pile onto GPU 0
            return {"num_gpus": 1 / math.ceil(num_workers / gpus), "num_cpus": 0, "scheduling_strategy": "SPREAD"}
        if res.get("CPU", 0) < num_workers:
            raise WorkerError(f"the Ray cluster has {res.get('CPU', 0):g} CPUs and {res.get('GPU', 0):g} GPUs: "
                              f"not enough for {num_workers} workers (each needs a GPU or a CPU)")
        return {"num_cpus": 1, "scheduling_strategy": "SPREAD"}

    def kill(self, actor) -> None:
        """End an actor for good: it can never deliver late."""
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already gone, or its node is: nothing left to stop
            pass

    def close(self) -> None:
        if not self.was_connected:
            started = self._local_processes()
            self.ray.shutdown()  # a local instance stops; a joined cluster only loses this driver
            _kill(started)  # its agents can outlive a shutdown cut short: nothing it started stays
        exits.unregister(self._hook)  # only now: a signal during shutdown still ends what it started

    def _local_processes(self) -> list[int]:
        """The local node's processes and all below them (workers, agents); not what the caller starts later."""
        if self.was_connected or not self.is_local:
            return []
        if self._roots is None:  # mid-init: whatever appeared below us since
            return [p for p in descendants(os.getpid()) if p not in self._before]
        return self._roots + [p for root in self._roots for p in descendants(root)]

    def _kill_local(self) -> None:
        """The exit path (a signal, os._exit): no Ray calls, just end every process a local Ray started."""
        _kill(self._local_processes())  # all at once, before any is orphaned and lost from our tree


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # Ray's agents ignore SIGTERM
        except OSError:
            pass


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children first."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def _children(pid: int) -> list[int]:
    return [child for child, parent in _parents().items() if parent == pid]


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process: /proc on Linux, `ps` elsewhere (macOS)."""
    if os.path.isdir("/proc/self"):
        out = {}
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    out[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])  # the name may hold spaces
            except (OSError, ValueError, IndexError):
                continue
        return out
    text = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True).stdout
    return {int(a): int(b) for a, b in (line.split() for line in text.splitlines() if line.strip())}
