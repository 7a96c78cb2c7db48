"""Calibrated sCTR, the number a user trusts offline, ranks policies as their true CTR does.

A dozen policies of different quality on one simulated world (sim/zoo.py, exact truth): genco early and late
in training, its element and combination heads alone, genco without priors and as the paper set it, the
count baselines and DCO, and the uniform policy. Each is scored by calibrated sCTR on a fresh uniform-random
log (``learner.evaluate``, what ``genco evaluate`` reports) and by the exact expectation of the same quantity
(``KnownTruth.true_sctr``); their rank correlation must be high, pooled over components. A world with a fixed
seed, no churn and effects at the upper end of the paper family's range keeps the test quick and the policies
apart: benchmarks/paper_tables.py reports the same correlation on held-out worlds.
"""

from __future__ import annotations

import dataclasses

import torch

from contract.events import Bag
from learner.baselines import ClickCounter, Uniform
from learner.trainer import Learner, preset
from sim.scorecard import genco_selections, score, spearman
from sim.zoo import ZooWorld, draw_config

SEED = 7  # a tuning seed of the paper family
TRAIN, EVALUATE = 16_000, 30_000
CHECKPOINTS = (256, 1_024, 4_096, TRAIN)
# Beyond the paper family's ranges (quality 0.6-0.9, CTR 2.5-8%): stronger effects set the policies further
# apart, and a higher CTR gives each estimate more clicks
QUALITY, CTR = 1.6, 0.12


def _world(seed: int = SEED) -> ZooWorld:
    config = draw_config("paper", seed)
    return ZooWorld(dataclasses.replace(config, n_ads=300, quality_scale=QUALITY, target_ctr=CTR, churn_every=10**9))


def sctr_against_truth(seed: int = SEED) -> dict[str, dict]:
    """A dozen policies' calibrated sCTR and its true value on the world of ``seed``."""
    world = _world(seed)
    train = [Bag.model_validate(b) for b in world.uniform_log(TRAIN)]
    log = world.uniform_log(EVALUATE, start=TRAIN)
    bags = [Bag.model_validate(b) for b in log]

    torch.manual_seed(0)
    models, mode = {}, {}
    genco = Learner(preset("default"))
    learned = 0
    for checkpoint in CHECKPOINTS:
        genco.learn(train[learned:checkpoint])
        learned = checkpoint
        models[f"genco@{checkpoint}"] = _frozen(genco)
    models["genco f_ele"], mode["genco f_ele"] = models[f"genco@{CHECKPOINTS[2]}"], "f_ele"
    models["genco f_comb"], mode["genco f_comb"] = models[f"genco@{TRAIN}"], "f_comb"
    network = Learner(preset("default", prior=False))
    network.learn(train[: CHECKPOINTS[1]])
    models[f"no priors@{CHECKPOINTS[1]}"] = _frozen(network)
    network.learn(train[CHECKPOINTS[1] :])
    models["no priors"] = network.model
    paper = Learner(preset("paper"))
    paper.learn(train)
    models["paper preset"] = paper.model
    selections = genco_selections(models, bags, mode)
    for name, baseline, learn in ((f"counter@{CHECKPOINTS[1]}", ClickCounter(), CHECKPOINTS[1]),
                                  ("counter", ClickCounter(), TRAIN), ("uniform", Uniform(), 0)):
        baseline.learn(train[:learn])
        selections[name] = baseline.select(bags)
    return score(world, log, bags, selections)


def test_calibrated_sctr_ranks_a_dozen_policies_as_the_true_ctr_does():
    scores = sctr_against_truth()
    assert len(scores) >= 12
    measured = [s["sctr"]["policy"]["pooled"] for s in scores.values()]
    true = [s["true"]["policy"]["pooled"] for s in scores.values()]
    rho = spearman(measured, true)
    table = "\n".join(f"{name:<16}{s['sctr']['policy']['pooled']:.5f}  {s['true']['policy']['pooled']:.5f}"
                      for name, s in sorted(scores.items(), key=lambda item: item[1]["true"]["policy"]["pooled"]))
    assert rho >= 0.9, f"Spearman {rho:.3f} between calibrated sCTR and true CTR:\n{table}"
    # the spread is real: the best policy's true lift over uniform dwarfs the estimate's noise
    assert max(true) > 1.05 * scores["uniform"]["true"]["uniform"]["pooled"], table


def _frozen(learner: Learner):
    """A copy of the model as trained so far (the learner goes on training its own)."""
    copy = type(learner.model)(learner.model.config)
    copy.load_weights(learner.model.weights())
    copy.eval()
    return copy
