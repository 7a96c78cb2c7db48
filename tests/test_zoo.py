"""The world zoo: deterministic per seed, speaks the contract, exact truth, and churn that really churns."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from contract.events import Bag, SelectionRequest
from sim.zoo import COMPONENTS, FAMILIES, HELD_OUT_SEEDS, TUNING_SEEDS, ZooWorld, draw_config, draw_world


@pytest.fixture(scope="module")
def worlds() -> dict[str, ZooWorld]:
    """One world per family (tuning seed 3), with 2,000 impressions of history."""
    drawn = {family: draw_world(family, 3) for family in FAMILIES}
    for world in drawn.values():
        world.uniform_log(2000)
    return drawn


@pytest.fixture(scope="module")
def churned() -> tuple[ZooWorld, list[dict], list[dict], list[dict]]:
    """The churn world (of seeds 0-19) that churns soonest: requests before its first churn, a log across
    it, and requests after it."""
    seed = min(range(20), key=lambda s: draw_config("churn", s).churn_every)
    world = draw_world("churn", seed)
    before = [world.request(f"before-{i}") for i in range(200)]
    log = world.uniform_log(world.config.churn_every + 5000)
    after = [world.request(f"after-{i}") for i in range(200)]
    return world, before, log, after


def small_request(world: ZooWorld, most: int = 400) -> dict:
    """A fresh request of the world with at most ``most`` combinations, so that they can all be tried."""
    for i in range(1000):
        request = world.request(f"small-{i}")
        if math.prod(len(ids) for ids in request["candidates"].values()) <= most:
            return request
    raise AssertionError(f"no request with at most {most} combinations")


def test_tuning_and_held_out_seeds_are_disjoint():
    assert not set(TUNING_SEEDS) & set(HELD_OUT_SEEDS)
    assert len(TUNING_SEEDS) >= 100 and len(HELD_OUT_SEEDS) >= 100


@pytest.mark.parametrize("family", list(FAMILIES))
def test_knobs_are_drawn_within_the_family_ranges_and_vary_by_seed(family):
    configs = [draw_config(family, seed) for seed in range(8)]
    for config in configs:
        for name, knob in FAMILIES[family].knobs.items():
            assert knob.low <= getattr(config, name) <= knob.high, name
        assert abs(sum(config.context_mix) - 1) < 0.01
    assert len({c.n_ads for c in configs}) > 1
    if FAMILIES[family].layout is None:  # a family with a layout fixes which components are templated
        assert len({c.templated for c in configs}) > 1


def test_a_family_and_seed_always_give_the_same_world():
    first, second = draw_world("mixed", 5), draw_world("mixed", 5)
    assert first.describe() == second.describe()
    assert first.uniform_log(300) == second.uniform_log(300)
    assert first.request("x") == second.request("x")
    assert draw_world("mixed", 6).describe() != first.describe()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_requests_and_bags_follow_the_contract(worlds, family):
    world = worlds[family]
    bags = world.uniform_log(300, start=10_000)
    for bag in bags:
        Bag.model_validate(bag)
        assert bag["policy"] == "explore" and bag["request_id"] == f"r-{int(bag['impression_id'][4:])}"
        assert bag["propensity"] == pytest.approx(1 / math.prod(len(v) for v in bag["candidates"].values()))
        assert ("click_ts" in bag) == bag["clicked"]
    assert [b["ts"] for b in bags] == sorted(b["ts"] for b in bags)
    for i in range(100):
        request = world.request(f"req-{i}")
        SelectionRequest.model_validate(request)
        assert set(request) == {"request_id", "ad_id", "ts", "user", "query", "candidates"}
        assert 1 <= len(request["query"]["segments"]) <= 3 and request["candidates"].keys() >= {"title", "image"}
        assert all(len(ids) <= 15 for ids in request["candidates"].values())


def test_paper_pools_have_table_1_coverage_and_sizes():
    world = draw_world("paper", 1)  # 2,253 ads
    pools = {r["ad_id"]: r["candidates"] for r in (world.request(f"t1-{i}") for i in range(3000))}
    assert len(pools) > 500
    for name, _, coverage, mean, _ in COMPONENTS:
        sizes = [len(c[name]) for c in pools.values() if name in c]
        assert len(sizes) / len(pools) == pytest.approx(coverage, abs=0.07), name
        assert np.mean(sizes) == pytest.approx(mean, rel=0.15) and max(sizes) <= 15, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_values_match_brute_force_over_every_combination(worlds, family):
    world = worlds[family]
    request = small_request(world)
    uniform, oracle, best = world.values(request)
    comps = list(request["candidates"])
    tried = [world.click_probability(request, dict(zip(comps, combo, strict=True)))
             for combo in itertools.product(*request["candidates"].values())]
    assert uniform == pytest.approx(np.mean(tried), rel=1e-9)
    assert oracle == pytest.approx(max(tried), rel=1e-9) and oracle >= max(tried) - 1e-12
    assert world.click_probability(request, best) == pytest.approx(oracle, rel=1e-9)


def test_values_stay_exact_on_the_largest_pools(worlds):
    """On a request near max_combinations, the oracle is at least every combination sampled."""
    world = worlds["synergy"]
    request = max((world.request(f"big-{i}") for i in range(200)),
                  key=lambda r: math.prod(len(v) for v in r["candidates"].values()))
    assert math.prod(len(v) for v in request["candidates"].values()) <= world.config.max_combinations
    _, oracle, _ = world.values(request)
    rng = np.random.default_rng(0)
    for _ in range(200):
        shown = {c: ids[rng.integers(len(ids))] for c, ids in request["candidates"].items()}
        assert world.click_probability(request, shown) <= oracle + 1e-12


def test_score_puts_the_oracle_at_one_and_the_uniform_policy_near_zero(worlds):
    world = worlds["paper"]
    requests = [world.request(f"score-{i}") for i in range(300)]
    oracle = world.score(requests, [world.values(r)[2] for r in requests])
    assert oracle["captured"] == pytest.approx(1.0) and oracle["ctr"] == pytest.approx(oracle["oracle_ctr"])
    rng = np.random.default_rng(1)
    uniform = world.score(requests, [{c: ids[rng.integers(len(ids))] for c, ids in r["candidates"].items()}
                                     for r in requests])
    assert abs(uniform["captured"]) < 0.2 and uniform["uniform_ctr"] < uniform["oracle_ctr"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_uniform_ctr_lands_between_2_and_10_percent(family):
    for seed in (0, 1):
        world = draw_world(family, seed)
        ctr = np.mean([world.values(world.request(f"ctr-{i}"))[0] for i in range(300)])
        assert 0.02 <= ctr <= 0.10, world.describe()


def test_churn_replaces_elements_and_brings_new_ads(churned):
    world, before, log, after = churned
    pools_before = {r["ad_id"]: r["candidates"] for r in before}
    pools_after = {r["ad_id"]: r["candidates"] for r in after}
    kept = replaced = 0
    for ad in pools_before.keys() & pools_after.keys():
        for component in ("title", "image"):  # always the ad's own elements
            old, new = set(pools_before[ad][component]), set(pools_after[ad][component])
            kept += len(old & new)
            replaced += len(new - old)
    assert replaced > 0.03 * (kept + replaced)
    ads = {int(b["ad_id"][3:]) for b in log[-5000:]}
    assert max(ads) >= world.config.n_ads  # ads born at the churn get traffic


def test_old_requests_are_scored_as_the_world_was_when_they_were_made(churned):
    world, before, _, _ = churned
    request = before[0]
    shown = {c: ids[0] for c, ids in request["candidates"].items()}
    then = world.click_probability(request, shown), world.values(request)
    later = draw_world(world.config.family, world.config.seed)  # the same world, not yet churned or drifted
    fresh = later.request("before-0")
    assert fresh == request
    assert then == (later.click_probability(fresh, shown), later.values(fresh))
    copy = {**request, "request_id": "copied"}  # an unknown id: its time comes from its ts
    assert world.click_probability(copy, shown) == then[0]


def test_an_evaluation_set_neither_moves_the_world_nor_changes_its_log():
    """Requests drawn to evaluate at a checkpoint all see the world as it stands, however many there are
    (20,000 would span a churn of the fastest worlds), and the log after them is the log without them."""
    seed = min(range(20), key=lambda s: draw_config("churn", s).churn_every)
    world, untouched = draw_world("churn", seed), draw_world("churn", seed)
    world.uniform_log(1000)
    untouched.uniform_log(1000)
    evaluation = world.requests_now(3 * world.config.churn_every, "eval")
    assert {r["ts"] for r in evaluation} == {evaluation[0]["ts"]}
    listed = {}
    for request in evaluation:  # an ad lists the same candidates in every request: no churn in between
        assert listed.setdefault(request["ad_id"], request["candidates"]) == request["candidates"]
    assert len(listed) > 1
    assert world.uniform_log(500, start=1000) == untouched.uniform_log(500, start=1000)


def test_the_log_is_the_same_however_it_is_requested():
    """A benchmark that checkpoints at other sizes, or a caller that reads the log in other chunks, sees the
    same impressions and clicks: across churn and drift steps and traffic blocks alike."""
    seed = min(range(20), key=lambda s: draw_config("churn", s).churn_every)
    whole, pieces = draw_world("churn", seed), draw_world("churn", seed)
    size = 2 * whole.config.churn_every + 1
    log = whole.uniform_log(size)
    cut: list[dict] = []
    for n in (1, 999, 4_096, 7, size):
        cut += pieces.uniform_log(min(n, size - len(cut)), start=len(cut))
    assert cut == log
    assert len({bag["ad_id"] for bag in log}) > 1 and 0 < sum(bag["clicked"] for bag in log) < len(log)


def test_the_best_fixed_combination_is_the_oracle_only_where_no_context_acts():
    """The context-free ceiling: on a world whose context weight is zero it is the oracle itself; on a
    context world the oracle's per-request choices beat it, and it still beats the uniform policy."""
    config = draw_config("context", 3)
    for context, low, high in ((0.0, 1.0 - 1e-9, 1.0 + 1e-9), (config.context, 0.2, 0.95)):
        world = ZooWorld(dataclasses.replace(config, context=context))
        world.advance(5_000)
        requests = world.requests_now(2_000, "ceiling")
        captured = world.summarise(requests, world.best_fixed_ctr(requests))["captured"]
        assert low < captured < high, (context, captured)


def test_advancing_the_world_skips_the_log_without_changing_what_follows():
    skipped, logged = draw_world("churn", 1), draw_world("churn", 1)
    n = skipped.config.churn_every + 3_000  # across a churn and its drift steps
    skipped.advance(n)
    logged.uniform_log(n)
    assert skipped.tick == logged.tick == n
    assert skipped.requests_now(50, "now") == logged.requests_now(50, "now")  # the churned listings
    assert skipped.uniform_log(200, start=n) == logged.uniform_log(200, start=n)
