"""The learner agent: bags in arrival order -> ``Learner.step`` per mini-batch -> snapshots.

A Faust agent (``stream.faust_app``) in the ``<prefix>learner`` app, whose group hands every
partition of the bags topic to one member (``stream.one_active``): one learner trains, the
others stand by, and when it is lost the group's rebalance hands everything to a standby.

Effectively once: the marks of trained impressions (``stream.trained_ids``) are written to
RocksDB only together with a checkpoint (a snapshot carrying the optimiser state), and a bag
is acknowledged to Faust, which commits acknowledged offsets only, once a checkpoint on Kafka
covers it. So the group's committed offset never passes a bag the newest checkpoint has not
trained on. After a crash the learner reloads that checkpoint and Faust starts from the
committed offset, at or before the checkpoint's end: the bags after the checkpoint are
trained again, and those before it are skipped by their marks, so every impression counts in
the model once (the joiner may repeat a bag after its own crash; that copy is skipped too).

Serving snapshots (weights only) go out every ``snapshot_every_s`` while learning, on the
snapshot topic for every selector (``stream.snapshot_topic``: a whole model now and then,
the rows that changed between) and into the state dir; checkpoints every
``checkpoint_every_s``, into the state dir and on the checkpoint topic (weights, optimiser
state, trained marks). A learner handed the partitions first takes over the newest
checkpoint on the topic if that is newer than its own, before it trains on any bag, so a
standby on a fresh host resumes where the lost one last checkpointed. Version numbers only
ever grow, across learners too: one continues after the newest version on the topic.

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
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from faust.types import EventT
from river import metrics

from contract.deadletters import InvalidInput, Message, Reason
from contract.events import Bag, work_batches
from contract.jsonl import parse_line
from contract.window import JoinWindow
from learner.publications import Differ, Replica, encode
from learner.referee import Referee
from learner.serving import readouts
from learner.snapshots import SnapshotError, SnapshotStore, model_from
from learner.trainer import Learner, preset
from state.kv import Store
from stream.faust_app import GencoApp
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
from stream.runtime import InputRecord, dead_letter, send_all
from stream.snapshot_topic import SnapshotPublisher, read_newest
from stream.trained_ids import TENSORS as TRAINED_TENSORS
from stream.trained_ids import TrainedIds

Source = tuple[TopicPartition, InputRecord]  # where a bag came from (a Faust message), for its dead letter

log = logging.getLogger("genco.learner")

_CHECKPOINT = b"checkpoint"  # -> the snapshot version the stored trained ids belong to
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


class TrainingAgent:
    def __init__(self, connection: Connection, topics: Topics, state_dir: Path, window: JoinWindow,
                 batch_size: int = 1024, max_wait_s: float = 1.5,
                 snapshot_every_s: float = 4.0, checkpoint_every_s: float = 30.0,
                 referee_settings: dict | None = None) -> None:
        self.connection = connection
        self.topics = topics
        self.store = Store(state_dir / "learner")
        self.snapshots = SnapshotStore(state_dir / "snapshots")
        self.trained_ids = TrainedIds(self.store, horizon_s=window.horizon_s)
        self.batch_size = batch_size
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
        # Training, publishing and taking over a checkpoint each hold it: none runs into another's model.
        self.lock = asyncio.Lock()
        self.unacknowledged: list[EventT] = []  # taken bags no checkpoint on Kafka covers yet
        self.checkpointed_on_kafka = True  # whether the newest checkpoint recorded here went out on the topic
        self.learned_since_snapshot = False
        self.last_snapshot = self.last_checkpoint = time.monotonic()
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

    def admit(self, tp: TopicPartition, record: InputRecord) -> Bag | Message | None:
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
        """One optimiser step."""
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
            self._record_trained()
            tensors = weights | {_OPTIMIZER + name: value.numpy() for name, value in optimizer_state.items()}
            publication = self.checkpoint_differ.publication(
                tensors | self.trained_ids.tensors(),
                {name: getattr(manifest, name) for name in CHECKPOINTED})
            outgoing.append(Outgoing(self.checkpointer, publication.manifest["kind"] == "base", encode(publication)))
        return outgoing

    async def publish_next(self, checkpoint: bool) -> bool:
        """Write the next snapshot and put it (and the checkpoint) on Kafka; whether all of it went out. The
        first time, this learner takes the next epoch and continues after the topic's newest version: only now,
        as the active learner (a standby that started long ago must not reuse the version numbers of its day)."""
        if self.publisher.producer is None:
            for publisher in (self.publisher, self.checkpointer):
                await publisher.open()
            self.version = max(self.version, self.publisher.last_version, self.checkpointer.last_version)
        sent = [await self.send(outgoing) for outgoing in await asyncio.to_thread(self.publish, checkpoint)]
        return all(sent)

    async def send(self, outgoing: Outgoing) -> bool:
        """Put a publication on its topic; whether it went. Where that fails, the next ones are bases: readers
        that missed this one must not wait for a chain that broke here."""
        try:
            await outgoing.publisher.publish(self.version, outgoing.base, outgoing.blob)
            return True
        except KafkaError as error:
            log.error("v%d not published on %s (%s: %s): the next versions go whole", self.version,
                      outgoing.publisher.topic, type(error).__name__, error)
            self.differ, self.checkpoint_differ = Differ(), Differ(CHECKPOINT_BASE_EVERY)
            return False

    async def adopt_newest_checkpoint(self) -> None:
        """Resume from the newest checkpoint on the checkpoint topic when it is newer than this learner's own:
        its model, optimiser and referee, and its trained marks. A checkpoint that does not load
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
        tx.put(_CHECKPOINT, str(m["version"]).encode())
        tx.commit()
        self.learner, self.referee, self.learner_version = learner, referee, m["version"]
        self.version = max(self.version, m["version"])
        self.unacknowledged.clear()  # trained into the model being replaced: taken again from the committed offset
        self.checkpointed_on_kafka = True
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
        """Record the trained impressions with the checkpoint they belong to."""
        tx = self.store.transaction()
        self.trained_ids.record(tx)
        tx.put(_CHECKPOINT, str(self.version).encode())
        tx.commit()
        self.learner_version = self.version

    async def learn(self, producer: AIOKafkaProducer, events: list[EventT]) -> None:
        """Train on one batch of taken bags (skipping those already trained), dead-letter what cannot be, and
        publish a snapshot (and a checkpoint) when one is due. The caller holds ``lock``."""
        self.unacknowledged += events
        EVENTS_IN.labels(self.topics.bags).inc(len(events))
        sources = [(TopicPartition(event.message.topic, event.message.partition), event.message) for event in events]
        dead, trained = await asyncio.to_thread(self.admit_and_train, sources)
        if trained:
            TRAINING_STEPS.inc()
            PROGRESSIVE_LOGLOSS.set(self.loss.get())
            self.learned_since_snapshot = True
        await send_all(producer, dead, self.topics.dead_letters)
        await self.publish_when_due()

    def admit_and_train(self, sources: list[Source]) -> tuple[list[Message], bool]:
        """Parse, admit and train on one batch, off the event loop (which takes the next batch meanwhile): the
        dead letters, and whether any bag was trained."""
        bags, trained_sources, dead = [], [], []
        for source in sources:
            admitted = self.admit(*source)
            if isinstance(admitted, tuple):
                dead.append(admitted)
            elif admitted is not None:
                bags.append(admitted)
                trained_sources.append(source)
        if bags:
            dead += self.train_isolating(bags, trained_sources)
        return dead, bool(bags)

    async def publish_when_due(self, force_checkpoint: bool = False) -> None:
        """A snapshot when ``snapshot_every_s`` has passed since the last and something was learned since; with a
        checkpoint when ``checkpoint_every_s`` has (or ``force_checkpoint`` and bags are unrecorded). The bags a
        checkpoint on Kafka covers are then acknowledged. The caller holds ``lock``."""
        if not self.trained_ids.unrecorded and self.checkpointed_on_kafka:
            self.acknowledge(len(self.unacknowledged))  # all taken since were skipped or dead-lettered
        now = time.monotonic()
        checkpoint = bool(self.trained_ids.unrecorded) and (
            force_checkpoint or now - self.last_checkpoint >= self.checkpoint_every_s)
        if not checkpoint and not (self.learned_since_snapshot and now - self.last_snapshot >= self.snapshot_every_s):
            return
        covered = len(self.unacknowledged)
        published = await self.publish_next(checkpoint)
        self.last_snapshot, self.learned_since_snapshot = now, False
        if checkpoint:
            self.last_checkpoint, self.checkpointed_on_kafka = now, published
            if published:
                self.acknowledge(covered)

    def acknowledge(self, count: int) -> None:
        """Acknowledge the first ``count`` taken bags. Always the oldest first: Faust commits past a single
        unacknowledged offset at the head of the acknowledged ones (faust-streaming #606)."""
        for event in self.unacknowledged[:count]:
            event.ack()
        del self.unacknowledged[:count]

    async def train_taken(self, producer: AIOKafkaProducer, taken: asyncio.Queue, stop: asyncio.Event) -> None:
        """Train each batch the agent takes, in order, while the agent takes the next; publish when due, also
        while no bags arrive (the last batch before a pause must still reach the selectors, and a checkpoint)."""
        while not stop.is_set():
            try:
                events = await asyncio.wait_for(taken.get(), timeout=0.25)
            except TimeoutError:
                events = []
            async with self.lock:
                if events:
                    await self.learn(producer, events)
                else:
                    await self.publish_when_due()

    async def run(self, stop: asyncio.Event) -> None:
        producer = self.connection.producer()
        await producer.start()
        app = GencoApp("learner", self.connection, self.topics, ready=self.ready, fetch_wait_ms=100,
                       max_poll_records=self.batch_size, assignor=OneActive(), wait_empty=False,
                       send_letters=lambda letters: send_all(producer, letters, self.topics.dead_letters))
        # Acknowledged only once a checkpoint covers them (publish_when_due), so Faust's committed offset never
        # passes an untrained bag.
        taken = app.batches(self.topics.bags, self.batch_size, within=self.max_wait_s)

        @app.on_partitions_assigned.connect
        async def take_over(sender, assigned, **kwargs) -> None:
            # Before any bag of the new assignment is trained (training waits for the lock).
            if assigned:
                async with self.lock:
                    await self.adopt_newest_checkpoint()

        await app.start()
        log.info("learning from %s; snapshots in %s (starting after v%d)", self.topics.bags,
                 self.snapshots.directory, self.version)
        training = asyncio.create_task(self.train_taken(producer, taken, stop))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([training, stopping], return_when=asyncio.FIRST_COMPLETED)
            if training.done():
                training.result()  # an error that stopped training stops the agent
            async with self.lock:
                await self.publish_when_due(force_checkpoint=True)
        finally:
            for task in (training, stopping):
                task.cancel()
            await app.stop()
            await producer.stop()
            for publisher in (self.publisher, self.checkpointer):
                await publisher.close()
            self.store.close()
