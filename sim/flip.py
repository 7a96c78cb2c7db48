"""A world whose ads change their minds: where a simple counter beats genco for a while, then genco wins back.

Why: the referee (learner/referee.py) must hand serving to a baseline when it is ahead and back to genco when
genco overtakes it, and a test must see both happen from real learning. Two components drawn from one
shared vocabulary; every ad lists a few of its elements. An element's click logit is a global effect, the
same in every ad, plus an effect of its own in each ad (a random sign), which ``flip`` reverses in every ad.

Before the flip genco's per-ad cells know both parts and beat the pooled counter, which only sees the global
one. Just after it, the cells still hold the old signs and choose the wrong elements, while the pooled
effects, whose per-ad parts averaged out across ads, still choose by the global part: the pooled counter is
ahead. Once the new signs outweigh the old in the cells, genco is ahead again.
"""

from __future__ import annotations

import numpy as np

COMPONENTS = ("title", "image")
T0 = 1_763_900_000.0


class FlipWorld:
    def __init__(self, seed: int = 0, n_ads: int = 60, vocabulary: int = 8, listed: int = 4,
                 global_sd: float = 0.8, own: float = 1.5, ctr: float = 0.05) -> None:
        self.rng = np.random.default_rng(seed)
        m = len(COMPONENTS)
        self.listing = self.rng.permuted(np.tile(np.arange(vocabulary), (n_ads, m, 1)), axis=2)[:, :, :listed]
        self.global_effect = self.rng.normal(0.0, global_sd, (m, vocabulary))
        self.own_effect = own * self.rng.choice([-1.0, 1.0], (n_ads, m, vocabulary))
        self.base = float(np.log(ctr / (1 - ctr)))
        self.tick = 0

    def flip(self) -> None:
        """Every ad's own effects change sign."""
        self.own_effect = -self.own_effect

    def _click_probability(self, ad: int, elements: np.ndarray) -> float:
        j = np.arange(len(COMPONENTS))
        logit = self.base + self.global_effect[j, elements].sum() + self.own_effect[ad, j, elements].sum()
        return float(1.0 / (1.0 + np.exp(-logit)))

    def uniform_log(self, n: int) -> list[dict]:
        """Bags from the uniform explore slice, in order (Bag fields)."""
        bags = []
        for _ in range(n):
            ad = int(self.rng.integers(len(self.listing)))
            positions = self.rng.integers(self.listing.shape[2], size=len(COMPONENTS))
            candidates = {c: [f"{c}-{e}" for e in self.listing[ad, j]] for j, c in enumerate(COMPONENTS)}
            p = self._click_probability(ad, self.listing[ad, np.arange(len(COMPONENTS)), positions])
            bags.append({"impression_id": f"imp-{self.tick}", "ts": T0 + self.tick, "ad_id": f"ad-{ad}",
                         "candidates": candidates,
                         "shown": {c: candidates[c][positions[j]] for j, c in enumerate(COMPONENTS)},
                         "policy": "explore", "propensity": 1.0 / self.listing.shape[2] ** len(COMPONENTS),
                         "clicked": bool(self.rng.random() < p)})
            self.tick += 1
        return bags

    def true_ctr(self, ad_ids: list[str], selections: list[dict[str, str]]) -> float:
        """The mean click probability of ``selections`` for requests of ``ad_ids``, as the world stands."""
        return float(np.mean([
            self._click_probability(int(ad_id.removeprefix("ad-")),
                                    np.array([int(selection[c].rsplit("-", 1)[1]) for c in COMPONENTS]))
            for ad_id, selection in zip(ad_ids, selections, strict=True)]))
