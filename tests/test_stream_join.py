"""The joiner on a real broker: exactly one bag per impression, with the contract's label."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest

from contract.settings import Settings
from contract.window import JoinWindow
from state.kv import Store
from stream.joiner import Joiner
from stream.kafka import Connection
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration

WINDOW = 2.0


def impression(i: int, ts: float, **extra) -> dict:
    return {"impression_id": f"imp-{i}", "ts": ts, "ad_id": "ad-1",
            "candidates": {"title": ["t1", "t2"], "image": ["i1", "i2", "i3"]},
            "shown": {"title": "t2", "image": "i1"}, **extra}


def click(i: int, ts: float) -> dict:
    return {"impression_id": f"imp-{i}", "ts": ts}


def at_least(n: int):
    return lambda bags: len(bags) >= n


def committed(store: Store, topic: str) -> int:
    """Messages of ``topic`` the joiner has committed as applied (the offsets stored with its state)."""
    return sum(offset for (name, _), offset in store.offsets().items() if name == topic)


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        await asyncio.sleep(0.05)


async def run_joiner(url: str, topics, store_dir, until, produce_messages, settle_s: float = 3.0,
                     prepare: Callable[[Joiner], None] = lambda joiner: None):
    """Run a joiner (``prepare``d first), produce, and return it with the bags on the topic once ``until(bags)``
    holds (+ settle_s)."""
    connection = Connection.from_settings(Settings(), url)
    stop = asyncio.Event()
    joiner = Joiner(connection, topics, JoinWindow(WINDOW), Store(store_dir))
    prepare(joiner)
    task = asyncio.create_task(joiner.run(stop))
    try:
        await asyncio.wait_for(joiner.ready.wait(), 60)
        await produce_messages(joiner)
        bags = await read_all(url, topics.bags, until, timeout_s=40, settle_s=settle_s)
    finally:
        stop.set()
        await task
        joiner.store.close()
    left = [t.get_coro().__qualname__ for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not left, f"the stopped joiner left tasks running: {left}"
    return joiner, bags


def test_join_labels_every_impression_once_whatever_the_order_and_partitioning(broker, topics, tmp_path):
    # Impressions on 4 partitions, clicks on 1: the join must not rely on co-partitioning.
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics([topics.impressions], partitions=4)
    connection.ensure_topics([topics.clicks, topics.bags, topics.dead_letters], partitions=1)
    now = time.time()
    expected = {
        "imp-0": True,   # click after the impression, inside the window
        "imp-1": True,   # click read before its impression
        "imp-2": False,  # click after the window closed
        "imp-3": False,  # no click
        "imp-4": True,   # impression repeated, click repeated
        "imp-5": True,   # click 30 s *before* the impression's ts (clock skew allowance is 60 s)
        "imp-6": False,  # click 90 s before: outside the skew allowance
    }

    async def messages(_) -> None:
        await produce(broker, [(topics.clicks, "imp-1", click(1, now + 0.5)),
                               (topics.clicks, "imp-5", click(5, now - 30)),
                               (topics.clicks, "imp-6", click(6, now - 90)),
                               (topics.clicks, "imp-99", click(99, now))])  # orphan: never an impression
        await produce(broker, [(topics.impressions, f"imp-{i}", impression(i, now)) for i in range(7)]
                      + [(topics.impressions, "imp-4", impression(4, now)),
                         (topics.impressions, "imp-bad", impression(7, now, shown={"title": "t9"}))])
        await produce(broker, [(topics.clicks, "imp-0", click(0, now + 1.0)),
                               (topics.clicks, "imp-4", click(4, now + 0.2)),
                               (topics.clicks, "imp-4", click(4, now + 0.3)),
                               (topics.clicks, "imp-2", click(2, now + WINDOW + 1.0))])

    joiner, bags = asyncio.run(run_joiner(broker, topics, tmp_path / "joiner", at_least(len(expected)), messages))
    labels = {b["impression_id"]: b["clicked"] for b in bags}
    assert len(bags) == len(expected), [b["impression_id"] for b in bags]
    assert labels == expected
    clicked = next(b for b in bags if b["impression_id"] == "imp-0")
    assert clicked["click_ts"] == now + 1.0 and clicked["shown"] == {"title": "t2", "image": "i1"}
    assert joiner.join.counts.duplicate_impressions == 1
    dead = asyncio.run(read_all(broker, topics.dead_letters, lambda m: len(m) >= 1, timeout_s=10))
    assert len(dead) == 1
    assert dead[0]["topic"] == topics.impressions
    assert "shown.title 't9' is not among candidates.title" in dead[0]["error"]
    assert json.loads(dead[0]["raw"])["impression_id"] == "imp-7"


def test_negative_bags_wait_for_the_window_and_positive_ones_do_not(broker, topics, tmp_path):
    Connection.from_settings(Settings(), broker).ensure_topics(topics.all())
    sent: dict[str, float] = {}
    decided: dict[str, tuple[float, float]] = {}  # impression -> (the joiner's watermark, the clock) at its bag

    def record_decisions(joiner: Joiner) -> None:
        finish = joiner.join._finish

        def recording(tx, impression_id: bytes, *args, **kwargs) -> None:
            decided[impression_id.decode()] = (joiner.watermark.value, time.time())
            finish(tx, impression_id, *args, **kwargs)

        joiner.join._finish = recording

    async def messages(_) -> None:
        now = sent["ts"] = time.time()  # stamped as they are sent: event time tracks the clock
        await produce(broker, [(topics.impressions, "imp-0", impression(0, now)),
                               (topics.impressions, "imp-1", impression(1, now)),
                               (topics.clicks, "imp-0", click(0, now + 0.1))])

    _, bags = asyncio.run(run_joiner(broker, topics, tmp_path / "j", at_least(2), messages, settle_s=0.0,
                                     prepare=record_decisions))
    assert {b["impression_id"]: b["clicked"] for b in bags} == {"imp-0": True, "imp-1": False}
    closes = sent["ts"] + WINDOW  # when both impressions' window closes, in event time
    assert decided["imp-0"][0] < closes, "a clicked bag goes out as soon as the click joins, not with the window"
    assert decided["imp-1"][0] >= closes, "a negative waits for event time to pass its window"
    # The contract's latency bound, on the joiner's clock: the one wall-clock bound left, since it is the point.
    assert decided["imp-1"][1] - sent["ts"] <= WINDOW + 5, "a negative goes out within window + 5 s of its impression"


def test_a_restarted_joiner_loses_nothing_and_repeats_no_label(broker, topics, tmp_path):
    Connection.from_settings(Settings(), broker).ensure_topics(topics.all())
    now = time.time()

    async def first(joiner: Joiner) -> None:  # stopped once it has committed all 50, before their window closes
        await produce(broker, [(topics.impressions, f"imp-{i}", impression(i, now)) for i in range(50)])
        await wait_for(lambda: committed(joiner.store, topics.impressions) >= 50,
                       "the first joiner commits the 50 impressions")

    before, _ = asyncio.run(run_joiner(broker, topics, tmp_path / "j", at_least(0), first, settle_s=0.0))
    assert before.join.counts.pending == 50, "the first joiner held every impression when it stopped"
    store = Store(tmp_path / "j")
    try:
        assert committed(store, topics.impressions) == 50, "what it held is on disk with the offsets it came from"
        assert sum(1 for _ in store.scan(b"i")) == 50
    finally:
        store.close()

    async def second(_) -> None:  # clicks for half of them arrive while the joiner was down
        await produce(broker, [(topics.clicks, f"imp-{i}", click(i, now + 0.5)) for i in range(0, 50, 2)]
                      + [(topics.impressions, "imp-0", impression(0, now))])

    after, bags = asyncio.run(run_joiner(broker, topics, tmp_path / "j", at_least(50), second))
    assert after.join.counts.duplicate_impressions == 1, "resumed after what it had read: only imp-0 came again"
    labels: dict[str, set[bool]] = {}
    for bag in bags:
        labels.setdefault(bag["impression_id"], set()).add(bag["clicked"])
    assert len(labels) == 50
    assert all(values == {int(i.split("-")[1]) % 2 == 0} for i, values in labels.items())
