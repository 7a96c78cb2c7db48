"""The learner agent: bags in arrival order -> ``Learner.step`` per mini-batch -> snapshots.

Effectively once: the marks of trained impressions (``stream.trained_ids``) and the bags
offsets are written to RocksDB only together with a checkpoint (a snapshot carrying the
optimiser state). After a crash the learner reloads that checkpoint, rewinds to those
offsets and trains the bags after them again, so every impression counts in the model
once; a bag whose impression was already trained is skipped (the joiner may repeat a
bag after its own crash).

Serving snapshots (weights only) go out every ``snapshot_every_s`` while learning, on the
snapshot topic for every selector (``stream.snapshot_topic``: a whole model now and then,
the rows that changed between) and into the state dir; checkpoints every
``checkpoint_every_s``, into the state dir and on the checkpoint topic (weights, optimiser
state, trained marks, offsets). Of the learners in a group one trains
(``stream.one_active``); when another is handed the partitions, it first takes over the
newest checkpoint on the topic if that is newer than its own, so a standby on a fresh
host resumes where the lost one last checkpointed. Version numbers only ever grow, across
learners too: one continues after the newest version on the topic.

Before each step, the referee (``learner.referee``) scores every readout of the model as it stands on the
batch's explore bags and keeps the champion; each snapshot names it (``serving``) with every readout's
estimate, and carries the referee's state, so a learner resumed from a checkpoint judges on from there.

No bag stops it: a step takes at most ``BATCH_WORK_CELLS`` of work (a message's cost is
capped at validation), a step that raises is retried on halves down to the single bag
at fault, which is dead-lettered, and a batch the client cannot decode is dead-lettered
by ``stream.fetch``. A bag's ts counts no further ahead than ``FUTURE_GRACE_S`` for the
trained-id marks, so one bag stamped 1e300 cannot expire all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from aiokafka import ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from river import metrics

from contract.deadletters import InvalidInput, Message, Reason
from contract.events import BATCH_WORK_CELLS, Bag, work_batches
from contract.jsonl import parse_line
from learner.publications import Differ, Replica, encode
from learner.referee import Referee
from learner.serving import readouts
from learner.snapshots import SnapshotError, SnapshotStore, model_from
from learner.trainer import Learner, preset
from state.kv import Store
from stream.fetch import Fetched, SafeFetch
from stream.kafka import Connection, Topics
from stream.metrics import (
    DUPLICATES,
    EVENTS_IN,
    POLICY_SCTR,
    POLICY_SCTR_SE,
    PROGRESSIVE_LOGLOSS,
    SNAPSHOT_LOAD_FAILURES,
    SNAPSHOT_VERSION,
    TRAINED_BAGS,
    TRAINING_STEPS,
)
from stream.one_active import OneActive
from stream.runtime import FetchWatch, dead_letter, send_all
from stream.snapshot_topic import SnapshotPublisher, read_newest
from stream.trained_ids import TENSORS as TRAINED_TENSORS
from stream.trained_ids import TrainedIds

Source = tuple[TopicPartition, ConsumerRecord]  # where a bag came from, for its dead letter

log = logging.getLogger("genco.learner")

_CHECKPOINT = b"checkpoint"  # -> the snapshot version the stored offsets and trained ids belong to
# What of a snapshot's manifest a selector needs: no optimiser, referee or training settings go on the topic.
PUBLISHED = ("version", "bags_seen", "steps", "created", "model_config", "serving", "estimates", "format")
CHECKPOINTED = (*PUBLISHED, "train_config", "referee")  # and a checkpoint's, to resume from
CHECKPOINT_BASE_EVERY = 20  # checkpoints per chain: at one every 30 s, a base every 10 minutes
_OPTIMIZER = "optimizer."  # checkpoint tensors of the optimiser state, beside the model's and the trained marks


@dataclass(frozen=True)
class Outgoing:
    """A publication ready for its topic: whether it starts a chain, and its bytes."""

    publisher: SnapshotPublisher
    base: bool
    blob: bytes


class AdoptThenSeek(ConsumerRebalanceListener):
    """On assignment, take over the newest checkpoint on Kafka when it is newer than this learner's own (a
    standby taking over, perhaps on a fresh host), then start each partition where the store says (at its
    beginning where the store has no offset). Until that is done the agent is not ``settled``: what the
    consumer fetched meanwhile, from wherever it stood, is dropped, and fetched again from there."""

    def __init__(self, consumer, agent: TrainingAgent) -> None:
        self.consumer = consumer
        self.agent = agent

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.agent.settled.clear()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.agent.settled.clear()
        if assigned:
            await self.agent.adopt_newest_checkpoint()
        stored = self.agent.store.offsets()
        for tp in assigned:
            offset = stored.get((tp.topic, tp.partition))
            if offset is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)
        self.agent.settled.set()


class TrainingAgent:
    def __init__(self, connection: Connection, topics: Topics, state_dir: Path, window_s: float,
                 batch_size: int = 1024, idle_flush_s: float = 0.3, max_wait_s: float = 1.5,
                 snapshot_every_s: float = 4.0, checkpoint_every_s: float = 30.0,
                 referee_settings: dict | None = None) -> None:
        self.connection = connection
        self.topics = topics
        self.store = Store(state_dir / "learner")
        self.snapshots = SnapshotStore(state_dir / "snapshots")
        self.trained_ids = TrainedIds(self.store, horizon_s=max(2 * window_s, 3600.0))
        self.batch_size = batch_size
        self.idle_flush_s = idle_flush_s
        self.max_wait_s = max_wait_s
        self.snapshot_every_s = snapshot_every_s
        self.checkpoint_every_s = checkpoint_every_s
        self.referee_settings = referee_settings or {}  # Referee's keyword arguments (tests judge sooner)
        self.learner, self.referee = self._resume()
        self.version = max(self.snapshots.latest_version(), self.learner_version)
        self.differ = Differ()
        self.publisher = SnapshotPublisher(connection, topics.snapshots)
        self.checkpoint_differ = Differ(CHECKPOINT_BASE_EVERY)
        self.checkpointer = SnapshotPublisher(connection, topics.checkpoints)
        self.loss = metrics.LogLoss()
        self.offsets: dict[tuple[str, int], int] = {}  # reached since the last checkpoint
        self.settled = asyncio.Event()  # set once the partitions assigned start where the checkpoint ends
        self.ready = asyncio.Event()  # set once partitions are assigned

    def _resume(self) -> tuple[Learner, Referee]:
        """The learner and referee of the recorded checkpoint; of the newest older one that loads when it does
        not (a file damaged on disk must not crash-loop the learner while an earlier checkpoint is intact)."""
        recorded = self.store.get(_CHECKPOINT)
        self.learner_version = int(recorded) if recorded else 0
        if not self.learner_version:
            learner = Learner(preset("default"))
            return learner, Referee(readouts(learner.model.config), **self.referee_settings)
        older = [v for v in reversed(self.snapshots.checkpoints()) if v < self.learner_version]
        failures = []
        for version in [self.learner_version, *older]:
            try:
                snapshot = self.snapshots.load(version, with_optimizer=True)
                m = snapshot.manifest
                learner = Learner.resume(snapshot.model, m.train_config, snapshot.optimizer_state, m.bags_seen,
                                         m.steps)
            except Exception as error:  # whatever a bad file raises: the next older checkpoint may load
                SNAPSHOT_LOAD_FAILURES.inc()
                log.error("checkpoint v%d does not load: %s: %s", version, type(error).__name__, error)
                failures.append(f"v{version}: {type(error).__name__}: {error}")
                continue
            if version != self.learner_version:
                log.error("resuming from the older checkpoint v%d: what v%d had learned since is lost to the "
                          "model (its bags stay marked trained, so none is counted twice)", version,
                          self.learner_version)
            log.info("resuming from checkpoint v%d (%d bags seen)", m.version, m.bags_seen)
            return learner, Referee.restore(m.referee, readouts(learner.model.config), **self.referee_settings)
        raise SnapshotError(f"no checkpoint in {self.snapshots.directory} loads ({'; '.join(failures)}); move the "
                            "snapshots aside to start the learner afresh")

    def admit(self, tp: TopicPartition, record: ConsumerRecord) -> Bag | Message | None:
        """A bag to train on (noted as trained), its dead letter if invalid, or None if already trained or
        stale (a horizon older than the newest trained: ``stream.trained_ids``).

        The trained-id mark expires by the bag's ts, taken no further ahead than ``FUTURE_GRACE_S``.
        """
        try:
            bag = parse_line(record.value or b"", Bag)
        except InvalidInput as error:
            return dead_letter(self.topics.dead_letters, tp, record, error.reason, str(error))
        if bag.impression_id in self.trained_ids:
            DUPLICATES.labels("trained_bag").inc()
            return None
        if self.trained_ids.stale(bag.ts):  # a replay older than the marks can vouch for
            DUPLICATES.labels("stale_bag").inc()
            return None
        self.trained_ids.add(bag.impression_id, bag.ts)
        return bag

    def train(self, bags: list[Bag]) -> None:
        """One optimiser step (run in a worker thread so the consumer keeps fetching)."""
        result = self.learner.step(bags)
        for bag, p in zip(bags, result.predicted.tolist(), strict=True):
            self.loss.update(bag.clicked, p)

    def train_isolating(self, bags: list[Bag], sources: list[Source]) -> list[Message]:
        """Steps on ``bags`` cut by work; a step that raises is retried on halves, and a bag that fails alone
        is dead-lettered. Returns the dead letters."""
        letters: list[Message] = []
        where = {id(bag): source for bag, source in zip(bags, sources, strict=True)}
        for batch in work_batches(bags):
            self.judge(batch)
            letters += self._step_or_bisect(batch, where)
        return letters

    def judge(self, bags: list[Bag]) -> None:
        """The referee's turn, before the model learns ``bags``; a fault of its own never stops training."""
        champion = self.referee.champion
        try:
            self.referee.judge(self.learner.model, bags)
        except Exception:
            log.exception("judging the readouts on %d bags failed; the champion stays %s", len(bags), champion)
            return
        if self.referee.champion != champion:
            lead, se = self.referee.lead(self.referee.champion, champion)
            log.info("the %s readout now serves: it leads %s by %.5f (standard error %.5f) in calibrated sCTR",
                     self.referee.champion, champion, lead, se)

    def _step_or_bisect(self, bags: list[Bag], where: dict[int, Source]) -> list[Message]:
        try:
            self.train(bags)
            TRAINED_BAGS.inc(len(bags))
            return []
        except Exception as error:
            if len(bags) == 1:
                tp, record = where[id(bags[0])]
                log.error("training on %s[%d]@%d failed (%s): dead-lettered", tp.topic, tp.partition, record.offset,
                          type(error).__name__)
                return [dead_letter(self.topics.dead_letters, tp, record, Reason.FAILED,
                                    f"training failed: {type(error).__name__}")]
            log.warning("a step on %d bags failed (%s); retrying on halves", len(bags), type(error).__name__)
        half = len(bags) // 2
        return self._step_or_bisect(bags[:half], where) + self._step_or_bisect(bags[half:], where)

    def publish(self, checkpoint: bool) -> list[Outgoing]:
        """Write the next snapshot; with ``checkpoint``, also record what it has trained on. Returns what goes
        on Kafka: the snapshot's publication and, with ``checkpoint``, the checkpoint's."""
        self.version += 1
        learner, estimates = self.learner, self.referee.estimates()
        optimizer_state = learner.optimizer_state() if checkpoint else None
        manifest = self.snapshots.save(learner.model, version=self.version, bags_seen=learner.bags_seen,
                                       steps=learner.steps, train_config=learner.preset.train.to_dict(),
                                       optimizer_state=optimizer_state, serving=self.referee.champion,
                                       estimates=estimates, referee=self.referee.state())
        weights = {name: value.detach().numpy() for name, value in learner.model.weights().items()}
        publication = self.differ.publication(weights, {name: getattr(manifest, name) for name in PUBLISHED})
        outgoing = [Outgoing(self.publisher, publication.manifest["kind"] == "base", encode(publication))]
        SNAPSHOT_VERSION.set(self.version)
        for policy, estimate in estimates.items():
            if estimate["sctr"] is not None:
                POLICY_SCTR.labels(policy).set(estimate["sctr"])
                POLICY_SCTR_SE.labels(policy).set(estimate["se"])
        if checkpoint:
            offsets = [[topic, partition, offset] for (topic, partition), offset in self.offsets.items()]
            self._record_trained()
            tensors = weights | {_OPTIMIZER + name: value.numpy() for name, value in optimizer_state.items()}
            publication = self.checkpoint_differ.publication(
                tensors | self.trained_ids.tensors(),
                {**{name: getattr(manifest, name) for name in CHECKPOINTED}, "offsets": offsets})
            outgoing.append(Outgoing(self.checkpointer, publication.manifest["kind"] == "base", encode(publication)))
        return outgoing

    async def publish_next(self, checkpoint: bool) -> None:
        """Write the next snapshot and put it (and the checkpoint) on Kafka. The first time, this learner takes
        the next epoch and continues after the topic's newest version: only now, as the active learner (a
        standby that started long ago must not reuse the version numbers of its day)."""
        if self.publisher.producer is None:
            for publisher in (self.publisher, self.checkpointer):
                await publisher.open()
            self.version = max(self.version, self.publisher.last_version, self.checkpointer.last_version)
        for outgoing in await asyncio.to_thread(self.publish, checkpoint):
            await self.send(outgoing)

    async def send(self, outgoing: Outgoing) -> None:
        """Put a publication on its topic. Where that fails, the next ones are bases: readers that missed this
        one must not wait for a chain that broke here."""
        try:
            await outgoing.publisher.publish(self.version, outgoing.base, outgoing.blob)
        except KafkaError as error:
            log.error("v%d not published on %s (%s: %s): the next versions go whole", self.version,
                      outgoing.publisher.topic, type(error).__name__, error)
            self.differ, self.checkpoint_differ = Differ(), Differ(CHECKPOINT_BASE_EVERY)

    async def adopt_newest_checkpoint(self) -> None:
        """Resume from the newest checkpoint on the checkpoint topic when it is newer than this learner's own:
        its model, optimiser and referee, its trained marks and its offsets. A checkpoint that does not load
        leaves the learner as it was (counted and logged), never stopped."""
        try:
            replica = await read_newest(self.connection, self.topics.checkpoints)
            if replica.version <= self.learner_version:
                return
            learner, referee = await asyncio.to_thread(self._learner_of, replica)
        except Exception as error:
            SNAPSHOT_LOAD_FAILURES.inc()
            log.error("the checkpoint topic's newest does not load (%s: %s): training on from v%d",
                      type(error).__name__, error, self.learner_version)
            return
        m = replica.manifest
        tx = self.store.transaction()
        self.trained_ids.unrecorded.clear()  # trained into the model being replaced
        restored = self.trained_ids.restore(tx, replica.weights)
        for topic, partition, offset in m["offsets"]:
            tx.set_offset(topic, partition, offset)
        tx.put(_CHECKPOINT, str(m["version"]).encode())
        tx.commit()
        self.learner, self.referee, self.learner_version = learner, referee, m["version"]
        self.version, self.offsets = max(self.version, m["version"]), {}
        log.info("resuming from checkpoint v%d of the checkpoint topic (%d bags seen, %d trained marks new here)",
                 m["version"], m["bags_seen"], restored)

    def _learner_of(self, replica: Replica) -> tuple[Learner, Referee]:
        m, tensors = replica.manifest, replica.weights
        model = model_from(m["model_config"], {name: torch.from_numpy(value) for name, value in tensors.items()
                                               if not name.startswith((_OPTIMIZER, TRAINED_TENSORS))})
        optimizer = {name.removeprefix(_OPTIMIZER): torch.from_numpy(value) for name, value in tensors.items()
                     if name.startswith(_OPTIMIZER)}
        learner = Learner.resume(model, m["train_config"], optimizer, m["bags_seen"], m["steps"])
        return learner, Referee.restore(m["referee"], readouts(model.config), **self.referee_settings)

    def _record_trained(self) -> None:
        """Record the trained impressions and the offsets reached, with the checkpoint they belong to."""
        tx = self.store.transaction()
        self.trained_ids.record(tx)
        for (topic, partition), offset in self.offsets.items():
            tx.set_offset(topic, partition, offset)
        tx.put(_CHECKPOINT, str(self.version).encode())
        tx.commit()
        self.learner_version = self.version

    async def run(self, stop: asyncio.Event) -> None:
        producer = self.connection.producer()
        await producer.start()
        consumer = self.connection.consumer(group=self.topics.group("learner"), max_poll_records=self.batch_size,
                                            partition_assignment_strategy=(OneActive(),))  # one learner trains
        consumer.subscribe([self.topics.bags], listener=AdoptThenSeek(consumer, self))
        await consumer.start()
        watch = FetchWatch("learner", log)
        fetch = SafeFetch(consumer, "learner", self.topics.dead_letters)
        log.info("learning from %s; snapshots in %s (starting after v%d)", self.topics.bags,
                 self.snapshots.directory, self.version)
        buffer: list[Bag] = []
        sources: list[Source] = []
        cells = 0  # work in the buffer (contract.events.work_cells)
        first_wait = last_arrival = last_snapshot = last_checkpoint = time.monotonic()
        learned_since_snapshot = False
        try:
            while not stop.is_set():
                fetched = await fetch.getmany(timeout_ms=100, max_records=self.batch_size - len(buffer))
                if not self.settled.is_set():  # from before this assignment's seek: fetched again after it
                    fetched = Fetched()
                batches = fetched.records
                watch.mark_ready(consumer, self.ready)
                now = time.monotonic()
                dead = list(fetched.letters)
                for tp, records in batches.items():
                    EVENTS_IN.labels(tp.topic).inc(len(records))
                    for record in records:
                        bag = self.admit(tp, record)
                        if isinstance(bag, tuple):
                            dead.append(bag)
                            continue
                        if bag is None:
                            continue
                        if not buffer:
                            first_wait = now
                        buffer.append(bag)
                        sources.append((tp, record))
                        cells += bag.work_cells
                    self.offsets[(tp.topic, tp.partition)] = records[-1].offset + 1
                    last_arrival = now
                for tp, offset in fetched.skipped_to.items():
                    self.offsets[(tp.topic, tp.partition)] = offset
                await send_all(producer, dead, self.topics.dead_letters)
                due = len(buffer) >= self.batch_size or cells >= BATCH_WORK_CELLS or (
                    buffer and (now - last_arrival >= self.idle_flush_s or now - first_wait >= self.max_wait_s))
                if due:
                    failed = await asyncio.to_thread(self.train_isolating, buffer, sources)
                    await send_all(producer, failed, self.topics.dead_letters)
                    TRAINING_STEPS.inc()
                    PROGRESSIVE_LOGLOSS.set(self.loss.get())
                    buffer, sources, cells = [], [], 0
                    learned_since_snapshot = True
                now = time.monotonic()
                if learned_since_snapshot and not buffer and now - last_snapshot >= self.snapshot_every_s:
                    checkpoint = now - last_checkpoint >= self.checkpoint_every_s
                    await self.publish_next(checkpoint)
                    last_snapshot, learned_since_snapshot = now, False
                    if checkpoint:
                        last_checkpoint = now
                await watch.lagging(consumer)
                if not batches:
                    continue
                if sum(map(len, batches.values())) < self.batch_size // 2:
                    await asyncio.sleep(0.2)  # fewer, larger fetches: see stream.joiner.POLL_PAUSE_S
            if buffer:
                await send_all(producer, self.train_isolating(buffer, sources), self.topics.dead_letters)
            if self.trained_ids.unrecorded:
                await self.publish_next(checkpoint=True)
        finally:
            watch.close()
            await consumer.stop()
            await producer.stop()
            for publisher in (self.publisher, self.checkpointer):
                await publisher.close()
            self.store.close()
