"""Snapshots over Kafka: the learner's publications (a base, then row deltas) reach every selector, on any host;
a selector that starts late serves the newest version at once, and a zombie learner's versions are refused."""

from __future__ import annotations

import asyncio
import doctest
import zlib

import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

import learner.publications
from contract.events import SelectionRequest
from contract.settings import Settings
from contract.window import JoinWindow
from learner.features import HashSizes
from learner.model import GenCO, ModelConfig
from learner.publications import ChainBroken, Differ, PublicationError, Replica, decode, encode
from learner.trainer import Learner, Preset, TrainConfig
from stream.kafka import Connection, Topics, bootstrap_servers
from stream.metrics import SNAPSHOT_LOAD_FAILURES
from stream.selector import SelectorAgent
from stream.snapshot_topic import CHUNK_BYTES, SnapshotPublisher
from stream.training import TrainingAgent
from tests.kafka_helpers import produce, read_all

UNUSED = Connection(("127.0.0.1:1",))  # the agents' Kafka clients are never started here
SMALL = ModelConfig(sizes=HashSizes(user=256, ad=256, query=256, segment=64, element=512, other_element=256))


def weights_of(model) -> dict[str, np.ndarray]:
    return {name: value.detach().numpy().copy() for name, value in model.weights().items()}


def test_docstring_example():
    assert doctest.testmod(learner.publications).failed == 0


def test_a_replica_of_bases_and_deltas_holds_exactly_the_learners_weights(small_world):
    _, bags = small_world
    trainer, differ, replica = Learner(), Differ(base_every=4), Replica()
    sizes = []
    for version in range(1, 7):
        trainer.step(bags[(version - 1) * 1024 : version * 1024])
        blob = encode(differ.publication(weights_of(trainer.model), {"version": version}))
        sizes.append(len(blob))
        assert replica.apply(decode(blob)) == version
        expected = weights_of(trainer.model)
        assert replica.weights.keys() == expected.keys()
        for name, value in expected.items():
            assert replica.weights[name].shape == value.shape and np.array_equal(replica.weights[name], value), name
    assert max(sizes[1:4]) < sizes[0] / 5, f"deltas carry the rows that changed, not the model: {sizes}"
    assert sizes[4] > sizes[3] * 5, "every fourth publication goes whole again"


def test_a_delta_that_does_not_follow_the_replica_and_a_damaged_blob_are_refused():
    differ = Differ()
    table = np.zeros((20_000, 4), dtype=np.float32)
    first = encode(differ.publication({"table": table}, {"version": 1}))
    table[3] = 2.0
    differ.publication({"table": table}, {"version": 2})  # a version this replica never sees
    table[4] = 3.0
    third = encode(differ.publication({"table": table}, {"version": 3}))
    replica = Replica()
    with pytest.raises(ChainBroken):
        replica.apply(decode(third))
    replica.apply(decode(first))
    with pytest.raises(ChainBroken, match="for v2, holding v1"):
        replica.apply(decode(third))
    with pytest.raises(PublicationError):
        decode(first[:-10])
    with pytest.raises(PublicationError, match="not a publication"):
        decode(zlib.compress(b"\x08" + b"\x00" * 7 + b"{}"))


def offer(selector: SelectorAgent, differ: Differ, weights: dict[str, np.ndarray], model_config: dict,
          version: int) -> int:
    """The version ``selector`` serves after its follower has applied ``weights`` as ``version``."""
    publication = differ.publication(weights, {"version": version, "model_config": model_config, "serving": "genco"})
    selector.follower.replica.apply(decode(encode(publication)))
    asyncio.run(selector.swap_to_newest())
    asyncio.run(selector.swap_to_newest())  # a version that failed is not tried again and again
    return selector.policy.version


def test_a_version_that_fails_to_load_in_any_way_leaves_the_last_good_one_serving():
    """A model from a newer genco (a setting this one does not know: TypeError) or weights that do not fit the
    model must not stop the selector: it keeps serving, counts it, and moves on to the next version."""
    model = GenCO(SMALL)
    weights, config = weights_of(model), model.config.to_dict()
    selector = SelectorAgent(UNUSED, Topics("s."), explore=0.0)
    differ = Differ()
    failures = SNAPSHOT_LOAD_FAILURES._value.get()
    assert offer(selector, differ, weights, config, 1) == 1
    assert offer(selector, differ, weights, {**config, "attention_heads_v2": 8}, 2) == 1
    misfit = {**weights, "element_table.weight": weights["element_table.weight"][:7]}
    assert offer(selector, differ, misfit, config, 3) == 1, "kept serving the last good version"
    assert SNAPSHOT_LOAD_FAILURES._value.get() - failures == 2
    assert offer(selector, differ, weights, config, 4) == 4


def test_a_new_version_is_served_with_the_ads_lone_requests_asked_for_already_scored(small_world):
    """The selector warms each new version's cache from the one it replaces, in the loading thread."""
    world, bags = small_world
    trainer = Learner(Preset(SMALL, TrainConfig(batch_size=256)))
    selector = SelectorAgent(UNUSED, Topics("s."), explore=0.0)
    differ = Differ()
    trainer.learn(bags[:1024])
    assert offer(selector, differ, weights_of(trainer.model), SMALL.to_dict(), 1) == 1
    for i in range(60):
        selector.policy.respond([SelectionRequest.model_validate(world.request(f"w-{i}"))])
    asked = selector.policy.selector.cached_pools
    trainer.learn(bags[1024:2048])
    assert offer(selector, differ, weights_of(trainer.model), SMALL.to_dict(), 2) == 2
    assert selector.policy.selector.cached_pools == asked > 10


async def publish(publisher: SnapshotPublisher, differ: Differ, model, version: int) -> bool:
    """Publish ``model`` as ``version``; whether it went as a base."""
    publication = differ.publication(weights_of(model), {"version": version, "model_config": model.config.to_dict(),
                                                         "serving": "genco"})
    await publisher.publish(version, publication.manifest["kind"] == "base", encode(publication))
    return publication.manifest["kind"] == "base"


async def until(condition, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.integration
def test_selector_serves_fallback_then_hot_swaps_to_the_newest_snapshot(broker, topics, small_world):
    world, bags = small_world
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics(topics.all())
    agent = SelectorAgent(connection, topics, explore=0.0)
    requests = [world.request(f"r-{i}") for i in range(40)]

    async def scenario() -> tuple[list[dict], list[dict]]:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(agent.ready.wait(), 60)
        await produce(broker, [(topics.requests, r["request_id"], r) for r in requests[:20]])
        before = await read_all(broker, topics.responses, lambda m: len(m) >= 20, timeout_s=20)
        trainer = Learner()
        trainer.learn(bags[:5000])
        publisher = SnapshotPublisher(connection, topics.snapshots)
        await publisher.open()
        await publish(publisher, Differ(), trainer.model, version=7)
        await publisher.close()
        await until(lambda: agent.policy.version == 7)
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


@pytest.mark.integration
def test_a_late_selector_serves_the_newest_version_and_a_zombie_learners_are_refused(broker, topics, small_world):
    """Epoch 1 publishes v1 (a base of several chunks) and deltas v2, v3; a selector started after them serves
    v3 before it answers anything. A learner of epoch 2 takes over at v4; the old one, still running, publishes
    v5 as a base: refused (were it applied, epoch 2's delta v6 could not follow it and v5 would stay)."""
    _, bags = small_world
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics(Topics(topics.prefix).all())
    trainer = Learner()
    models: dict[int, dict[str, np.ndarray]] = {}

    async def train_and_publish(publisher: SnapshotPublisher, differ: Differ, version: int) -> bool:
        trainer.step(bags[version * 1024 : (version + 1) * 1024])
        models[version] = weights_of(trainer.model)
        return await publish(publisher, differ, trainer.model, version)

    async def scenario() -> tuple[SelectorAgent, int, list[bool]]:
        old, old_differ = SnapshotPublisher(connection, topics.snapshots), Differ()
        await old.open()
        kinds = [await train_and_publish(old, old_differ, version) for version in (1, 2, 3)]
        agent = SelectorAgent(connection, topics, explore=0.0)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.wait_for(agent.ready.wait(), 60)
        served_at_start = agent.policy.version
        new, new_differ = SnapshotPublisher(connection, topics.snapshots), Differ()
        await new.open()
        assert (new.epoch, new.last_version) == (2, 3), "a learner that starts continues after the topic's newest"
        kinds.append(await train_and_publish(new, new_differ, 4))
        await until(lambda: agent.policy.version == 4)
        kinds.append(await train_and_publish(old, Differ(), 5))
        kinds.append(await train_and_publish(new, new_differ, 6))
        await until(lambda: agent.follower.replica.version >= 5)
        await until(lambda: agent.policy.version != 4, timeout_s=10)
        stop.set()
        await task
        for publisher in (old, new):
            await publisher.close()
        return agent, served_at_start, kinds

    agent, served_at_start, kinds = asyncio.run(scenario())
    assert kinds == [True, False, False, True, True, False]
    assert served_at_start == 3, "requests wait until the newest version on the topic serves"
    assert agent.policy.version == 6, "the zombie's v5 was refused and epoch 2's delta applied"
    for name, value in models[6].items():
        assert np.array_equal(agent.follower.replica.weights[name], value), name
    assert len(encode(Differ().publication(models[1], {"version": 1}))) > CHUNK_BYTES, "v1 went in several chunks"


@pytest.mark.integration
def test_a_learner_on_a_fresh_state_dir_resumes_from_the_newest_checkpoint_on_kafka(broker, topics, tmp_path,
                                                                                    small_world):
    """The lost learner's checkpoint (model, optimiser, referee, trained marks) travels over Kafka: a
    learner with an empty state dir takes it over, skips every bag the first one trained, and continues its
    versions; one whose own checkpoint is as new keeps its own."""
    _, bags = small_world
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics(topics.all(), configs=topics.configs)
    first = TrainingAgent(connection, topics, tmp_path / "first", JoinWindow(60.0))
    trained = bags[:3000]

    async def scenario() -> TrainingAgent:
        for chunk in (trained[:1000], trained[1000:]):
            admitted = [first.admit(*record(topics.bags, 0, bag)) for bag in chunk]
            first.train_isolating(admitted, [(None, None)] * len(admitted))
            await first.publish_next(checkpoint=True)
        await first.publish_next(checkpoint=False)  # a later snapshot without a checkpoint
        for publisher in (first.publisher, first.checkpointer):
            await publisher.close()
        second = TrainingAgent(connection, topics, tmp_path / "second", JoinWindow(60.0))
        await second.adopt_newest_checkpoint()
        await first.adopt_newest_checkpoint()  # its own is the newest: nothing changes
        await second.publish_next(checkpoint=False)
        for publisher in (second.publisher, second.checkpointer):
            await publisher.close()
        return second

    second = asyncio.run(scenario())
    assert second.learner_version == first.learner_version == 2
    assert (second.learner.bags_seen, second.learner.steps) == (first.learner.bags_seen, first.learner.steps)
    ours, theirs = weights_of(first.learner.model), weights_of(second.learner.model)
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)
    assert {k: v.tolist() for k, v in first.learner.optimizer_state().items()} == \
        {k: v.tolist() for k, v in second.learner.optimizer_state().items()}
    assert second.referee.state() == first.referee.state()
    assert all(second.admit(*record(topics.bags, 0, bag)) is None for bag in trained), "none trained twice"
    assert second.admit(*record(topics.bags, 0, bags[3000])) is not None
    replayed = bags[3001].model_copy(update={"ts": max(bag.ts for bag in trained) - 3 * 3600})
    assert second.admit(*record(topics.bags, 0, replayed)) is None, "a replay older than the marks is skipped"
    assert second.version == 4, "versions continue after the newest published (v3, a snapshot only)"
    for agent in (first, second):
        agent.store.close()


@pytest.mark.integration
def test_bags_trained_after_the_last_checkpoint_are_trained_again_after_a_crash(broker, topics, tmp_path,
                                                                                  small_world):
    """The learner agent acknowledges a bag to Faust only once a checkpoint on Kafka covers it: one that dies
    having trained every bag but checkpointed none leaves the group's committed offset before all of them, so
    the next learner trains them all (acknowledging on taking would have started it past them, losing them);
    one stopped cleanly checkpoints and commits the end."""
    _, bags = small_world
    n = 2000
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics(topics.all(), configs=topics.configs)
    asyncio.run(produce(broker, [(topics.bags, bag.impression_id, bag.model_dump_json().encode())
                                 for bag in bags[:n]]))

    async def run_until_trained(agent: TrainingAgent, crash: bool) -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        while agent.learner.bags_seen < n:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.1)
        if crash:
            task.cancel()  # no final checkpoint
            await asyncio.gather(task, return_exceptions=True)
        else:
            stop.set()
            await task
        return agent.learner.bags_seen

    async def committed() -> int | None:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers(broker), group_id=topics.group("learner"),
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            return await consumer.committed(TopicPartition(topics.bags, 0))
        finally:
            await consumer.stop()

    crashed = TrainingAgent(connection, topics, tmp_path, JoinWindow(60.0), checkpoint_every_s=3600.0)
    assert asyncio.run(run_until_trained(crashed, crash=True)) == n
    assert asyncio.run(committed()) in (None, 0), "nothing acknowledged without a checkpoint on Kafka"
    restarted = TrainingAgent(connection, topics, tmp_path, JoinWindow(60.0), checkpoint_every_s=3600.0)
    assert restarted.learner_version == 0, "no checkpoint was recorded"
    assert asyncio.run(run_until_trained(restarted, crash=False)) == n, "every bag trained again, once"
    assert asyncio.run(committed()) == n, "the clean stop's checkpoint covers every bag"


def record(topic: str, offset: int, bag) -> tuple[TopicPartition, ConsumerRecord]:
    value = bag.model_dump_json().encode()
    return TopicPartition(topic, 0), ConsumerRecord(topic, 0, offset, 0, 0, None, value, None, 0, len(value), ())
