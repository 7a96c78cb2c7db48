"""The joiner's and the learner's assignor: every partition to one member, kept by the member that holds them.
(Two ``genco serve`` processes sharing a deployment, one killed: tests/test_reliability.py.)"""

from __future__ import annotations

import doctest

from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata as Metadata

import stream.one_active
from stream.one_active import OneActive


class Cluster:
    def __init__(self, partitions: dict[str, int]) -> None:
        self.partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return set(range(self.partitions[topic])) if topic in self.partitions else None


def test_docstring_example():
    assert doctest.testmod(stream.one_active).failed == 0


def test_a_standby_that_joins_never_takes_the_work_and_takes_all_of_it_when_the_active_member_leaves():
    cluster = Cluster({"impressions": 4, "clicks": 3})
    active, standby = OneActive(), OneActive()
    topics = ["impressions", "clicks"]
    alone = active.assign(cluster, {"m-9": active.metadata(topics)})
    active.on_assignment(alone["m-9"])
    assert alone["m-9"].assignment == [("clicks", [0, 1, 2]), ("impressions", [0, 1, 2, 3])]
    both = active.assign(cluster, {"m-9": active.metadata(topics), "m-1": standby.metadata(topics)})
    assert both["m-1"].assignment == [] and both["m-9"].assignment == alone["m-9"].assignment, \
        "the member holding the partitions keeps them, though another sorts first"
    standby.on_assignment(both["m-1"])
    left = standby.assign(cluster, {"m-1": standby.metadata(topics)})
    assert left["m-1"].assignment == alone["m-9"].assignment


def test_a_topic_without_metadata_yet_is_left_out():
    assignment = OneActive().assign(Cluster({"clicks": 1}), {"m": Metadata(0, ["clicks", "impressions"], b"")})
    assert assignment["m"].assignment == [("clicks", [0])]
