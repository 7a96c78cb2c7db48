"""Faults on a real broker: SIGKILL of ``genco serve`` and restart, a frozen broker, 5 MB values. Nothing lost.

Each test runs the simulated ad server's closed loop through the contract and checks:
every request answered, every impression exactly one label (the one its clicks imply),
the model trained on each impression once, model_version never going back.
"""

from __future__ import annotations

import asyncio
import random
import re
import time

import pytest

from contract.deadletters import MAX_RAW_CHARS
from contract.settings import Settings
from contract.window import JoinWindow
from learner.snapshots import SnapshotStore
from sim.adserver import AdServer, Report
from sim.garbage import corrupt
from sim.harness import WINDOW, bags_seen, freeze, kill_and_restart, serve_log, start_serve, stop_serve, wait_ready
from sim.world import World, WorldConfig
from state.kv import Store
from stream.embedded import EmbeddedBroker
from stream.joiner import Joiner
from stream.kafka import Connection
from stream.selector import SelectorAgent
from tests.kafka_helpers import produce, read_all

SERVED = re.compile(r"serving snapshot v(\d+)")  # the selector's log line as it swaps in a snapshot

pytestmark = pytest.mark.integration


def run_closed_loop(broker: str, topics, rate: float, requests: int, fault) -> Report:
    """Drive the ad server while ``fault()`` (a coroutine) does its damage; wait for every answer."""
    connection = Connection.from_settings(Settings(), broker)
    server = AdServer(World(WorldConfig(seed=7, n_ads=60)), connection, topics, rate=rate, requests=requests,
                      window_s=WINDOW, window_every_s=10)

    async def scenario() -> Report:
        damage = asyncio.create_task(fault())
        report = await server.run(drain_s=90)
        await damage
        return report

    return asyncio.run(scenario())


def assert_nothing_lost(broker: str, topics, report: Report, state_dir, selectors: int = 1) -> None:
    """Every request answered, every impression one bag with the label its clicks imply, and (once the running
    serve's learner has caught up, or after a minute) a model trained on each bag once; a failure names what
    was lost. With one selector, model_version never goes back (several each follow the versions on their
    own, so their answers interleave)."""
    assert report.invalid == [], report.invalid[:5]
    assert report.answered == report.sent, f"{report.sent - report.answered} requests never answered"
    bags = asyncio.run(read_all(broker, topics.bags, lambda m: len({b["impression_id"] for b in m})
                                >= len(report.labels), timeout_s=60, settle_s=1))
    labels: dict[str, bool] = {}
    for bag in bags:
        assert labels.setdefault(bag["impression_id"], bag["clicked"]) == bag["clicked"], \
            f"the bag of {bag['impression_id']} changed label"
    missing = sorted(set(report.labels) - set(labels))
    assert not missing, f"{len(missing)} impressions got no bag, e.g. {missing[:5]}"
    unknown = sorted(set(labels) - set(report.labels))
    assert not unknown, f"{len(unknown)} bags for impressions never shown, e.g. {unknown[:5]}"
    wrong = sorted(i for i, clicked in labels.items() if clicked != report.labels[i])
    assert not wrong, f"{len(wrong)} bags labelled against their clicks, e.g. {wrong[:5]}"
    assert selectors > 1 or report.versions == sorted(report.versions), "model_version went back"
    deadline = time.monotonic() + 60
    while (seen := bags_seen(state_dir)) < len(report.labels) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert seen == len(report.labels), (
        f"the newest snapshot trained on {seen} bags of {len(report.labels)}: "
        + (f"{len(report.labels) - seen} bags lost before the model" if seen < len(report.labels)
           else f"{seen - len(report.labels)} trained twice"))


@pytest.mark.slow
def test_sigkill_halfway_and_restart_loses_nothing_and_trains_each_impression_once(broker, topics, tmp_path):
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics([topics.requests, topics.impressions, topics.clicks], partitions=4)
    serves = [start_serve(broker, topics, tmp_path)]
    served_before_kill: list[int] = []

    def note_served_versions() -> None:
        served_before_kill.extend(int(version) for version in SERVED.findall(serve_log(tmp_path)))

    try:
        wait_ready(tmp_path)  # requests sent earlier would wait, not be lost
        report = run_closed_loop(broker, topics, rate=200, requests=8000,  # kill halfway through sending
                                 fault=lambda: kill_and_restart(serves, broker, topics, tmp_path, after_s=20,
                                                                on_down=note_served_versions))
        assert_nothing_lost(broker, topics, report, tmp_path)
    finally:
        stop_serve(serves[-1])
    log = serve_log(tmp_path)
    assert bags_seen(tmp_path) == len(report.labels), "the model trained on every impression exactly once"
    assert "resuming from checkpoint" in log, "the restarted learner continued from its checkpoint, not from 0"
    newest = SnapshotStore(tmp_path / "snapshots").latest_version()
    assert served_before_kill and newest > max(served_before_kill), "versions continue after the restart"
    assert "exited with status" not in log, log[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("change", ["sigkill", "scale"])
def test_two_serves_form_one_deployment_and_the_survivor_loses_nothing(broker, topics, tmp_path, change):
    """Two ``genco serve`` processes, every role in each, each on its own state dir, input topics of four
    partitions. The first holds the joiner and the learner (the second's stand by, ``stream.one_active``); the
    two selectors share the requests. ``sigkill``: the second runs from the start, the first is SIGKILLed
    halfway and left dead. ``scale``: the second joins mid-run (scale up), then the first leaves on SIGTERM
    (scale down). Either way the survivor takes over, its learner from the first's last checkpoint on Kafka,
    and every impression is trained once."""
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics([topics.requests, topics.impressions, topics.clicks], partitions=4)
    first, second = tmp_path / "first", tmp_path / "second"
    serves = [start_serve(broker, topics, first)]

    async def fault() -> None:
        if change == "scale":
            await asyncio.sleep(8)
            serves.append(start_serve(broker, topics, second))
            await asyncio.to_thread(wait_ready, second, agents=("selector",))
            await asyncio.sleep(5)
            serves[0].terminate()
        else:
            await asyncio.sleep(20)
            serves[0].kill()
        await asyncio.to_thread(serves[0].wait)

    try:
        wait_ready(first)
        if change == "sigkill":
            serves.append(start_serve(broker, topics, second))
            wait_ready(second, agents=("selector",))  # its joiner and learner stand by while the first works
        report = run_closed_loop(broker, topics, rate=200, requests=8000, fault=fault)
        assert_nothing_lost(broker, topics, report, second, selectors=2)
        newest_before = max(map(int, SERVED.findall(serve_log(first))))
        deadline = time.monotonic() + 30  # the survivor's learner has trained every bag: its version is coming
        while max(map(int, SERVED.findall(serve_log(second))), default=0) <= newest_before:
            assert time.monotonic() < deadline, f"nothing after v{newest_before} served:\n{serve_log(second)[-3000:]}"
            time.sleep(0.5)
    finally:
        for serve in serves:
            if serve.poll() is None:
                stop_serve(serve)
    assert max(report.latencies_ms) < 30_000, f"a request waited {max(report.latencies_ms) / 1000:.1f} s"
    before = serve_log(first)
    assert "genco.joiner    INFO    assigned" in before and "genco.learner   INFO    assigned" in before
    assert change == "sigkill" or "stopped cleanly" in before
    after = serve_log(second)
    assert "genco.joiner    INFO    assigned" in after and "genco.learner   INFO    assigned" in after, \
        "the survivor's joiner and learner took over"
    assert "epoch 2" in after and "exited with status" not in after, after[-3000:]
    assert "of the checkpoint topic" in after, "the survivor's learner resumed from the first's checkpoint"


@pytest.mark.slow
def test_a_spare_selector_takes_over_the_partition_of_a_killed_one_and_answers_every_request(broker, topics,
                                                                                              tmp_path):
    """More selectors than request partitions (one, genco's default): one Faust consumer holds the partition,
    the other stands by with none. The holder is SIGKILLed and the other must answer every request from the
    holder's last commit on. Faust resumes a newly assigned partition before seeking it to the committed
    offset (faust-streaming PR #241), a window in which a worker that held nothing can drop records and
    commit past them."""
    Connection.from_settings(Settings(), broker).ensure_genco_topics(topics)
    dirs = [tmp_path / "first", tmp_path / "second"]
    serves = [start_serve(broker, topics, dirs[0], agents=("selector",))]
    killed: list[int] = []

    async def fault() -> None:
        serves.append(start_serve(broker, topics, dirs[1], agents=("selector",)))
        await asyncio.sleep(12)  # the second has joined: the group's rebalance gave the partition to one of them
        holder = 1 if "assigned" in serve_log(dirs[1]) else 0
        serves[holder].kill()
        await asyncio.to_thread(serves[holder].wait)
        killed.append(holder)

    try:
        wait_ready(dirs[0], agents=("selector",))
        report = run_closed_loop(broker, topics, rate=200, requests=5000, fault=fault)
    finally:
        for serve in serves:
            if serve.poll() is None:
                stop_serve(serve)
    assert report.invalid == [], report.invalid[:5]
    assert report.answered == report.sent, f"{report.sent - report.answered} requests never answered"
    survivor = serve_log(dirs[1 - killed[0]])
    assert "assigned 1 partitions" in survivor and "exited with status" not in survivor, survivor[-3000:]


@pytest.mark.slow
def test_a_frozen_broker_is_waited_out_without_restarts_or_loss(topics, tmp_path):
    with EmbeddedBroker() as broker:  # its own broker: SIGSTOP must not freeze the other tests'
        connection = Connection.from_settings(Settings(), broker.url)
        connection.ensure_topics([topics.requests, topics.impressions, topics.clicks], partitions=4)
        serve = start_serve(broker.url, topics, tmp_path)
        wait_ready(tmp_path)
        try:
            report = run_closed_loop(broker.url, topics, rate=200, requests=7000,
                                     fault=lambda: freeze(broker, after_s=12, for_s=15))
            assert_nothing_lost(broker.url, topics, report, tmp_path)
        finally:
            stop_serve(serve)
        log = serve_log(tmp_path)
        assert bags_seen(tmp_path) == len(report.labels), "the model trained on every impression exactly once"
        assert "exited with status" not in log, "agents waited for the broker instead of dying: " + log[-3000:]
        assert "no fetch answered by the broker" in log and "broker answering again" in log, "outage logged plainly"
        assert serve.returncode == 0, log[-3000:]


def test_5_mb_values_on_every_input_topic_become_truncated_dead_letters_and_traffic_flows_on(broker, topics, tmp_path):
    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics(topics.all())
    world = World(WorldConfig(seed=2, n_ads=5))
    good = world.uniform_log(1)[0]
    impression = {k: v for k, v in good.items() if k not in ("clicked", "click_ts")}
    request = world.request("r-good")
    big = {"request": corrupt("request", request, random.Random(0), "big_value"),
           "impression": corrupt("impression", impression, random.Random(0), "big_value"),
           "click": corrupt("click", {"impression_id": "imp-x", "ts": 1.0}, random.Random(0), "big_value")}
    joiner = Joiner(connection, topics, JoinWindow(WINDOW), Store(tmp_path / "joiner"))
    selector = SelectorAgent(connection, topics, explore=0.0)

    async def scenario() -> tuple[list[dict], list[dict], list[dict]]:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(agent.run(stop)) for agent in (joiner, selector)]
        await asyncio.wait_for(asyncio.gather(joiner.ready.wait(), selector.ready.wait()), 60)
        await produce(broker, [(topics.requests, None, big["request"].raw), (topics.requests, "r-good", request),
                               (topics.impressions, None, big["impression"].raw),
                               (topics.impressions, impression["impression_id"], impression),
                               (topics.clicks, None, big["click"].raw)])
        dead = await read_all(broker, topics.dead_letters, lambda m: len(m) >= 3, timeout_s=30)
        responses = await read_all(broker, topics.responses, lambda m: len(m) >= 2, timeout_s=30)
        bags = await read_all(broker, topics.bags, lambda m: len(m) >= 1, timeout_s=30)
        stop.set()
        await asyncio.gather(*tasks)
        return dead, responses, bags

    dead, responses, bags = asyncio.run(scenario())
    assert sorted(d["topic"] for d in dead) == sorted([topics.requests, topics.impressions, topics.clicks])
    assert all(len(d["raw"]) == MAX_RAW_CHARS for d in dead), "the original bytes, truncated at 64 KiB"
    assert sorted(d["error"] for d in dead) == ["candidates: Field required"] * 2 + ["ts: Field required"]
    assert {r["request_id"]: "error" in r for r in responses} == {big["request"].request_id: True, "r-good": False}
    assert [b["impression_id"] for b in bags] == [impression["impression_id"]]


def test_an_output_the_broker_refuses_becomes_a_dead_letter_instead_of_being_retried_for_ever(broker, topics):
    from stream.kafka import MAX_MESSAGE_BYTES
    from stream.runtime import send_all

    connection = Connection.from_settings(Settings(), broker)
    connection.ensure_topics(topics.all())
    too_large = b'{"pad": "' + b"x" * MAX_MESSAGE_BYTES + b'"}'

    async def scenario() -> None:
        producer = connection.producer()
        await producer.start()
        try:
            await asyncio.wait_for(send_all(producer, [(topics.bags, b"imp-big", too_large),
                                                       (topics.bags, b"imp-ok", b'{"ok": true}')],
                                            topics.dead_letters), 60)
        finally:
            await producer.stop()

    asyncio.run(scenario())
    dead = asyncio.run(read_all(broker, topics.dead_letters, lambda m: len(m) >= 1, timeout_s=30))
    assert [(d["topic"], d["reason"]) for d in dead] == [(topics.bags, "output_refused")]
    assert len(dead[0]["raw"]) == MAX_RAW_CHARS and "MessageSizeTooLarge" in dead[0]["error"]
    assert asyncio.run(read_all(broker, topics.bags, lambda m: len(m) >= 1, timeout_s=30)) == [{"ok": True}]
