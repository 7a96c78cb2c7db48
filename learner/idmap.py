"""A collision-free map from 64-bit keys to dense rows, in numpy: the count tables' index.

Why: hashing ids straight into a fixed table mixes the counts of every ids that share a cell, and at
thousands of ads with ~15 elements each a table sized for memory holds a good share of its elements in
shared cells. Like Monolith's collisionless tables, each key here gets a row of its own, in order of
first sight, and the tables that hang off the rows grow with them. Keys are 64-bit hashes of ids
(``features.id_key``), whose chance of one collision among a million ids is ~3e-8.

Open addressing with linear probing over a power-of-two slot array kept at most half full; lookups and
inserts are whole-array numpy passes, one per probe step (a batch's keys settle in two or three).
"""

from __future__ import annotations

import numpy as np

from learner.ops import mix64

_EMPTY = 0  # key 0 is stored as _ZERO_KEY, so an empty slot is never a key
_ZERO_KEY = np.int64(0x5BD1E995)


class KeyIndex:
    """Rows 0, 1, 2... for int64 keys in order of first sight; ``keys`` lists them by row."""

    def __init__(self, keys: np.ndarray | None = None) -> None:
        self.keys = np.zeros(0, dtype=np.int64)
        self._slots = np.zeros(1 << 10, dtype=np.int64)
        self._rows = np.full(1 << 10, -1, dtype=np.int64)
        if keys is not None and len(keys):
            self.add(np.asarray(keys, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.keys)

    def _home(self, keys: np.ndarray) -> np.ndarray:
        shift = 64 - (len(self._slots).bit_length() - 1)
        return (mix64(keys) >> shift) & (len(self._slots) - 1)  # the top bits, made non-negative by the mask

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Each key's row, -1 for keys never added."""
        keys = np.where(keys == _EMPTY, _ZERO_KEY, keys)
        position = self._home(keys)
        # the first probe on whole arrays: at most half full, most keys settle here, and the rest go round
        # the loop with their indices
        slot = self._slots.take(position)
        hit = slot == keys
        rows = np.where(hit, self._rows.take(position), -1)
        pending = np.flatnonzero(~hit & (slot != _EMPTY))
        mask = len(self._slots) - 1
        position[pending] = (position[pending] + 1) & mask
        while len(pending):
            slot = self._slots[position[pending]]
            hit = slot == keys[pending]
            rows[pending[hit]] = self._rows[position[pending[hit]]]
            pending = pending[~hit & (slot != _EMPTY)]
            position[pending] = (position[pending] + 1) & mask
        return rows

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Each key's row, giving unseen keys the next rows in order of first appearance."""
        rows = self.find(keys)
        unseen = rows < 0
        if unseen.any():
            new, first = np.unique(keys[unseen], return_index=True)
            new = new[np.argsort(first)]  # first sight decides the row, so rows do not depend on key values
            start = len(self.keys)
            self.keys = np.concatenate([self.keys, new])
            if 2 * len(self.keys) > len(self._slots):
                self._rehash()
            else:
                self._insert(new, np.arange(start, start + len(new)))
            rows[unseen] = self.find(keys[unseen])
        return rows

    def _rehash(self) -> None:
        size = len(self._slots)
        while 2 * len(self.keys) > size:
            size *= 2
        self._slots = np.zeros(size, dtype=np.int64)
        self._rows = np.full(size, -1, dtype=np.int64)
        self._insert(self.keys, np.arange(len(self.keys)))

    def _insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Place distinct new keys: at each probe step, of the keys whose slot is empty one per slot wins."""
        keys = np.where(keys == _EMPTY, _ZERO_KEY, keys)
        position = self._home(keys)
        pending = np.arange(len(keys))
        mask = len(self._slots) - 1
        while len(pending):
            free = self._slots[position[pending]] == _EMPTY
            candidates = pending[free]
            _, winner = np.unique(position[candidates], return_index=True)
            placed = candidates[winner]
            self._slots[position[placed]] = keys[placed]
            self._rows[position[placed]] = rows[placed]
            waiting = np.ones(len(keys), dtype=bool)
            waiting[placed] = False
            pending = pending[waiting[pending]]
            stuck = pending[self._slots[position[pending]] != _EMPTY]
            position[stuck] = (position[stuck] + 1) & mask
