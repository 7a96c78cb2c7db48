"""``sim.harness.serve_loop`` (benchmarks/live.py --kafka): genco serve on the embedded broker, scored the way
sim/loop.py scores."""

from __future__ import annotations

import dataclasses

import pytest

from sim.harness import serve_loop
from sim.loop import LoopConfig
from sim.zoo import ZooWorld, draw_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_kafka_run_is_scored_by_tenth_like_the_loop():
    """Every request answered and every tenth of them scored against uniform and oracle: the rows that the
    benchmark prints beside sim/loop.py's come from the whole run, not from the answers that made it in time."""
    config = LoopConfig(rate=500.0, requests=1000)
    world = ZooWorld(dataclasses.replace(draw_config("catalogue", 1000), n_ads=100))
    loop, served = serve_loop(world, config, seed=1000)
    assert served.answered == served.sent == 1000 and not served.invalid
    assert len(loop.captured_by_tenth()) == 10
    assert all(tenth.served and tenth.oracle and tenth.uniform for tenth in loop.tenths)
    assert sum(len(tenth.served) for tenth in loop.tenths) == 1000
