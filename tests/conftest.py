"""Shared fixtures: small simulated worlds and their uniform-random logs, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sim.world import World, WorldConfig
from stream.events import Bag

torch.set_num_threads(1)


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
