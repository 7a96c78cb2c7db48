"""The closed loop without Kafka (sim/loop.py): what a snapshot of a baseline serves."""

from __future__ import annotations

import dataclasses

from contract.events import Bag, SelectionRequest
from learner.baselines import PooledBeta
from learner.policy import uniform_propensity
from sim.loop import Frozen, LoopConfig, run_loop
from sim.zoo import ZooWorld, draw_config


def test_each_snapshot_of_a_sampling_baseline_draws_afresh():
    """A snapshot is a copy; were its random generator copied too, every snapshot would replay the draws of the
    first, and a Thompson-sampled counter would serve the same "random" picks all run long."""
    live = Frozen(PooledBeta(thompson=True, seed=0))
    request = SelectionRequest.model_validate(
        {"request_id": "r", "ad_id": "a", "candidates": {f"c{j}": [f"e{j}-{k}" for k in range(10)] for j in range(6)}})
    first, second = live.snapshot().select([request] * 20), live.snapshot().select([request] * 20)
    assert first != second


class FirstCandidates:
    """A live policy that always serves every component's first candidate, and keeps the bags it learns."""

    def __init__(self) -> None:
        self.bags: list[Bag] = []

    def learn(self, bags: list[Bag]) -> None:
        self.bags.extend(bags)

    def snapshot(self) -> FirstCandidates:
        return self

    def select(self, requests: list[SelectionRequest]) -> list[dict[str, str]]:
        return [{component: ids[0] for component, ids in r.candidates.items()} for r in requests]


def test_the_loops_bags_say_who_chose_as_the_pipelines_do():
    """The selector's answer says who chose (``genco``, or ``explore`` with its propensity) and the ad server
    copies that into the impression: what the referee judges on, and so what the loop's bags must carry too."""
    policy = FirstCandidates()
    world = ZooWorld(dataclasses.replace(draw_config("paper", 0), n_ads=50))
    run_loop(world, policy, LoopConfig(rate=500.0, requests=6_000, explore=0.2), seed=0)
    explored = [b for b in policy.bags if b.policy == "explore"]
    served = [b for b in policy.bags if b.policy == "genco"]
    # learned at each snapshot: the bags known by then (those of the last snapshot's 4 s are not)
    assert len(explored) + len(served) == len(policy.bags) > 2_500
    assert 0.15 < len(explored) / len(policy.bags) < 0.25
    assert all(b.propensity == uniform_propensity(b.candidates) for b in explored)
    assert all(b.propensity is None and b.shown == {c: ids[0] for c, ids in b.candidates.items()} for b in served)
    assert any(b.shown != {c: ids[0] for c, ids in b.candidates.items()} for b in explored)
