"""The join window: which click labels which impression, and how long genco remembers either.

One value, built once from the settings (``Settings.join_window``) and handed to every part that
reads it: the joiner's decisions (``stream.join``), its event-time watermark (``stream.watermark``)
and the learner's marks of trained impressions (``stream.trained_ids``). The semantics are the
contract's (docs/contract.md, "Join").

>>> window = JoinWindow(after_s=1800.0)
>>> window.attributes(click_ts=1100.0, impression_ts=1000.0)
True
>>> window.attributes(click_ts=900.0, impression_ts=1000.0)  # 100 s before it: beyond a clock's skew
False
>>> window.horizon_s  # impression_ids are remembered an hour, or two windows where that is longer
3600.0
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JoinWindow:
    after_s: float  # a click up to this long after its impression labels it (GENCO_CLICK_WINDOW_S)
    before_s: float = 60.0  # and one up to this long before it: producers' clocks disagree
    # Event time counts only once the broker has answered for this long after reaching it, so an outage
    # or a late producer's burst is never taken for quiet traffic that closes windows.
    grace_s: float = 2.5

    @property
    def horizon_s(self) -> float:
        """How long, in event time, an impression_id is remembered: its repeats are recognised within it, and a
        bag replayed later than this after the newest trained is stale."""
        return max(2 * self.after_s, 3600.0)

    def attributes(self, click_ts: float, impression_ts: float) -> bool:
        """Whether a click at ``click_ts`` labels the impression at ``impression_ts``."""
        return -self.before_s <= click_ts - impression_ts <= self.after_s
