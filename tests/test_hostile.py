"""Hostile input thrown at each agent's handling code (property-based, hypothesis): none of it raises.

The inputs the issue found could stop an agent for good: deep nesting, requests whose
validation errors run to megabytes, amplification (more candidates, or segments x
candidates, than a message may ask for), timestamps far in the future, and names made
of control characters. Whatever hypothesis combines of them, the selector answers or
refuses each request (error response and dead letter, the error at most 1 KiB and
printable, the reason one of a fixed set), the joiner and the learner dead-letter what
they refuse, and no event time reaches state beyond now + FUTURE_GRACE_S.
The real agent code on real RocksDB stores; the broker is left out so hypothesis can
try many cases (tests/test_clients.py sends the same kinds through genco serve).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest
from aiokafka import ConsumerRecord, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.deadletters import MAX_ERROR_CHARS, Reason
from contract.events import FUTURE_GRACE_S, MAX_SEGMENT_CROSSES, Bag, considered
from contract.window import JoinWindow
from learner.snapshots import SnapshotStore
from learner.trainer import Learner
from sim.world import World, WorldConfig
from state.kv import Store, decode_time
from stream.joiner import Joiner
from stream.kafka import Connection, Topics
from stream.selector import SelectorAgent
from stream.training import TrainingAgent

TOPICS = Topics("h.")
UNUSED = Connection(("127.0.0.1:1",))  # the agents' Kafka clients are never started here
WINDOW = 2.0
WORLD = World(WorldConfig(seed=8, n_ads=5))
REASONS = {str(r) for r in Reason}

names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=256)  # control characters included
ids = st.text(min_size=1, max_size=12)


def nested(depth: int, opener: str) -> bytes:
    return (opener * depth).encode()


deep = st.builds(nested, st.integers(100, 5000), st.sampled_from(["[", '{"a":', '{"candidates":[']))
future_ts = st.floats(1e10, 1e300)


@st.composite
def requests(draw) -> bytes:
    """A request that is hostile one way or several: huge errors, amplification, hostile names."""
    components = draw(st.sampled_from([1, 3, 7, 64]))
    per_component = draw(st.sampled_from([1, 15, 1000, 1001]))
    valued = draw(st.booleans())  # else ints: one validation error per candidate
    candidates = {f"{draw(names)}{c}": [f"e{j}" if valued else j for j in range(per_component)]
                  for c in range(components)}
    segments = [f"s{i}" for i in range(draw(st.sampled_from([0, 3, 100, 1000])))]
    return json.dumps({"request_id": draw(ids), "ad_id": draw(names), "candidates": candidates,
                       "query": {"segments": segments}, "ts": draw(future_ts | st.none())}).encode()


@st.composite
def impressions(draw) -> bytes:
    bag = WORLD.uniform_log(1)[0]
    impression = {k: v for k, v in bag.items() if k not in ("clicked", "click_ts")}
    impression["impression_id"] = draw(ids)
    impression["ts"] = draw(future_ts | st.floats(1e9, 2e9))
    if draw(st.booleans()):  # a component name of control characters, still a valid impression
        name = draw(names)
        impression["candidates"][name] = ["x"]
        impression["shown"][name] = "x"
    return json.dumps(impression).encode()


def clicks() -> st.SearchStrategy[bytes]:
    return st.builds(lambda i, ts: json.dumps({"impression_id": i, "ts": ts}).encode(), ids, future_ts)


def record(topic: str, offset: int, raw: bytes) -> tuple[TopicPartition, ConsumerRecord]:
    return TopicPartition(topic, 0), ConsumerRecord(topic, 0, offset, 0, 0, None, raw, None, 0, len(raw), ())


def assert_bounded(letter: dict) -> None:
    assert letter["reason"] in REASONS
    assert len(letter["error"]) <= MAX_ERROR_CHARS and letter["error"].isprintable()


@pytest.fixture(scope="module")
def snapshot_dir(tmp_path_factory) -> Path:
    learner = Learner()
    learner.learn([Bag.model_validate(bag) for bag in WORLD.uniform_log(256)])
    directory = tmp_path_factory.mktemp("hostile") / "snapshots"
    SnapshotStore(directory).save(learner.model, version=1, bags_seen=256, steps=1,
                                  train_config=learner.preset.train.to_dict())
    return directory


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(requests() | deep, min_size=1, max_size=4))
def test_the_selector_answers_or_refuses_every_hostile_request(snapshot_dir, raws):
    agent = SelectorAgent(UNUSED, TOPICS, explore=0.0)
    agent.serve_snapshot(SnapshotStore(snapshot_dir).load())
    good = [WORLD.request(f"good-{i}") for i in range(3)]
    messages = [*raws, *(json.dumps(r).encode() for r in good)]
    out = agent.answer([record(TOPICS.requests, i, raw) for i, raw in enumerate(messages)])
    letters = [json.loads(v) for t, _, v in out if t == TOPICS.dead_letters]
    responses = [json.loads(v) for t, _, v in out if t == TOPICS.responses]
    answered = [r for r in responses if "shown" in r]
    assert [r["request_id"] for r in answered][-3:] == [r["request_id"] for r in good], "good requests answered"
    assert len(answered) + len(letters) == len(messages), "each request answered or dead-lettered, once"
    for letter in letters:
        assert_bounded(letter)
    for response in responses:
        assert len(response.get("error", "")) <= MAX_ERROR_CHARS
    sent = {request["request_id"]: request for request in map(_object, messages) if request}
    for response in answered[:-3]:  # a hostile request that was served stayed within the caps
        request = sent[response["request_id"]]
        assert considered(request["candidates"]) * len(request["query"]["segments"]) <= MAX_SEGMENT_CROSSES


def _object(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([TOPICS.impressions, TOPICS.clicks]), impressions() | clicks() | deep),
                min_size=1, max_size=12))
def test_the_joiner_keeps_no_state_beyond_now_whatever_the_timestamps(messages):
    now = time.time()
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory))
        joiner = Joiner(UNUSED, TOPICS, JoinWindow(WINDOW), store)
        joiner.join.clock = lambda: now
        tx = store.transaction()
        for offset, (topic, raw) in enumerate(messages):
            joiner.apply(tx, *record(topic, offset, raw))
        letters = [json.loads(v) for _, (t, _, v) in tx.commit() if t == TOPICS.dead_letters]
        latest = now + FUTURE_GRACE_S + joiner.join.window.horizon_s
        for prefix in (b"t", b"u", b"e"):
            for key, _ in store.scan(prefix):
                assert decode_time(key[1:9]) <= latest, "an expiry index beyond now + grace + horizon"
        store.close()
    for letter in letters:
        assert_bounded(letter)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                HealthCheck.function_scoped_fixture])
@given(st.lists(impressions() | deep | requests(), min_size=1, max_size=4), st.booleans())
def test_the_learner_keeps_its_dedupe_whatever_the_bags(tmp_path_factory, raws, clicked):
    state = tmp_path_factory.mktemp("learner")
    agent = TrainingAgent(UNUSED, TOPICS, state, JoinWindow(WINDOW))
    old = WORLD.uniform_log(2)
    for i, bag in enumerate(old):  # trained and checkpointed before the hostile bags came
        agent.admit(*record(TOPICS.bags, i, json.dumps({**bag, "ts": time.time()}).encode()))
    agent.publish(checkpoint=True)
    hostile = [raw[:-1] + f',"clicked":{str(clicked).lower()}}}'.encode() if raw[-1:] == b"}" else raw
               for raw in raws]
    admitted, sources, letters = [], [], []
    for offset, raw in enumerate(hostile, start=len(old)):
        tp, rec = record(TOPICS.bags, offset, raw)
        outcome = agent.admit(tp, rec)
        if isinstance(outcome, tuple):
            letters.append(json.loads(outcome[2]))
        elif outcome is not None:
            admitted.append(outcome)
            sources.append((tp, rec))
    letters += [json.loads(v) for _, _, v in agent.train_isolating(admitted, sources)]
    agent.publish(checkpoint=True)
    assert all(bag["impression_id"] in agent.trained_ids for bag in old), "a future ts expired the trained marks"
    for letter in letters:
        assert_bounded(letter)
    agent.store.close()
