"""What GENCO_KAFKA_COMPRESSION costs and saves: bags produced and consumed through the embedded broker per codec.

    .venv/bin/python benchmarks/compression.py [--bags 20000] [--rounds 3]

Produces the same bags (the simulator's, ~730 bytes of JSON each) with genco's own
producer settings and each codec, reads them back with genco's consumer settings,
and reports bags/s each way (best of ``--rounds``) and the compressed size of the
batches as the producer builds them (the codec applied to 512 KiB batches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiokafka import codec

from contract.settings import COMPRESSIONS
from sim.world import World, WorldConfig
from stream.embedded import EmbeddedBroker
from stream.kafka import Connection

ENCODERS = {"none": lambda b: b, "gzip": codec.gzip_encode, "snappy": codec.snappy_encode,
            "lz4": codec.lz4_encode, "zstd": codec.zstd_encode}


def batch_ratio(values: list[bytes], encode, batch_bytes: int = 512 << 10) -> float:
    """Compressed bytes over raw bytes, batching values as the producer does (up to ``batch_bytes``)."""
    raw = packed = 0
    batch: list[bytes] = []
    for value in [*values, None]:
        if value is None or sum(map(len, batch)) + len(value) > batch_bytes:
            blob = b"".join(batch)
            raw, packed = raw + len(blob), packed + len(encode(blob))
            batch = []
        if value is not None:
            batch.append(value)
    return packed / raw


async def roundtrip(connection: Connection, topic: str, values: list[bytes]) -> tuple[float, float]:
    """Seconds to produce every value (acknowledged) and to consume them all back."""
    producer = connection.producer()
    await producer.start()
    started = time.perf_counter()
    futures = [await producer.send(topic, value) for value in values]
    await asyncio.gather(*futures)
    produced = time.perf_counter() - started
    await producer.stop()
    consumer = connection.consumer(topic, group=f"bench-{topic}")
    await consumer.start()
    started, seen = time.perf_counter(), 0
    while seen < len(values):
        seen += sum(map(len, (await consumer.getmany(timeout_ms=500, max_records=2000)).values()))
    consumed = time.perf_counter() - started
    await consumer.stop()
    return produced, consumed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bags", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    values = [json.dumps(bag).encode() for bag in World(WorldConfig(seed=1, n_ads=200)).uniform_log(args.bags)]
    print(f"{args.bags} bags, {sum(map(len, values)) / len(values):.0f} bytes each on average")
    print(f"{'codec':<8}{'size':>8}{'produce bags/s':>16}{'consume bags/s':>16}")
    with EmbeddedBroker() as broker:
        for name in COMPRESSIONS:
            connection = Connection((broker.url.removeprefix("kafka://"),), compression=name)
            best_in = best_out = float("inf")
            for round_ in range(args.rounds):
                topic = f"bench.{name}.{round_}"
                connection.ensure_topics([topic])
                produced, consumed = asyncio.run(roundtrip(connection, topic, values))
                best_in, best_out = min(best_in, produced), min(best_out, consumed)
            ratio = batch_ratio(values, ENCODERS[name])
            print(f"{name:<8}{ratio:>7.0%}{len(values) / best_in:>16,.0f}{len(values) / best_out:>16,.0f}", flush=True)


if __name__ == "__main__":
    main()
