from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.events import Bag
from learner.baselines._shared import Candidates, Counts, smoothed_ctr
from learner.baselines.base import Request, Selection


class PooledBeta:
    """A Beta posterior of the click rate of each (component, element), pooled over every ad and context;
    served greedily by its mean, or by Thompson sampling (``thompson=True``).

    Why: where elements churn, an element is shown in few bags of any one ad before it is replaced, and what
    it did across all ads is most of what there is to know of it; a pooled count has no ad level to wait
    for. Greedy, it ranks like :class:`ClickCounter` (the same posterior mean, with ``p0`` smoothed so the
    prior stays a proper Beta); what it adds is the posterior to sample from when it serves live, and counts
    kept in numpy arrays, so a batch is learned and served in a few vectorised passes.

    The prior is Beta(``strength`` · p0, ``strength`` · (1 − p0)), p0 the running overall CTR (one click in
    20 bags before any are seen): ``strength`` pseudo-impressions at the overall rate. An element never seen
    scores p0.

    Examples
    --------
    Half of the bold title's impressions are clicked, none of the plain one's; 20 bags of each:

    >>> from contract.events import Bag, SelectionRequest
    >>> pool = {"title": ["plain", "bold"]}
    >>> bags = [Bag(impression_id=f"i{i}", ts=i, ad_id="shoe", candidates=pool,
    ...             shown={"title": pool["title"][i % 2]}, clicked=i % 4 == 1) for i in range(40)]
    >>> beta = PooledBeta(strength=20.0)
    >>> beta.learn(bags)
    >>> alpha, b = beta.posterior(["title", "title", "title"], ["plain", "bold", "unseen"])
    >>> (alpha / (alpha + b)).round(3).tolist()
    [0.092, 0.342, 0.183]
    >>> beta.select([SelectionRequest(request_id="r", ad_id="boot", candidates=pool)])
    [{'title': 'bold'}]

    Sampled, the plain title still gets a try now and then:

    >>> sampler = PooledBeta(thompson=True, seed=0)
    >>> sampler.learn(bags[:8])
    >>> picks = sampler.select([SelectionRequest(request_id="r", ad_id="shoe", candidates=pool)] * 1000)
    >>> 0.5 < sum(p["title"] == "bold" for p in picks) / 1000 < 1.0
    True
    """

    def __init__(self, strength: float = 20.0, thompson: bool = False, seed: int = 0) -> None:
        self.strength = strength
        self.thompson = thompson
        self.rng = np.random.default_rng(seed)
        self.elements = Counts()  # (component, element): impressions n, clicks s
        self.bags = self.clicks = 0

    @property
    def p0(self) -> float:
        """The running overall CTR (``smoothed_ctr``)."""
        return smoothed_ctr(self.clicks, self.bags)

    def learn(self, bags: list[Bag]) -> None:
        if not bags:
            return
        rows = self.elements.lookup([key for b in bags for key in b.shown.items()])
        clicked = np.array([b.clicked for b in bags for _ in b.shown], dtype=np.float64)
        self.elements.add(rows, clicked)
        self.bags += len(bags)
        self.clicks += sum(b.clicked for b in bags)

    def posterior(self, components: Sequence[str], elements: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Beta parameters (α, β) of each (component, element)'s click rate."""
        n, clicks = self.elements.get(self.elements.find(list(zip(components, elements, strict=True))))
        return clicks + self.strength * self.p0, n - clicks + self.strength * (1.0 - self.p0)

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        rows = Candidates.of(requests)
        alpha, beta = self.posterior(rows.components, rows.elements)
        scores = self.rng.beta(alpha, beta) if self.thompson else alpha / (alpha + beta)
        return rows.best(requests, scores)
