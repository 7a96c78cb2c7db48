"""The closed loop without Kafka: a policy serves live traffic with the model lag of ``genco serve``.

Why: to compare how fast policies learn from their own traffic (genco against a Thompson-sampling
counter, say) under the same timing, in seconds of computer time and without a broker's noise. The
real loop over Kafka (``sim.harness.serve_loop``, ``benchmarks/live.py --kafka``) runs genco the same way.

Time is simulated. Requests arrive at ``rate`` a second. A share ``explore`` of them is served
uniformly at random; the rest by the policy as of its newest snapshot. A served impression becomes a
bag when its label is known: at its click (a delay inside the window) or when the click window closes.
Every ``snapshot_every_s`` the learner has trained, in arrival order and ``batch_size`` at a time, on
every bag known by then, and publishes a snapshot that serves until the next one: genco serve's
learner publishes every few seconds and flushes partial batches within a second or two.
"""

from __future__ import annotations

import copy
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from contract.events import Bag, SelectionRequest
from learner.policy import uniform_propensity


class Serving(Protocol):
    def select(self, requests: Sequence[SelectionRequest]) -> list[dict[str, str]]: ...


class LivePolicy(Protocol):
    """What the loop drives: ``learn`` on bags in arrival order, ``snapshot`` a frozen server."""

    def learn(self, bags: list[Bag]) -> None: ...

    def snapshot(self) -> Serving: ...


class Frozen:
    """A learner whose snapshot is a deep copy of itself (the baselines: learning and serving are one object)."""

    def __init__(self, policy) -> None:
        self.policy = policy

    def learn(self, bags: list[Bag]) -> None:
        self.policy.learn(bags)

    def snapshot(self) -> Serving:
        frozen = copy.deepcopy(self.policy)
        rng = getattr(self.policy, "rng", None)
        if isinstance(rng, np.random.Generator):  # each snapshot its own draws: a copy would replay the same ones
            frozen.rng = rng.spawn(1)[0]
        return frozen


@dataclass
class LoopConfig:
    rate: float = 500.0  # requests a second
    requests: int = 60_000
    window_s: float = 2.0  # click attribution window
    snapshot_every_s: float = 4.0
    explore: float = 0.05
    batch_size: int = 1024
    truth_sample: float = 0.3  # share of requests whose uniform and oracle CTRs are computed (exactly)


@dataclass
class Tenth:
    """True CTRs over one tenth of the run's requests."""

    served: list[float] = field(default_factory=list)
    uniform: list[float] = field(default_factory=list)
    oracle: list[float] = field(default_factory=list)
    sampled: list[float] = field(default_factory=list)  # served CTR of the requests whose truth was computed

    def captured(self) -> float:
        gap = np.mean(self.oracle) - np.mean(self.uniform)
        return float((np.mean(self.sampled) - np.mean(self.uniform)) / gap) if gap > 0 else 0.0


@dataclass
class LoopReport:
    tenths: list[Tenth] = field(default_factory=lambda: [Tenth() for _ in range(10)])

    def score(self, world, request: dict, i: int, p: float, config: LoopConfig, rng: random.Random) -> None:
        """Counts the ``i``-th request's served true CTR ``p`` in its tenth of the run, and for a share
        ``config.truth_sample`` of requests (drawn from ``rng``) its uniform and oracle CTRs, computed exactly:
        enumerating every combination is what scoring costs."""
        tenth = self.tenths[min(10 * i // config.requests, 9)]
        tenth.served.append(p)
        if rng.random() < config.truth_sample:
            uniform, oracle, _ = world.values(request)
            tenth.uniform.append(uniform)
            tenth.oracle.append(oracle)
            tenth.sampled.append(p)

    def captured_by_tenth(self) -> list[float]:
        return [round(tenth.captured(), 3) for tenth in self.tenths]

    def captured_last_quarter(self) -> float:
        """Over the requests of the last quarter of the run (tenths 8-10, the 8th counted half)."""
        last = [self.tenths[7], self.tenths[8], self.tenths[9]]
        weights = [0.5, 1.0, 1.0]

        def mean(attr: str) -> float:
            return sum(w * np.mean(getattr(t, attr)) for w, t in zip(weights, last, strict=True)) / sum(weights)

        gap = mean("oracle") - mean("uniform")
        return round(float((mean("sampled") - mean("uniform")) / gap), 3) if gap > 0 else 0.0


def run_loop(world, policy: LivePolicy, config: LoopConfig | None = None, seed: int = 0) -> LoopReport:
    """Serve ``config.requests`` requests of ``world`` with ``policy`` as above; scores by tenth of the run."""
    config = config or LoopConfig()
    rng = random.Random(seed)
    pending: list[tuple[float, int, dict]] = []  # (time the label is known, order, bag)
    known: list[dict] = []  # bags whose label is known, in arrival order, not yet learned
    report = LoopReport()
    serving = policy.snapshot()
    per_snapshot = int(config.rate * config.snapshot_every_s)
    for start in range(0, config.requests, per_snapshot):
        now = start / config.rate
        while pending and pending[0][0] <= now:
            known.append(heapq.heappop(pending)[2])
        for first in range(0, len(known), config.batch_size):
            policy.learn([Bag.model_validate(b) for b in known[first : first + config.batch_size]])
        known.clear()
        serving = policy.snapshot()
        raws = [world.request(f"live-{i}") for i in range(start, min(start + per_snapshot, config.requests))]
        explored = [rng.random() < config.explore for _ in raws]
        learned = [SelectionRequest.model_validate(r) for r, e in zip(raws, explored, strict=True) if not e]
        picks = iter(serving.select(learned))
        for offset, (raw, explore) in enumerate(zip(raws, explored, strict=True)):
            i = start + offset
            if explore:
                shown = {c: ids[rng.randrange(len(ids))] for c, ids in raw["candidates"].items()}
            else:
                shown = next(picks)
            p = world.click_probability(raw, shown)
            report.score(world, raw, i, p, config, rng)
            clicked = rng.random() < p
            at = i / config.rate
            known_at = at + (rng.uniform(0.05, 0.8 * config.window_s) if clicked else config.window_s)
            # who chose, as the selector's answer says and the ad server copies into the impression
            chosen_by, propensity = ("explore", uniform_propensity(raw["candidates"])) if explore else ("genco", None)
            bag = {**raw, "impression_id": f"imp-{i}", "ts": at, "shown": shown, "clicked": clicked,
                   "policy": chosen_by, "propensity": propensity}
            heapq.heappush(pending, (known_at, i, bag))
    return report
