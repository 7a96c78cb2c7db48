"""The selector agent: SelectionRequests -> SelectionResponses, from the newest snapshot.

A Faust agent (``stream.faust_app``): the ``<prefix>selector`` app's consumer group shares
``selection-requests`` among every selector, on any host. Requests are answered in batches
(up to 512, or whatever arrived within 5 ms), so the model runs once per batch. Snapshots come
over Kafka (``stream.snapshot_topic``), so a selector runs on any host: at start it reads the
newest chain of publications, and then follows the topic, applying each new version off the
event loop and swapping the serving policy between two batches: serving never pauses, and the
version served never goes back. It serves the readout the snapshot names (``serving``: genco,
or one of its baselines that the learner's referee found ahead); its answers say ``genco``
either way. A request that fails validation gets an error response (when its request_id can be
read) and a dead letter. A batch is acknowledged to Faust, which commits only acknowledged
offsets, once its responses are acknowledged by the broker: after a crash, unanswered requests
are answered again, never dropped.

No request can stop it: a batch is cut by work (``contract.events.work_batches``), a
model call that raises is retried request by request and a request that raises
alone gets an error response and a dead letter, a batch the client cannot decode is
dead-lettered (``stream.fetch``, inside Faust's fetching), and a snapshot that fails to load,
for whatever reason, leaves the last good model serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import torch
from aiokafka import AIOKafkaProducer, TopicPartition
from faust.types import EventT, StreamT

from contract.deadletters import InvalidInput, Message, Reason
from contract.events import SelectionRequest, work_batches
from contract.jsonl import parse_line, readable_request_id
from learner.policy import ServingPolicy
from learner.serving import READOUTS
from learner.snapshots import Snapshot, model_from
from stream.faust_app import GencoApp
from stream.kafka import Connection, Topics
from stream.metrics import (
    EVENTS_IN,
    MODEL_LOADED_AT,
    MODEL_VERSION,
    SELECTION_LATENCY,
    SELECTIONS,
    SERVING_POLICY,
    SNAPSHOT_LOAD_FAILURES,
)
from stream.runtime import dead_letter, send_all
from stream.snapshot_topic import Follower, seek_to_newest_chain, snapshot_consumer

log = logging.getLogger("genco.selector")


class SelectorAgent:
    def __init__(self, connection: Connection, topics: Topics, explore: float, max_batch: int = 512) -> None:
        self.connection = connection
        self.topics = topics
        self.explore = explore
        self.max_batch = max_batch
        self.policy = ServingPolicy(None, explore=explore)
        self.follower = Follower()
        self.failed_version = 0  # the newest version that failed to load: not tried again
        self.caught_up = asyncio.Event()  # set once the newest version on the topic serves (or there is none)
        self.ready = asyncio.Event()  # set once partitions are assigned

    def serve_snapshot(self, snapshot: Snapshot) -> None:
        """Serve a snapshot read from a directory from now on, without the topic (tests answer with one)."""
        self._swap(self._policy(snapshot.model, snapshot.manifest.version, snapshot.manifest.serving))

    def _policy(self, model, version: int, readout: str) -> ServingPolicy:
        policy = ServingPolicy(model, version, explore=self.explore, readout=readout)
        if policy.selector and self.policy.selector:  # its cache starts with the ads lone requests ask for
            try:
                policy.selector.warm(self.policy.selector)
            except Exception as error:  # a cache must never keep a snapshot from serving
                log.warning("snapshot v%d starts with a cold cache (%s: %s)", version, type(error).__name__, error)
        return policy

    def _swap(self, policy: ServingPolicy) -> None:
        policy.rng = self.policy.rng
        self.policy = policy
        MODEL_VERSION.set(policy.version)
        MODEL_LOADED_AT.set(time.time())
        readout = policy.selector.model.readout
        for name in READOUTS:
            SERVING_POLICY.labels(name).set(1 if name == readout else 0)
        log.info("serving snapshot v%d (readout %s)", policy.version, readout)

    def _load_replica(self) -> ServingPolicy:
        manifest, weights = self.follower.replica.manifest, self.follower.replica.weights
        model = model_from(manifest["model_config"], {name: torch.from_numpy(value) for name, value in weights.items()})
        return self._policy(model, manifest["version"], manifest.get("serving", "genco"))

    async def swap_to_newest(self) -> None:
        """Serve the newest version the follower holds if it is newer than the one served (loading off the
        event loop); a version that fails to load leaves the one before serving."""
        version = self.follower.replica.version
        if version <= max(self.policy.version, self.failed_version):
            return
        try:
            policy = await asyncio.to_thread(self._load_replica)
        except Exception as error:  # any fault of a snapshot (a newer format, a bad tensor) must not stop serving
            SNAPSHOT_LOAD_FAILURES.inc()
            self.failed_version = version
            log.error("snapshot v%d not loaded (%s: %s); serving v%d until a newer one loads", version,
                      type(error).__name__, error, self.policy.version)
            return
        self._swap(policy)

    async def follow_snapshots(self, stop: asyncio.Event) -> None:
        """Read the newest chain on the snapshot topic, then every version after it, serving each once caught up."""
        consumer, tp = snapshot_consumer(self.connection, self.topics.snapshots)
        await consumer.start()
        try:
            consumer.assign([tp])
            await seek_to_newest_chain(consumer, tp)
            while not stop.is_set():
                records = (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
                if records:
                    await asyncio.to_thread(self.follower.take, records)
                highwater = consumer.highwater(tp)
                if highwater is None or await consumer.position(tp) >= highwater:  # caught up: serve the newest
                    await self.swap_to_newest()
                    self.caught_up.set()
        finally:
            await consumer.stop()

    def answer(self, records: list) -> list[Message]:
        """Responses (and dead letters) for one batch of request records: refusals first, then answers in
        request order."""
        requests, where, out = [], {}, []
        for tp, record in records:
            try:
                request = parse_line(record.value or b"", SelectionRequest)
            except InvalidInput as error:
                out += self._refuse(tp, record, error.reason, str(error))
                continue
            requests.append(request)
            where[id(request)] = tp, record
        for batch in work_batches(requests):
            try:
                responses = self.policy.respond(batch)
            except Exception:  # one request may be at fault: answer each alone, refuse those that fail alone
                log.exception("answering a batch of %d requests failed; answering them one by one", len(batch))
                responses = []
                for request in batch:
                    try:
                        responses += self.policy.respond([request])
                    except Exception as error:
                        out += self._refuse(*where[id(request)], Reason.FAILED,
                                            f"selection failed: {type(error).__name__}")
            for response in responses:
                SELECTIONS.labels(response["policy"]).inc()
                out.append((self.topics.responses, response["request_id"].encode(), json.dumps(response).encode()))
        return out

    def _refuse(self, tp, record, reason: Reason, error: str) -> list[Message]:
        """A dead letter, and an error response when the request_id can be read."""
        letter = dead_letter(self.topics.dead_letters, tp, record, reason, error)
        request_id = readable_request_id(record.value or b"")
        if request_id is None:
            return [letter]
        return [letter, (self.topics.responses, request_id.encode(),
                         json.dumps({"request_id": request_id, "error": json.loads(letter[2])["error"]}).encode())]

    async def answer_events(self, producer: AIOKafkaProducer, events: list[EventT]) -> None:
        """Answer one batch of Faust events; return once every response (and dead letter) is acknowledged."""
        started = time.monotonic()
        records = [(TopicPartition(e.message.topic, e.message.partition), e.message) for e in events]
        EVENTS_IN.labels(self.topics.requests).inc(len(records))
        await send_all(producer, self.answer(records), self.topics.dead_letters)
        elapsed = time.monotonic() - started
        for _ in records:
            SELECTION_LATENCY.observe(elapsed)

    async def run(self, stop: asyncio.Event) -> None:
        follower = asyncio.create_task(self.follow_snapshots(stop))
        # After a restart, never answer with an older model than before it: requests wait for the newest.
        caught_up = asyncio.create_task(self.caught_up.wait())
        await asyncio.wait([follower, caught_up], return_when=asyncio.FIRST_COMPLETED)
        caught_up.cancel()
        producer = self.connection.producer(linger_ms=0)
        await producer.start()
        app = GencoApp("selector", self.connection, self.topics, ready=self.ready, fetch_wait_ms=10,
                       max_poll_records=self.max_batch,
                       send_letters=lambda letters: send_all(producer, letters, self.topics.dead_letters))
        failed: list[BaseException] = []

        @app.agent(app.topic(self.topics.requests))
        async def select(stream: StreamT) -> None:
            # Acknowledged (so committed) only once answered: a batch whose answers did not go out is
            # answered again after a restart, never dropped.
            async for events in stream.noack_take(self.max_batch, within=0.005):
                try:
                    await self.answer_events(producer, events)
                except Exception as error:  # the agent must not go on past requests it did not answer
                    failed.append(error)
                    stop.set()
                    return
                for event in events:
                    await stream.ack(event)

        await app.start()
        log.info("answering %s on %s", self.topics.requests, self.topics.responses)
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([stopping, follower], return_when=asyncio.FIRST_COMPLETED)
            if follower.done():  # following the snapshots stopped on an error: let the agent die of it
                follower.result()
            if failed:
                raise failed[0]
        finally:
            for task in (stopping, follower):
                task.cancel()
            await app.stop()
            await producer.stop()
