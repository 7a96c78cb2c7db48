from __future__ import annotations

import numpy as np

from learner.baselines.hierarchical_counter import HierarchicalCounter


class ThompsonCounter(HierarchicalCounter):
    """:class:`HierarchicalCounter` serving by Thompson sampling: each candidate's score is drawn from its
    posterior, so an element with little data is tried in proportion to its chance of being the best.

    Why: served live, a greedy counter keeps showing what it believes best and learns little about the rest;
    sampling spends impressions on candidates while they may still be the best (``benchmarks/live.py``).

    Examples
    --------
    After 8 bags the bold title is likely but not certainly the better, so the plain one is still tried now and
    then:

    >>> from contract.events import Bag, SelectionRequest
    >>> pool = {"title": ["plain", "bold"]}
    >>> bags = [Bag(impression_id=f"i{i}", ts=i, ad_id="shoe", candidates=pool,
    ...             shown={"title": pool["title"][i % 2]}, clicked=i % 4 == 1) for i in range(8)]
    >>> counter = ThompsonCounter(seed=0)
    >>> counter.learn(bags)
    >>> picks = counter.select([SelectionRequest(request_id="r", ad_id="shoe", candidates=pool)] * 1000)
    >>> shares = {e: sum(p["title"] == e for p in picks) / 1000 for e in pool["title"]}
    >>> 0.9 < shares["bold"] < 1.0
    True
    """

    def _draw(self, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        return mean + np.sqrt(var) * self.rng.standard_normal(len(mean))
