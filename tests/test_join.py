"""The join's decisions on a real RocksDB store, driven by an explicit watermark (no broker); the watermark."""

from __future__ import annotations

import doctest
import json

from aiokafka import TopicPartition

import contract.window
from contract.events import Click, Impression
from contract.settings import Settings
from contract.window import JoinWindow
from state.kv import Store
from stream.join import Join
from stream.watermark import Watermark

W = 10.0
WINDOW = JoinWindow(W)


def imp(i: int, ts: float) -> Impression:
    return Impression(impression_id=f"imp-{i}", ts=ts, ad_id="ad-1", candidates={"title": ["t1", "t2"]},
                      shown={"title": "t1"})


def step(store: Store, join: Join, events: list, watermark: float) -> list[dict]:
    tx = store.transaction()
    for event in events:
        (join.impression if isinstance(event, Impression) else join.click)(tx, event)
    join.sweep(tx, watermark)
    return [json.loads(value) for _, (_, _, value) in tx.commit()]


def test_orphan_clicks_are_counted_and_dropped_once_no_impression_can_claim_them(tmp_path):
    store, join = Store(tmp_path), Join(WINDOW, "bags")
    assert step(store, join, [Click(impression_id="imp-1", ts=100.0)], watermark=100.0) == []
    assert step(store, join, [], watermark=100.0 + 60 - 1) == [] and join.counts.orphan_clicks == 0
    step(store, join, [], watermark=100.0 + 60 + 1)
    assert join.counts.orphan_clicks == 1
    assert step(store, join, [imp(1, 150.0)], watermark=161.0) == []  # the click is gone: no label from it
    assert [b["clicked"] for b in step(store, join, [], watermark=150.0 + W + 1)] == [False]


def test_done_marks_expire_after_the_horizon_and_state_is_left_empty(tmp_path):
    store, join = Store(tmp_path), Join(WINDOW, "bags")
    bags = step(store, join, [imp(1, 100.0), Click(impression_id="imp-1", ts=101.0), imp(2, 100.0)], 100.0)
    assert [(b["impression_id"], b["clicked"], b.get("click_ts")) for b in bags] == [("imp-1", True, 101.0)]
    assert step(store, join, [imp(1, 100.0)], 100.0) == []  # repeated: ignored
    assert [b["impression_id"] for b in step(store, join, [], 100.0 + W + 0.5)] == ["imp-2"]
    step(store, join, [], 100.0 + WINDOW.horizon_s + 1)
    keys = {k[:1] for k, _ in store.scan(b"")} - {b"o"}  # the outbox is the caller's to clear
    assert keys == set(), keys


def test_an_event_stamped_in_the_future_cannot_run_the_watermark_ahead_of_the_clock():
    watermark, tp, now = Watermark(settle_s=0.0), TopicPartition("impressions", 0), 1_000.0
    watermark.observe(tp, now - 5, wall=now)
    watermark.observe(tp, 1e12, wall=now)  # a producer's clock off by centuries
    assert watermark.advance([], confirmed=now + 1) == now + 1, "event time follows the clock, not the bad ts"
    assert watermark.advance([tp], confirmed=now + 2) == now + 1, "a lagging partition holds it at its newest event"


def test_the_watermark_does_not_credit_a_stretch_in_which_the_broker_did_not_answer():
    watermark, tp, now = Watermark(settle_s=0.0), TopicPartition("clicks", 0), 1_000.0
    watermark.observe(tp, now, wall=now)
    assert watermark.advance([], confirmed=now + 0.5) == now + 0.5
    assert watermark.advance([], confirmed=now + 15.5) == now + 0.5, "15 s of silence: clicks may be held up"
    assert watermark.advance([], confirmed=now + 16.0) == now + 1.0, "from the broker's return on, time counts"


def test_fresh_impressions_after_an_outage_wait_for_the_clicks_another_producer_still_holds():
    """The CI failure this guards: the broker froze for 15 s; the impressions producer was first back, and
    its fresh timestamps closed windows whose clicks (stamped before the freeze) were still on their way."""
    watermark, impressions, now = Watermark(settle_s=2.5), TopicPartition("impressions", 0), 1_000.0
    watermark.observe(impressions, now, wall=now)
    for t in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
        before_freeze = watermark.advance([], confirmed=now + t)
    assert before_freeze == now + 0.5, "an advance counts once the broker has answered for 2.5 s since"
    back = now + 18.0  # frozen 15 s
    watermark.observe(impressions, back, wall=back)  # fresh impressions, no clicks yet
    for t in (0.0, 0.5, 1.0, 1.5, 2.0):
        assert watermark.advance([], confirmed=back + t) < now + 3.5, "held at what had settled before the jump"
    assert watermark.advance([], confirmed=back + 2.5) >= back, "2.5 s of answers later the jump counts"


def test_the_window_is_one_value_built_from_the_settings():
    assert doctest.testmod(contract.window).failed == 0
    window = Settings(click_window_s=7200.0).join_window
    assert (window.after_s, window.before_s, window.horizon_s) == (7200.0, 60.0, 14400.0), "two windows past an hour"
    assert window.attributes(click_ts=1000.0 + 7200.0, impression_ts=1000.0)
    assert not window.attributes(click_ts=1000.0 + 7200.5, impression_ts=1000.0)
