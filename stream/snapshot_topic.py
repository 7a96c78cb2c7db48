"""The snapshot topic: the learner publishes every model version on it, and every selector, on any host, follows.

One partition, so versions arrive in the order they were made. A publication (``learner.publications``: a base
now and then, row deltas between) is cut into chunks under Apache Kafka's default 1 MB message limit, each
sent once the one before it is acknowledged: each chunk is then a record batch of its own, which keeps the
embedded broker's end offset exact (it reports the last batch's base offset + 1).

Every chunk carries its stamp in its headers: the learner's epoch, the version, the chunk's index and count,
the SHA-256 of the whole publication, and ``start``, the offset from which a reader gets the newest complete
model (its chain's base; for a base's own chunks, the chain before it, in case this base never completes).
So a selector that starts reads the topic's last chunk, seeks to its ``start`` and reads on from there.

Epochs fence zombies: a learner that starts takes the epoch after the last one on the topic, and a selector
refuses every publication of an epoch older than the newest it has applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from learner.publications import ChainBroken, PublicationError, Replica, checksum, decode
from stream.kafka import Connection
from stream.metrics import SNAPSHOT_LOAD_FAILURES

log = logging.getLogger("genco.snapshots")

CHUNK_BYTES = 900 << 10  # under Apache Kafka's default message.max.bytes (1 MB), headers and all
_HEADER = "genco-snapshot"


@dataclass(frozen=True)
class Stamp:
    epoch: int
    version: int
    chunk: int
    chunks: int
    sha256: str
    start: int  # where a reader starts to get the newest complete model (-1: nowhere yet)

    def header(self) -> list[tuple[str, bytes]]:
        fields = (self.epoch, self.version, self.chunk, self.chunks, self.sha256, self.start)
        return [(_HEADER, " ".join(map(str, fields)).encode())]

    @classmethod
    def of(cls, record: ConsumerRecord) -> Stamp | None:
        """The stamp of a chunk; None for a record that is not one (anything else written to the topic)."""
        for key, value in record.headers or ():
            if key == _HEADER:
                try:
                    epoch, version, chunk, chunks, sha256, start = value.decode().split(" ")
                    return cls(int(epoch), int(version), int(chunk), int(chunks), sha256, int(start))
                except ValueError:
                    return None
        return None


async def last_stamp(consumer: AIOKafkaConsumer, tp: TopicPartition) -> Stamp | None:
    """The stamp of the newest chunk on the (assigned) partition ``tp``; None when there is none."""
    end = (await consumer.end_offsets([tp]))[tp]
    if end == 0:
        return None
    consumer.seek(tp, end - 1)
    fetched = await consumer.getmany(tp, timeout_ms=5000)
    records = fetched.get(tp, [])
    return Stamp.of(records[-1]) if records else None


def snapshot_consumer(connection: Connection, topic: str) -> tuple[AIOKafkaConsumer, TopicPartition]:
    """A consumer of the snapshot topic in no group (every selector reads every version), and its partition."""
    return connection.consumer(group=None, max_wait_ms=200), TopicPartition(topic, 0)


async def seek_to_newest_chain(consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
    """Position the (assigned) consumer where the newest complete chain starts; at the beginning if none."""
    last = await last_stamp(consumer, tp)
    if last is not None and last.start >= 0:
        consumer.seek(tp, last.start)
    else:
        await consumer.seek_to_beginning(tp)


async def read_newest(connection: Connection, topic: str) -> Replica:
    """The newest version on a snapshot (or checkpoint) topic, applied from its chain; an empty replica when
    there is none."""
    consumer, tp = snapshot_consumer(connection, topic)
    await consumer.start()
    try:
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await seek_to_newest_chain(consumer, tp)
        follower = Follower()
        while await consumer.position(tp) < end:
            records = (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
            await asyncio.to_thread(follower.take, records)
        return follower.replica
    finally:
        await consumer.stop()


class SnapshotPublisher:
    """The learner's side: publishes each encoded publication, chunk by chunk, under the learner's epoch."""

    def __init__(self, connection: Connection, topic: str) -> None:
        self.connection = connection
        self.topic = topic
        self.producer: AIOKafkaProducer | None = None
        self.epoch = 0
        self.last_version = 0  # the newest version on the topic when this learner started
        self.start = -1

    async def open(self) -> None:
        """Start the producer and read the topic's last stamp: this learner's epoch is the next one."""
        consumer, tp = snapshot_consumer(self.connection, self.topic)
        await consumer.start()
        try:
            consumer.assign([tp])
            last = await last_stamp(consumer, tp)
        finally:
            await consumer.stop()
        if last:
            self.epoch, self.last_version, self.start = last.epoch + 1, last.version, last.start
        else:
            self.epoch = 1
        self.producer = self.connection.producer(linger_ms=0)
        await self.producer.start()
        log.info("publishing snapshots on %s as epoch %d (the topic's newest version: v%d)", self.topic,
                 self.epoch, self.last_version)

    async def publish(self, version: int, base: bool, blob: bytes) -> None:
        """Send every chunk of one publication, each after the one before it is acknowledged."""
        assert self.producer is not None, "open() first"
        chunks = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
        digest, first = checksum(blob), None
        for index, chunk in enumerate(chunks):
            stamp = Stamp(self.epoch, version, index, len(chunks), digest, self.start)
            metadata = await self.producer.send_and_wait(self.topic, chunk, key=f"v{version}".encode(),
                                                         headers=stamp.header())
            first = metadata.offset if first is None else first
        if base:
            self.start = first

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


class Chunks:
    """Reassembles publications from chunks in offset order: yields (stamp, blob) for each complete one whose
    checksum holds; a publication whose chunks break off (its learner died) is dropped."""

    def __init__(self) -> None:
        self.stamp: Stamp | None = None
        self.parts: list[bytes] = []

    def add(self, record: ConsumerRecord) -> Iterator[tuple[Stamp, bytes]]:
        stamp = Stamp.of(record)
        if stamp is None:
            log.warning("%s@%d is not a snapshot chunk: skipped", record.topic, record.offset)
            return
        if stamp.chunk == 0:
            self.stamp, self.parts = stamp, []
        elif self.stamp is None or (stamp.epoch, stamp.version, stamp.chunk) != (
                self.stamp.epoch, self.stamp.version, len(self.parts)):
            self.stamp, self.parts = None, []  # a chunk out of turn: the publication it belongs to is incomplete
            return
        self.parts.append(record.value or b"")
        if len(self.parts) < stamp.chunks:
            return
        blob, self.stamp, self.parts = b"".join(self.parts), None, []
        if checksum(blob) != stamp.sha256:
            SNAPSHOT_LOAD_FAILURES.inc()
            log.error("snapshot v%d (epoch %d) fails its checksum: skipped", stamp.version, stamp.epoch)
            return
        yield stamp, blob


class Follower:
    """The selector's side: chunks in, the newest model version out. Publications of an epoch older than the
    newest applied are refused (a zombie learner's); a delta that does not follow what the replica holds waits
    for the next base."""

    def __init__(self) -> None:
        self.chunks = Chunks()
        self.replica = Replica()
        self.epoch = 0

    def take(self, records: list[ConsumerRecord]) -> None:
        """Apply every complete publication among ``records`` (CPU work: run it off the event loop)."""
        for record in records:
            for stamp, blob in self.chunks.add(record):
                if stamp.epoch < self.epoch:
                    log.warning("snapshot v%d of epoch %d refused: epoch %d has published since (a learner "
                                "that lost its place)", stamp.version, stamp.epoch, self.epoch)
                    continue
                try:
                    self.replica.apply(decode(blob))
                except ChainBroken as error:
                    log.info("snapshot v%d skipped (%s): waiting for the next base", stamp.version, error)
                    continue
                except (PublicationError, KeyError, ValueError) as error:
                    SNAPSHOT_LOAD_FAILURES.inc()
                    log.error("snapshot v%d does not apply (%s: %s): waiting for the next base", stamp.version,
                              type(error).__name__, error)
                    self.replica = Replica()
                    continue
                self.epoch = stamp.epoch
