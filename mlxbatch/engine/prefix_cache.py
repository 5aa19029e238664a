"""A byte-capped LRU of computed prompt prefixes, keyed by their token bytes.

Owns: which prefixes stay computed between units. A hit hands out the same
`SharedPrefix` object (never a copy), so every group using it reads one copy.
Does not own: computing a prefix (core.py) or how rows attend to it.
"""

from __future__ import annotations

from collections import OrderedDict

from mlxbatch.engine.kvcache import SharedPrefix
from mlxbatch.engine.scheduler import common_prefix


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, SharedPrefix] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def longest(self, key: bytes) -> SharedPrefix | None:
        """The longest cached prefix of `key` (token bytes), marked as recently used."""
        best = None
        for k, prefix in self._items.items():
            if len(k) <= len(key) and key.startswith(k) and (best is None or len(k) > len(best.key)):
                best = prefix
        if best is not None:
            self._items.move_to_end(best.key)
        return best

    def shared_head(self, key: bytes) -> tuple[SharedPrefix | None, int]:
        """The cached prefix whose first tokens agree longest with `key`, and for how many tokens
        (another prompt after the same system prompt: its head's KV is this one's too)."""
        best, n = None, 0
        for k, prefix in self._items.items():
            m = common_prefix(k, key)
            if m > n:
                best, n = prefix, m
        if best is not None:
            self._items.move_to_end(best.key)
        return best, n
    def clear(self) -> None:
        """Forget every prefix (after running out of memory; rows using one keep their reference)."""
        self._items.clear()
        self.nbytes = 0

    def put(self, prefix: SharedPrefix) -> None:
        size = prefix.nbytes
        if size > self.max_bytes or prefix.key in self._items:
            return
        self._items[prefix.key] = prefix
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evictions += 1
