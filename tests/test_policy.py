"""Serving: deterministic whatever the batch, never worse than greedy under its own scores, valid always."""

from __future__ import annotations

import pytest
import torch

from learner.features import Featurizer
from learner.policy import Selector, ServingPolicy, choose, hashed_uniform, sample_combinations
from learner.trainer import Learner
from stream.events import SelectionRequest


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
    assert alone == together[:40]
    assert shuffled == together


def test_sampling_adds_options_and_never_loses_the_greedy_combination(trained):
    model, requests = trained
    batch = Featurizer(model.config.sizes).batch(requests)
    greedy, chosen = choose(model, batch, k=1), choose(model, batch, k=16)
    with torch.no_grad():
        enc = model.encode(batch)
        candidates = sample_combinations(batch, enc.element_logit, k=16)
        first = torch.cumsum(batch.group_size, 0) - batch.group_size
        scores = model.combination_logit(batch, enc, torch.stack([first + greedy, first + chosen]))
    assert torch.equal(candidates[0], greedy)
    differs = (candidates[1:] != greedy).any(0).float().mean()  # pools where a sample strays from greedy
    assert differs > 0.5
    assert torch.all(scores[1] >= scores[0] - 1e-6)


def test_hashed_uniform_is_uniform_and_deterministic():
    u = hashed_uniform(torch.arange(200_000))
    assert torch.equal(u, hashed_uniform(torch.arange(200_000)))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert torch.histc(u.float(), bins=10, min=0, max=1).sub(20_000).abs().max() < 600


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
