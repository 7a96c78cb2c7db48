"""Serving: deterministic whatever the batch, never worse than greedy under its own scores, valid always."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from contract.events import SelectionRequest
from learner.features import Featurizer
from learner.policy import EVERY_PAIR_ELEMENTS, Selector, ServingPolicy, choose, hashed_uniform, sample_combinations
from learner.priors import PAIR_STRENGTHS
from learner.serving import ServingModel
from learner.trainer import Learner, preset


@pytest.fixture(scope="module")
def trained(small_world):
    world, bags = small_world
    torch.manual_seed(0)
    learner = Learner()
    learner.learn(bags[:8192])
    requests = [SelectionRequest.model_validate(world.request(f"p-{i}")) for i in range(300)]
    return learner.model, requests


def test_a_request_gets_the_same_answer_alone_or_in_any_batch(trained):
    model, requests = trained
    selector = Selector(model, k=16)
    together = selector.select(requests)
    alone = [selector.select([r])[0] for r in requests[:40]]
    shuffled = selector.select(requests[::-1])[::-1]
    threaded = Selector(model, k=16, threads=2, batch_size=37).select(requests)  # 9 batches on 2 threads
    assert alone == together[:40]
    assert shuffled == together
    assert threaded == together


@pytest.mark.parametrize("thompson", [False, True])
def test_a_lone_request_for_pools_seen_before_reuses_them_and_answers_as_in_a_batch(trained, thompson):
    """Lone requests reuse what an earlier one of the same ad and candidates computed from its pools; only the
    context is new. The answers must be the batch's, to the bit, also when an ad's candidates change and when
    the cache is full. The pair prior at its weakest shrinkage, so that pairs sway the answers."""
    model, requests = copy.deepcopy(trained[0]), trained[1]
    model.priors.pair_strength = PAIR_STRENGTHS[0]
    changed = [SelectionRequest.model_validate({**r.model_dump(), "request_id": f"{r.request_id}-changed",
                                                "candidates": {c: ids[::-1][:3] for c, ids in r.candidates.items()}})
               for r in requests[:20]]
    mixed = [*requests[:150], *changed, *requests[150:]]
    together = Selector(model, k=16, thompson=thompson).select(mixed)
    selector = Selector(model, k=16, thompson=thompson)
    alone = [selector.select([r])[0] for r in mixed]
    assert alone == together
    pools = {(r.ad_id, str(r.candidates)) for r in mixed}
    assert selector.cached_pools == len(pools) < len(mixed) / 3  # most requests were answered from the cache
    budget = 7 * selector.cached_bytes // selector.cached_pools  # room for about 7 ads' pools
    small = Selector(model, k=16, thompson=thompson, cache_bytes=budget)
    assert [small.select([r])[0] for r in mixed] == together
    assert 3 < small.cached_pools < 12 and small.cached_bytes <= budget


def test_a_selector_warmed_from_the_last_snapshots_cache_answers_as_a_fresh_one(trained):
    """A new snapshot's selector scores the pools its predecessor kept, for its own model: its cache starts
    with the same ads in the same order, and its answers are its own model's, not the old scores'."""
    model, requests = trained
    newer = copy.deepcopy(model)
    newer.priors.pair_strength = PAIR_STRENGTHS[0]  # a snapshot whose pair shifts differ
    old = Selector(model, k=16)
    for request in requests[:100]:
        old.select([request])
    warm, fresh = Selector(newer, k=16), Selector(newer, k=16)
    assert warm.warm(old, seconds=60) == old.cached_pools == warm.cached_pools
    assert list(warm._pools) == list(old._pools)  # the most recently asked for still leaves last
    answers = [fresh.select([r])[0] for r in requests]
    assert [warm.select([r])[0] for r in requests] == answers
    assert [old.select([r])[0] for r in requests] != answers  # so old scores carried over would show
    assert Selector(newer, k=16).warm(old, seconds=0) <= 1


def test_a_lone_request_too_large_for_a_pair_table_or_the_cache_answers_as_when_computed_afresh(trained):
    """Against lone requests computed afresh rather than a batch: the extra components' elements are untrained,
    so their scores tie exactly, and a batch's other shapes may round such a tie the other way."""
    model, requests = copy.deepcopy(trained[0]), trained[1]
    model.priors.pair_strength = PAIR_STRENGTHS[0]
    wide = [SelectionRequest.model_validate({**r.model_dump(), "request_id": f"{r.request_id}-wide", "candidates": {
        **r.candidates, **{f"extra-{c}": [f"x{c}-{i}" for i in range(15)] for c in range(8)}}}) for r in requests[:100]]
    assert all(sum(min(len(ids), 15) for ids in r.candidates.values()) > EVERY_PAIR_ELEMENTS for r in wide)
    selector, uncached = Selector(model, k=16), Selector(model, k=16, cache_bytes=1000)
    assert [selector.select([r])[0] for r in wide] == [uncached.select([r])[0] for r in wide]
    assert 0 < selector.cached_pools < len(wide) / 2 and uncached.cached_pools == uncached.cached_bytes == 0


def test_sampling_adds_options_and_never_loses_the_greedy_combination(trained):
    model, requests = trained
    serving, batch = ServingModel(model), Featurizer(model.config.sizes).batch(requests)
    greedy, chosen = choose(serving, batch, k=1), choose(serving, batch, k=16)
    enc = serving.encode(batch)
    candidates = sample_combinations(batch, enc.element_logit, k=16)
    first = batch.pools.start
    scores = serving.combination_logit(batch, enc, np.stack([first + greedy, first + chosen]))
    assert np.array_equal(candidates[0], greedy)
    differs = (candidates[1:] != greedy).any(0).mean()  # pools where a sample strays from greedy
    assert differs > 0.5
    assert np.all(scores[1] >= scores[0] - 1e-6)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"pair_prior": False}, {"mil": False}, {"mil": False, "attention": False, "prior": False}],
)
def test_the_numpy_serving_copy_scores_like_the_torch_model_it_was_taken_from(small_world, overrides):
    world, bags = small_world
    torch.manual_seed(0)
    learner = Learner(preset("default", **overrides))
    learner.learn(bags[:4096])  # trained, so BatchNorm statistics and priors are not at their defaults
    model = learner.model.eval()
    if model.priors is not None:
        model.network_weight.data = torch.tensor([0.7, 0.4])  # the network's share of every score, exercised
    if model.config.taste:
        torch.nn.init.normal_(model.taste.weight, std=0.5)  # and its taste term
    requests = [SelectionRequest.model_validate(world.request(f"t-{i}")) for i in range(200)]
    batch = Featurizer(model.config.sizes).batch(requests)
    serving = ServingModel(model)
    picks = sample_combinations(batch, serving.encode(batch).element_logit, k=16)
    first = batch.pools.start
    with torch.no_grad():
        enc = model.encode(batch)
        expected = model.combination_logit(batch, enc, torch.from_numpy(first + picks)).numpy()
        element_logit = model.element_logit(batch, enc).numpy()
    ours = serving.encode(batch)
    np.testing.assert_allclose(ours.element_logit, element_logit, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(serving.combination_logit(batch, ours, first + picks), expected, rtol=1e-4, atol=1e-4)
    assert np.ptp(expected) > 0.1, "a model whose scores do not vary would make this check empty"


def test_hashed_uniform_is_uniform_and_deterministic():
    u = hashed_uniform(np.arange(200_000))
    assert np.array_equal(u, hashed_uniform(np.arange(200_000)))
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005
    assert np.abs(np.histogram(u, bins=10, range=(0, 1))[0] - 20_000).max() < 600


def test_exploration_slice_has_the_configured_share_and_exact_propensities(trained):
    model, requests = trained
    policy = ServingPolicy(model, version=3, explore=0.2, seed=1)
    responses = [r for _ in range(10) for r in policy.respond(requests)]
    explored = [r for r in responses if r["policy"] == "explore"]
    assert 0.17 < len(explored) / len(responses) < 0.23
    by_id = {r.request_id: r for r in requests}
    for response in explored:
        expected = 1.0
        for ids in by_id[response["request_id"]].candidates.values():
            expected /= len(ids)
        assert response["propensity"] == pytest.approx(expected)
    learned = [r for r in responses if r["policy"] == "genco"]
    assert all(r["propensity"] is None and r["model_version"] == 3 for r in learned)


def test_unseen_components_are_served(trained):
    model, _ = trained
    request = SelectionRequest.model_validate({"request_id": "r", "ad_id": "ad-1", "candidates": {
        "sticker": ["s1", "s2", "s3"], "title": ["t1", "t2"], "badge": ["b1"]}})
    shown = Selector(model).select([request])[0]
    assert set(shown) == {"sticker", "title", "badge"} and shown["sticker"] in {"s1", "s2", "s3"}


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_samples_follow_each_pools_softmax(temperature):
    requests = [SelectionRequest.model_validate({"request_id": f"r{i}", "ad_id": f"ad-{i}", "candidates": {
        "title": ["a", "b", "c", "d"], "image": ["x", "y"]}}) for i in range(2000)]
    batch = Featurizer().batch(requests)
    logit = np.tile(np.array([0.0, 1.0, 2.0, -1.0, 0.5, -0.5], dtype=np.float32), len(requests))
    draws = sample_combinations(batch, logit, k=16, temperature=temperature)[1:]
    for pool, pool_logit in ((0, [0.0, 1.0, 2.0, -1.0]), (1, [0.5, -0.5])):
        expected = np.exp(np.array(pool_logit) / temperature)
        seen = np.bincount(draws[:, pool::2].ravel(), minlength=len(pool_logit)) / draws[:, pool::2].size
        np.testing.assert_allclose(seen, expected / expected.sum(), atol=0.01)  # 30k draws: sd < 0.003
