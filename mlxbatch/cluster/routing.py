"""Prefix-affinity routing: rows that share a prompt prefix go to the same worker.

Owns: keys for a prompt's prefixes (a chained hash at every 64-token block boundary), which
worker owns each key (bounded: the oldest are forgotten), and the choice: the owner of the
deepest known key, unless it is more than about a batch busier than the least-loaded worker.
Does not own: the workers or their loads (cluster/pool.py passes them in).
"""

from __future__ import annotations

from itertools import islice

BLOCK_TOKENS = 64
MAX_KEYS = 200_000  # ~20 MB of dict; a job that outgrows it forgets its oldest prefixes


def prefix_keys(tokens: list[int], block: int = BLOCK_TOKENS) -> list[int]:
    """One key per whole block: the key at k blocks names the prompt's first k * block tokens."""
    keys, h = [], 0
    for end in range(block, len(tokens) + 1, block):
        h = hash((h, tuple(tokens[end - block:end])))
        keys.append(h)
    return keys


class PrefixRouter:
    def __init__(self, *, slack: int, max_keys: int = MAX_KEYS):
        self.slack = slack  # how much busier than the least-loaded worker an owner may be
        self.max_keys = max_keys
        self.owner: dict[int, int] = {}

    def route(self, tokens: list[int], loads: dict[int, int]) -> int:
        """The worker for a prompt, given the outstanding requests of each worker that can take work."""
        keys = prefix_keys(tokens)
        least = min(loads, key=loads.__getitem__)
        deepest = next((k for k in reversed(keys) if self.owner.get(k) in loads), None)
        chosen = least
        if deepest is not None:
            owner = self.owner.pop(deepest)
            self.owner[deepest] = owner  # most recently used: forgotten last
            if loads[owner] - loads[least] <= self.slack:
                chosen = owner
        for k in keys:
            if self.owner.get(k) not in loads:  # unowned, or owned by a worker that is gone
                self.owner[k] = chosen
        self._trim()
        return chosen

    def _trim(self) -> None:
        if len(self.owner) > self.max_keys:
            for k in list(islice(self.owner, len(self.owner) - self.max_keys * 3 // 4)):
                del self.owner[k]
