"""The simulated ad server's scoring and its count of answers, which demo, tests and benchmarks report from."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from contract.settings import Settings
from sim.adserver import AdServer, Report
from sim.world import World, WorldConfig
from stream.kafka import Connection


def window(responses: int, genco: float) -> dict:
    return {"responses": responses, "genco_ctr": genco, "uniform_ctr": 0.07, "oracle_ctr": 0.2}


def test_last_quarter_is_the_newest_quarter_of_responses_so_a_short_tail_does_not_drag_it():
    report = Report(windows=[window(3000, 0.05)] * 6 + [window(3000, 0.095), window(20, 0.01)])
    assert report.last_quarter()["genco"] == pytest.approx((3000 * 0.05 + 3000 * 0.095 + 20 * 0.01) / 6020)
    demo = Report(windows=[window(3000, 0.05)] * 5 + [window(3000, 0.095), window(12, 0.01)])  # genco demo's shape
    assert demo.last_quarter()["genco"] == pytest.approx((3000 * 0.05 + 3000 * 0.095 + 12 * 0.01) / 6012)
    assert Report().last_quarter() is None


@pytest.mark.integration
def test_a_response_the_live_reader_skipped_is_found_after_the_run_and_counted_as_seen_late(broker, topics):
    """On the embedded broker a reader following a partition that several producers write at once can skip a
    whole batch (two selectors' responses): the ad server reads the responses again before calling a request
    lost, so that the broker's fault is not reported as genco's."""
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics([topics.responses], partitions=1)
    server = AdServer(World(WorldConfig(seed=0, n_ads=5)), connection, topics, rate=1.0, requests=0, window_s=2.0)
    requests = [server.world.request(f"r-{i}") for i in range(3)]
    for request in requests:
        server.outstanding[request["request_id"]] = (0.0, request)
    answers = [{"request_id": r["request_id"], "ad_id": r["ad_id"], "policy": "fallback", "propensity": 0.5,
                "model_version": 0, "shown": {c: ids[0] for c, ids in r["candidates"].items()}} for r in requests]
    answers.append({"request_id": "another-clients", "error": "not ours"})

    async def sweep() -> None:
        producer = connection.producer()
        consumer = AIOKafkaConsumer(bootstrap_servers=list(connection.servers), group_id=None)
        await producer.start()
        await consumer.start()
        try:
            for answer in answers:
                await producer.send_and_wait(topics.responses, json.dumps(answer).encode())
            tps = [TopicPartition(topics.responses, 0)]
            consumer.assign(tps)
            await server._sweep(consumer, tps)
        finally:
            await producer.stop()
            await consumer.stop()

    asyncio.run(sweep())
    assert server.report.answered == server.report.seen_late == 3 and not server.outstanding
    assert server.report.invalid == [] and server.report.latencies_ms == [], "no latency for a response seen late"
