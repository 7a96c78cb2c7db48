from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.events import Bag
from learner.baselines._shared import Counts, between_variance, smoothed_ctr
from learner.baselines.base import Request, Selection


class HierarchicalCounter:
    """Empirical-Bayes click counter: each (ad, element) shrunk towards the element in other ads, which is shrunk
    towards its component's mean, all counted as clicks in excess of the ad's own CTR.

    Why: the strongest simple learner of additive element quality. Counting against the ad's CTR keeps product
    appeal out of an element's credit; the element's record in *other* ads is what a new (ad, element) cell is
    worth before it has data of its own (a template shared across ads), and an ad-specific element, with no
    other ads, starts from its component's mean. The shrinkage strengths are not tuned but estimated from the
    data (method of moments on the spread of each level around its parent), refit whenever the counts change.

    Examples
    --------
    Half of the bold title's impressions in the shoe ad are clicked, none of the plain one's; a boot ad, never
    seen, gets the bold title on its record in the shoe ad:

    >>> from contract.events import Bag, SelectionRequest
    >>> pool = {"title": ["plain", "bold"]}
    >>> bags = [Bag(impression_id=f"i{i}", ts=i, ad_id="shoe", candidates=pool,
    ...             shown={"title": pool["title"][i % 2]}, clicked=i % 4 == 1) for i in range(40)]
    >>> counter = HierarchicalCounter()
    >>> counter.learn(bags)
    >>> mean, var = counter.posterior("shoe", "title", ["plain", "bold"])
    >>> bool(mean[1] > 0 > mean[0])
    True
    >>> counter.select([SelectionRequest(request_id="r", ad_id=ad, candidates=pool) for ad in ("shoe", "boot")])
    [{'title': 'bold'}, {'title': 'bold'}]
    """

    def __init__(self, ad_strength: float = 50.0, seed: int = 0) -> None:
        self.ad_strength = ad_strength  # pseudo-impressions at the overall CTR for an ad's own CTR
        self.rng = np.random.default_rng(seed)
        self.ads, self.components, self.elements, self.cells = Counts(), Counts(), Counts(), Counts()
        self.bags = self.clicks = 0
        self._fitted: tuple[float, float, float] | None = None  # (noise, τ² of elements, τ² of cells)

    @property
    def p0(self) -> float:
        """The running overall CTR (``smoothed_ctr``)."""
        return smoothed_ctr(self.clicks, self.bags)

    def _ad_rate(self, rows: np.ndarray) -> np.ndarray:
        n, clicks = self.ads.get(rows)
        return (clicks + self.ad_strength * self.p0) / (n + self.ad_strength)

    def learn(self, bags: list[Bag]) -> None:
        if not bags:
            return
        ads = self.ads.lookup([b.ad_id for b in bags])
        clicked = np.array([b.clicked for b in bags], dtype=np.float64)
        excess = clicked - self._ad_rate(ads)  # measured before this batch, so a label never sees itself
        shown = [(i, b.ad_id, c, e) for i, b in enumerate(bags) for c, e in b.shown.items()]
        request = np.array([i for i, *_ in shown])
        components = self.components.lookup([c for _, _, c, _ in shown])
        elements = self.elements.lookup([(c, e) for _, _, c, e in shown], components)
        cells = self.cells.lookup([(a, c, e) for _, a, c, e in shown], elements)
        for table, rows in ((self.components, components), (self.elements, elements), (self.cells, cells)):
            table.add(rows, excess[request])
        self.ads.add(ads, clicked)
        self.bags += len(bags)
        self.clicks += int(clicked.sum())
        self._fitted = None

    def _fit(self) -> tuple[float, float, float]:
        if self._fitted is None:
            noise = self.p0 * (1 - self.p0)
            component_mean = self.components.s / np.maximum(self.components.n, 1)
            el = self.elements
            tau_element = between_variance(el.n, el.s, component_mean[el.parent], noise)
            cells = self.cells
            mean, var = self._element_prior(cells.parent, cells.n, cells.s, noise, tau_element)
            tau_cell = between_variance(cells.n, cells.s, mean, noise, extra=var)
            self._fitted = noise, tau_element, tau_cell
        return self._fitted

    def _element_prior(self, elements: np.ndarray, n_own: np.ndarray, s_own: np.ndarray, noise: float,
                       tau_element: float) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of each element's excess rate from the *other* ads' counts (the ad's
        own ``n_own``, ``s_own`` left out), shrunk towards its component's mean; -1 elements: the overall 0."""
        n, s = self.elements.get(elements)
        components = np.where(elements >= 0, self.elements.parent[np.maximum(elements, 0)], -1)
        n_c, s_c = self.components.get(components)
        component_mean = s_c / np.maximum(n_c, 1)
        strength = noise / tau_element
        others = n - n_own
        return ((s - s_own + strength * component_mean) / (others + strength), noise / (others + strength))

    def posterior(self, ad_id: str, component: str, candidates: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of each candidate's excess click rate in this ad."""
        noise, tau_element, tau_cell = self._fit()
        cells = self.cells.find([(ad_id, component, e) for e in candidates])
        elements = self.elements.find([(component, e) for e in candidates])
        n, s = self.cells.get(cells)
        mean, var = self._element_prior(elements, n, s, noise, tau_element)
        strength = noise / (tau_cell + var)
        return (s + strength * mean) / (n + strength), noise / (n + strength)

    def _draw(self, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        """The score a candidate is served by: its posterior mean (:class:`ThompsonCounter` samples instead)."""
        return mean

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        out = []
        for r in requests:
            pick = {}
            for component, ids in r.candidates.items():
                pick[component] = ids[int(np.argmax(self._draw(*self.posterior(r.ad_id, component, ids))))]
            out.append(pick)
        return out
