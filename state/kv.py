"""A RocksDB store (rocksdict, raw bytes) with atomic write batches that read their own writes.

Every agent keeps its state here and commits it together with the input offsets
it has consumed, in one write batch: after a crash the state and the offsets
agree, so replaying from those offsets neither loses nor repeats an effect.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

_DELETED = object()
_OFFSET = b"k"  # k<topic>\0<partition> -> next offset to consume
_OUTBOX = b"o"  # o<seq> -> an output message not yet acknowledged by the broker


def encode_time(ts: float) -> bytes:
    """8 bytes that sort like the (non-negative) timestamp, for time-ordered index keys."""
    return struct.pack(">d", max(ts, 0.0))


def decode_time(raw: bytes) -> float:
    return struct.unpack(">d", raw[:8])[0]


class Store:
    """One RocksDB directory. Use ``transaction()`` for every change."""

    def __init__(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path), Options(raw_mode=True))
        self._outbox_seq = self._last_outbox_seq()

    def close(self) -> None:
        self.db.close()

    def get(self, key: bytes) -> bytes | None:
        return self.db.get(key)

    def scan(self, prefix: bytes, below: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Committed (key, value) pairs under ``prefix`` in key order, stopping before ``prefix + below``."""
        stop = prefix + below if below is not None else None
        for key, value in self.db.items(from_key=prefix):
            if not key.startswith(prefix) or (stop is not None and key >= stop):
                return
            yield key, value

    def transaction(self) -> Transaction:
        return Transaction(self)

    # Offsets -----------------------------------------------------------------------------------
    def offsets(self) -> dict[tuple[str, int], int]:
        result = {}
        for key, value in self.scan(_OFFSET):
            topic, partition = key[1:].rsplit(b"\0", 1)
            result[(topic.decode(), int(partition))] = int(value)
        return result

    # Outbox --------------------------------------------------------------------------------------
    def outbox(self) -> list[tuple[bytes, tuple[str, bytes | None, bytes]]]:
        """Output messages committed but not yet confirmed sent, oldest first."""
        return [(key, _unpack_message(value)) for key, value in self.scan(_OUTBOX)]

    def sent(self, outbox_keys: list[bytes]) -> None:
        batch = WriteBatch(raw_mode=True)
        for key in outbox_keys:
            batch.delete(key)
        self.db.write(batch)

    def _last_outbox_seq(self) -> int:
        last = 0
        for key, _ in self.scan(_OUTBOX):
            last = int.from_bytes(key[1:], "big")
        return last

    def _next_outbox_key(self) -> bytes:
        self._outbox_seq += 1
        return _OUTBOX + self._outbox_seq.to_bytes(8, "big")


def _pack_message(topic: str, key: bytes | None, value: bytes) -> bytes:
    t = topic.encode()
    k = b"" if key is None else key
    return struct.pack(">HIB", len(t), len(k), key is None) + t + k + value


def _unpack_message(raw: bytes) -> tuple[str, bytes | None, bytes]:
    topic_len, key_len, no_key = struct.unpack(">HIB", raw[:7])
    topic = raw[7 : 7 + topic_len].decode()
    key = None if no_key else raw[7 + topic_len : 7 + topic_len + key_len]
    return topic, key, raw[7 + topic_len + key_len :]


class Transaction:
    """Buffered changes that ``commit`` applies atomically; ``get`` sees the buffered ones first."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batch = WriteBatch(raw_mode=True)
        self.pending: dict[bytes, bytes | object] = {}
        self.messages: list[tuple[bytes, tuple[str, bytes | None, bytes]]] = []

    def get(self, key: bytes) -> bytes | None:
        value = self.pending.get(key)
        if value is None:
            return self.store.get(key)
        return None if value is _DELETED else value  # type: ignore[return-value]

    def put(self, key: bytes, value: bytes) -> None:
        self.pending[key] = value
        self.batch.put(key, value)

    def delete(self, key: bytes) -> None:
        self.pending[key] = _DELETED
        self.batch.delete(key)

    def set_offset(self, topic: str, partition: int, next_offset: int) -> None:
        self.put(_OFFSET + topic.encode() + b"\0" + str(partition).encode(), str(next_offset).encode())

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue an output message; it is written with the state, then sent (see ``Store.outbox``)."""
        outbox_key = self.store._next_outbox_key()
        message = (topic, key, value)
        self.batch.put(outbox_key, _pack_message(*message))
        self.messages.append((outbox_key, message))

    def commit(self) -> list[tuple[bytes, tuple[str, bytes | None, bytes]]]:
        """Apply every change at once; returns the output messages to send now."""
        if self.pending or self.messages:
            self.store.db.write(self.batch)
        return self.messages
