"""Event-time watermark over several partitions: how far event time has surely advanced.

A partition that still has a backlog holds the watermark at the newest ``ts`` read
from it, so reading one topic ahead of another (clicks far ahead of impressions,
say) never closes a window early. When every partition is caught up, event time
is taken to advance with the clock from the newest event seen, up to when the
broker last confirmed that no partition held anything newer (not simply "now":
a broker that stops answering must stop the watermark), so windows close at low
or no traffic too. A stall between confirmations is not credited at all.

Every advance then settles for ``settle_s`` seconds of broker answers before it
counts. Producers are independent: after an outage (or any hiccup) one of them may
deliver fresh impressions while another still holds the clicks that belong to
older ones, and without the wait those fresh timestamps would close the older
windows first. The wait is processing time, so it also covers ordinary
out-of-order arrival, and a negative bag still goes out within the contract's
window + 5 s.

Event time never runs ahead of the joiner's own clock: an event stamped in the
future (a producer's clock off by a minute, or a garbage ts of year 3000) counts
as "now", so it cannot close every pending window at once and label them all 0.
"""

from __future__ import annotations

import math
from collections import deque

from aiokafka import TopicPartition

# Confirmations further apart than this mean the broker (or the joiner) stalled: that stretch is
# not credited to event time, since producers resend what they held back only after it.
MAX_CONFIRMATION_GAP_S = 1.0


class Watermark:
    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self.newest: dict[TopicPartition, float] = {}
        self.max_ts = -math.inf
        self.max_ts_wall = 0.0  # when max_ts was seen, shifted on by every stall since
        self.confirmed = 0.0
        self.answered_s = 0.0  # seconds of broker answers so far, stalls left out
        self.settling: deque[tuple[float, float]] = deque()  # (answered_s when reached, value reached)
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
        if self.confirmed:
            gap = max(confirmed - self.confirmed, 0.0)
            if gap > MAX_CONFIRMATION_GAP_S:
                self.max_ts_wall += gap
            else:
                self.answered_s += gap
        self.confirmed = max(self.confirmed, confirmed)
        reached = self._reached(lagging, confirmed)
        if reached > (self.settling[-1][1] if self.settling else self.value):
            self.settling.append((self.answered_s, reached))
        while self.settling and self.settling[0][0] <= self.answered_s - self.settle_s:
            self.value = max(self.value, self.settling.popleft()[1])
        return self.value

    def _reached(self, lagging: list[TopicPartition], confirmed: float) -> float:
        """How far event time has advanced by the events read so far, before settling."""
        if lagging:
            if any(tp not in self.newest for tp in lagging):
                return -math.inf
            return min(self.newest[tp] for tp in lagging)
        if self.max_ts == -math.inf:
            return -math.inf
        return self.max_ts + max(confirmed - self.max_ts_wall, 0.0)
