"""Faust apps for genco's agents, on genco's own Kafka connection and its safe fetching.

One app, so one consumer group (``Topics.group(role)``), per role: Faust runs all of an app's
agents on one consumer, and a worker that runs only some roles needs an app for each (issue 32).
The app runs inside the agent process's own event loop (``await app.start()``) rather than
under ``faust.Worker``: the process keeps genco's signal handling, logging and exit status,
which the supervisor and ``genco status`` read, and no web server is bound.

What genco changes in Faust's aiokafka driver, and why:

- **Fetching.** Faust's consumer thread lets a batch it cannot decode raise out of its fetch
  loop, which stops the worker, and again after every restart. Here the thread fetches
  through ``stream.fetch.SafeFetch``: such a batch is dead-lettered (the letter sent and
  acknowledged before any record after it is handed on) and skipped, and Faust's tracking
  of offset gaps commits past it once the records after it are acknowledged.
- **Clients.** Consumer and producer are made like genco's other clients
  (``stream.kafka.Connection``): its credentials and TLS context, a 10 s session, and a
  fetch wait chosen per role. Faust fixes the wait at 1.5 s, and the embedded broker holds an
  empty fetch for all of it: latency, for the selector.
- **Readiness and lag.** A ``stream.runtime.FetchWatch`` looks at every fetch, on the
  consumer's own thread, so ``genco status`` shows the role as ready, its lag and any broker
  outage, as for the other agents.
- **Acknowledgements.** Only an agent's acknowledgement of an event of the current generation, while
  the flow runs, counts towards a commit (``Consumer.ack``): Faust's stream acknowledges the events it
  skips during a rebalance, and would commit them unhandled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import ConsumerStoppedError
from aiokafka.structs import TopicPartition
from faust.transport.drivers import aiokafka as driver
from faust.types import EventT, StreamT
from faust.types import Message as FaustMessage
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from contract.deadletters import Message
from stream.fetch import SafeFetch
from stream.kafka import Connection, Topics
from stream.runtime import FetchWatch

SendLetters = Callable[[list[Message]], Awaitable[None]]
Assignor = type[AbstractPartitionAssignor] | AbstractPartitionAssignor
log = logging.getLogger("genco.faust")


class GencoApp(faust.App):
    """A Faust app for one of genco's roles, its clients made by ``connection``.

    ``send_letters`` sends dead letters for undecodable batches and returns once they are
    acknowledged; it runs on the app's event loop (the fetching thread waits for it). ``ready`` is
    set, on the app's loop, once the role's consumer has partitions. ``assignor`` shares the role's
    partitions among its group (``stream.one_active`` where one member must hold them all).
    ``wait_empty=False`` lets a rebalance go ahead while events are still unacknowledged: for an agent
    that acknowledges only once its work is durable (the learner, at its checkpoints), which waiting
    would hold up for that long.
    """

    def __init__(self, role: str, connection: Connection, topics: Topics, send_letters: SendLetters,
                 ready: asyncio.Event, fetch_wait_ms: int, max_poll_records: int,
                 assignor: Assignor = RoundRobinPartitionAssignor, wait_empty: bool = True) -> None:
        self.role = role
        self.partition_assignor = assignor
        self.connection = connection
        self.dead_letters = topics.dead_letters
        self.send_letters = send_letters
        self.fetch_wait_ms = fetch_wait_ms
        self.watch = FetchWatch(role, logging.getLogger(f"genco.{role}"))
        self.ready = ready
        super().__init__(
            topics.group(role), broker=[f"kafka://{server}" for server in connection.servers], store="memory://",
            autodiscover=False, web_enabled=False, topic_allow_declare=False, topic_disable_leader=True,
            key_serializer="raw", value_serializer="raw", consumer_auto_offset_reset="earliest",
            broker_max_poll_records=max_poll_records, broker_session_timeout=10, broker_heartbeat_interval=1,
            stream_wait_empty=wait_empty)

    def batches(self, topic: str, size: int, within: float) -> asyncio.Queue[list[EventT]]:
        """The role's agent: it takes up to ``size`` events off ``topic`` (or what arrived within ``within``
        seconds) into the queue returned, one batch ahead of the role's work on them, which runs in a task of
        its own. Faust's take hands over a batch only once the one before is consumed, so working on a batch
        inside the agent would stop intake meanwhile. Events come unacknowledged: the role acknowledges each
        (``event.ack()``, oldest first) once its effect is durable, and Faust commits acknowledged offsets only.
        """
        taken: asyncio.Queue[list[EventT]] = asyncio.Queue(maxsize=1)

        @self.agent(self.topic(topic))
        async def take(stream: StreamT) -> None:
            async for events in stream.noack_take(size, within=within):
                await taken.put(events)

        return taken

    def _new_transport(self) -> Transport:
        return Transport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Transport:
        return Transport(self.conf.broker_producer, self)


class ConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's consumer thread, with genco's consumer and its safe fetch."""

    app: GencoApp
    watched: asyncio.Event | None = None  # the watch's readiness, on this thread's loop

    def _create_worker_consumer(self, transport: Any) -> AIOKafkaConsumer:
        self._assignor = self.app.partition_assignor  # no tables: Faust's own assignor would have nothing to place
        return self.app.connection.consumer(
            group=self.app.conf.id, max_wait_ms=self.app.fetch_wait_ms, client_id=self.app.conf.broker_client_id,
            partition_assignment_strategy=[self._assignor], max_poll_records=self.app.conf.broker_max_poll_records)

    async def _fetch_records(self, consumer: AIOKafkaConsumer, active_partitions: set[TopicPartition],
                             timeout: float | None = None, max_records: int | None = None) -> dict:
        if not self.consumer.flow_active:
            return {}
        if consumer._closed or consumer._fetcher._closed:
            raise ConsumerStoppedError()
        if not active_partitions:  # all paused (a rebalance under way): fetching none would fetch them all
            await asyncio.sleep(0.05)
            return {}
        app = self.app
        partitions = [TopicPartition(tp.topic, tp.partition) for tp in active_partitions]  # Faust's TP is not one
        fetched = await SafeFetch(consumer, app.role, app.dead_letters).getmany(
            *partitions, timeout_ms=int((timeout or 0) * 1000),
            max_records=max_records or app.conf.broker_max_poll_records)
        if fetched.letters:  # out and acknowledged before Faust sees (and may commit) the offsets after them
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(app.send_letters(fetched.letters), app.loop))
        if self.watched is None:
            self.watched = asyncio.Event()
        app.watch.mark_ready(consumer, self.watched)
        if self.watched.is_set() and not app.ready.is_set():
            app.loop.call_soon_threadsafe(app.ready.set)
        await app.watch.lagging(consumer)
        return fetched.records

    async def on_thread_stop(self) -> None:
        self.app.watch.close()
        await super().on_thread_stop()


class Consumer(driver.Consumer):
    """Faust's consumer, with genco's consumer thread; only an acknowledgement of an event handed on in the
    current generation, with the flow running, counts towards a commit.

    Faust's stream acknowledges an event it skips (one it reads while the flow is suspended for a
    rebalance, or one fetched in an earlier generation of the group) as if an agent had processed it.
    At a revocation Faust has just forgotten the partition's committed offset, and it then commits the
    first run of acknowledged offsets it holds, whatever lies below it: an event skipped that way is
    committed unhandled, and with it any cleared from the agents' buffers before it, none of them ever
    handed on again (a request never answered). So such an
    acknowledgement marks the event done, for the rebalance not to wait on it, but is not counted: the
    event is fetched again from the committed offset and handed on once more (at least once). An agent's
    own acknowledgement that comes during a rebalance is not counted either, for the same reason: its
    event is handed on again after the rebalance.
    """

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def ack(self, message: FaustMessage) -> bool:
        app = self.app
        if self.flow_active and app.flow_control.is_active() and message.generation_id == app.consumer_generation_id:
            return super().ack(message)
        with ack_lock:
            if message.acked:
                return False
            message.acked = True
            self._unacked_messages.discard(message)
            notify(self._waiting_for_ack)
        log.info("%s[%d]@%d acknowledged during a rebalance: not committed, it is handed on again",
                 message.topic, message.partition, message.offset)
        return False


class Producer(driver.Producer):
    def _settings_auth(self) -> dict:
        return self.app.connection.client_options()


class Transport(driver.Transport):
    Consumer = Consumer
    Producer = Producer
