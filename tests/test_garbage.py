"""Generated garbage on every input topic: one dead letter per broken message, good traffic untouched.

Property-based (hypothesis): whatever broken messages are mixed in, wherever, the
joiner gives the good impressions the same bags and the selector gives the good
requests the same responses as a clean run. The real join and selector code on a
real RocksDB store; the broker is left out so hypothesis can try hundreds of cases
(tests/test_serve.py runs garbage through the broker end to end).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest
import torch
from aiokafka import ConsumerRecord, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.deadletters import MAX_RAW_CHARS
from contract.events import Bag
from contract.window import JoinWindow
from learner.snapshots import SnapshotStore
from learner.trainer import Learner
from sim.garbage import FAULTS, corrupt
from sim.world import World, WorldConfig
from state.kv import Store
from stream.joiner import Joiner
from stream.kafka import Connection, Topics
from stream.selector import SelectorAgent

TOPICS = Topics("g.")
UNUSED = Connection(("127.0.0.1:1",))  # the agents' Kafka clients are never started here
WINDOW = 2.0
REQUIRED = {"request_id", "impression_id", "ts", "ad_id", "candidates", "shown"}


def good_traffic() -> tuple[list[tuple[str, bytes]], list[dict]]:
    """A world's impressions and clicks (in a plausible arrival order), and some requests."""
    world = World(WorldConfig(seed=3, n_ads=10))
    inputs: list[tuple[str, bytes]] = []
    for bag in world.uniform_log(150):
        impression = {k: v for k, v in bag.items() if k not in ("clicked", "click_ts")}
        inputs.append((TOPICS.impressions, json.dumps(impression).encode()))
        if bag["clicked"]:
            inputs.append((TOPICS.clicks, json.dumps({"impression_id": bag["impression_id"],
                                                      "ts": bag["ts"] + 0.5}).encode()))
    return inputs, [world.request(f"r-{i}") for i in range(60)]


GOOD_INPUTS, GOOD_REQUESTS = good_traffic()
KIND = {TOPICS.impressions: "impression", TOPICS.clicks: "click", TOPICS.requests: "request"}


def json_garbage() -> st.SearchStrategy[bytes]:
    """JSON of any shape that lacks the contract's required fields (so it can never be valid)."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
    objects = st.dictionaries(st.text(max_size=12).filter(lambda k: k not in REQUIRED), values, max_size=5)
    return (values | objects).map(lambda v: json.dumps(v).encode())


def garbage_for(topic: str) -> st.SearchStrategy[bytes]:
    """Random bytes, shapeless JSON, or a good message broken in one of the contract's ways."""
    kind = KIND[topic]
    examples = [json.loads(raw) for t, raw in GOOD_INPUTS if t == topic] or GOOD_REQUESTS
    broken = st.builds(lambda fault, i, seed: corrupt(kind, examples[i % len(examples)], random.Random(seed),
                                                      fault).raw,
                       st.sampled_from(FAULTS[kind]), st.integers(0, 10_000), st.integers(0, 2**32))
    return st.binary(max_size=200) | json_garbage() | broken


def mixed(good: list, topics: list[str]) -> st.SearchStrategy[tuple[list, list]]:
    """``good`` with up to 25 broken messages inserted anywhere; and the broken ones."""
    insert = st.sampled_from(topics).flatmap(lambda t: st.tuples(st.just(t), garbage_for(t)))
    return st.lists(st.tuples(st.integers(0, len(good)), insert), max_size=25).map(
        lambda extra: (_insert(good, extra), [message for _, message in extra]))


def _insert(good: list, extra: list) -> list:
    out = list(good)
    for position, message in sorted(extra, key=lambda e: -e[0]):
        out.insert(position, message)
    return out


def record(topic: str, offset: int, raw: bytes) -> tuple[TopicPartition, ConsumerRecord]:
    return TopicPartition(topic, 0), ConsumerRecord(topic, 0, offset, 0, 0, None, raw, None, 0, len(raw), ())


def join(messages: list[tuple[str, bytes]]) -> tuple[dict[str, bool], list[dict]]:
    """Bags (impression_id -> clicked) and dead letters from a joiner fed ``messages``, all windows closed."""
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory))
        joiner = Joiner(UNUSED, TOPICS, JoinWindow(WINDOW), store)
        tx = store.transaction()
        for offset, (topic, raw) in enumerate(messages):
            joiner.apply(tx, *record(topic, offset, raw))
        joiner.join.sweep(tx, watermark=float("inf"))
        out = [json.loads(value) for _, (topic, _, value) in tx.commit()]
        store.close()
    bags = {m["impression_id"]: Bag.model_validate(m).clicked for m in out if "clicked" in m}
    return bags, [m for m in out if "clicked" not in m]


CLEAN_BAGS, _ = join(GOOD_INPUTS)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mixed(GOOD_INPUTS, [TOPICS.impressions, TOPICS.clicks]))
def test_the_joiner_gives_good_impressions_the_same_bags_whatever_garbage_is_mixed_in(case):
    messages, broken = case
    bags, dead = join(messages)
    assert bags == CLEAN_BAGS
    assert len(dead) == len(broken)
    for letter in dead:
        assert letter["topic"] in (TOPICS.impressions, TOPICS.clicks) and letter["error"]
        assert len(letter["raw"]) <= MAX_RAW_CHARS


@pytest.fixture(scope="module")
def snapshot_dir(small_world, tmp_path_factory) -> Path:
    _, bags = small_world
    torch.manual_seed(0)
    learner = Learner()
    learner.learn(bags[:4096])
    directory = tmp_path_factory.mktemp("garbage") / "snapshots"
    SnapshotStore(directory).save(learner.model, version=3, bags_seen=4096, steps=4,
                                  train_config=learner.preset.train.to_dict())
    return directory


def answer(snapshot_dir: Path, messages: list[tuple[str, bytes]]) -> tuple[list[dict], list[dict], list[dict]]:
    """(responses, error responses, dead letters) of a selector serving the snapshot, 10% explore, fixed seed."""
    agent = SelectorAgent(UNUSED, TOPICS, explore=0.1)
    agent.serve_snapshot(SnapshotStore(snapshot_dir).load())
    assert agent.policy.version == 3
    agent.policy.rng = random.Random(0)
    out = [json.loads(value) for topic, _, value in agent.answer([record(t, i, raw) for i, (t, raw)
                                                                   in enumerate(messages)])]
    responses = [{k: v for k, v in r.items() if k != "ts"} for r in out if "shown" in r]
    return responses, [r for r in out if set(r) == {"request_id", "error"}], [r for r in out if "raw" in r]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(mixed([(TOPICS.requests, json.dumps(r).encode()) for r in GOOD_REQUESTS], [TOPICS.requests]))
def test_the_selector_gives_good_requests_the_same_responses_whatever_garbage_is_mixed_in(snapshot_dir, case):
    messages, broken = case
    clean, _, _ = answer(snapshot_dir, [(TOPICS.requests, json.dumps(r).encode()) for r in GOOD_REQUESTS])
    responses, errors, dead = answer(snapshot_dir, messages)
    assert responses == clean
    assert len(dead) == len(broken) and all(letter["error"] for letter in dead)
    readable = [request_id for _, raw in broken if (request_id := _request_id(raw))]
    assert sorted(e["request_id"] for e in errors) == sorted(readable), "an error response where the id is legible"


def _request_id(raw: bytes) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    request_id = value.get("request_id") if isinstance(value, dict) else None
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= 256 else None
