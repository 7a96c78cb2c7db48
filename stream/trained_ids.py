"""The learner's record of the impressions it has trained on: no impression is trained twice.

Bags repeat: a joiner replays its outbox after a crash, and one taking over on a fresh host joins the
input topics again from their beginning. So the learner marks each impression it trains and skips a
bag whose mark exists. The marks are written to its RocksDB store only together with a checkpoint
(with the offsets they belong to), and travel in the checkpoints on Kafka, so that a learner taking
over on another host skips what its predecessor trained.

A bag older than the horizon before the newest one trained is *stale*: a replay (a joiner taking
over on a fresh host joins the whole retained input again) whose mark may be gone, so it is never
trained. Marks live two horizons, so every bag that is not stale finds its mark if it was trained.

A mark is the impression id's 8-byte BLAKE2b hash (fixed size, so marks pack into tensors; a collision
among the million marks of an hour at 300 bags/s has a chance of ~3e-8). Each lives until its bag's ts
(no further ahead than ``FUTURE_GRACE_S``) plus the horizon, and is swept once the newest bag recorded
is a horizon past that: one bag stamped 1e300 cannot expire the rest. In memory, the marks recorded
are grouped by the minute they expire, one tensor per minute in a checkpoint: a minute that is over
never changes again, so checkpoint deltas carry only the newest minutes.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from contract.events import FUTURE_GRACE_S
from state.kv import Store, Transaction, decode_time, encode_time

_MARK, _INDEX = b"t", b"x"  # mark -> b""; index: expiry (8 bytes) + mark -> b""
_FORMAT, _HASHED = b"marks", b"blake2b-8"  # what the marks are (a store without it holds the ids themselves)
TENSORS = "trained."  # checkpoint tensors: trained.<minute of expiry> -> uint64 marks


def mark(impression_id: str) -> bytes:
    return hashlib.blake2b(impression_id.encode(), digest_size=8).digest()


class TrainedIds:
    def __init__(self, store: Store, horizon_s: float) -> None:
        self.store = store
        self.horizon_s = horizon_s
        self.unrecorded: dict[bytes, float] = {}  # trained since the last checkpoint: mark -> expiry
        self.minutes: dict[int, list[bytes]] = {}  # recorded marks by the minute they expire
        if store.get(_FORMAT) != _HASHED:
            self._hash_old_marks()
        self.newest = 0.0  # the newest bag ts trained (held to FUTURE_GRACE_S ahead of the clock)
        for index, _ in store.scan(_INDEX):
            expiry = decode_time(index[1:9])
            self.minutes.setdefault(int(expiry // 60), []).append(index[9:])
            self.newest = max(self.newest, expiry - horizon_s)

    def _hash_old_marks(self) -> None:
        """Stores written before the marks were hashes hold the ids themselves: rewrite them, once."""
        tx = self.store.transaction()
        for index, _ in self.store.scan(_INDEX):
            hashed = mark(index[9:].decode(errors="replace"))
            tx.delete(index)
            tx.delete(_MARK + index[9:])
            tx.put(_MARK + hashed, b"")
            tx.put(index[:9] + hashed, b"")
        tx.put(_FORMAT, _HASHED)
        tx.commit()

    def __contains__(self, impression_id: str) -> bool:
        key = mark(impression_id)
        return key in self.unrecorded or self.store.get(_MARK + key) is not None

    def __len__(self) -> int:
        return len(self.unrecorded) + sum(map(len, self.minutes.values()))

    def stale(self, ts: float) -> bool:
        """Whether a bag of this ts is a horizon or more older than the newest trained: never trained."""
        return ts < self.newest - self.horizon_s

    def add(self, impression_id: str, ts: float) -> None:
        ts = min(ts, time.time() + FUTURE_GRACE_S)
        self.unrecorded[mark(impression_id)] = ts + self.horizon_s
        self.newest = max(self.newest, ts)

    def record(self, tx: Transaction) -> None:
        """Write the unrecorded marks into ``tx`` (the checkpoint's transaction) and sweep the expired ones."""
        for key, expiry in self.unrecorded.items():
            self._put(tx, key, expiry)
        newest = max(self.unrecorded.values(), default=0.0) - self.horizon_s  # the newest bag's ts
        for index, _ in self.store.scan(_INDEX, encode_time(newest - self.horizon_s)):
            tx.delete(index)
            tx.delete(_MARK + index[9:])
        for minute in [m for m in self.minutes if (m + 1) * 60 < newest - self.horizon_s]:
            del self.minutes[minute]
        self.unrecorded.clear()

    def _put(self, tx: Transaction, key: bytes, expiry: float) -> None:
        tx.put(_MARK + key, b"")
        tx.put(_INDEX + encode_time(expiry) + key, b"")
        self.minutes.setdefault(int(expiry // 60), []).append(key)

    def tensors(self) -> dict[str, np.ndarray]:
        """The recorded marks as checkpoint tensors, one per minute of expiry, each in the order recorded."""
        return {f"{TENSORS}{minute}": np.frombuffer(b"".join(keys), dtype=np.uint64)
                for minute, keys in self.minutes.items()}

    def restore(self, tx: Transaction, tensors: dict[str, np.ndarray]) -> int:
        """Record the marks of a checkpoint's tensors that this store lacks (other tensors are ignored); how many
        were new."""
        restored = 0
        for name, marks in tensors.items():
            if not name.startswith(TENSORS):
                continue
            expiry = (int(name.removeprefix(TENSORS)) + 1) * 60.0  # the end of the minute: never sooner
            self.newest = max(self.newest, expiry - 60.0 - self.horizon_s)  # the minute's start: never later
            raw = np.ascontiguousarray(marks, dtype=np.uint64).tobytes()
            for key in (raw[i : i + 8] for i in range(0, len(raw), 8)):
                if self.store.get(_MARK + key) is None:
                    self._put(tx, key, expiry)
                    restored += 1
        return restored
