"""Champion and challenger: a snapshot's readouts, judged on the explore slice, serve when ahead with confidence."""

from __future__ import annotations

import asyncio
import copy
import json

import numpy as np
import pytest
import torch

from contract.events import Bag, SelectionRequest
from contract.window import JoinWindow
from learner.policy import Selector
from learner.priors import PriorKeys
from learner.publications import decode
from learner.referee import Referee
from learner.serving import ServingModel, readouts
from learner.snapshots import SnapshotStore
from learner.trainer import Learner, preset
from sim.flip import FlipWorld

POLICIES = ("genco", "priors", "pooled")


def explicit_bags(rng: np.random.Generator, picks: dict[str, tuple[int, int]], quality: np.ndarray, n: int,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """n explore bags of two components of four candidates, shown uniformly: each policy's exposures (it picks
    ``picks[policy]`` in every bag) and the clicks, at log-odds -2.5 plus the shown elements' ``quality``."""
    shown = rng.integers(4, size=(n, 2))
    logit = -2.5 + quality[0, shown[:, 0]] + quality[1, shown[:, 1]]
    clicked = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    exposures = np.stack([4.0 * (shown == np.array(picks[p])).sum(1) for p in POLICIES], 1)
    return exposures, clicked


def test_a_challenger_serves_only_when_ahead_with_confidence_and_genco_takes_back_over():
    rng = np.random.default_rng(0)
    referee = Referee(POLICIES, half_life=4000)
    first_best = np.array([[0.0, 0.5, -0.2, -0.2]] * 2)  # element 1 of each component: the pooled counter's picks
    picks = {"genco": (0, 0), "priors": (0, 0), "pooled": (1, 1)}

    champions = [referee.record(*explicit_bags(rng, picks, first_best, 50)) for _ in range(3)]
    assert champions == ["genco"] * 3 and referee.discordant[2, 0] < referee.min_clicks, (
        "not on a handful of clicks where the two differ, however far ahead")
    champions = [referee.record(*explicit_bags(rng, picks, first_best, 250)) for _ in range(40)]
    assert champions[-1] == "pooled"
    lead, se = referee.lead("pooled", "genco")
    assert lead > 2 * se > 0

    tie = np.array([[0.25, 0.25, -0.2, -0.2]] * 2)  # the two picks alike: nothing to gain by switching
    champions = [referee.record(*explicit_bags(rng, picks, tie, 250)) for _ in range(60)]
    assert champions == ["pooled"] * 60, "within the noise the champion stays (no flapping)"

    genco_best = first_best[:, [1, 0, 2, 3]]  # element 0 best now: genco and priors pick it, genco goes first
    champions = [referee.record(*explicit_bags(rng, picks, genco_best, 250)) for _ in range(60)]
    assert champions[-1] == "genco" and "priors" not in champions
    switched = champions.index("genco")
    assert champions[switched:] == ["genco"] * (60 - switched)


def test_a_restored_referee_judges_on_from_the_same_sums_and_champion():
    rng = np.random.default_rng(1)
    referee = Referee(POLICIES, half_life=4000)
    for _ in range(20):
        referee.record(*explicit_bags(rng, {"genco": (0, 0), "priors": (2, 2), "pooled": (1, 1)},
                                      np.array([[0.0, 0.8, -0.8, 0.0]] * 2), 250))
    assert referee.champion == "pooled"
    restored = Referee.restore(json.loads(json.dumps(referee.state())), POLICIES, half_life=4000)
    assert restored.champion == "pooled" and restored.estimates() == referee.estimates()
    assert Referee.restore(referee.state(), ("genco",)).champion == "genco", "another model's policies: afresh"
    assert Referee.restore(None, POLICIES).estimates()["genco"] == {"sctr": None, "se": None, "bags": 0.0}


def test_readouts_of_one_model_serve_the_priors_alone_and_the_pooled_counts(small_world):
    world, bags = small_world
    torch.manual_seed(0)
    learner = Learner()
    learner.learn(bags[:4096])
    model = learner.model
    requests = [SelectionRequest.model_validate(world.request(f"r-{i}")) for i in range(200)]
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.network_weight.zero_()
    assert Selector(model, readout="priors").select(requests) == Selector(zeroed).select(requests)
    assert Selector(model, readout="genco").select(requests) == Selector(model).select(requests)
    serving = ServingModel(model)
    batch = Selector(model).featurizer.batch(requests)
    best = batch.pool_grid(serving.priors.pool_scores(PriorKeys.of(batch)).pooled).argmax(1)
    expected = [{batch.component_names[g]: batch.candidate_ids[g][best[g]] for g in pools}
                for pools in batch.request_pools()]
    assert Selector(model, readout="pooled").select(requests) == expected
    assert Selector(model, readout="pooled").select(requests[:1]) == expected[:1], "a lone request alike"
    assert readouts(preset("paper").model) == ("genco",)
    with pytest.raises(ValueError, match="priors"):
        Selector(Learner(preset("paper")).model, readout="priors")


def test_the_learner_hands_serving_to_the_pooled_counter_and_genco_takes_it_back(tmp_path):
    """Through the learner agent, its snapshots, a restart and the selector agent, on a world where the pooled
    counter is ahead for a while after the ads change their minds (sim/flip.py), and genco after that."""
    from stream.kafka import Connection, Topics
    from stream.selector import SelectorAgent
    from stream.training import TrainingAgent

    world = FlipWorld(seed=0)
    probe = SelectionRequest.model_validate({**world.uniform_log(1)[0], "request_id": "probe"})
    settings = {"half_life": 3000, "max_bags": 1024}

    def agent() -> TrainingAgent:
        return TrainingAgent(Connection(("127.0.0.1:1",)), Topics("s."), tmp_path, JoinWindow(60.0),
                             referee_settings=settings)

    def train_until(learner: TrainingAgent, steps: int, champion: str | None = None) -> list[str]:
        """Champions after each step, for ``steps`` steps or until ``champion`` serves."""
        champions = []
        while len(champions) < steps and (champion is None or champion not in champions):
            bags = [Bag.model_validate(b) for b in world.uniform_log(1024)]
            learner.train_isolating(bags, [(None, None)] * len(bags))
            champions.append(learner.referee.champion)
        return champions

    def served(published: list) -> str:
        """The readout the selector serves once it has applied the learner's snapshot publication."""
        selector.follower.replica.apply(decode(published[0].blob))
        asyncio.run(selector.swap_to_newest())
        assert selector.policy.respond([probe])[0]["policy"] == "genco", "learned answers say genco, whichever readout"
        return selector.policy.selector.model.readout

    selector = SelectorAgent(Connection(("127.0.0.1:1",)), Topics("s."), explore=0.0)
    learner = agent()
    assert train_until(learner, 10) == ["genco"] * 10, "genco ahead while the ads keep their minds"
    world.flip()
    assert train_until(learner, 12, "pooled")[-1] == "pooled"
    published = learner.publish(checkpoint=True)
    manifest = SnapshotStore(tmp_path / "snapshots").manifest()
    assert manifest.serving == "pooled" and manifest.estimates["pooled"]["sctr"] > manifest.estimates["genco"]["sctr"]
    assert served(published) == "pooled"

    learner.store.close()
    learner = agent()  # a restart resumes the referee with the checkpoint
    assert learner.referee.champion == "pooled" and learner.referee.estimates() == manifest.estimates
    assert train_until(learner, 30, "genco")[-1] == "genco", "genco overtakes once its cells learn the new signs"
    assert served(learner.publish(checkpoint=True)) == "genco"
    learner.store.close()
