"""One agent process (``python -m stream.agent``), started by ``genco serve``'s supervisor.

The supervisor passes the agent's name, the broker and the settings as JSON in
GENCO_AGENT_SPEC, without the Kafka credentials: the agent reads those from the
GENCO_KAFKA_* variables it inherits, so no secret is ever copied into another
variable. SIGTERM or SIGINT stops the agent cleanly: it finishes the batch in hand,
flushes, checkpoints and leaves its consumer group. An error that stops it is
logged and recorded as a metric (its type) before the process exits with status 1,
for the supervisor to restart it and ``genco status`` to show.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from contract.settings import Settings
from stream.kafka import Connection, Topics

LOG_FORMAT = "%(asctime)s %(name)-15s %(levelname)-7s %(message)s"


def build_agent(name: str, connection: Connection, settings: Settings):
    state = Path(settings.state_dir)
    topics = Topics(settings.topic_prefix)
    if name == "joiner":
        from state.kv import Store
        from stream.joiner import Joiner

        return Joiner(connection, topics, settings.join_window, Store(state / "joiner"))
    if name == "learner":
        from stream.training import TrainingAgent

        return TrainingAgent(connection, topics, state, settings.join_window,
                             checkpoint_every_s=settings.checkpoint_every_s)
    if name == "selector":
        from stream.selector import SelectorAgent

        return SelectorAgent(connection, topics, settings.explore)
    raise ValueError(f"unknown agent {name!r}")


async def run_agent(name: str, connection: Connection, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = build_agent(name, connection, settings)
    await agent.run(stop)
    logging.getLogger(f"genco.{name}").info("stopped cleanly")


def main() -> None:
    spec = json.loads(os.environ["GENCO_AGENT_SPEC"])
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    for noisy in ("aiokafka", "kafka", "faust", "mode", "stream.faust_app"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from learner.compute import configure_compute

    configure_compute()  # one core per agent: more threads would fight the other agents
    settings = Settings(**spec["settings"])
    try:
        asyncio.run(run_agent(spec["name"], Connection.from_settings(settings, spec["broker"]), settings))
    except Exception as error:
        from stream.metrics import AGENT_LAST_ERROR

        AGENT_LAST_ERROR.labels(spec["name"], type(error).__name__).set(time.time())
        logging.getLogger(f"genco.{spec['name']}").exception("stopped by an error")
        sys.exit(1)


if __name__ == "__main__":
    main()
