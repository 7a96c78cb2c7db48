"""``genco serve`` as a client no one here wrote sees it: confluent-kafka (librdkafka) produces and consumes.

genco itself produces zstd here (GENCO_KAFKA_COMPRESSION), read back by librdkafka and by its own learner.
Everything goes through the contract's topics and the running ``genco serve`` only, so
these tests hold whatever runs the agents. One serve for the module: first every
compression codec, then hostile input of every kind the issue found (a corrupt record
batch, deep nesting, a request whose errors are megabytes, requests over the work
caps, control characters in names); after each, the agents still answer, and none of
them was restarted.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import pytest

from contract.deadletters import MAX_ERROR_CHARS, Reason
from contract.events import CONSIDERED
from sim.harness import serve_env, serve_log, start_serve, stop_serve, wait_ready
from sim.world import World, WorldConfig
from stream.embedded import free_port
from stream.kafka import Topics, bootstrap_servers
from tests.kafka_helpers import produce_corrupt_batch

pytestmark = pytest.mark.integration

confluent_kafka = pytest.importorskip("confluent_kafka", reason="confluent-kafka belongs in the [test] extra")

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")
PER_CODEC = 30


@pytest.fixture(scope="module")
def served(broker, tmp_path_factory):
    """A running ``genco serve`` (2 s click window) on its own topics, producing zstd: (broker, topics, state dir,
    metrics port)."""
    state = tmp_path_factory.mktemp("clients")
    topics = Topics(f"c{uuid.uuid4().hex[:8]}.")
    port = free_port()
    serve = start_serve(broker, topics, state, port, extra_env={"GENCO_KAFKA_COMPRESSION": "zstd"})
    try:
        wait_ready(state)
        yield broker, topics, state, port
    finally:
        stop_serve(serve)
    log = serve_log(state)
    assert serve.returncode == 0 and "exited with status" not in log, log[-3000:]


def confluent_produce(broker: str, codec: str, messages: list[tuple[str, str | None, bytes]]) -> None:
    """Produce with librdkafka, ``codec`` compression, and check every delivery report."""
    producer = confluent_kafka.Producer({"bootstrap.servers": ",".join(bootstrap_servers(broker)),
                                         "compression.type": codec, "linger.ms": 20, "message.max.bytes": 8 << 20})
    failures = []

    def report(error, message) -> None:
        if error is not None:
            failures.append(error)

    for topic, key, value in messages:
        producer.produce(topic, value, key, on_delivery=report)
        producer.poll(0)
    assert producer.flush(30) == 0, "messages left undelivered"
    assert failures == []


def confluent_read(broker: str, topic: str, until, timeout_s: float = 60.0, settle_s: float = 1.0) -> list[dict]:
    """Every JSON value on partition 0 of ``topic``, read with librdkafka, once ``until(values)`` holds (+ settle)."""
    consumer = confluent_kafka.Consumer({"bootstrap.servers": ",".join(bootstrap_servers(broker)),
                                         "group.id": f"test-{uuid.uuid4().hex}", "enable.auto.commit": False})
    consumer.assign([confluent_kafka.TopicPartition(topic, 0, confluent_kafka.OFFSET_BEGINNING)])
    values: list[dict] = []
    deadline, settle_until = time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                values.append(json.loads(message.value()))
            if settle_until is None and until(values):
                settle_until = time.monotonic() + settle_s
            if settle_until is not None and time.monotonic() >= settle_until:
                break
    finally:
        consumer.close()
    return values


def status(broker: str, topics: Topics, state, port: int) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "genco.cli", "status", "--json"], capture_output=True, text=True,
                          env=serve_env(broker, topics, state, port), timeout=60)
    return done.returncode, json.loads(done.stdout.splitlines()[-1])


def impression_for(request: dict, response: dict, ts: float) -> dict:
    return {"impression_id": f"imp-{request['request_id']}", "ts": ts, "ad_id": request["ad_id"],
            "user": request["user"], "query": request["query"], "candidates": request["candidates"],
            "shown": response["shown"], "request_id": request["request_id"], "policy": response["policy"],
            "propensity": response["propensity"]}


def test_confluent_kafka_with_every_codec_gets_every_answer_and_every_bag(served):
    broker, topics, state, port = served
    world = World(WorldConfig(seed=4, n_ads=20))
    requests = {codec: [world.request(f"r-{codec}-{i}") for i in range(PER_CODEC)] for codec in CODECS}
    for codec, batch in requests.items():
        confluent_produce(broker, codec, [(topics.requests, r["request_id"], json.dumps(r).encode()) for r in batch])
    every = {r["request_id"]: r for batch in requests.values() for r in batch}
    responses = confluent_read(broker, topics.responses, lambda v: {r["request_id"] for r in v} >= set(every))
    answered = {r["request_id"]: r for r in responses}
    assert set(answered) == set(every), f"unanswered: {sorted(set(every) - set(answered))[:5]}"
    for request_id, response in answered.items():
        candidates = every[request_id]["candidates"]
        assert set(response["shown"]) == set(candidates)
        assert all(response["shown"][c] in candidates[c] for c in candidates)

    now = time.time()
    labels = {}
    for codec, batch in requests.items():
        messages = []
        for i, request in enumerate(batch):
            impression = impression_for(request, answered[request["request_id"]], now)
            messages.append((topics.impressions, impression["impression_id"], json.dumps(impression).encode()))
            labels[impression["impression_id"]] = i % 2 == 0
            if i % 2 == 0:
                click = {"impression_id": impression["impression_id"], "ts": now + 0.5}
                messages.append((topics.clicks, impression["impression_id"], json.dumps(click).encode()))
        confluent_produce(broker, codec, messages)
    bags = confluent_read(broker, topics.bags, lambda v: len(v) >= len(labels), settle_s=3.0)
    assert len(bags) == len(labels), "one bag per impression"
    assert {b["impression_id"]: b["clicked"] for b in bags} == labels

    deadline = time.monotonic() + 60  # the learner reads the bags genco wrote compressed (zstd)
    while (report := status(broker, topics, state, port)[1])["trained_bags"] < len(labels):
        assert time.monotonic() < deadline, report
        time.sleep(1)
    code, report = status(broker, topics, state, port)
    assert code == 0 and report["healthy"], report["problems"]
    assert all(agent["restarts"] == 0 for agent in report["agents"].values()), report["agents"]


def test_hostile_input_is_dead_lettered_or_refused_and_every_agent_keeps_answering(served):
    broker, topics, state, port = served
    world = World(WorldConfig(seed=9, n_ads=10))
    control = "\x1b[31mred\n\rline"
    hostile = {
        "deep": b"[" * 1100,
        "huge-error": json.dumps({"request_id": "huge-error", "ad_id": "a",  # 64k type errors in 200 KB
                                  "candidates": {f"{'c' * 250}{i}": list(range(1000)) for i in range(64)}}).encode(),
        "wide": json.dumps({"request_id": "wide", "ad_id": "a",  # valid: served from each pool's first 15
                            "query": {"segments": [f"s{i}" for i in range(100)]},
                            "candidates": {f"c{i}": [f"e{j}" for j in range(1000)] for i in range(7)}}).encode(),
        "crosses": json.dumps({"request_id": "crosses", "ad_id": "a",  # 64 x 15 considered x 100 segments
                               "query": {"segments": [f"s{i}" for i in range(100)]},
                               "candidates": {f"c{i}": [f"e{j}" for j in range(15)] for i in range(64)}}).encode(),
        "control": json.dumps({"request_id": "control", "ad_id": "a", "candidates": {control: []}}).encode(),
    }
    asyncio.run(produce_corrupt_batch(broker, topics.requests, [b'{"request_id": "lost"}'] * 5))
    asyncio.run(produce_corrupt_batch(broker, topics.impressions, [b"{}"] * 3))
    asyncio.run(produce_corrupt_batch(broker, topics.clicks, [b"{}"] * 2))
    confluent_produce(broker, "none", [(topics.requests, key, value) for key, value in hostile.items()])
    served_anyway = world.request("odd-names")
    served_anyway["candidates"] = {control: ["x", "y"], "title": ["t1"]}  # an unseen component must be served
    after = [world.request(f"after-{i}") for i in range(10)] + [served_anyway]
    confluent_produce(broker, "zstd", [(topics.requests, r["request_id"], json.dumps(r).encode()) for r in after])
    impression = impression_for(after[0], {"shown": {c: v[0] for c, v in after[0]["candidates"].items()},
                                           "policy": "explore", "propensity": None}, time.time())
    click = {"impression_id": impression["impression_id"], "ts": impression["ts"] + 0.1}
    key = impression["impression_id"]
    confluent_produce(broker, "lz4", [(topics.impressions, key, json.dumps(impression).encode()),
                                      (topics.clicks, key, json.dumps(click).encode())])

    wanted = {r["request_id"] for r in after} | {"huge-error", "wide", "crosses", "control"}
    responses = {r["request_id"]: r for r in confluent_read(
        broker, topics.responses, lambda v: {r["request_id"] for r in v} >= wanted)}
    assert wanted <= set(responses), f"unanswered: {sorted(wanted - set(responses))}"
    assert all("shown" in responses[r["request_id"]] for r in after), "good requests after hostile ones answered"
    assert responses["odd-names"]["shown"][control] in ("x", "y")
    for request_id in ("huge-error", "crosses", "control"):
        assert len(responses[request_id]["error"]) <= MAX_ERROR_CHARS
    assert "over the cap" in responses["crosses"]["error"]
    wide = responses["wide"]
    assert set(wide["shown"]) == {f"c{i}" for i in range(7)}
    if wide["policy"] == "genco":  # the model scores each pool's first CONSIDERED candidates only
        assert all(int(e[1:]) < CONSIDERED for e in wide["shown"].values()), wide
    else:  # the explore slice (GENCO_EXPLORE of the requests) and the fallback draw from every candidate
        assert wide["propensity"] == pytest.approx(1000.0**-7), wide
    assert "\x1b" not in responses["control"]["error"] and "\\x1b" in responses["control"]["error"]

    bags = confluent_read(broker, topics.bags, lambda v: any(b["impression_id"] == impression["impression_id"]
                                                             for b in v))
    assert [b["clicked"] for b in bags if b["impression_id"] == impression["impression_id"]] == [True]

    letters = confluent_read(broker, topics.dead_letters, lambda v: len(v) >= 7)
    by_reason: dict[str, list[dict]] = {}
    for letter in letters:
        by_reason.setdefault(letter["reason"], []).append(letter)
        assert len(letter["error"]) <= MAX_ERROR_CHARS
    undecodable = sorted((letter["topic"], letter["last_offset"] - letter["offset"] + 1)
                         for letter in by_reason["undecodable"])
    assert undecodable == sorted([(topics.requests, 5), (topics.impressions, 3), (topics.clicks, 2)]), \
        "each corrupt batch: one letter naming its whole offset range"
    assert [letter["raw"] for letter in by_reason["not_json"]] == ["[" * 1100]
    assert len(by_reason["over_cap"]) == 1 and len(by_reason["invalid"]) == 2
    assert set(by_reason) == {"undecodable", "not_json", "over_cap", "invalid"}

    code, report = status(broker, topics, state, port)
    assert code == 0 and report["healthy"], report["problems"]
    assert all(agent["restarts"] == 0 for agent in report["agents"].values()), report["agents"]
    assert {key.split("/")[1] for key in report["dead_letters"]} <= {str(r) for r in Reason}
