"""Baseline policies: the serving contract, learning on a simulated world, and the counter's arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from contract.events import Bag, SelectionRequest
from learner.baselines import DCO, ClickCounter, MLPBaseline, Policy, Uniform
from sim.world import World, WorldConfig

BAGS = 30_000


def _bag(i: int, shown: dict[str, str], clicked: bool, ad: str = "a", candidates=None) -> Bag:
    return Bag.model_validate(
        {
            "impression_id": f"i{i}",
            "ts": float(i),
            "ad_id": ad,
            "clicked": clicked,
            "shown": shown,
            "candidates": candidates or {c: sorted({e, f"{c}-other"}) for c, e in shown.items()},
        }
    )


@pytest.fixture(scope="module")
def world_log() -> tuple[World, list[Bag], list[dict], list[SelectionRequest]]:
    """A 30-ad world, 30k uniform bags and 500 fresh requests, built once for the module."""
    world = World(WorldConfig(n_ads=30, seed=3))
    bags = [Bag.model_validate(b) for b in world.uniform_log(BAGS)]
    raw = [world.request(f"eval-{i}") for i in range(500)]
    return world, bags, raw, [SelectionRequest.model_validate(r) for r in raw]


def _trained(policy: Policy, bags: list[Bag], chunk: int) -> Policy:
    for i in range(0, len(bags), chunk):
        policy.learn(bags[i : i + chunk])
    return policy


def _all_policies() -> list[Policy]:
    return [Uniform(), ClickCounter(), DCO(), MLPBaseline()]


def test_every_baseline_serves_one_candidate_per_component(world_log):
    _, bags, _, requests = world_log
    odd = SelectionRequest.model_validate(
        {
            "request_id": "odd",
            "ad_id": "never-seen",
            "candidates": {
                "sticker": ["s1", "s2", "s3"],
                "title": ["t-new", "t-newer"],
                **{f"badge{j}": [f"b{j}-{k}" for k in range(5)] for j in range(4)},
            },  # 1250 combos
        }
    )
    for policy in _all_policies():
        assert isinstance(policy, Policy)
        for learned in (0, 2048):  # untrained, then after two mini-batches
            _trained(policy, bags[:learned], 1024)
            batch = [*requests[:20], odd, bags[0]]  # a Bag is a valid request too
            picks = policy.select(batch)
            assert len(picks) == len(batch), type(policy).__name__
            for request, pick in zip(batch, picks, strict=True):
                assert pick.keys() == request.candidates.keys(), type(policy).__name__
                assert all(pick[c] in ids for c, ids in request.candidates.items()), type(policy).__name__
        assert policy.select([]) == []


@pytest.mark.parametrize(
    ("make", "chunk", "low", "high"),
    [
        (Uniform, 1024, -0.1, 0.1),
        (ClickCounter, 1024, 0.15, 1.0),  # per-element click rates alone are well clear of uniform
        # With ~1000 bags per ad and CTR ~9 %, every Hoeffding radius (>0.1) dwarfs the CTR gaps
        # between elements, so nothing is eliminated yet and DCO still serves uniformly.
        (DCO, 1024, -0.1, 0.1),
        # MLPBaseline steps on 128 bags at a time whatever the chunk: at 1024 bags a step it fit
        # only the base rate.
        (MLPBaseline, 1024, 0.12, 1.0),
    ],
)
def test_baselines_on_a_simulated_world(world_log, make, chunk, low, high):
    world, bags, raw, requests = world_log
    policy = _trained(make(), bags, chunk)
    score = world.score(raw, policy.select(requests))
    assert low < score["captured"] < high, score
    if make is MLPBaseline:
        assert score["lift"] > 0.1, score


def test_counter_score_matches_hand_computation():
    bags = [
        _bag(0, {"title": "t1", "image": "i1"}, True),
        _bag(1, {"title": "t1", "image": "i2"}, False),
        _bag(2, {"title": "t2", "image": "i1"}, False),
        _bag(3, {"title": "t1", "image": "i1"}, False),
    ]
    counter = ClickCounter(strength=2.0)
    counter.learn(bags[:1])
    counter.learn(bags[1:])  # state carries over between calls
    assert counter.p0 == pytest.approx(0.25)
    assert counter.score("title", "t1") == pytest.approx((1 + 2 * 0.25) / (3 + 2))
    assert counter.score("title", "t2") == pytest.approx((0 + 2 * 0.25) / (1 + 2))
    assert counter.score("image", "i2") == pytest.approx((0 + 2 * 0.25) / (1 + 2))
    assert counter.score("title", "unseen") == pytest.approx(0.25)
    assert counter.score("image", "t1") == pytest.approx(0.25)  # counts are per (component, element)
    request = SelectionRequest.model_validate(
        {
            "request_id": "r",
            "ad_id": "x",
            "candidates": {"title": ["t2", "t3", "t1"], "image": ["i2", "i1"], "sticker": ["s2", "s1"]},
        }
    )
    assert counter.select([request]) == [{"title": "t1", "image": "i1", "sticker": "s2"}]  # tie -> first


def test_dco_eliminates_clearly_worse_arms_per_ad():
    rng = np.random.default_rng(0)
    arms = {"t0": 0.02, "t1": 0.05, "t2": 0.6}
    pool = {"title": list(arms)}
    bags = [
        _bag(i, {"title": e}, bool(rng.random() < arms[e]), candidates=pool)
        for i, e in enumerate(rng.choice(list(arms), 3000))
    ]
    dco = DCO(delta=0.05, seed=1)
    dco.learn(bags[:20])
    assert dco.survivors("a", "title", list(arms)) == list(arms)  # too little evidence to drop anything
    for i in range(20, len(bags), 500):
        dco.learn(bags[i : i + 500])
    assert dco.survivors("a", "title", list(arms)) == ["t2"]
    assert dco.survivors("a", "title", ["t0", "t2", "t-new"]) == ["t2", "t-new"]  # unpulled arms stay
    assert dco.survivors("b", "title", list(arms)) == list(arms)  # statistics are per ad
    request = SelectionRequest.model_validate({"request_id": "r", "ad_id": "a", "candidates": pool})
    assert {p["title"] for p in dco.select([request] * 50)} == {"t2"}
    other = SelectionRequest.model_validate({"request_id": "r", "ad_id": "b", "candidates": pool})
    assert {p["title"] for p in dco.select([other] * 50)} == set(arms)  # exploring: uniform over all
