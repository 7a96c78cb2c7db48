"""Reading and writing topics directly in integration tests (plain aiokafka, no genco code)."""

from __future__ import annotations

import asyncio
import json
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stream.kafka import bootstrap_servers


async def produce(url: str, messages: list[tuple[str, str | None, bytes | dict]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers(url), max_request_size=8 << 20)
    await producer.start()
    try:
        for topic, key, value in messages:
            raw = json.dumps(value).encode() if isinstance(value, dict) else value
            await producer.send(topic, raw, key=key.encode() if key else None)
        await producer.flush()
    finally:
        await producer.stop()


async def read_all(url: str, topic: str, until, timeout_s: float = 30.0, settle_s: float = 0.0) -> list[dict]:
    """Every message on ``topic`` (JSON values) once ``until(messages)`` holds, then ``settle_s`` more."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers(url), group_id=None, fetch_max_wait_ms=50)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + timeout_s
        while not partitions and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await consumer.topics()  # refreshes the metadata
            partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        messages: list[dict] = []
        settle_until = None
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                messages.extend(json.loads(r.value) for r in records)
            if settle_until is None and until(messages):
                settle_until = time.monotonic() + settle_s
            if settle_until is not None and time.monotonic() >= settle_until:
                break
        return messages
    finally:
        await consumer.stop()


async def produce_corrupt_batch(url: str, topic: str, values: list[bytes], partition: int = 0) -> None:
    """One record batch of ``values`` whose CRC no longer matches (a byte of its payload flipped), written with
    a plain ProduceRequest: no client sends such a thing, but a disk, a proxy or a buggy producer can."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.produce import ProduceRequest
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i, value in enumerate(values):
        builder.append(i, timestamp=None, key=None, value=value, headers=[])
    batch = bytearray(builder.build())
    batch[-3] ^= 0xFF
    client = AIOKafkaClient(bootstrap_servers=bootstrap_servers(url))
    await client.bootstrap()
    try:
        await client._metadata_update(client.cluster, [topic])
        leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        response = await client.send(leader, ProduceRequest(None, -1, 30000, [(topic, [(partition, bytes(batch))])]))
        assert response.topics[0][1][0][1] == 0, f"the broker refused the batch: {response}"
    finally:
        await client.close()
