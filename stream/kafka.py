"""Kafka plumbing shared by every agent: broker URLs, topic names, clients, topic creation.

The joiner and the learner talk to Kafka through aiokafka directly; the selector is a
Faust agent (``stream.faust_app``) whose consumer and producer are made here too, so every
client has the same credentials. kafka-python's admin client creates topics before they start.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.helpers import create_ssl_context
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from contract.settings import Settings

log = logging.getLogger("genco.kafka")

MAX_MESSAGE_BYTES = 6 << 20  # a little over the 5 MB values the contract says we must survive


def bootstrap_servers(url: str) -> list[str]:
    """``kafka://h1:9092,h2:9092`` (or bare ``h1:9092``) as a bootstrap list."""
    hosts = url.removeprefix("kafka://").strip("/")
    servers = [h.strip() for h in hosts.split(",") if h.strip()]
    if not servers or any(":" not in s for s in servers):
        raise ValueError(f"broker URL {url!r} is not kafka://host:port[,host:port]")
    return servers


@dataclass(frozen=True)
class Topics:
    """The contract's topic names under one prefix."""

    prefix: str = "genco."

    @property
    def requests(self) -> str:
        return f"{self.prefix}selection-requests"

    @property
    def responses(self) -> str:
        return f"{self.prefix}selection-responses"

    @property
    def impressions(self) -> str:
        return f"{self.prefix}impressions"

    @property
    def clicks(self) -> str:
        return f"{self.prefix}clicks"

    @property
    def bags(self) -> str:
        return f"{self.prefix}bags"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}dead-letters"

    @property
    def snapshots(self) -> str:
        """genco's own: the learner's model versions, for every selector (``stream.snapshot_topic``)."""
        return f"{self.prefix}snapshots"

    @property
    def checkpoints(self) -> str:
        """genco's own: the learner's checkpoints, for a learner that takes over on another host."""
        return f"{self.prefix}checkpoints"

    @property
    def configs(self) -> dict[str, dict[str, str]]:
        """Topic configs genco sets when it creates a topic. The snapshot and checkpoint topics keep their newest
        2 GiB, however old (an idle learner publishes nothing, and its newest chain must stay readable), in
        64 MiB segments."""
        newest = {"retention.ms": "-1", "retention.bytes": str(2 << 30), "segment.bytes": str(64 << 20)}
        return {self.snapshots: newest, self.checkpoints: newest}

    def group(self, agent: str) -> str:
        """The consumer group of an agent: per prefix, so deployments sharing a cluster stay apart."""
        return f"{self.prefix}{agent}"

    def all(self) -> list[str]:
        """Every topic genco reads or writes: the contract's and its own."""
        return [self.requests, self.responses, self.impressions, self.clicks, self.bags, self.dead_letters,
                self.snapshots, self.checkpoints]


@dataclass(frozen=True)
class Connection:
    """Where the broker is and how to authenticate; makes clients configured alike.

    ``security`` holds the GENCO_KAFKA_* settings (passwords among them): it is left out of the
    repr, and the CA, certificate and key files become one ``ssl.SSLContext`` (what aiokafka and
    kafka-python take; aiokafka refuses ``ssl_cafile``).
    """

    servers: tuple[str, ...]
    security: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    compression: str = "none"

    @classmethod
    def from_settings(cls, settings: Settings, broker: str | None = None) -> Connection:
        return cls(tuple(bootstrap_servers(broker or settings.broker)), tuple(sorted(settings.kafka_security.items())),
                   settings.kafka_compression)

    def client_options(self) -> dict:
        """Security options for aiokafka's and kafka-python's clients alike."""
        options = dict(self.security)
        files = {name: options.pop(f"ssl_{name}", None) for name in ("cafile", "certfile", "keyfile")}
        if options.get("security_protocol", "PLAINTEXT").endswith("SSL"):
            options["ssl_context"] = self.ssl_context(**files)
        return options

    @staticmethod
    def ssl_context(cafile: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
        """Verifies the brokers against ``cafile`` (the system's CAs without one); presents ``certfile`` if set."""
        return create_ssl_context(cafile=cafile, certfile=certfile, keyfile=keyfile)

    def producer(self, linger_ms: int = 2, **options) -> AIOKafkaProducer:
        compression = None if self.compression == "none" else self.compression
        return AIOKafkaProducer(bootstrap_servers=list(self.servers), linger_ms=linger_ms, max_batch_size=512 << 10,
                                max_request_size=MAX_MESSAGE_BYTES, acks="all", compression_type=compression,
                                **self.client_options(), **options)

    def consumer(self, *topics: str, group: str, max_wait_ms: int = 100, **options) -> AIOKafkaConsumer:
        """A consumer that commits only when told to and starts from the earliest message.

        ``max_wait_ms``: the embedded broker answers an empty fetch only at its max wait, so the wait
        is latency for a latency-bound agent; but each fetch costs broker CPU, so only those go low.
        """
        return AIOKafkaConsumer(*topics, bootstrap_servers=list(self.servers), group_id=group,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_bytes=16 << 20, max_partition_fetch_bytes=MAX_MESSAGE_BYTES,
                                fetch_max_wait_ms=max_wait_ms, rebalance_timeout_ms=3000,
                                session_timeout_ms=10000, heartbeat_interval_ms=1000,
                                **self.client_options(), **options)

    def ensure_genco_topics(self, topics: Topics, request_partitions: int = 1) -> None:
        """Every topic genco reads or writes, created where missing: selection-requests with
        ``request_partitions`` (``Settings.request_partitions``), the others with one each, genco's own two
        with their configs (each holds chains read in order, so they keep one partition)."""
        self.ensure_topics(topics.all(), configs=topics.configs, counts={topics.requests: request_partitions})

    def ensure_topics(self, topics: list[str], partitions: int = 1, timeout_s: float = 60.0,
                      configs: dict[str, dict[str, str]] | None = None, counts: dict[str, int] | None = None) -> None:
        """Create the topics that do not exist, each with ``partitions`` (or its own in ``counts``) and its
        ``configs`` if any; leave existing ones (and their partition counts and configs) alone."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                admin = KafkaAdminClient(bootstrap_servers=list(self.servers), client_id="genco-admin",
                                         **self.client_options())
                break
            except KafkaError as error:
                if time.monotonic() > deadline:
                    raise
                log.warning("broker %s not reachable yet (%s); retrying", ",".join(self.servers), error)
                time.sleep(1.0)
        try:
            existing = set(admin.list_topics())
            for topic in [t for t in topics if t not in existing]:
                count = (counts or {}).get(topic, partitions)
                try:
                    admin.create_topics([NewTopic(topic, count, 1, topic_configs=(configs or {}).get(topic))])
                    log.info("created topic %s (%d partition%s)", topic, count, "s"[: count > 1])
                except TopicAlreadyExistsError:
                    pass
        finally:
            admin.close()
