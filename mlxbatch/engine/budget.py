"""The KV budget: what counts against `max_kv_gb`, and whether a unit of rows may join.

Owns: the budget's accounting. It covers what the KV really holds: the running batch's buffers
(every row as wide as the widest, rounded up to the capacity step, dead rows' columns until a
trim), the shared prefixes its rows read (and their side-by-side copy), and the unit being
prefilled. A unit joins only while that projected peak fits. The prefix LRU is a separate budget
(`prefix_cache_gb`): an entry counts here only while rows read it. The KV peak stays within
budget * (1 + KV_BUDGET_SLACK). One row always runs, even one that alone exceeds the budget.
Does not own: which requests form a unit (scheduler.py), the buffers (kvcache.py), the rows (core.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxbatch.engine.kvcache import capacity

# Why a slack: under a tight budget a merge or trim copies the cache one layer at a time, so one
# layer's copy sits on top (1/16 of it or less for models of 16+ layers).
KV_BUDGET_SLACK = 1 / 16
TRIM_SHARE = 16  # columns held by dead rows past the widest live row are trimmed from 1/this of its width
MIN_TRIM = 16  # ... or from this many columns (a trim copies the cache: not every step)
_OOM_SHRINK = 0.5  # after running out of memory the budget is (at most) what was held, times this


def held_columns(columns: int, *, fine: bool) -> int:
    """Columns a row that may grow to `columns` holds at most: the capacity step, and the dead
    columns a trim leaves (TRIM_SHARE) beside it. The budget's unit of account."""
    return capacity(columns + max(MIN_TRIM, columns // TRIM_SHARE), fine=fine)


@dataclass(frozen=True)
class UnitShape:
    """What a candidate unit will hold: its rows, its own columns (a prefix stored once excluded),
    each row's final span, and a shared prefix it would add to the batch (0: none, or held already)."""

    rows: int
    width: int
    ends: tuple
    new_prefix_bytes: int = 0


class KVBudget:
    """The KV budget of one engine (bytes), and the projection admission checks against it."""

    def __init__(self, max_bytes: int, *, bytes_per_token: int, state_bytes: int, fine: bool,
                 rows_held=lambda n: n):
        self.max_bytes = max_bytes
        self.rows_held = rows_held  # the rows a batch of n live rows holds (padded to its shape bucket)
        self.bytes_per_token = bytes_per_token
        self.state_bytes = state_bytes  # a row's state layers, whatever its length
        self.fine = fine  # the cache's capacity steps (kvcache.capacity)

    def fits(self, unit: UnitShape, live_spans: list, prefix_bytes: int, num_groups: int) -> bool:
        return self.projected_peak(unit, live_spans, prefix_bytes, num_groups) <= self.max_bytes

    def projected_peak(self, unit: UnitShape, live_spans: list, prefix_bytes: int, num_groups: int) -> int:
        """The most bytes the KV holds from now on if this unit starts (and no other): while it is
        prefilled, the running batch's live rows (`live_spans`: the columns each may reach) as wide as
        the widest may grow, beside the unit's cache; after it joins, every live row and the unit's as
        wide as the widest of them. Shared prefixes (`prefix_bytes`, held by `num_groups` groups) count
        once, plus the side-by-side copy several groups make."""
        bpt, state = self.bytes_per_token, self.state_bytes
        groups = num_groups + (1 if unit.new_prefix_bytes else 0)
        shared = (prefix_bytes + unit.new_prefix_bytes) * (2 if groups > 1 else 1)
        prefill = unit.rows * (bpt * capacity(unit.width, fine=self.fine) + state)
        batch = self.rows_held(len(live_spans)) * (bpt * held_columns(max(live_spans), fine=self.fine) + state) if live_spans else 0
        widest = max([*live_spans, *unit.ends])
        after = self.rows_held(len(live_spans) + unit.rows) * (bpt * held_columns(widest, fine=self.fine) + state)
        return shared + max(batch + prefill, after)

    def is_tight(self, held: int) -> bool:
        """Whether a whole copy beside `held` bytes would break the budget: then merges and trims copy
        layer by layer (a sync each), else in one go (no sync: decode stays pipelined)."""
        return 2 * held > self.max_bytes

    def shrink(self, held: int, longest_row: int) -> None:
        """After running out of memory: at most what was held, halved, but room for one row."""
        floor = self.bytes_per_token * min(longest_row, 1024) + self.state_bytes
        self.max_bytes = max(floor, int(min(self.max_bytes, max(held, floor)) * _OOM_SHRINK))
