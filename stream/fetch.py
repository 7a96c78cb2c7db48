"""Fetching that no record batch can stop: a batch the client cannot decode is dead-lettered and skipped.

Why this exists: aiokafka decodes a fetched batch lazily, inside ``getmany``. A batch it
cannot decode (a codec it lacks, a failed CRC, a truncated or garbled payload) raises
there, every time it is fetched again, so an agent that lets the error out dies on it
after each restart. Worse, the records of the same ``getmany`` that were decoded before
the bad batch are dropped with the exception while the consumer's position has already
moved past them.

So ``SafeFetch.getmany`` notes every partition's position before fetching. When the
fetch raises a decoding error it rewinds to those positions (nothing is lost), reads
each partition record by record up to the batch that fails (records before it are
returned as usual), finds where the undecodable run of offsets ends by probing with
seeks (a fetch from inside a batch returns the whole batch), dead-letters that range
with topic, partition and first/last offset, and seeks past it. Other errors (a
stopped consumer, authorisation) are not input faults and propagate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import ConsumerStoppedError, CorruptRecordException, KafkaError, RecordTooLargeError

from contract.deadletters import Message, Reason, letter
from stream.metrics import DEAD_LETTERS, LAST_FETCH

log = logging.getLogger("genco.fetch")

_PROBE_MS = 500  # a probe's fetch wait: the broker answers at once when the offset holds data

Records = dict[TopicPartition, list[ConsumerRecord]]


@dataclass
class Fetched:
    """What one fetch gave: records by partition, dead letters for undecodable ranges, and for each partition
    with such a range the offset after it (to record as consumed once the letters are out)."""

    records: Records = field(default_factory=dict)
    letters: list[Message] = field(default_factory=list)
    skipped_to: dict[TopicPartition, int] = field(default_factory=dict)


def is_decoding_error(error: BaseException) -> bool:
    """Whether ``getmany`` raised because of what a batch holds (rather than the consumer's state).

    aiokafka's own errors for a failed CRC, a record over the fetch size or a codec it lacks
    (UnsupportedCodecError, not exported under that name by every version), and whatever a codec
    library or the record parser raises on a garbled payload (no KafkaError at all).
    """
    if isinstance(error, ConsumerStoppedError):
        return False
    if isinstance(error, CorruptRecordException | RecordTooLargeError):
        return True
    if isinstance(error, KafkaError):
        return type(error).__name__ == "UnsupportedCodecError"
    return isinstance(error, Exception)


class SafeFetch:
    """``getmany`` for one agent's consumer that returns dead letters for undecodable batches instead of raising."""

    def __init__(self, consumer: AIOKafkaConsumer, agent: str, dead_letters: str) -> None:
        self.consumer = consumer
        self.agent = agent
        self.dead_letters = dead_letters

    async def getmany(self, *partitions: TopicPartition, timeout_ms: int, max_records: int) -> Fetched:
        """Records by partition (of ``partitions``, or of all assigned), and dead letters for the batches that
        could not be decoded."""
        positions = {tp: await self.consumer.position(tp) for tp in partitions or self.consumer.assignment()}
        try:
            records = await self.consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
            LAST_FETCH.labels(self.agent).set(time.time())
            return Fetched(records)
        except Exception as error:
            if not is_decoding_error(error):
                raise
            log.warning("a fetched batch cannot be decoded (%s: %s); isolating it", type(error).__name__, error)
        fetched = Fetched()
        for tp, position in positions.items():
            if tp not in self.consumer.assignment():
                continue
            self.consumer.seek(tp, position)  # the failed getmany may have moved past records it dropped
            good, bad = await self._read_to_bad_batch(tp, max_records)
            if good:
                fetched.records[tp] = good
            if bad:
                fetched.letters.append(bad)
                fetched.skipped_to[tp] = await self.consumer.position(tp)
        LAST_FETCH.labels(self.agent).set(time.time())
        return fetched

    async def _read_to_bad_batch(self, tp: TopicPartition, max_records: int) -> tuple[list[ConsumerRecord],
                                                                                       Message | None]:
        """Records of ``tp`` one at a time up to the first batch that fails (then skipped and dead-lettered)."""
        good: list[ConsumerRecord] = []
        while len(good) < max_records:
            try:
                batch = await self.consumer.getmany(tp, timeout_ms=_PROBE_MS, max_records=1)
            except Exception as error:
                if not is_decoding_error(error):
                    raise
                start = await self.consumer.position(tp)
                end = await self._end_of_bad_run(tp, start)
                self.consumer.seek(tp, end)
                log.error("%s[%d] offsets %d-%d cannot be decoded (%s): dead-lettered and skipped",
                          tp.topic, tp.partition, start, end - 1, type(error).__name__)
                DEAD_LETTERS.labels(tp.topic, Reason.UNDECODABLE).inc()
                return good, letter(self.dead_letters, tp.topic, tp.partition, start, None, b"", Reason.UNDECODABLE,
                                    f"{type(error).__name__}: {error}", last_offset=end - 1)
            if not batch.get(tp):
                return good, None
            good.extend(batch[tp])
        return good, None

    async def _end_of_bad_run(self, tp: TopicPartition, start: int) -> int:
        """The first offset after ``start`` from which ``tp`` reads again (decodes, or holds nothing yet).

        Offsets inside an undecodable batch fail (a fetch from inside a batch returns all of it), those
        after it do not: galloping then bisecting finds the boundary in ~2 log2(batch size) fetches. The
        partition's end offset is not trusted as a bound: the embedded broker can report it short.
        """
        low, step = start, 1  # low: known to fail
        while not await self._reads_from(tp, low + step):
            low += step
            step *= 2
        high = low + step  # known to read
        while high - low > 1:
            middle = (low + high) // 2
            if await self._reads_from(tp, middle):
                high = middle
            else:
                low = middle
        return high

    async def _reads_from(self, tp: TopicPartition, offset: int) -> bool:
        self.consumer.seek(tp, offset)
        try:
            await self.consumer.getmany(tp, timeout_ms=_PROBE_MS, max_records=1)
        except Exception as error:
            if not is_decoding_error(error):
                raise
            return False
        return True
