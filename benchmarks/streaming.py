"""Streaming benchmarks on the embedded broker, each beside plain aiokafka on the same broker in the same run.

    python benchmarks/streaming.py [--n 30000] [--json bench-out/streaming.json]

- floor: plain aiokafka produce, consume + json.loads, and consume -> decode -> encode -> produce
- joiner: impressions/s of one Joiner process draining a backlog (10% clicked)
- selector: requests/s of one SelectorAgent draining a backlog, with a trained snapshot
- learner: bags/s of one TrainingAgent (a Faust agent) training on a backlog, snapshots and checkpoints
  included, beside the same bags through ``Learner.learn`` in process
- freshness: closed loop at 300 requests/s; click -> first snapshot that trained on its bag (p50, p90)
- late_selector: a selector started after a whole chain (a base and 59 deltas of a catalogue world's model,
  1,024 bags apart) is on the snapshot topic: seconds until it serves the newest, and until it answers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from contract.events import Bag
from contract.settings import Settings
from contract.window import JoinWindow
from learner.compute import configure_compute
from learner.publications import BASE_EVERY, Differ, encode
from learner.snapshots import SnapshotError, SnapshotStore
from learner.trainer import Learner
from sim.adserver import AdServer
from sim.harness import read_topic
from sim.world import World, WorldConfig
from sim.zoo import draw_world
from state.kv import Store
from stream.embedded import EmbeddedBroker
from stream.joiner import Joiner
from stream.kafka import Connection, Topics
from stream.selector import SelectorAgent
from stream.serve import running_agents
from stream.snapshot_topic import SnapshotPublisher
from stream.training import TrainingAgent


async def load(servers: list[str], messages: list[tuple[str, bytes, bytes]]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=servers, linger_ms=5, max_batch_size=512 << 10)
    await producer.start()
    start = time.perf_counter()
    for topic, key, value in messages:
        await producer.send(topic, value, key=key)
    await producer.flush()
    elapsed = time.perf_counter() - start
    await producer.stop()
    return len(messages) / elapsed


async def count_until(servers: list[str], topic: str, n: int, timeout_s: float = 300) -> float:
    """Seconds until ``n`` messages are on ``topic`` (polled from the start)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, group_id=None, fetch_max_wait_ms=100)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or {0}]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    seen, start = 0, time.perf_counter()
    while seen < n and time.perf_counter() - start < timeout_s:
        seen += sum(len(r) for r in (await consumer.getmany(timeout_ms=200)).values())
    await consumer.stop()
    return time.perf_counter() - start


async def drain(agent, is_ready, servers: list[str], topic: str, n: int) -> float:
    """Seconds a running agent takes to put ``n`` messages on ``topic``, timed once ``is_ready()`` holds."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    while not is_ready():
        await asyncio.sleep(0.05)
    elapsed = await count_until(servers, topic, n)
    stop.set()
    await task
    return elapsed


async def floor(servers: list[str], topic: str, out: str, n: int) -> dict:
    """Plain aiokafka on the same messages: consume + json.loads, and a pass-through re-producing each."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=servers, group_id=None, auto_offset_reset="earliest",
                                fetch_max_bytes=16 << 20)
    await consumer.start()
    seen, start = 0, time.perf_counter()
    while seen < n:
        for records in (await consumer.getmany(timeout_ms=500, max_records=2000)).values():
            for r in records:
                json.loads(r.value)
            seen += len(records)
    consume = n / (time.perf_counter() - start)
    await consumer.seek_to_beginning()
    producer = AIOKafkaProducer(bootstrap_servers=servers, linger_ms=2, max_batch_size=512 << 10)
    await producer.start()
    seen, start = 0, time.perf_counter()
    while seen < n:
        futures = []
        for records in (await consumer.getmany(timeout_ms=500, max_records=2000)).values():
            for r in records:
                futures.append(await producer.send(out, json.dumps(json.loads(r.value)).encode(), key=r.key))
            seen += len(records)
        await asyncio.gather(*futures)
    through = n / (time.perf_counter() - start)
    await consumer.stop()
    await producer.stop()
    return {"consume_json_per_s": round(consume), "pass_through_per_s": round(through)}


def bench_joiner(url: str, world: World, n: int, state: Path) -> dict:
    topics = Topics("bj.")
    connection = Connection.from_settings(Settings(), url)
    servers = list(connection.servers)
    connection.ensure_topics(topics.all())
    # The backlog is stamped in the past, ending 2 s ago, and followed by one impression stamped now: once
    # the joiner reads that one, every backlog window has closed in event time (a 1 s window), so the drain
    # times the join's work plus the watermark's settle, a fixed delay that is subtracted and reported.
    log = world.uniform_log(n + 1)
    start_ts, rng, messages = time.time() - 2.0 - n * 0.002, random.Random(0), []
    for i, bag in enumerate(log):
        ts = start_ts + i * 0.002 if i < n else time.time()
        bag.update(ts=ts, impression_id=f"imp-{i}")
        bag.pop("clicked"), bag.pop("click_ts", None)
        messages.append((topics.impressions, f"imp-{i}".encode(), json.dumps(bag).encode()))
        if rng.random() < 0.1:
            messages.append((topics.clicks, f"imp-{i}".encode(),
                             json.dumps({"impression_id": f"imp-{i}", "ts": ts + 0.5}).encode()))
    produce_rate = asyncio.run(load(servers, messages))
    raw = asyncio.run(floor(servers, topics.impressions, "bj.floor-out", n))
    window = JoinWindow(1.0)
    joiner = Joiner(connection, topics, window, Store(state / "joiner"))
    elapsed = asyncio.run(drain(joiner, joiner.ready.is_set, servers, topics.bags, n))
    rate = n / (elapsed - window.grace_s)
    return {"impressions": n, "producer_per_s": round(produce_rate), **raw, "drain_s": round(elapsed, 2),
            "settle_s": window.grace_s, "joiner_impressions_per_s": round(rate),
            "ratio_to_pass_through": round(rate / raw["pass_through_per_s"], 3)}


async def publish_version(publisher: SnapshotPublisher, differ: Differ, learner: Learner, version: int) -> int:
    """``learner``'s model as ``version`` on the snapshot topic, as the learner agent publishes it; its bytes."""
    weights = {name: value.detach().numpy() for name, value in learner.model.weights().items()}
    publication = differ.publication(weights, {"version": version, "model_config": learner.model.config.to_dict(),
                                               "serving": "genco"})
    blob = encode(publication)
    await publisher.publish(version, publication.manifest["kind"] == "base", blob)
    return len(blob)


async def publish_model(connection: Connection, topics: Topics, learner: Learner) -> None:
    """``learner``'s model as version 1, alone on the snapshot topic."""
    publisher = SnapshotPublisher(connection, topics.snapshots)
    await publisher.open()
    await publish_version(publisher, Differ(), learner, 1)
    await publisher.close()


def bench_selector(url: str, world: World, n: int, state: Path) -> dict:
    topics = Topics("bs.")
    connection = Connection.from_settings(Settings(), url)
    servers = list(connection.servers)
    connection.ensure_topics(topics.all())
    learner = Learner()
    learner.learn([Bag.model_validate(b) for b in world.uniform_log(20_000)])
    asyncio.run(publish_model(connection, topics, learner))
    requests = [world.request(f"r-{i}") for i in range(n)]
    asyncio.run(load(servers, [(topics.requests, r["request_id"].encode(), json.dumps(r).encode())
                               for r in requests]))
    raw = asyncio.run(floor(servers, topics.requests, "bs.floor-out", n))
    agent = SelectorAgent(connection, topics, explore=0.05)
    elapsed = asyncio.run(drain(agent, lambda: agent.policy.version == 1, servers, topics.responses, n))
    rate = n / elapsed
    return {"requests": n, **raw, "selector_requests_per_s": round(rate),
            "ratio_to_pass_through": round(rate / raw["pass_through_per_s"], 3)}


def bench_learner(url: str, world: World, n: int, state: Path) -> dict:
    """The single active learner bounds a deployment: the bags/s it trains is the traffic one learner serves."""
    topics = Topics("bt.")
    connection = Connection.from_settings(Settings(), url)
    servers = list(connection.servers)
    connection.ensure_topics(topics.all())
    log = world.uniform_log(n)
    asyncio.run(load(servers, [(topics.bags, bag["impression_id"].encode(), json.dumps(bag).encode())
                               for bag in log]))
    raw = asyncio.run(floor(servers, topics.bags, "bt.floor-out", n))
    bags = [Bag.model_validate(bag) for bag in log]
    start = time.perf_counter()
    Learner().learn(bags)
    in_process = n / (time.perf_counter() - start)
    agent = TrainingAgent(connection, topics, state, JoinWindow(60.0))

    async def train_all() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await agent.ready.wait()
        start = time.perf_counter()
        while agent.learner.bags_seen < n:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - start
        stop.set()
        await task
        return elapsed

    rate = n / asyncio.run(train_all())
    return {"bags": n, **raw, "in_process_bags_per_s": round(in_process), "learner_bags_per_s": round(rate),
            "ratio_to_in_process": round(rate / in_process, 3)}


def bench_late_selector(url: str) -> dict:
    topics = Topics("bl.")
    connection = Connection.from_settings(Settings(), url)
    connection.ensure_topics(topics.all())
    bags = [Bag.model_validate(b) for b in draw_world("catalogue", 0).uniform_log(BASE_EVERY * 1024)]
    learner = Learner()

    async def publish_chain() -> list[int]:
        publisher, differ, sizes = SnapshotPublisher(connection, topics.snapshots), Differ(), []
        await publisher.open()
        for version in range(1, BASE_EVERY + 1):
            learner.step(bags[(version - 1) * 1024 : version * 1024])
            sizes.append(await publish_version(publisher, differ, learner, version))
        await publisher.close()
        return sizes

    async def start_selector() -> tuple[SelectorAgent, float, float]:
        agent, stop = SelectorAgent(connection, topics, explore=0.0), asyncio.Event()
        started = time.monotonic()
        task = asyncio.create_task(agent.run(stop))
        await agent.caught_up.wait()
        caught_up = time.monotonic() - started
        await agent.ready.wait()
        ready = time.monotonic() - started
        stop.set()
        await task
        return agent, caught_up, ready

    sizes = asyncio.run(publish_chain())
    agent, caught_up, ready = asyncio.run(start_selector())
    return {"versions": len(sizes), "chain_mib": round(sum(sizes) / 2**20, 1), "base_mib": round(sizes[0] / 2**20, 1),
            "delta_mib_mean": round(sum(sizes[1:]) / len(sizes[1:]) / 2**20, 2), "version_served": agent.policy.version,
            "serving_newest_s": round(caught_up, 2), "answering_s": round(ready, 2)}


def bench_freshness(url: str, state: Path, rate: float = 300, seconds: float = 40) -> dict:
    topics = Topics("bf.")
    settings = Settings(state_dir=str(state), click_window_s=2.0, metrics_port=0, topic_prefix=topics.prefix)
    connection = Connection.from_settings(settings, url)
    snapshots = SnapshotStore(state / "snapshots")
    published: list[tuple[int, float]] = []  # (bags_seen, when it appeared)
    done = threading.Event()

    def watch() -> None:
        last = 0
        while not done.is_set():
            version = snapshots.latest_version()
            if version > last:
                try:
                    published.append((snapshots.manifest(version).bags_seen, time.time()))
                    last = version
                except SnapshotError:  # half-written or pruned meanwhile
                    pass
            time.sleep(0.05)

    with running_agents(settings, url):
        time.sleep(12)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        server = AdServer(World(WorldConfig(seed=2, n_ads=200)), connection, topics, rate=rate,
                          requests=int(rate * seconds), window_s=2.0)
        asyncio.run(server.run())
        time.sleep(8)
        done.set()

    bags = asyncio.run(read_topic(connection, topics.bags))
    delays = []
    for index, bag in enumerate(bags):
        if bag["clicked"]:
            first = next((t for seen, t in published if seen >= index + 1), None)
            if first is not None:
                delays.append(first - bag["click_ts"])
    delays.sort()
    return {"clicked_bags": len(delays), "freshness_p50_s": round(delays[len(delays) // 2], 2),
            "freshness_p90_s": round(delays[int(0.9 * len(delays))], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30_000)
    parser.add_argument("--only", nargs="*", default=["joiner", "selector", "learner", "freshness", "late_selector"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    configure_compute()
    world = World(WorldConfig(seed=1, n_ads=200))
    results = {}
    for name in args.only:
        state = Path(tempfile.mkdtemp(prefix=f"genco-bench-{name}-"))
        try:
            with EmbeddedBroker() as broker:  # a fresh broker each: its cost grows with what it holds
                if name == "joiner":
                    results[name] = bench_joiner(broker.url, world, args.n, state)
                elif name == "selector":
                    results[name] = bench_selector(broker.url, world, args.n, state)
                elif name == "learner":
                    results[name] = bench_learner(broker.url, world, args.n, state)
                elif name == "late_selector":
                    results[name] = bench_late_selector(broker.url)
                else:
                    results[name] = bench_freshness(broker.url, state)
        finally:
            shutil.rmtree(state, ignore_errors=True)
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
