"""Shared fixtures: small simulated worlds and their uniform-random logs, built once per session."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from contract.events import Bag
from learner.compute import configure_compute
from sim.world import World, WorldConfig

configure_compute()


def make_log(seed: int, n_ads: int, bags: int) -> tuple[World, list[dict]]:
    world = World(WorldConfig(seed=seed, n_ads=n_ads))
    return world, world.uniform_log(bags)


@pytest.fixture(scope="session")
def small_world() -> tuple[World, list[Bag]]:
    """A 40-ad world and 40k uniform bags: enough for a policy to learn, quick to build."""
    world, log = make_log(seed=11, n_ads=40, bags=40_000)
    return world, [Bag.model_validate(b) for b in log]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env().ping()
        return True
    except Exception:  # no client library, no socket, no engine: all mean "no Docker here"
        return False


@pytest.fixture(scope="session", params=["embedded", "testcontainers"])
def broker(request) -> str:
    """A real Kafka-protocol broker's kafka:// URL: the embedded Tansu always, Apache Kafka where Docker runs."""
    if request.param == "embedded":
        from stream.embedded import EmbeddedBroker

        with EmbeddedBroker() as embedded:
            yield embedded.url
        return
    if not _docker_available():
        pytest.skip("no Docker engine here: the Apache Kafka (testcontainers) variant needs one")
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer("confluentinc/cp-kafka:7.6.0") as kafka:
        yield "kafka://" + kafka.get_bootstrap_server()


@pytest.fixture
def topics(request):
    """Topic names unique to the test, so tests sharing a broker never see each other's messages."""
    from stream.kafka import Topics

    return Topics(f"t{zlib.crc32(request.node.nodeid.encode()):08x}.")


def pytest_collection_modifyitems(items) -> None:
    """A test that asks for a broker belongs to the integration tier: one without the mark stops the run, so
    ``-m "not integration"`` never starts a broker by accident."""
    unmarked = [item.nodeid for item in items
                if "broker" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("integration")]
    if unmarked:
        raise pytest.UsageError("mark these @pytest.mark.integration (they use the broker fixture): "
                                + ", ".join(unmarked))
