"""The closed loop without Kafka (sim/loop.py): what a snapshot of a baseline serves."""

from __future__ import annotations

from contract.events import SelectionRequest
from learner.baselines import PooledBeta
from sim.loop import Frozen


def test_each_snapshot_of_a_sampling_baseline_draws_afresh():
    """A snapshot is a copy; were its random generator copied too, every snapshot would replay the draws of the
    first, and a Thompson-sampled counter would serve the same "random" picks all run long."""
    live = Frozen(PooledBeta(thompson=True, seed=0))
    request = SelectionRequest.model_validate(
        {"request_id": "r", "ad_id": "a", "candidates": {f"c{j}": [f"e{j}-{k}" for k in range(10)] for j in range(6)}})
    first, second = live.snapshot().select([request] * 20), live.snapshot().select([request] * 20)
    assert first != second
