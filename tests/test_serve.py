"""``genco serve`` on a real broker: the closed loop (with garbage mixed in) learns, SIGTERM is clean, and its
roles run in separate processes that share nothing but the broker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from contract.settings import Settings
from sim.adserver import AdServer
from sim.harness import WINDOW, serve_env, serve_log, start_serve, stop_serve, wait_ready
from sim.world import World, WorldConfig
from stream.embedded import free_port
from stream.kafka import Connection
from stream.snapshot_topic import read_newest
from tests.kafka_helpers import produce, read_all

pytestmark = pytest.mark.integration


@pytest.mark.slow
def test_closed_loop_with_garbage_on_every_topic_answers_joins_and_learns(broker, topics, tmp_path):
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics([topics.requests, topics.impressions, topics.clicks], partitions=4)
    metrics_port = free_port()
    serve = start_serve(broker, topics, tmp_path, metrics_port)
    try:
        world = World(WorldConfig(seed=5, n_ads=60))
        server = AdServer(world, connection, topics, rate=250, requests=12_000, window_s=WINDOW,
                          window_every_s=12, truth_sample=0.3, garbage=0.05)
        wait_ready(tmp_path)  # imports and group joins take seconds; requests sent earlier would wait, not be lost
        report = asyncio.run(server.run())
        bags = asyncio.run(read_all(broker, topics.bags, lambda m: len(m) >= len(report.labels), timeout_s=30,
                                    settle_s=1))
        garbage = sum(report.garbage.values())
        dead = asyncio.run(read_all(broker, topics.dead_letters, lambda m: len(m) >= garbage, timeout_s=30,
                                    settle_s=1))
        status = genco_status(broker, topics, tmp_path, metrics_port,
                              until=lambda s: s.get("trained_bags", 0) >= len(report.labels))
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    assert report.sent == report.answered == 12_000, report.invalid[:5]
    assert report.invalid == []
    labels = {}
    for bag in bags:
        assert labels.setdefault(bag["impression_id"], bag["clicked"]) == bag["clicked"], "a bag changed label"
    assert labels == report.labels, "every impression exactly one bag, with the label the clicks imply"
    assert set(report.garbage) == {topics.requests, topics.impressions, topics.clicks} and garbage > 1000
    assert report.errors_answered == report.errors_due, "a broken request with a readable id gets an error"
    assert len(dead) == garbage and all(d["error"] and d["raw"] for d in dead), "each broken message: one letter"
    assert report.versions[-1] >= 3, "the learner keeps publishing and the selector keeps swapping"
    assert status["agents_ready"] == ["joiner", "learner", "selector"]
    assert status["trained_bags"] == len(report.labels), "the learner trained on each impression once"
    assert status["serving_model_version"] >= report.versions[-1] and status["pending_impressions"] == 0
    assert sum(status["dead_letters"].values()) == garbage and sum(status["bags_out"].values()) == len(labels)
    last = report.windows[-1] if report.windows[-1]["responses"] > 1000 else report.windows[-2]
    assert last["genco_ctr"] > 1.1 * last["uniform_ctr"], report.windows
    log = serve_log(tmp_path)
    assert serve.returncode == 0 and "stopped cleanly" in log and "exited with status" not in log, log[-2000:]


def genco_status(broker: str, topics, state_dir, metrics_port: int, until, timeout_s: float = 30) -> dict:
    """``genco status --json`` of the running serve, once ``until(status)`` holds (or at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = subprocess.run([sys.executable, "-m", "genco.cli", "status", "--json"], capture_output=True, text=True,
                              env=serve_env(broker, topics, state_dir, metrics_port), timeout=60)
        status = json.loads(done.stdout.splitlines()[-1])
        if until(status) or time.monotonic() > deadline:
            return status
        time.sleep(1)


def test_selection_requests_get_the_partitions_asked_for_and_the_chains_keep_one(broker, topics, monkeypatch):
    """GENCO_REQUEST_PARTITIONS sets how many selectors can answer at once; the snapshot and checkpoint topics keep
    one partition whatever it says (a chain is read in order), and an existing topic keeps its count."""
    from kafka import KafkaConsumer

    monkeypatch.setenv("GENCO_REQUEST_PARTITIONS", "3")
    settings = Settings()
    connection = Connection.from_settings(settings, broker)
    connection.ensure_genco_topics(topics, settings.request_partitions)
    connection.ensure_genco_topics(topics, 5)  # a second serve asking for more changes nothing
    consumer = KafkaConsumer(bootstrap_servers=list(connection.servers))
    try:
        counts = {topic: len(consumer.partitions_for_topic(topic) or ()) for topic in topics.all()}
    finally:
        consumer.close()
    assert counts == {topic: 3 if topic == topics.requests else 1 for topic in topics.all()}, counts
    monkeypatch.setenv("GENCO_REQUEST_PARTITIONS", "0")
    with pytest.raises(SystemExit, match="GENCO_REQUEST_PARTITIONS='0' is not a whole number of at least 1"):
        Settings()


@pytest.mark.slow
def test_roles_in_processes_that_share_nothing_but_the_broker(broker, topics, tmp_path):
    """``genco serve --agents joiner,learner`` and ``--agents selector``, each on its own state dir: the selector
    serves the learner's versions, which reach it over Kafka. Once it stops, a selector started on an empty
    state dir answers with the newest version from its first answer on."""
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics(topics.all())
    trainer_dir, first_dir, second_dir = tmp_path / "trainer", tmp_path / "selector-1", tmp_path / "selector-2"
    training, selecting = ("joiner", "learner"), ("selector",)
    serves = [start_serve(broker, topics, trainer_dir, agents=training),
              start_serve(broker, topics, first_dir, agents=selecting)]
    world = World(WorldConfig(seed=5, n_ads=60))
    late = [world.request(f"late-{i}") for i in range(50)]
    try:
        wait_ready(trainer_dir, agents=training)
        wait_ready(first_dir, agents=selecting)
        report = asyncio.run(AdServer(world, connection, topics, rate=250, requests=6_000, window_s=WINDOW).run())
        stop_serve(serves[1])
        newest = asyncio.run(read_newest(connection, topics.snapshots)).version  # on the topic before it starts
        started = time.monotonic()
        serves.append(start_serve(broker, topics, second_dir, agents=selecting))
        asyncio.run(produce(broker, [(topics.requests, r["request_id"], r) for r in late]))
        responses = asyncio.run(read_all(broker, topics.responses, timeout_s=120, until=lambda m: sum(
            r["request_id"].startswith("late-") for r in m) >= len(late)))
        took_s = time.monotonic() - started
    finally:
        for serve in serves:
            if serve.poll() is None:
                stop_serve(serve)
    assert report.sent == report.answered == 6_000, report.invalid[:5]
    assert report.versions[-1] >= 3 and report.policies.get("genco", 0) > 4_000, "the learner's versions serve"
    answers = [r for r in responses if r["request_id"].startswith("late-")]
    assert len(answers) == len(late) and {r["policy"] for r in answers} <= {"genco", "explore"}
    assert min(r["model_version"] for r in answers) >= newest > 0, "the new selector began with the newest"
    assert took_s < 60, f"a new selector answered after {took_s:.0f} s"
    assert not (first_dir / "snapshots").exists() and not (second_dir / "snapshots").exists()
    for state in (trainer_dir, first_dir, second_dir):
        log = serve_log(state)
        assert "stopped cleanly" in log and "exited with status" not in log, log[-2000:]
