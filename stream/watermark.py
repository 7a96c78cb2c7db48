"""Event-time watermark over several partitions: how far event time has surely advanced.

A partition that still has a backlog holds the watermark at the newest ``ts`` read
from it, so reading one topic ahead of another (clicks far ahead of impressions,
say) never closes a window early. When every partition is caught up, event time
is taken to advance with the clock from the newest event seen, up to when the
broker last confirmed that no partition held anything newer (not simply "now":
a broker that stops answering must stop the watermark), so windows close at low
or no traffic too. A stall between confirmations is not credited at all: after
an outage, producers' held-back clicks reach the broker only after it answers
again, possibly after the joiner's first fetch does.

Event time never runs ahead of the joiner's own clock: an event stamped in the
future (a producer's clock off by a minute, or a garbage ts of year 3000) counts
as "now", so it cannot close every pending window at once and label them all 0.
"""

from __future__ import annotations

import math

from aiokafka import TopicPartition

# Confirmations further apart than this mean the broker (or the joiner) stalled: that stretch is
# not credited to event time, since producers resend what they held back only after it.
MAX_CONFIRMATION_GAP_S = 1.0


class Watermark:
    def __init__(self) -> None:
        self.newest: dict[TopicPartition, float] = {}
        self.max_ts = -math.inf
        self.max_ts_wall = 0.0  # when max_ts was seen, shifted on by every stall since
        self.confirmed = 0.0
        self.value = -math.inf

    def observe(self, tp: TopicPartition, ts: float, wall: float) -> None:
        ts = min(ts, wall)
        if ts > self.newest.get(tp, -math.inf):
            self.newest[tp] = ts
        if ts > self.max_ts:
            self.max_ts, self.max_ts_wall = ts, wall

    def advance(self, lagging: list[TopicPartition], confirmed: float) -> float:
        """The new watermark, given the partitions that still have a backlog and when the broker last
        confirmed the end of every partition; never moves back."""
        gap = confirmed - self.confirmed
        if self.confirmed and gap > MAX_CONFIRMATION_GAP_S:
            self.max_ts_wall += gap
        self.confirmed = max(self.confirmed, confirmed)
        if lagging:
            if any(tp not in self.newest for tp in lagging):
                return self.value
            candidate = min(self.newest[tp] for tp in lagging)
        elif self.max_ts > -math.inf:
            candidate = self.max_ts + max(confirmed - self.max_ts_wall, 0.0)
        else:
            return self.value
        self.value = max(self.value, candidate)
        return self.value
