"""What several baselines share: counts in growing numpy arrays and a method-of-moments variance."""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np


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
