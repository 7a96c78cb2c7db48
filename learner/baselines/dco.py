from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.events import Bag
from learner.baselines.base import Request, Selection


class DCO:
    """Dynamic Creative Optimisation (Wei et al. 2022) by successive elimination per (ad, component).

    Why: the paper's bandit baseline. Each (ad, component) pool is a k-armed bandit; an arm
    survives while its Hoeffding upper bound reaches the best lower bound, and DCO serves
    uniformly among survivors while it still explores. Arms are judged on the current pool
    each time, so churned-in elements (unpulled, infinite radius) are always explored.

    Examples
    --------
    Half of the bold title's impressions are clicked, none of the plain one's; after 20 bags both arms survive,
    after 400 only the bold one does, and a new arm is explored beside it:

    >>> from contract.events import Bag, SelectionRequest
    >>> pool = {"title": ["plain", "bold"]}
    >>> bags = [Bag(impression_id=f"i{i}", ts=i, ad_id="shoe", candidates=pool,
    ...             shown={"title": pool["title"][i % 2]}, clicked=i % 4 == 1) for i in range(400)]
    >>> dco = DCO()
    >>> dco.learn(bags[:20])
    >>> dco.survivors("shoe", "title", ["plain", "bold"])
    ['plain', 'bold']
    >>> dco.learn(bags[20:])
    >>> dco.survivors("shoe", "title", ["plain", "bold", "new"])
    ['bold', 'new']
    >>> dco.select([SelectionRequest(request_id="r", ad_id="shoe", candidates=pool)])
    [{'title': 'bold'}]
    """

    def __init__(self, delta: float = 0.05, seed: int = 0) -> None:
        self.delta = delta
        self.rng = np.random.default_rng(seed)
        self.pulls: dict[tuple[str, str, str], int] = {}  # (ad, component, element) -> times shown
        self.clicks: dict[tuple[str, str, str], int] = {}

    def learn(self, bags: list[Bag]) -> None:
        for bag in bags:
            y = int(bag.clicked)
            for component, element in bag.shown.items():
                key = (bag.ad_id, component, element)
                self.pulls[key] = self.pulls.get(key, 0) + 1
                self.clicks[key] = self.clicks.get(key, 0) + y

    def survivors(self, ad_id: str, component: str, candidates: Sequence[str]) -> list[str]:
        """Candidates whose upper bound is >= the best lower bound, in candidate order."""
        k = len(candidates)
        n = np.array([self.pulls.get((ad_id, component, e), 0) for e in candidates], dtype=np.float64)
        c = np.array([self.clicks.get((ad_id, component, e), 0) for e in candidates], dtype=np.float64)
        pulled = n > 0
        safe = np.where(pulled, n, 1.0)
        mean = np.where(pulled, c / safe, 0.0)
        radius = np.where(pulled, np.sqrt(np.log(4 * k * safe**2 / self.delta) / (2 * safe)), np.inf)
        upper, lower = mean + radius, mean - radius
        keep = upper >= lower.max()
        return [e for e, alive in zip(candidates, keep, strict=True) if alive]

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        out = []
        for r in requests:
            choice = {}
            for component, ids in r.candidates.items():
                alive = self.survivors(r.ad_id, component, ids)
                choice[component] = alive[int(self.rng.integers(len(alive)))]
            out.append(choice)
        return out
