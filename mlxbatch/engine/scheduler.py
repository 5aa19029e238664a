"""Which waiting requests are prefilled together, and with what shared prefix.

Owns: the look-ahead window of waiting requests, kept sorted by token ids so
rows sharing a prefix sit next to each other (a sorted array does the work of a
radix tree here: the rows with the longest common prefix with any row are its
neighbours). A unit is formed around the oldest waiting row (no starvation):
its prefix-sharing neighbours, then the closest in length (less padding), under
a row and a prefill-token cap. Priority (types.Priority): each class waits in its own window and
the most urgent non-empty class forms the next unit; a yielding class (batch rows) takes only slots
beyond a reserve kept for urgent requests, a reserve's worth at a time, so its rows never have to be
cancelled and redone when an urgent request arrives. Does not own: running the model (engine/core.py).
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass

DEFAULT_MIN_SHARE = 0.5  # a neighbour joins while its shared prefix >= half the best one


def token_key(tokens: list[int]) -> bytes:
    # Big-endian bytes sort like the token sequence and compare at C speed.
    a = array("I", tokens)
    a.byteswap()
    return a.tobytes()


_ADAPTER_TAG = 0xFFFF0000  # above any vocabulary: a tagged key never shares a prefix with a token


def request_key(tokens: list[int], adapter: int = 0) -> bytes:
    """A request's sort and prefix-cache key: its tokens, after one tag token for adapters other than
    the first. Why: a prefix's KV depends on the adapter, so rows share one only with their own."""
    return token_key([_ADAPTER_TAG + adapter, *tokens] if adapter else tokens)


def common_prefix(a: bytes, b: bytes) -> int:
    """Length in tokens of the common prefix of two token keys (binary search on slices)."""
    lo, hi = 0, min(len(a), len(b)) // 4
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[: mid * 4] == b[: mid * 4]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Unit:
    """Requests prefilled together; `prefix_len` leading tokens are identical in all."""

    requests: list
    prefix_len: int


class Scheduler:
    """Waiting requests by priority class (types.Priority: lower is more urgent)."""

    def __init__(self, *, reserve: int = 0):
        self.reserve = reserve  # slots a yielding class leaves free for urgent requests
        self._queues: dict[int, _Queue] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __bool__(self) -> bool:
        return any(self._queues.values())

    def count(self, priority: int) -> int:
        q = self._queues.get(priority)
        return len(q) if q is not None else 0

    def add(self, request) -> None:
        p = int(getattr(request, "priority", 0))
        if p not in self._queues:
            self._queues = dict(sorted({**self._queues, p: _Queue()}.items()))
        self._queues[p].add(request)

    def remove(self, key) -> bool:
        return any(q.remove(key) for q in self._queues.values())

    def next_priority(self) -> int | None:
        return next((p for p, q in self._queues.items() if q), None)

    def next_unit(self, *, max_rows: int, max_prefill_tokens: int, fits=None) -> Unit | None:
        """The next unit of the most urgent class waiting (see _Queue.next_unit); a yielding class
        (priority > 0) gets the slots beyond the reserve, at most a reserve's worth."""
        p = self.next_priority()
        if p is None:
            return None
        if p > 0 and self.reserve:
            max_rows = min(max_rows - self.reserve, self.reserve)
        return self._queues[p].next_unit(max_rows=max_rows, max_prefill_tokens=max_prefill_tokens, fits=fits)


class _Queue:
    """One priority class's waiting requests, sorted by tokens for prefix sharing."""

    def __init__(self):
        self._waiting: dict[int, object] = {}  # seq -> request, oldest first
        self._sorted: list[tuple[bytes, int]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, request) -> None:
        self._seq += 1
        self._waiting[self._seq] = request
        bisect.insort(self._sorted, (request_key(request.tokens, request.adapter), self._seq))

    def remove(self, key) -> bool:
        """Take out the waiting request with this key (linear: cancels are rare); False if none."""
        seq = next((s for s, r in self._waiting.items() if r.key == key), None)
        if seq is None:
            return False
        request = self._waiting.pop(seq)
        # The key add() sorted it under: tagged for adapters, else another row's entry would go.
        self._sorted.pop(bisect.bisect_left(self._sorted, (request_key(request.tokens, request.adapter), seq)))
        return True

    def next_unit(self, *, max_rows: int, max_prefill_tokens: int, fits=None) -> Unit | None:
        """The next unit, or None. `fits(requests, prefix_len)`, where given, says whether a unit of
        those rows fits the KV budget: the unit is cut to the most rows that fit (it may not fit
        with fewer rows once it does not fit with more), None when not even the anchor fits."""
        if not self._waiting or max_rows <= 0:
            return None
        anchor_seq = next(iter(self._waiting))
        anchor = self._waiting[anchor_seq]
        anchor_key = request_key(anchor.tokens, anchor.adapter)
        pos = bisect.bisect_left(self._sorted, (anchor_key, anchor_seq))
        shared = self._neighbours(pos, anchor_key, limit=4 * max_rows)
        anchor_len = len(anchor_key) // 4
        # Closest lengths first (less padding), longer shared prefix breaks ties.
        shared.sort(key=lambda item: (abs(item[2] - anchor_len), -item[1]))
        chosen = shared[:max_rows]
        chosen = self._cap_tokens(chosen, max_prefill_tokens)
        if fits is not None:
            chosen = self._cap_fit(chosen, fits, anchor.adapter)
            if not chosen:
                return None
        prefix = self._prefix_of(chosen, anchor.adapter)
        requests = [self._take(idx) for idx in sorted((c[0] for c in chosen), reverse=True)]
        return Unit(requests[::-1], prefix)

    @staticmethod
    def _prefix_of(chosen: list, adapter: int) -> int:
        prefix = min(min(c[1] for c in chosen), min(c[2] for c in chosen) - 1)
        prefix -= 1 if adapter else 0  # the tag token is no prompt token (shared by all, or prefix is 0)
        return max(prefix, 0)

    def _cap_fit(self, chosen: list, fits, adapter: int) -> list:
        """The longest head of `chosen` that `fits` (a binary search: more rows hardly ever fit better)."""
        def ok(n: int) -> bool:
            head = chosen[:n]
            return fits([self._waiting[self._sorted[c[0]][1]] for c in head], self._prefix_of(head, adapter))
        lo, hi = 0, len(chosen)  # ok(lo) holds (no rows), find the largest n with ok(n)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid - 1
        return chosen[:lo]

    def _neighbours(self, pos: int, anchor_key: bytes, *, limit: int) -> list[tuple[int, int, int]]:
        """(sorted index, shared prefix with anchor, length) of rows grouped with the anchor."""
        out = [(pos, len(anchor_key) // 4, len(anchor_key) // 4)]
        lo, hi, best = pos - 1, pos + 1, 0
        while len(out) < limit:
            left = common_prefix(self._sorted[lo][0], anchor_key) if lo >= 0 else -1
            right = common_prefix(self._sorted[hi][0], anchor_key) if hi < len(self._sorted) else -1
            share, idx = (left, lo) if left >= right else (right, hi)
            if share < 0 or share < best * DEFAULT_MIN_SHARE:
                break
            best = max(best, share)
            out.append((idx, share, len(self._sorted[idx][0]) // 4))
            lo, hi = (lo - 1, hi) if idx == lo else (lo, hi + 1)
        return out

    @staticmethod
    def _cap_tokens(chosen: list, max_tokens: int) -> list:
        # The anchor (first) always stays, so a long prompt still runs alone.
        while len(chosen) > 1:
            prefix = min(min(c[1] for c in chosen), min(c[2] for c in chosen) - 1)
            width = max(c[2] for c in chosen) - prefix
            if len(chosen) * width <= max_tokens:
                break
            chosen = chosen[:-1]
        return chosen

    def _take(self, sorted_index: int):
        _, seq = self._sorted.pop(sorted_index)
        return self._waiting.pop(seq)
