"""The joiner agent: impressions + clicks -> bags on the bags topic (semantics in ``stream.join``).

Each batch of input is applied to RocksDB in one write batch together with the
offsets it came from and the messages it produces (an outbox); the messages are
sent after that commit and struck off once the broker has them. A crash at any
point therefore replays at most the uncommitted batch, and the outbox re-sends
bags with the labels already decided, never different ones.

It consumes every partition of both topics itself, so the join is correct
whatever partition counts or key partitioning the producers used: other joiners
in its group stand by (``stream.one_active``).

No input stops it: an invalid message, one the join's code raises on, and a batch
the client cannot decode (``stream.fetch``) each become a dead letter, written
through the outbox with the offsets they came from.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import TopicPartition

from contract.deadletters import InvalidInput, Reason
from contract.events import Click, Impression
from contract.jsonl import parse_line
from contract.window import JoinWindow
from state.kv import Store
from stream.fetch import SafeFetch
from stream.join import Join, JoinCounts
from stream.kafka import Connection, Topics
from stream.metrics import BAGS_OUT, DUPLICATES, EVENTS_IN, ORPHAN_CLICKS, PENDING_IMPRESSIONS, WATERMARK
from stream.one_active import OneActive
from stream.runtime import FetchWatch, SeekToStoredOffsets, dead_letter, deliver
from stream.watermark import Watermark

log = logging.getLogger("genco.joiner")

# Pause between small polls: each fetch costs the embedded broker CPU that grows with the size of
# the topic, so polling flat out would take a core from the rest of the machine; bags can wait 0.1 s.
POLL_PAUSE_S = 0.1



class Joiner:
    def __init__(self, connection: Connection, topics: Topics, window: JoinWindow, store: Store) -> None:
        self.connection = connection
        self.topics = topics
        self.store = store
        self.join = Join(window, topics.bags)
        self.join.counts.pending = sum(1 for _ in store.scan(b"i"))
        self.watermark = Watermark(window.grace_s)
        self._reported = JoinCounts()
        self.ready = asyncio.Event()  # set once partitions are assigned: from then on input is joined

    def apply(self, tx, tp: TopicPartition, record) -> None:
        """Validate one input message and hand it to the join (or to the dead-letter topic)."""
        model = Impression if tp.topic == self.topics.impressions else Click
        try:
            event = parse_line(record.value or b"", model)
        except InvalidInput as error:
            tx.send(*dead_letter(self.topics.dead_letters, tp, record, error.reason, str(error)))
            return
        try:
            if model is Impression:
                self.join.impression(tx, event)
            else:
                self.join.click(tx, event)
        except Exception as error:
            log.exception("joining %s[%d]@%d failed", tp.topic, tp.partition, record.offset)
            tx.send(*dead_letter(self.topics.dead_letters, tp, record, Reason.FAILED,
                                 f"join failed: {type(error).__name__}"))
            return
        self.watermark.observe(tp, event.ts, time.time())

    async def run(self, stop: asyncio.Event) -> None:
        producer = self.connection.producer()
        await producer.start()
        consumer = self.connection.consumer(group=self.topics.group("joiner"), max_poll_records=2000,
                                            partition_assignment_strategy=(OneActive(),))
        watch = FetchWatch("joiner", log)
        try:
            leftovers = self.store.outbox()
            if leftovers:
                log.info("re-sending %d messages decided before the last stop", len(leftovers))
                await deliver(producer, self.store, leftovers, self.topics.dead_letters)
            consumer.subscribe([self.topics.impressions, self.topics.clicks],
                               listener=SeekToStoredOffsets(consumer, self.store))
            await consumer.start()
            fetch = SafeFetch(consumer, "joiner", self.topics.dead_letters)
            log.info("joining %s + %s -> %s (window %.0f s)", self.topics.impressions, self.topics.clicks,
                     self.topics.bags, self.join.window.after_s)
            while not stop.is_set():
                fetched = await fetch.getmany(timeout_ms=200, max_records=2000)
                batches = fetched.records
                watch.mark_ready(consumer, self.ready)
                tx = self.store.transaction()
                for tp, records in batches.items():
                    EVENTS_IN.labels(tp.topic).inc(len(records))
                    for record in records:
                        self.apply(tx, tp, record)
                    tx.set_offset(tp.topic, tp.partition, records[-1].offset + 1)
                for message in fetched.letters:
                    tx.send(*message)
                for tp, offset in fetched.skipped_to.items():  # past the undecodable range, after any records
                    tx.set_offset(tp.topic, tp.partition, offset)
                lagging = await watch.lagging(consumer)
                watermark = self.watermark.advance(lagging, watch.confirmed_at)
                self.join.sweep(tx, watermark)
                await deliver(producer, self.store, tx.commit(), self.topics.dead_letters)
                self._publish_counts(watermark)
                if sum(map(len, batches.values())) < 500:
                    await asyncio.sleep(POLL_PAUSE_S)
        finally:
            watch.close()
            await consumer.stop()
            await producer.stop()

    def _publish_counts(self, watermark: float) -> None:
        now, before = self.join.counts, self._reported
        BAGS_OUT.labels("true").inc(now.bags_positive - before.bags_positive)
        BAGS_OUT.labels("false").inc(now.bags_negative - before.bags_negative)
        DUPLICATES.labels("impression").inc(now.duplicate_impressions - before.duplicate_impressions)
        DUPLICATES.labels("click").inc(now.duplicate_clicks - before.duplicate_clicks)
        ORPHAN_CLICKS.inc(now.orphan_clicks - before.orphan_clicks)
        PENDING_IMPRESSIONS.set(now.pending)
        if watermark > 0:
            WATERMARK.set(watermark)
        self._reported = JoinCounts(**now.__dict__)
