"""What every agent's consume loop shares: stored offsets, outbox sending with retries, dead letters, lag."""

from __future__ import annotations

import asyncio
import json
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from kafka.errors import KafkaError

from state.kv import Store
from stream.metrics import CONSUMER_LAG, DEAD_LETTERS

log = logging.getLogger("genco.runtime")

MAX_RAW_CHARS = 64 << 10

Message = tuple[str, bytes | None, bytes]  # (topic, key, value)


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


async def send_all(producer: AIOKafkaProducer, messages: list[Message]) -> None:
    """Send and wait for every acknowledgement, retrying with backoff while the broker is unreachable."""
    delay = 0.5
    while messages:
        try:
            futures = [await producer.send(topic, value, key=key) for topic, key, value in messages]
            await asyncio.gather(*futures)
            return
        except KafkaError as error:
            log.warning("sending %d messages failed (%s); retrying in %.1f s", len(messages), error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def deliver(producer: AIOKafkaProducer, store: Store, outbox: list[tuple[bytes, Message]]) -> None:
    """Send committed outbox messages, then strike them off the store."""
    await send_all(producer, [message for _, message in outbox])
    store.sent([key for key, _ in outbox])


def mark_ready(consumer: AIOKafkaConsumer, ready: asyncio.Event, agent_log: logging.Logger) -> None:
    """Set ``ready`` (and say so) the first time the consumer has partitions assigned."""
    if not ready.is_set() and consumer.assignment():
        agent_log.info("assigned %d partitions", len(consumer.assignment()))
        ready.set()


def dead_letter(dead_letters: str, tp: TopicPartition, record: ConsumerRecord, error: str) -> Message:
    """The contract's DeadLetter for a bad input record, keyed like it: where it was, what is wrong, 64 KiB of it."""
    DEAD_LETTERS.labels(tp.topic, error.split(":", 1)[0].split(" ", 1)[0][:64]).inc()
    text = (record.value or b"")[:MAX_RAW_CHARS].decode("utf-8", errors="backslashreplace")[:MAX_RAW_CHARS]
    value = {"topic": tp.topic, "partition": tp.partition, "offset": record.offset, "error": error, "raw": text}
    return dead_letters, record.key, json.dumps(value).encode()


async def lagging_partitions(consumer: AIOKafkaConsumer, agent: str) -> list[TopicPartition]:
    """The assigned partitions with unread messages (publishing lag per topic on the way)."""
    lag_by_topic: dict[str, int] = {}
    lagging = []
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:  # nothing fetched yet: unknown, so assume a backlog
            lagging.append(tp)
            continue
        lag = max(highwater - await consumer.position(tp), 0)
        lag_by_topic[tp.topic] = lag_by_topic.get(tp.topic, 0) + lag
        if lag:
            lagging.append(tp)
    for topic, lag in lag_by_topic.items():
        CONSUMER_LAG.labels(agent, topic).set(lag)
    return lagging
