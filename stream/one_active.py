"""A partition assignor that gives every partition to one member of the group; the others stand by.

Why: the joiner must see an impression and its clicks, which arrive on different topics and, with
producers' own partitioning, on any partition; and exactly one learner may train, or two models would
each learn half the bags. aiokafka's default (round robin) would hand ``clicks-0`` to one joiner and
``impressions-0`` to another as soon as a second ``genco serve`` joins: every click orphaned, every bag
labelled unclicked. With this assignor, any number of joiners or learners may run (on any hosts, with
``genco serve --agents``); one works, and when it is lost the group's rebalance hands everything to a
standby.

Sticky: the member that holds the partitions says so in its metadata and keeps them when a standby
joins, so starting one never moves the work (nor its state) away from the active member.

>>> from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata as Metadata
>>> class Cluster:
...     def partitions_for_topic(self, topic):
...         return {0, 1}
>>> members = {"b": Metadata(0, ["clicks", "impressions"], b"active"),
...            "a": Metadata(0, ["clicks", "impressions"], b"")}
>>> assignment = OneActive().assign(Cluster(), members)
>>> assignment["b"].assignment, assignment["a"].assignment
([('clicks', [0, 1]), ('impressions', [0, 1])], [])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

_ACTIVE = b"active"


class OneActive(AbstractPartitionAssignor):
    name = "genco-one-active"
    version = 0

    def __init__(self) -> None:
        self.active = False  # whether this member holds the partitions since the last assignment

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), _ACTIVE if self.active else b"")

    def assign(self, cluster, members: Mapping[str, ConsumerProtocolMemberMetadata]
               ) -> dict[str, ConsumerProtocolMemberAssignment]:
        """Everything to the member that already holds it, else to the first member by id."""
        chosen = min(members, key=lambda member: (members[member].user_data != _ACTIVE, member))
        topics = sorted({topic for metadata in members.values() for topic in metadata.subscription})
        everything = [(topic, sorted(partitions)) for topic in topics
                      if (partitions := cluster.partitions_for_topic(topic))]
        return {member: ConsumerProtocolMemberAssignment(self.version, everything if member == chosen else [], b"")
                for member in members}

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.active = bool(assignment.assignment)
