"""Row ids as they are written to output, and a compact set to find duplicates among them.

Owns: `written_id` (the id string a row's record carries: its id field as text,
its OpenAI custom_id, or `line-N`) and `IdSet`. `run` and `validate` both use
them, so `{"id": 77}` and `{"id": "77"}`, or a row without an id on line 95 and
a row whose id is "line-95", are one id. Does not own: validating ids (job/render.py).
"""

from __future__ import annotations

import hashlib
from array import array

from mlxbatch.job.render import raw_id
from mlxbatch.job.source import Row


def written_id(row: Row, id_field: str) -> str | None:
    """The id text this row's record will carry, or None when the row has no usable id."""
    rid = raw_id(row, id_field)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        return None
    return str(rid)


class IdSet:
    """A set of id strings stored as 64-bit hashes in one flat array (16 bytes per id, not ~100).

    Open addressing with linear probing; a false "duplicate" needs a 64-bit
    blake2b collision (~1e-8 at 1e6 ids).
    """

    def __init__(self):
        self._slots = array("Q", bytes(8 * 1024))
        self._num = 0

    def __len__(self) -> int:
        return self._num

    def add(self, text: str) -> bool:
        """Add `text`; False when it was already there."""
        h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") or 1
        if self._insert(self._slots, h):
            self._num += 1
            if 2 * self._num > len(self._slots):
                self._grow()
            return True
        return False

    @staticmethod
    def _insert(slots: array, h: int) -> bool:
        mask = len(slots) - 1
        i = h & mask
        while slots[i]:
            if slots[i] == h:
                return False
            i = (i + 1) & mask
        slots[i] = h
        return True

    def _grow(self) -> None:
        old, self._slots = self._slots, array("Q", bytes(16 * len(self._slots)))
        for h in old:
            if h:
                self._insert(self._slots, h)
