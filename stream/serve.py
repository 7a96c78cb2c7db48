"""``genco serve``: the embedded broker when none is configured, the topics, and one process per agent.

Why processes: the learner's training steps and the selector's request loop must
not share a GIL (training would stall selection), and the joiner gets a core's
worth of Python to itself. The supervisor restarts an agent that dies, stops all
of them on SIGTERM/SIGINT, and serves their merged Prometheus metrics. Agents die
with the supervisor (PR_SET_PDEATHSIG), so a killed ``genco serve`` leaves no
orphan holding the RocksDB locks that its restart needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from contract.settings import AGENTS, Settings
from stream.agent import LOG_FORMAT
from stream.embedded import EmbeddedBroker, die_with_parent
from stream.kafka import Connection, Topics

log = logging.getLogger("genco.serve")

RESTART_MEMORY_S = 600.0  # genco_agent_recent_restarts counts the restarts of this long ago


class Supervisor:
    """Runs the agent processes; restarts one that dies; stops them all on ``stop()``.

    Every exit shows: the agent's metrics files are marked dead (so it no longer counts as
    ready), and its restarts, recent restarts and last exit status are metrics that
    ``genco status`` and the container healthchecks read.
    """

    def __init__(self, settings: Settings, broker: str, agents: tuple[str, ...] = AGENTS,
                 log_path: Path | None = None) -> None:
        """``log_path``: a file that takes the agents' output (appended to); without one they write to this
        process's stderr."""
        self.settings = settings
        self.broker = broker
        self.agents = agents
        self.log_path = log_path
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, deque[float]] = {name: deque() for name in agents}
        self.exited: set[str] = set()

    def spec(self, name: str) -> str:
        """GENCO_AGENT_SPEC for agent ``name``: no secret in it (the agent reads those from its environment)."""
        return json.dumps({"name": name, "broker": self.broker, "settings": self.settings.shareable()})

    def _spawn(self, name: str) -> None:
        with contextlib.ExitStack() as files:  # the child keeps its own copy of the log's descriptor
            log = files.enter_context(open(self.log_path, "ab")) if self.log_path else None
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "stream.agent"], preexec_fn=die_with_parent, stdout=log,
                stderr=subprocess.STDOUT if log else None, env={**os.environ, "GENCO_AGENT_SPEC": self.spec(name)})

    def start(self) -> None:
        for name in self.agents:
            self._spawn(name)

    def check(self) -> None:
        """Note any agent that exited, and restart it (at most once every 5 s each)."""
        from stream.metrics import AGENT_LAST_EXIT, AGENT_RECENT_RESTARTS, AGENT_RESTARTS

        now = time.monotonic()
        for name, process in self.processes.items():
            restarts = self.restarts[name]
            if process.poll() is not None and name not in self.exited:
                self.exited.add(name)
                _mark_dead(process.pid)
                AGENT_LAST_EXIT.labels(name, str(process.returncode)).set(time.time())
                log.error("agent %s exited with status %s; restarting it", name, process.returncode)
            if name in self.exited and now - (restarts[-1] if restarts else 0.0) > 5.0:
                restarts.append(now)
                AGENT_RESTARTS.labels(name).inc()
                self.exited.discard(name)
                self._spawn(name)
            while restarts and restarts[0] < now - RESTART_MEMORY_S:
                restarts.popleft()
            AGENT_RECENT_RESTARTS.labels(name).set(len(restarts))

    def stop(self, timeout_s: float = 30.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for name, process in self.processes.items():
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("agent %s did not stop in %.0f s; killing it", name, timeout_s)
                process.kill()
                process.wait()


def _mark_dead(pid: int) -> None:
    """Drop a dead process's live gauges (ready, lag, last fetch) from the merged metrics."""
    from prometheus_client import multiprocess

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


def prepare_metrics(state_dir: str) -> Path:
    """A fresh multiprocess metrics directory, set in the environment the agents inherit."""
    directory = Path(state_dir).resolve() / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


def start_metrics_server(port: int, host: str = "127.0.0.1") -> None:
    """Serve every process's metrics on ``host:port`` (loopback by default: GENCO_METRICS_HOST opens it)."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    if not port:
        return
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(port, addr=host, registry=registry)
        log.info("metrics on http://%s:%d/metrics", host, port)
    except OSError as error:
        log.warning("metrics endpoint not started: %s:%d: %s", host, port, error)


def ready_agents(metrics_dir: Path) -> set[str]:
    """The agents that have their input partitions, from the metrics they write to ``metrics_dir``."""
    from prometheus_client import CollectorRegistry, multiprocess

    if not metrics_dir.is_dir():  # genco serve has not created it yet
        return set()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    return {sample.labels["agent"] for metric in registry.collect() if metric.name == "genco_agent_ready"
            for sample in metric.samples if sample.value >= 1}


def wait_until_ready(metrics_dir: Path, agents: tuple[str, ...] = AGENTS, timeout_s: float = 90.0) -> bool:
    """Block until every agent has its partitions (imports and group joins take seconds); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while not set(agents) <= ready_agents(metrics_dir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@contextlib.contextmanager
def broker_for(settings: Settings, broker: str | None) -> Iterator[str]:
    """The configured broker's URL, or an embedded broker's for the duration of the block."""
    url = broker or settings.broker
    if url:
        yield url
        return
    with EmbeddedBroker() as embedded:
        print(f"genco: embedded broker at {embedded.url} (memory only)", flush=True)
        yield embedded.url


@contextlib.contextmanager
def running_agents(settings: Settings, broker: str, agents: tuple[str, ...] = AGENTS,
                   log_path: Path | None = None) -> Iterator[Supervisor]:
    """Topics created, agents started (their output in ``log_path`` if given); they are stopped cleanly when the
    block ends."""
    topics = Topics(settings.topic_prefix)
    Connection.from_settings(settings, broker).ensure_genco_topics(topics, settings.request_partitions)
    supervisor = Supervisor(settings, broker, agents, log_path)
    supervisor.start()
    try:
        yield supervisor
    finally:
        supervisor.stop()


def serve(settings: Settings, broker: str | None = None, agents: tuple[str, ...] | None = None) -> int:
    """Run ``agents`` (all by default) until SIGTERM or SIGINT."""
    agents = agents or AGENTS
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.WARNING)
    prepare_metrics(settings.state_dir)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    with broker_for(settings, broker) as url:
        log.info("broker %s, topics %s*, state in %s, agents %s", url, settings.topic_prefix,
                 Path(settings.state_dir).resolve(), ",".join(agents))
        start_metrics_server(settings.metrics_port, settings.metrics_host)
        with running_agents(settings, url, agents) as supervisor:
            while not stopping:
                time.sleep(0.2)
                supervisor.check()
            log.info("stopping (signal %d)", stopping[0])
    log.info("stopped cleanly")
    return 0
