"""What several baselines share: counts in growing numpy arrays, a method-of-moments variance, and a batch of
requests flattened into one row per candidate, so a policy scores them all at once and keeps each slot's best."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from learner.baselines.base import Request, Selection


def smoothed_ctr(clicks: float, bags: float) -> float:
    """The running overall CTR, smoothed by one click in 20 bags: a proper Beta prior's mean before any click,
    and no division by zero before any bag."""
    return (clicks + 1.0) / (bags + 20.0)


class Counts:
    """Impressions and summed values (clicks, excess clicks) per key, in numpy arrays that grow; a key gets a row
    on first sight and remembers its parent's row in the level above (for a hierarchy's shrinkage)."""

    def __init__(self) -> None:
        self.rows: dict[Hashable, int] = {}
        self.n = np.zeros(1)  # a zero row, so unseen keys read zeros before anything is counted
        self.s = np.zeros(1)
        self.parent = np.zeros(1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, keys: list, parents: np.ndarray | None = None) -> np.ndarray:
        """Rows of ``keys``, adding the unseen ones (with their ``parents``' rows)."""
        rows = self.rows
        found = np.fromiter((rows.setdefault(k, len(rows)) for k in keys), dtype=np.int64, count=len(keys))
        if len(rows) > len(self.n):
            grow = max(len(rows), 2 * len(self.n)) - len(self.n)
            self.n, self.s = np.append(self.n, np.zeros(grow)), np.append(self.s, np.zeros(grow))
            self.parent = np.append(self.parent, np.zeros(grow, dtype=np.int64))
        if parents is not None:
            self.parent[found] = parents
        return found

    def find(self, keys: list) -> np.ndarray:
        """Rows of ``keys``, -1 for keys never seen (nothing is added)."""
        get = self.rows.get
        return np.fromiter((get(k, -1) for k in keys), dtype=np.int64, count=len(keys))

    def add(self, rows: np.ndarray, values: np.ndarray) -> None:
        self.n += np.bincount(rows, minlength=len(self.n))
        self.s += np.bincount(rows, weights=values, minlength=len(self.s))

    def get(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, s) of ``rows``, zeros where a row is -1."""
        seen = rows >= 0
        safe = np.where(seen, rows, 0)
        return np.where(seen, self.n[safe], 0.0), np.where(seen, self.s[safe], 0.0)


def between_variance(n: np.ndarray, s: np.ndarray, prior: np.ndarray, noise: float, extra: np.ndarray | float = 0.0,
                     floor: float = 1e-6) -> float:
    """Method-of-moments variance of true rates around ``prior`` among rows shown at least once:
    E[(mean − prior)²] = τ² + ``extra`` + noise / n, weighted by impressions."""
    seen = n > 0
    if not seen.any():
        return floor
    n, d = n[seen], s[seen] / n[seen] - prior[seen]
    extra = extra[seen] if isinstance(extra, np.ndarray) else extra
    return max(float((n * (d * d - extra) - noise).sum() / n.sum()), floor)


@dataclass
class Candidates:
    """Every candidate of a batch of requests, one row each: request by request, component by component,
    candidate by candidate. A policy scores the rows in one go and :meth:`best` keeps each slot's highest."""

    ads: list[str]
    components: list[str]
    elements: list[str]
    sizes: np.ndarray  # candidates per (request, component) slot, in row order

    @classmethod
    def of(cls, requests: Sequence[Request]) -> Candidates:
        ads: list[str] = []
        components: list[str] = []
        elements: list[str] = []
        sizes: list[int] = []
        for r in requests:
            for component, ids in r.candidates.items():
                ads += [r.ad_id] * len(ids)
                components += [component] * len(ids)
                elements += ids
                sizes.append(len(ids))
        return cls(ads, components, elements, np.array(sizes, dtype=np.int64))

    def best(self, requests: Sequence[Request], scores: np.ndarray) -> list[Selection]:
        """Each slot's candidate of highest score; of equal scores, the first (as ``max`` and ``argmax`` do)."""
        if not len(self.sizes):
            return [{} for _ in requests]
        slot = np.repeat(np.arange(len(self.sizes)), self.sizes)
        starts = np.cumsum(self.sizes) - self.sizes
        order = np.lexsort((-scores, slot))  # stable: of equal scores the earlier candidate comes first
        top = iter((order[starts] - starts).tolist())
        return [{component: ids[next(top)] for component, ids in r.candidates.items()} for r in requests]
