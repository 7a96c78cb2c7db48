"""The learner told a zoo world's structure (sim/bound.py): it carries a template's record to every ad, as
the world does, and knows nothing of an ad's own element before it is shown."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from contract.events import Bag
from sim.bound import KnownStructure
from sim.zoo import ZooWorld, draw_config


@pytest.fixture(scope="module")
def learned() -> tuple[ZooWorld, KnownStructure]:
    """A paper world of 200 ads whose highlights and marketing lines come from one global catalogue, after a
    uniform log of 100,000 impressions."""
    config = dataclasses.replace(draw_config("paper", 0), n_ads=200, templated=("marketing", "highlight"),
                                 template_scope="global", context=0.0, churn_every=10**9)
    world = ZooWorld(config)
    learner = KnownStructure(world)
    for start in range(0, 100_000, 1024):
        learner.learn([Bag.model_validate(b) for b in world.uniform_log(1024, start=start)])
    return world, learner


def test_a_template_is_judged_in_an_ad_that_never_listed_it_by_its_record_in_other_ads(learned):
    world, learner = learned
    elements = world.elements
    templates = np.flatnonzero(elements.template > 0)
    counted = set(learner_cells(learner))
    pairs = [(ad, e) for e in templates for ad in range(50) if (ad, e) not in counted]
    ad, e = np.array(pairs).T
    estimate = learner.effects(ad, e)
    scale, category, _ = world.structure(ad, e)
    truth = scale * (elements.quality[e] + world._template_deviation[elements.template[e], category])
    assert (estimate != 0).mean() > 0.9
    assert np.corrcoef(estimate, truth)[0, 1] > 0.25  # 0.38 as drawn: the counts are few, not absent


def test_an_own_element_never_shown_in_an_ad_starts_at_zero_there(learned):
    world, learner = learned
    counted = set(learner_cells(learner))
    own = [e for e in np.flatnonzero(world.elements.template == 0).tolist() if (0, e) not in counted]
    assert len(own) > 100
    assert np.all(learner.effects(np.zeros(len(own), dtype=np.int64), np.array(own)) == 0.0)


def learner_cells(learner: KnownStructure) -> list[tuple[int, int]]:
    keys = learner.cells.index.keys
    return list(zip((keys >> 32).tolist(), (keys & ((1 << 32) - 1)).tolist(), strict=True))
