"""The selector agent: SelectionRequests -> SelectionResponses, from the newest snapshot.

Requests are answered in batches (whatever one fetch returned, up to 512), so the
model runs once per batch. A watcher notices a new snapshot, loads it in a worker
thread and swaps the serving policy between two batches: serving never pauses.
It serves the readout the snapshot names (``Manifest.serving``: genco, or one of its
baselines that the learner's referee found ahead); its answers say ``genco`` either way.
A request that fails validation gets an error response (when its request_id can
be read) and a dead letter. Offsets are committed after the responses are sent:
after a crash, unanswered requests are answered again, never dropped.

No request can stop it: a batch is cut by work (``contract.events.work_batches``), a
model call that raises is retried request by request and a request that raises
alone gets an error response and a dead letter, a batch the client cannot decode is
dead-lettered (``stream.fetch``), and a snapshot that fails to load, for whatever
reason, leaves the last good model serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from contract.deadletters import InvalidInput, Message, Reason
from contract.events import SelectionRequest, work_batches
from contract.jsonl import parse_line, readable_request_id
from learner.policy import ServingPolicy
from learner.serving import READOUTS
from learner.snapshots import SnapshotStore
from stream.fetch import SafeFetch
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
from stream.runtime import FetchWatch, commit, dead_letter, send_all

log = logging.getLogger("genco.selector")


class SelectorAgent:
    def __init__(self, connection: Connection, topics: Topics, snapshot_dir: Path, explore: float,
                 max_batch: int = 512, poll_every_s: float = 0.5) -> None:
        self.connection = connection
        self.topics = topics
        self.snapshots = SnapshotStore(snapshot_dir)
        self.explore = explore
        self.max_batch = max_batch
        self.poll_every_s = poll_every_s
        self.policy = ServingPolicy(None, explore=explore)
        self.failed_version = 0  # the newest snapshot that failed to load: not tried again until a newer one
        self.ready = asyncio.Event()  # set once partitions are assigned

    def _load(self, version: int) -> ServingPolicy:
        snapshot = self.snapshots.load(version)
        policy = ServingPolicy(snapshot.model, snapshot.manifest.version, explore=self.explore,
                               readout=snapshot.manifest.serving)
        if policy.selector and self.policy.selector:  # its cache starts with the ads lone requests ask for
            try:
                policy.selector.warm(self.policy.selector)
            except Exception as error:  # a cache must never keep a snapshot from serving
                log.warning("snapshot v%d starts with a cold cache (%s: %s)", version, type(error).__name__, error)
        return policy

    async def swap_to_newest(self) -> None:
        """Serve the newest snapshot if it is newer than the one served (loading off the event loop)."""
        try:
            version = self.snapshots.latest_version()
            if version <= max(self.policy.version, self.failed_version):
                return
            policy = await asyncio.to_thread(self._load, version)
        except Exception as error:  # any fault of a snapshot (a newer format, a bad file) must not stop serving
            SNAPSHOT_LOAD_FAILURES.inc()
            self.failed_version = version
            log.error("snapshot v%d not loaded (%s: %s); serving v%d until a newer one loads", version,
                      type(error).__name__, error, self.policy.version)
            return
        policy.rng = self.policy.rng
        self.policy = policy
        MODEL_VERSION.set(policy.version)
        MODEL_LOADED_AT.set(time.time())
        readout = policy.selector.model.readout
        for name in READOUTS:
            SERVING_POLICY.labels(name).set(1 if name == readout else 0)
        log.info("serving snapshot v%d (readout %s)", policy.version, readout)

    async def watch_snapshots(self, stop: asyncio.Event) -> None:
        """Swap in each new snapshot as it appears."""
        while not stop.is_set():
            await self.swap_to_newest()
            await asyncio.sleep(self.poll_every_s)

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

    async def run(self, stop: asyncio.Event) -> None:
        producer = self.connection.producer(linger_ms=0)
        await producer.start()
        consumer = self.connection.consumer(self.topics.requests, group=self.topics.group("selector"),
                                            max_wait_ms=10, max_poll_records=self.max_batch)
        await consumer.start()
        watch = FetchWatch("selector", log)
        fetch = SafeFetch(consumer, "selector", self.topics.dead_letters)
        await self.swap_to_newest()  # after a restart, never answer with an older model than before it
        watcher = asyncio.create_task(self.watch_snapshots(stop))
        log.info("answering %s on %s", self.topics.requests, self.topics.responses)
        try:
            while not stop.is_set():
                fetched = await fetch.getmany(timeout_ms=100, max_records=self.max_batch)
                batches = fetched.records
                watch.mark_ready(consumer, self.ready)
                if fetched.letters:
                    await send_all(producer, fetched.letters, self.topics.dead_letters)
                    await commit(consumer, {tp: o for tp, o in fetched.skipped_to.items() if tp not in batches})
                if not batches:
                    await watch.lagging(consumer)
                    continue
                started = time.monotonic()
                records = [(tp, r) for tp, rs in batches.items() for r in rs]
                EVENTS_IN.labels(self.topics.requests).inc(len(records))
                await send_all(producer, self.answer(records), self.topics.dead_letters)
                await commit(consumer, {tp: rs[-1].offset + 1 for tp, rs in batches.items()})
                elapsed = time.monotonic() - started
                for _ in records:
                    SELECTION_LATENCY.observe(elapsed)
        finally:
            watcher.cancel()
            await consumer.stop()
            await producer.stop()
