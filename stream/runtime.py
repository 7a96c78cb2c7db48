"""What every agent's consume loop shares: stored offsets, outbox sending with retries, dead letters, lag."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CorruptRecordException, KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from contract.deadletters import Message, Reason, letter
from state.kv import Store
from stream.metrics import AGENT_READY, CONSUMER_LAG, DEAD_LETTERS

log = logging.getLogger("genco.runtime")

OUTAGE_LOG_S = 5.0  # no fetch answered for this long: say the broker is not answering
# Errors that sending the same message again cannot cure: the broker (or the client's own limit) refuses it.
REFUSED = (MessageSizeTooLargeError, RecordTooLargeError, CorruptRecordException)


class SeekToStoredOffsets(ConsumerRebalanceListener):
    """On assignment, start each partition where the agent's own store says it stopped.

    The store commits offsets atomically with the state they produced, so this, not
    Kafka's committed offsets, is the truth after a crash.
    """

    def __init__(self, consumer: AIOKafkaConsumer, store: Store) -> None:
        self.consumer = consumer
        self.store = store

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        stored = self.store.offsets()
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is not None:
                self.consumer.seek(tp, offset)


async def send_all(producer: AIOKafkaProducer, messages: list[Message], dead_letters: str) -> None:
    """Send and wait for every acknowledgement, retrying with backoff what failed while the broker is unreachable.

    A message the broker refuses for what it is (too large, say) is never retried: a dead letter
    naming it goes out instead, and a refused dead letter is logged and dropped.
    """
    delay = 0.5
    while messages:
        failed: list[tuple[Message, KafkaError]] = []
        sent = []
        for message in messages:
            topic, key, value = message
            try:
                sent.append((message, await producer.send(topic, value, key=key)))
            except KafkaError as error:  # the client's own checks (max_request_size) raise here
                failed.append((message, error))
        for message, future in sent:
            try:
                await future
            except KafkaError as error:
                failed.append((message, error))
        refused = [refusal(message, error, dead_letters) for message, error in failed if isinstance(error, REFUSED)]
        retry = [message for message, error in failed if not isinstance(error, REFUSED)]
        messages = [letter for letter in refused if letter is not None]
        if retry:
            log.warning("sending %d messages failed (%s); retrying in %.1f s", len(retry),
                        next(e for _, e in failed if not isinstance(e, REFUSED)), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            messages += retry


def refusal(message: Message, error: KafkaError, dead_letters: str) -> Message | None:
    """The dead letter for an output the broker refused; None when that output was a dead letter itself."""
    topic, key, value = message
    log.error("the broker refused a %d-byte message for %s (%s)", len(value), topic, type(error).__name__)
    if topic == dead_letters:
        return None
    DEAD_LETTERS.labels(topic, Reason.OUTPUT_REFUSED).inc()
    return letter(dead_letters, topic, None, None, key, value, Reason.OUTPUT_REFUSED,
                  f"output of {len(value)} bytes refused: {type(error).__name__}")


async def deliver(producer: AIOKafkaProducer, store: Store, outbox: list[tuple[bytes, Message]],
                  dead_letters: str) -> None:
    """Send committed outbox messages, then strike them off the store."""
    await send_all(producer, [message for _, message in outbox], dead_letters)
    store.sent([key for key, _ in outbox])


class InputRecord(Protocol):
    """An input record as an agent holds it: aiokafka's ``ConsumerRecord`` or a Faust ``Message`` alike."""

    offset: int
    key: bytes | None
    value: bytes | None


def dead_letter(dead_letters: str, tp: TopicPartition, record: InputRecord, reason: Reason, error: str) -> Message:
    """The contract's DeadLetter for a bad input record, keyed like it: where it was, what is wrong, 64 KiB of it."""
    DEAD_LETTERS.labels(tp.topic, reason).inc()
    return letter(dead_letters, tp.topic, tp.partition, record.offset, record.key, record.value or b"", reason, error)


class FetchWatch:
    """One agent's view of its input: whether it has partitions yet; which may hold unread messages; whether
    the broker went quiet.

    A partition counts as lagging while its end is unknown (before its first fetch) or
    its position is behind it. ``confirmed_at`` is when the broker last answered a fetch
    for every partition: the joiner's watermark advances with it, not with the wall
    clock, so an outage is never taken for quiet traffic (which would close windows
    whose clicks are held up).
    An outage is logged once when it starts and once when it ends, by a task of its own
    that looks every second: the agent's loop may itself be waiting on the broker (for an
    acknowledgement, say) and so take no turn to notice. aiokafka keeps retrying meanwhile,
    and consumption resumes where it stopped. ``close`` ends that task: the agent calls it when it stops.
    """

    def __init__(self, agent: str, agent_log: logging.Logger) -> None:
        self.agent = agent
        self.log = agent_log
        self.quiet_since: float | None = None
        # When the broker last confirmed the end of *every* assigned partition (0: not yet).
        self.confirmed_at = 0.0
        self.outages: asyncio.Task | None = None

    def mark_ready(self, consumer: AIOKafkaConsumer, ready: asyncio.Event) -> None:
        """Set ``ready`` (and say so, in the log and the metrics) the first time the consumer has partitions."""
        if not ready.is_set() and consumer.assignment():
            self.log.info("assigned %d partitions", len(consumer.assignment()))
            AGENT_READY.labels(self.agent).set(1)
            ready.set()
            self.outages = asyncio.create_task(self._watch_outages(consumer))

    def close(self) -> None:
        """Stop watching for outages (the agent is stopping; its consumer is about to)."""
        if self.outages is not None:
            self.outages.cancel()

    async def _watch_outages(self, consumer: AIOKafkaConsumer) -> None:
        """Every second: has the broker answered a fetch for any assigned partition lately?"""
        while True:
            await asyncio.sleep(1.0)
            try:  # no await between the two calls: the assignment cannot change under it
                answers = [consumer.last_poll_timestamp(tp) or 0 for tp in consumer.assignment()]
            except Exception:  # the consumer has stopped: nothing more to watch
                return
            self._report_outage(max(answers, default=0) / 1000, time.time())

    async def lagging(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        """The lagging partitions (publishing lag per topic on the way)."""
        lag_by_topic: dict[str, int] = {}
        lagging = []
        first_answer = math.inf
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            first_answer = min(first_answer, (consumer.last_poll_timestamp(tp) or 0) / 1000)
            if highwater is None:
                lagging.append(tp)
                continue
            lag = max(highwater - await consumer.position(tp), 0)
            lag_by_topic[tp.topic] = lag_by_topic.get(tp.topic, 0) + lag
            if lag:
                lagging.append(tp)
        for topic, lag in lag_by_topic.items():
            CONSUMER_LAG.labels(self.agent, topic).set(lag)
        self.confirmed_at = first_answer if first_answer < math.inf else 0.0
        return lagging

    def _report_outage(self, last_answer: float, now: float) -> None:
        if not last_answer:
            return
        if now - last_answer > OUTAGE_LOG_S and self.quiet_since is None:
            self.quiet_since = last_answer
            self.log.warning("no fetch answered by the broker for %.0f s: waiting for it, retrying "
                             "(nothing is lost: consumption resumes where it stopped)", now - last_answer)
        elif now - last_answer <= OUTAGE_LOG_S and self.quiet_since is not None:
            self.log.warning("broker answering again after %.0f s", now - self.quiet_since)
            self.quiet_since = None
