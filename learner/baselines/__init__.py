"""Baseline serving policies that GenCO is measured against, one per module.

All follow one small river-like interface (:class:`Policy`): ``learn`` takes a chronological mini-batch of
bags and updates state incrementally; ``select`` returns one element per requested component, always one of
that component's candidates, for components never seen before too. Each class's docstring says why it exists
and has a runnable example that tests/test_baselines.py runs; that test also finds every policy of every
module here by itself, so a new baseline is checked as soon as its file exists.

- :class:`Uniform`: the logging policy; the floor any learner must beat.
- :class:`ClickCounter`: smoothed per-element click rates; context-free and additive.
- :class:`PooledBeta`: a Beta posterior per element pooled over every ad, greedy or Thompson-sampled.
- :class:`HierarchicalCounter`: empirical-Bayes (ad, element) rates shrunk towards the element across ads;
  :class:`ThompsonCounter` serves it by posterior sampling.
- :class:`AdElementEB`: (ad, element) Beta posteriors around the ad's CTR times the element's click ratio
  elsewhere, greedy or Thompson-sampled.
- :class:`ContextLogReg`: river's logistic regression on element x ad and element x context crosses.
- :class:`DCO`: the paper's bandit baseline, successive elimination per (ad, component).
- :class:`MLPBaseline`: the paper's "MLP": a network scoring whole combinations.
"""

from learner.baselines.ad_element_eb import AdElementEB
from learner.baselines.base import Policy, Request, Selection
from learner.baselines.click_counter import ClickCounter
from learner.baselines.context_logreg import ContextLogReg
from learner.baselines.dco import DCO
from learner.baselines.hierarchical_counter import HierarchicalCounter
from learner.baselines.mlp import MLPBaseline
from learner.baselines.pooled_beta import PooledBeta
from learner.baselines.thompson_counter import ThompsonCounter
from learner.baselines.uniform import Uniform

__all__ = [
    "DCO",
    "AdElementEB",
    "ClickCounter",
    "ContextLogReg",
    "HierarchicalCounter",
    "MLPBaseline",
    "Policy",
    "PooledBeta",
    "Request",
    "Selection",
    "ThompsonCounter",
    "Uniform",
]
