from __future__ import annotations

from collections.abc import Sequence

from contract.events import Bag
from learner.baselines.base import Request, Selection


class ClickCounter:
    """Smoothed click rate per (component, element), blind to context, ad and other components.

    Why: the simplest learner that exploits element quality. Shrinking towards the running
    overall CTR ``p0`` with ``strength`` pseudo-impressions keeps rarely-shown elements from
    winning on a lucky click; an element never seen scores exactly ``p0``.

    Examples
    --------
    Half of the bold title's impressions are clicked, none of the plain one's:

    >>> from contract.events import Bag, SelectionRequest
    >>> pool = {"title": ["plain", "bold"]}
    >>> bags = [Bag(impression_id=f"i{i}", ts=i, ad_id="shoe", candidates=pool,
    ...             shown={"title": pool["title"][i % 2]}, clicked=i % 4 == 1) for i in range(40)]
    >>> counter = ClickCounter(strength=20.0)
    >>> counter.learn(bags)
    >>> counter.p0
    0.25
    >>> round(counter.score("title", "bold"), 3), round(counter.score("title", "plain"), 3)
    (0.375, 0.125)
    >>> counter.select([SelectionRequest(request_id="r", ad_id="boot", candidates=pool)])
    [{'title': 'bold'}]
    """

    def __init__(self, strength: float = 20.0) -> None:
        self.strength = strength
        self.shows: dict[tuple[str, str], int] = {}
        self.clicks: dict[tuple[str, str], int] = {}
        self.bags = 0
        self.clicked = 0

    @property
    def p0(self) -> float:
        """Running CTR over all bags seen (0 before any)."""
        return self.clicked / self.bags if self.bags else 0.0

    def learn(self, bags: list[Bag]) -> None:
        for bag in bags:
            y = int(bag.clicked)
            self.bags += 1
            self.clicked += y
            for key in bag.shown.items():
                self.shows[key] = self.shows.get(key, 0) + 1
                self.clicks[key] = self.clicks.get(key, 0) + y

    def score(self, component: str, element: str) -> float:
        """(c + strength * p0) / (n + strength)."""
        key = (component, element)
        return (self.clicks.get(key, 0) + self.strength * self.p0) / (self.shows.get(key, 0) + self.strength)

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        # max() keeps the first of equal scores, so ties go to the first candidate
        return [
            {c: max(ids, key=lambda e, c=c: self.score(c, e)) for c, ids in r.candidates.items()}
            for r in requests
        ]
