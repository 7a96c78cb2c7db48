"""The real ``genco serve`` as a subprocess, its log in a file: what reliability tests and benchmarks kill.

Also the faults they inflict (SIGKILL and restart, a frozen broker), reading back
what it wrote (a whole single-partition topic), and ``serve_loop``: sim/loop.py's closed
loop through it, scored the same way (benchmarks/live.py --kafka).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from contract.settings import AGENTS, Settings
from learner.snapshots import SnapshotError, SnapshotStore
from sim.adserver import AdServer, Report
from sim.loop import LoopConfig, LoopReport
from sim.truth import KnownTruth
from stream.embedded import EmbeddedBroker
from stream.kafka import Connection, Topics
from stream.serve import wait_until_ready

WINDOW = 2.0


TEST_CHECKPOINT_EVERY_S = 5.0  # tests kill and restart serves within seconds: each must have checkpoints to resume


def serve_env(broker: str, topics: Topics, state_dir: Path, metrics_port: int = 0,
              checkpoint_every_s: float | None = TEST_CHECKPOINT_EVERY_S) -> dict[str, str]:
    """The environment of a closed loop's ``genco serve``: a WINDOW-second click window, checkpoints every
    ``checkpoint_every_s`` (None: genco's default, as a deployment has it)."""
    env = {**os.environ, "GENCO_BROKER": broker, "GENCO_TOPIC_PREFIX": topics.prefix,
           "GENCO_STATE_DIR": str(state_dir), "GENCO_CLICK_WINDOW_S": str(WINDOW),
           "GENCO_METRICS_PORT": str(metrics_port)}
    if checkpoint_every_s is not None:
        env["GENCO_CHECKPOINT_EVERY_S"] = str(checkpoint_every_s)
    return env


def start_serve(broker: str, topics: Topics, state_dir: Path, metrics_port: int = 0,
                extra_env: dict[str, str] | None = None, agents: tuple[str, ...] = AGENTS,
                checkpoint_every_s: float | None = TEST_CHECKPOINT_EVERY_S) -> subprocess.Popen:
    """``genco serve --agents`` on ``broker`` (see ``serve_env``, plus ``extra_env``), its log in
    state_dir/serve.log."""
    env = {**serve_env(broker, topics, state_dir, metrics_port, checkpoint_every_s), **(extra_env or {})}
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(state_dir) / "serve.log", "a") as log:  # a file, not a pipe: a full pipe would block the agents
        return subprocess.Popen([sys.executable, "-m", "genco.cli", "serve", "--agents", ",".join(agents)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def stop_serve(serve: subprocess.Popen) -> None:
    """SIGTERM, and wait for the clean stop."""
    serve.send_signal(signal.SIGTERM)
    serve.wait(60)


async def kill_and_restart(serves: list[subprocess.Popen], broker: str, topics: Topics, state_dir: Path,
                           after_s: float, down_s: float = 2.0, on_down=None) -> None:
    """After ``after_s``, SIGKILL the newest serve in ``serves`` (no handler runs; its agents die with it,
    PR_SET_PDEATHSIG), call ``on_down()``, and after ``down_s`` append a restarted one on the same state."""
    await asyncio.sleep(after_s)
    serves[-1].kill()
    serves[-1].wait()
    if on_down:
        on_down()
    await asyncio.sleep(down_s)
    serves.append(start_serve(broker, topics, state_dir))


async def freeze(broker: EmbeddedBroker, after_s: float, for_s: float = 15.0) -> None:
    """After ``after_s``, stop the broker process dead (SIGSTOP) for ``for_s``: unreachable, data kept."""
    await asyncio.sleep(after_s)
    os.kill(broker.process.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(for_s)
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)


def serve_log(state_dir: Path) -> str:
    return (Path(state_dir) / "serve.log").read_text()


def wait_ready(state_dir: Path, timeout_s: float = 90.0, agents: tuple[str, ...] = AGENTS) -> None:
    """Until ``agents`` of the ``genco serve`` started on ``state_dir`` have their partitions."""
    if not wait_until_ready(Path(state_dir) / "metrics", agents, timeout_s=timeout_s):
        raise TimeoutError(f"genco serve not ready after {timeout_s:.0f} s:\n{serve_log(state_dir)[-3000:]}")


def bags_seen(state_dir: Path) -> int:
    """How many bags the newest snapshot's model has trained on (0 before any)."""
    store = SnapshotStore(Path(state_dir) / "snapshots")
    try:
        return store.manifest().bags_seen
    except SnapshotError:  # none yet, or pruned between reading LATEST and the manifest
        return 0


async def read_topic(connection: Connection, topic: str) -> list[dict]:
    """Every JSON message on partition 0 of ``topic``, up to its end now, in order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=list(connection.servers), group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        messages: list[dict] = []
        while len(messages) < end:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                messages.extend(json.loads(r.value) for r in records)
        return messages
    finally:
        await consumer.stop()


def serve_loop(world: KnownTruth, config: LoopConfig, seed: int) -> tuple[LoopReport, Report]:
    """sim/loop.py's ``run_loop`` in the real pipeline: ``config.requests`` requests of ``world`` at
    ``config.rate`` a second from the simulated ad server through ``genco serve`` (exploring
    ``config.explore``, clicks attributed within ``config.window_s``) on a fresh embedded broker, scored by
    tenth of the requests sent as ``run_loop`` scores them; and the ad server's report (answers, latencies).
    ``world`` is a KnownTruth that also draws requests (``request(request_id)``), as the ad server's is."""
    scored = LoopReport()
    rng = random.Random(seed)

    def score(request: dict, response: dict, p: float) -> None:
        i = int(request["request_id"].removeprefix("r-"))  # the ad server's ids count the requests sent
        scored.score(world, request, i, p, config, rng)

    topics = Topics("live.")
    with tempfile.TemporaryDirectory() as state, EmbeddedBroker() as broker:
        # checkpoints as often as a deployment writes them by default: the learner publishes each to Kafka
        serve = start_serve(broker.url, topics, Path(state), checkpoint_every_s=None, extra_env={
            "GENCO_CLICK_WINDOW_S": str(config.window_s), "GENCO_EXPLORE": str(config.explore)})
        try:
            wait_ready(Path(state))
            server = AdServer(world, Connection.from_settings(Settings(), broker.url), topics, rate=config.rate,
                              requests=config.requests, window_s=config.window_s, truth_sample=0.0, seed=seed)
            server.on_response = score
            report = asyncio.run(server.run())
        finally:
            stop_serve(serve)
    return scored, report
