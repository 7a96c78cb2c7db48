"""How genco meets what it has not seen and lets go of what stopped working: new elements start from what
is known about them, and a creative whose clicks dry up stops being served."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from contract.events import Bag, SelectionRequest
from learner.policy import Selector
from learner.trainer import Learner, preset
from sim.zoo import ZooWorld, draw_config


def _template_bags(n: int, seed: int = 0) -> list[Bag]:
    """40 ads, each with the shared title template "t-shared" (12% clicked) and two titles of its own (5%),
    served uniformly."""
    rng = random.Random(seed)
    bags = []
    for i in range(n):
        ad = i % 40
        titles = ["t-shared", f"t-{ad}-1", f"t-{ad}-2"]
        title = rng.choice(titles)
        bags.append(Bag.model_validate({
            "impression_id": f"i-{i}", "ts": i, "ad_id": f"ad-{ad}", "user": {"id": f"u-{i % 300}"},
            "candidates": {"title": titles}, "shown": {"title": title},
            "clicked": rng.random() < (0.12 if title == "t-shared" else 0.05)}))
    return bags


def _request(request_id: str, ad_id: str, titles: list[str]) -> SelectionRequest:
    return SelectionRequest.model_validate({"request_id": request_id, "ad_id": ad_id, "user": {"id": "u-new"},
                                            "candidates": {"title": titles}})


def test_a_new_element_starts_from_its_template_record_and_a_fresh_one_from_its_component():
    torch.manual_seed(0)
    learner = Learner(preset("default"))
    learner.learn(_template_bags(12_000))
    # A new ad: the template has never been shown in it, the other two titles have never been shown anywhere.
    request = _request("r-new", "ad-new", ["t-fresh-a", "t-shared", "t-fresh-b"])
    learner.model.eval()
    enc = learner.model.encode(learner.featurizer.batch([request]))
    fresh_a, shared, fresh_b = enc.element_prior.tolist()
    assert fresh_a == fresh_b  # nothing known of either: both start at the component's mean
    assert abs(fresh_a) < 0.15  # ... which, with one title shown per impression, is about the ad's own CTR
    assert shared - fresh_a > 0.5  # the template's record in the 40 other ads (true log-odds gap 0.95)
    picks = Selector(learner.model).select([_request(f"r-{i}", f"ad-new-{i}", ["t-fresh-a", "t-shared",
                                                                               "t-fresh-b"]) for i in range(50)])
    assert {pick["title"] for pick in picks} == {"t-shared"}


def _drifting_bags(start: int, n: int, rates: dict[str, float], seed: int) -> list[Bag]:
    rng = random.Random(seed)
    bags = []
    for i in range(start, start + n):
        title = rng.choice(sorted(rates))
        bags.append(Bag.model_validate({
            "impression_id": f"d-{i}", "ts": i, "ad_id": f"ad-{i % 5}", "user": {"id": f"u-{i % 300}"},
            "candidates": {"title": sorted(rates)}, "shown": {"title": title},
            "clicked": rng.random() < rates[title]}))
    return bags


def test_a_creative_whose_clicks_dry_up_stops_being_served():
    """"t-a" is the best title for 4k impressions, then worse than "t-b" for the next 8k: served from the
    data as it comes, the share of requests that get "t-a" must fall from all to none."""
    torch.manual_seed(0)
    learner = Learner(preset("default"))
    requests = [_request(f"r-{i}", f"ad-{i % 5}", ["t-a", "t-b", "t-c"]) for i in range(200)]

    def share_of_a() -> float:
        return sum(pick["title"] == "t-a" for pick in Selector(learner.model).select(requests)) / len(requests)

    learner.learn(_drifting_bags(0, 4_000, {"t-a": 0.12, "t-b": 0.04, "t-c": 0.04}, seed=1))
    assert share_of_a() == 1.0
    learner.learn(_drifting_bags(4_000, 8_000, {"t-a": 0.02, "t-b": 0.08, "t-c": 0.04}, seed=2))
    assert share_of_a() == 0.0


def _captured_with_and_without_context_prior(context: float) -> dict[bool, float]:
    """Captured on a 200-ad context world whose taste acts through demographics and query segments only
    (what crosses can see), ``context`` its strength; trained on a 50k uniform log with and without crosses."""
    config = dataclasses.replace(draw_config("context", 0), n_ads=200, churn_every=10**9, context=context,
                                 context_mix=(0.5, 0.5, 0.0))
    world = ZooWorld(config)
    bags = [Bag.model_validate(bag) for bag in world.uniform_log(50_000)]
    raw = [world.request(f"e-{i}") for i in range(2000)]
    requests = [SelectionRequest.model_validate(r) for r in raw]
    captured = {}
    for context_prior in (True, False):
        torch.manual_seed(0)
        learner = Learner(preset("default", context_prior=context_prior))
        learner.learn(bags)
        captured[context_prior] = world.score(raw, Selector(learner.model).select(requests))["captured"]
    return captured


@pytest.mark.slow
def test_context_crosses_help_where_context_matters_and_cost_nothing_where_it_does_not():
    with_context = _captured_with_and_without_context_prior(2.0)
    assert with_context[True] > with_context[False] + 0.01  # a clear gain, not noise
    without_context = _captured_with_and_without_context_prior(0.0)
    assert abs(without_context[True] - without_context[False]) < 0.01  # crosses of no signal cost nothing
