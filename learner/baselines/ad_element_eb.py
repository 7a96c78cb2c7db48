from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.events import Bag
from learner.baselines._shared import Candidates, Counts, smoothed_ctr
from learner.baselines.base import Request, Selection


class AdElementEB:
    """Empirical-Bayes click rate of each (ad, component, element) cell, shrunk towards the ad's own CTR times
    the element's click ratio in the other ads; served greedily by the posterior mean, or by Thompson sampling
    (``thompson=True``).

    Why: an element's worth is mostly one factor across ads (a template that works, works everywhere) and an ad's
    CTR another (product appeal), so before a cell has data of its own the product of the two is its best guess;
    the cell's own clicks take over as they accumulate, which is where an element that suits one ad only is
    found. The factors multiply, as the click rates of ads far apart in CTR do.

    - The ad's CTR: its clicks over impressions, smoothed by ``ad_strength`` pseudo-impressions at the running
      overall CTR p0.
    - The element's click ratio: its clicks over the clicks expected at the CTRs of the ads that showed it,
      smoothed towards 1 by ``ratio_strength`` pseudo-clicks (the mean of a Gamma posterior, clicks being
      Poisson in ratio x expected). An ad's CTR includes what its served elements are worth, so an element's
      clicks in an ad are expected at the ad's CTR divided by the mean ratio of what the ad showed in that
      component (``ITERATIONS`` rounds of iterative proportional fitting): served adaptively, an ad shows its
      best element nearly always, which would otherwise be measured against itself. A cell's prior takes the
      element's ratio in the *other* ads only (its own clicks would count twice); an element seen nowhere else
      has ratio 1.
    - The cell's prior is a Beta around that mean m whose relative variance is the cells' own spread around
      their mean, 1 / (``strength`` · p0), plus the ratio's uncertainty, 1 / (its Gamma shape): as many
      pseudo-clicks as the harmonic sum of the two. A template element known from many ads gives about
      ``strength`` · p0 pseudo-clicks (``strength`` pseudo-impressions for a cell at the overall CTR, more where
      m is lower); an element of this ad alone, under one, so its cell learns from its own clicks at once.
      ``strength`` is a constant: 400 (some 20 pseudo-clicks at a CTR of 5 %) is at the spread end of what the
      method of moments found from uniform logs on the zoo's worlds (20-55 pseudo-clicks: relative spreads of
      0.13-0.22). Fitted live, on adaptively served traffic, that estimate was not robust in a first version
      (with each ad showing one element nearly always it found no spread at all, and the cells stopped
      learning); offline 1,000 did about as well, live it did worse on two worlds of three.

    Thompson sampling draws each candidate's rate from its Beta posterior.

    Examples
    --------
    Half of the bold title's impressions in the shoe ad are clicked, none of the plain one's; a boot ad never seen
    starts from the titles' ratios in the shoe ad, at the overall CTR:

    >>> from contract.events import Bag, SelectionRequest
    >>> pool = {"title": ["plain", "bold"]}
    >>> bags = [Bag(impression_id=f"i{i}", ts=i, ad_id="shoe", candidates=pool,
    ...             shown={"title": pool["title"][i % 2]}, clicked=i % 4 == 1) for i in range(40)]
    >>> eb = AdElementEB()
    >>> eb.learn(bags)
    >>> alpha, beta = eb.posterior(["shoe", "shoe", "boot", "boot"], ["title"] * 4, ["plain", "bold"] * 2)
    >>> (alpha / (alpha + beta)).round(3).tolist()
    [0.037, 0.417, 0.045, 0.492]
    >>> eb.select([SelectionRequest(request_id="r", ad_id=ad, candidates=pool) for ad in ("shoe", "boot")])
    [{'title': 'bold'}, {'title': 'bold'}]
    """

    ITERATIONS = 3  # rounds of fitting the ads' bases and the elements' ratios to each other

    def __init__(self, strength: float = 400.0, ratio_strength: float = 1.0, ad_strength: float = 50.0,
                 thompson: bool = False, seed: int = 0) -> None:
        self.strength = strength
        self.ratio_strength = ratio_strength
        self.ad_strength = ad_strength
        self.thompson = thompson
        self.rng = np.random.default_rng(seed)
        self.ads = Counts()  # ad: impressions, clicks
        self.slots = Counts()  # (ad, component): rows only; parent: the ad's row
        self.elements = Counts()  # (component, element): rows only; its sums come from its cells
        self.cells = Counts()  # (ad, component, element): impressions, clicks; parent: the element's row
        self.cell_slot = np.zeros(1, dtype=np.int64)  # each cell's (ad, component) row
        self.bags = self.clicks = 0
        self._fitted: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def p0(self) -> float:
        """The running overall CTR (``smoothed_ctr``)."""
        return smoothed_ctr(self.clicks, self.bags)

    def learn(self, bags: list[Bag]) -> None:
        if not bags:
            return
        ads = self.ads.lookup([b.ad_id for b in bags])
        clicked = np.array([b.clicked for b in bags], dtype=np.float64)
        shown = [(i, b.ad_id, c, e) for i, b in enumerate(bags) for c, e in b.shown.items()]
        request = np.array([i for i, *_ in shown], dtype=np.int64)
        slots = self.slots.lookup([(a, c) for _, a, c, _ in shown], ads[request])
        elements = self.elements.lookup([(c, e) for _, _, c, e in shown])
        cells = self.cells.lookup([(a, c, e) for _, a, c, e in shown], elements)
        if len(self.cells.n) > len(self.cell_slot):
            grow = len(self.cells.n) - len(self.cell_slot)
            self.cell_slot = np.append(self.cell_slot, np.zeros(grow, dtype=np.int64))
        self.cell_slot[cells] = slots
        self.cells.add(cells, clicked[request])
        self.ads.add(ads, clicked)
        self.bags += len(bags)
        self.clicks += int(clicked.sum())
        self._fitted = None

    def _ad_rate(self, n: np.ndarray, clicks: np.ndarray) -> np.ndarray:
        return (clicks + self.ad_strength * self.p0) / (n + self.ad_strength)

    def _fit(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each element's clicks and expected clicks, and each (ad, component)'s mean ratio of what it showed."""
        if self._fitted is None:
            cells, slots, k = self.cells, self.slots, self.ratio_strength
            rate = self._ad_rate(self.ads.n, self.ads.s)[slots.parent][self.cell_slot]
            size = len(self.elements.n)
            clicks = np.bincount(cells.parent, weights=cells.s, minlength=size)
            shown = np.bincount(self.cell_slot, weights=cells.n, minlength=len(slots.n))
            mean_ratio = np.ones(len(slots.n))
            for _ in range(self.ITERATIONS):
                expected = np.bincount(cells.parent, weights=cells.n * rate / mean_ratio[self.cell_slot],
                                       minlength=size)
                ratio = (clicks + k) / (expected + k)
                weighted = np.bincount(self.cell_slot, weights=cells.n * ratio[cells.parent], minlength=len(shown))
                mean_ratio = np.where(shown > 0, weighted / np.maximum(shown, 1e-12), 1.0)
            expected = np.bincount(cells.parent, weights=cells.n * rate / mean_ratio[self.cell_slot], minlength=size)
            self._fitted = clicks, expected, mean_ratio
        return self._fitted

    def posterior(self, ad_ids: Sequence[str], components: Sequence[str], elements: Sequence[str],
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Beta parameters (α, β) of each (ad, component, element) cell's click rate."""
        element_clicks, element_expected, mean_ratio = self._fit()
        slot = self.slots.find(list(zip(ad_ids, components, strict=True)))
        base = self._ad_rate(*self.ads.get(self.ads.find(list(ad_ids)))) / np.where(slot >= 0, mean_ratio[slot], 1.0)
        n, clicks = self.cells.get(self.cells.find(list(zip(ad_ids, components, elements, strict=True))))
        rows = self.elements.find(list(zip(components, elements, strict=True)))
        seen = rows >= 0
        safe = np.where(seen, rows, 0)
        k = self.ratio_strength  # the element's clicks and expected clicks in the other ads, smoothed towards 1
        shape = np.where(seen, element_clicks[safe], 0.0) - clicks + k
        scale = np.maximum(np.where(seen, element_expected[safe], 0.0) - n * base, 0.0) + k
        m = np.clip(base * shape / scale, 1e-6, 1 - 1e-6)
        cell = self.strength * self.p0
        pseudo_clicks = cell * shape / (cell + shape)  # relative variances add: 1 / cell + 1 / shape
        return clicks + pseudo_clicks, n - clicks + pseudo_clicks * (1 - m) / m

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        rows = Candidates.of(requests)
        alpha, beta = self.posterior(rows.ads, rows.components, rows.elements)
        scores = self.rng.beta(alpha, beta) if self.thompson else alpha / (alpha + beta)
        return rows.best(requests, scores)
