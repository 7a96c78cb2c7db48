"""``genco serve`` on a real broker: the closed loop (with garbage mixed in) learns, selection hot-swaps
snapshots, SIGTERM is clean."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import pytest

from contract.events import Bag
from contract.settings import Settings
from learner.snapshots import SnapshotStore
from learner.trainer import Learner
from sim.adserver import AdServer
from sim.harness import WINDOW, serve_env, serve_log, start_serve, wait_ready
from sim.world import World, WorldConfig
from stream.embedded import free_port
from stream.kafka import Connection
from stream.selector import SelectorAgent
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


def test_selector_serves_fallback_then_hot_swaps_to_the_newest_snapshot(broker, topics, tmp_path, small_world):
    world, log = small_world
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics(topics.all())
    agent = SelectorAgent(connection, topics, tmp_path / "snapshots", explore=0.0, poll_every_s=0.1)
    requests = [world.request(f"r-{i}") for i in range(40)]

    async def scenario() -> tuple[list[dict], list[dict]]:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(agent.ready.wait(), 60)
        await produce(broker, [(topics.requests, r["request_id"], r) for r in requests[:20]])
        before = await read_all(broker, topics.responses, lambda m: len(m) >= 20, timeout_s=20)
        learner = Learner()
        learner.learn([Bag.model_validate(b) for b in log[:5000]])
        SnapshotStore(tmp_path / "snapshots").save(learner.model, version=7, bags_seen=5000, steps=5,
                                                   train_config=learner.preset.train.to_dict())
        while agent.policy.version != 7:
            await asyncio.sleep(0.05)
        await produce(broker, [(topics.requests, r["request_id"], r) for r in requests[20:]]
                      + [(topics.requests, "r-bad", b'{"request_id": "r-bad", "ad_id": "a", "candidates": {}}')])
        after = await read_all(broker, topics.responses, lambda m: len(m) >= 41, timeout_s=20)
        stop.set()
        await task
        return before, after[20:]

    before, after = asyncio.run(scenario())
    assert {(r["policy"], r["model_version"]) for r in before} == {("fallback", 0)}
    assert all(r["propensity"] > 0 for r in before)
    answered = [r for r in after if "error" not in r]
    assert {(r["policy"], r["model_version"]) for r in answered} == {("genco", 7)}
    assert [r["request_id"] for r in answered] == [r["request_id"] for r in requests[20:]]
    errors = [r for r in after if "error" in r]
    assert errors == [{"request_id": "r-bad", "error": errors[0]["error"]}]
    assert "candidates" in errors[0]["error"]
