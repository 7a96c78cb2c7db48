"""Impressions + clicks -> bags, exactly the contract's join semantics, on a RocksDB store.

Event time throughout: a click labels an impression when the window says so
(``contract.window.JoinWindow``: up to 60 s before it and the click window after),
whatever order the two arrive in. A positive bag goes out as soon as the pair
meets; a negative one when the watermark (see ``stream.watermark``) passes the
impression's window. Each impression yields one bag: repeated impressions and
clicks are recognised by impression_id for the window's horizon of event time.

The time-ordered indexes take an event's ``ts`` no later than ``FUTURE_GRACE_S``
after the clock's now: a ts in year 3000, or 1e300, would otherwise keep its keys in
RocksDB for ever, since no watermark ever passes it. The bag keeps the original ts.

Keys (one byte prefix, time-ordered indexes for the sweeps)::

    i<id>             pending impression: its ts (8 bytes) + its JSON
    t<close><id>      index: when that impression's window closes
    c<id>             clicks seen before their impression: packed ts
    u<expiry><id>     index: when those clicks are dropped as orphans
    d<id>             done: the label given (b"0"/b"1") + ts
    e<expiry><id>     index: when the done mark is forgotten
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from contract.events import FUTURE_GRACE_S, Click, Impression
from contract.window import JoinWindow
from state.kv import Transaction, decode_time, encode_time


@dataclass
class JoinCounts:
    bags_positive: int = 0
    bags_negative: int = 0
    duplicate_impressions: int = 0
    duplicate_clicks: int = 0
    orphan_clicks: int = 0
    pending: int = 0  # impressions waiting for their window to close


def bag_json(impression_json: bytes, click_ts: float | None) -> bytes:
    """The Bag: the (validated, re-serialised) impression's fields plus the label and click_ts."""
    label = f',"clicked":true,"click_ts":{click_ts!r}}}' if click_ts is not None else ',"clicked":false}'
    return impression_json[:-1] + label.encode()


class Join:
    """The join's decisions; the caller owns the transaction and sends what it queues."""

    def __init__(self, window: JoinWindow, bags_topic: str, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.bags_topic = bags_topic
        self.clock = clock
        self.counts = JoinCounts()

    def _indexed(self, ts: float) -> float:
        """``ts`` as the expiry indexes take it: never further ahead of now than a clock's plausible error."""
        return min(ts, self.clock() + FUTURE_GRACE_S)

    def _finish(self, tx: Transaction, impression_id: bytes, ts: float, bag: bytes, clicked: bool) -> None:
        tx.send(self.bags_topic, impression_id, bag)
        tx.put(b"d" + impression_id, (b"1" if clicked else b"0") + encode_time(ts))
        tx.put(b"e" + encode_time(self._indexed(ts) + self.window.horizon_s) + impression_id, b"")
        if clicked:
            self.counts.bags_positive += 1
        else:
            self.counts.bags_negative += 1

    def impression(self, tx: Transaction, impression: Impression) -> None:
        key = impression.impression_id.encode()
        if tx.get(b"d" + key) is not None or tx.get(b"i" + key) is not None:
            self.counts.duplicate_impressions += 1
            return
        body = impression.model_dump_json(exclude_none=True).encode()
        early = tx.get(b"c" + key)
        if early is not None:
            clicks = [t for t in _unpack_times(early) if self.window.attributes(t, impression.ts)]
            if clicks:
                tx.delete(b"c" + key)
                self._finish(tx, key, impression.ts, bag_json(body, min(clicks)), clicked=True)
                return
        close = self._indexed(impression.ts) + self.window.after_s
        tx.put(b"i" + key, encode_time(impression.ts) + body)
        self.counts.pending += 1
        tx.put(b"t" + encode_time(close) + key, b"")

    def click(self, tx: Transaction, click: Click) -> None:
        key = click.impression_id.encode()
        if tx.get(b"d" + key) is not None:
            self.counts.duplicate_clicks += 1
            return
        pending = tx.get(b"i" + key)
        if pending is not None:
            impression_ts = decode_time(pending)
            if self.window.attributes(click.ts, impression_ts):
                tx.delete(b"i" + key)  # its t-index entry is skipped by the sweep
                self.counts.pending -= 1
                self._finish(tx, key, impression_ts, bag_json(pending[8:], click.ts), clicked=True)
            else:
                self.counts.duplicate_clicks += 1  # outside the window: it labels nothing
            return
        early = tx.get(b"c" + key)
        times = _unpack_times(early) if early is not None else []
        if click.ts in times or len(times) >= 16:
            self.counts.duplicate_clicks += 1
            return
        tx.put(b"c" + key, _pack_times([*times, click.ts]))
        if not times:  # kept for the window, and at least as long as an impression it can label may come
            kept_s = max(self.window.after_s, self.window.before_s)
            tx.put(b"u" + encode_time(self._indexed(click.ts) + kept_s) + key, b"")

    def sweep(self, tx: Transaction, watermark: float) -> None:
        """Close windows, drop orphan clicks and forget done marks that the watermark has passed."""
        limit = encode_time(watermark)
        for index, _ in tx.store.scan(b"t", limit):
            key = index[9:]
            tx.delete(index)
            pending = tx.get(b"i" + key)
            if pending is not None:
                tx.delete(b"i" + key)
                self.counts.pending -= 1
                self._finish(tx, key, decode_time(pending), bag_json(pending[8:], None), clicked=False)
        for index, _ in tx.store.scan(b"u", limit):
            key = index[9:]
            tx.delete(index)
            if tx.get(b"c" + key) is not None:
                tx.delete(b"c" + key)
                self.counts.orphan_clicks += 1
        for index, _ in tx.store.scan(b"e", limit):
            tx.delete(index)
            tx.delete(b"d" + index[9:])


def _pack_times(times: list[float]) -> bytes:
    return struct.pack(f">{len(times)}d", *times)


def _unpack_times(raw: bytes) -> list[float]:
    return list(struct.unpack(f">{len(raw) // 8}d", raw))
