"""A learner told a zoo world's structure, not its effects: how far estimating creative quality from a
uniform log can go.

Why: outside the context family, genco and the hierarchical counter capture about half of the lift on
offer, where the best fixed combination per ad, known exactly, captures ~0.9. Is what lies between
estimation that a better learner could do, or the log's limit? This learner knows what no learner of
the contract can: each ad's category, which elements are templates, and the distribution the world
draws every effect from (``ZooWorld.structure``). It counts each (ad, element) cell's clicks against
the ad's CTR, as genco's priors do, and chooses by each effect's posterior mean under the true prior:

- an ad's own element: its effect ~ N(0, scale²), scale its component's importance in the ad's category;
- a template: a quality common to every ad plus a deviation per category (``template_deviation`` of its
  sd), each category's share measured on every ad of the category that lists it, weighted by the true
  scales; a category where the template has no clicks yet starts from the common quality.

Context, synergy and drift it ignores: it bounds the estimation of the additive part, which is what the
hierarchical counter does too. ``benchmarks/quality.py --policies "known structure"`` runs it.
"""

from __future__ import annotations

import numpy as np

from learner.idmap import KeyIndex
from learner.priors import CountTable
from sim.zoo import ZooWorld

_AD_STRENGTH = 50.0  # pseudo-impressions at the overall CTR in an ad's own CTR, as the hierarchical counter's
_SHIFT = 32  # a cell's key: ad << _SHIFT | element


class KnownStructure:
    """``learn`` counts bags; ``select`` picks each pool's element of highest posterior mean effect."""

    def __init__(self, world: ZooWorld) -> None:
        self.world = world
        self.ads = CountTable()  # per ad index: impressions and clicks (in the excess column, as genco's priors)
        self.total = np.zeros(2)
        self.cells = CountTable()  # per (ad, element): impressions, Σ excess over the ad's CTR, Σ its variance

    def _ad_rate(self, ads: np.ndarray) -> np.ndarray:
        n, clicks, _ = self.ads.get(ads, 1.0).T
        base = (self.total[1] + 1.0) / (self.total[0] + 20.0)
        return (clicks + _AD_STRENGTH * base) / (n + _AD_STRENGTH)

    def learn(self, bags: list) -> None:
        """Count a chronological batch, each impression against its ad's CTR before the batch."""
        ads = np.array([_ad_index(bag.ad_id) for bag in bags])
        clicked = np.array([float(bag.clicked) for bag in bags])
        index = self.world.elements.index
        shown = [(i, index[e]) for i, bag in enumerate(bags) for e in bag.shown.values()]
        request, elements = np.array(shown).T
        rate = self._ad_rate(ads)
        self.cells.add((ads[request] << _SHIFT) | elements, 1.0, (clicked - rate)[request],
                       (rate * (1 - rate))[request], np.zeros(len(request), dtype=np.int64))
        self.ads.add(ads, 1.0, clicked, np.zeros(len(ads)), np.zeros(len(ads), dtype=np.int64))
        self.total += [len(ads), clicked.sum()]

    def effects(self, ads: np.ndarray, elements: np.ndarray) -> np.ndarray:
        """Posterior mean effect (log-odds) of each (ad, element) index pair."""
        groups, share, common = self._template_shares(int(elements.max(initial=0)) + 1)
        scale, category, template = self.world.structure(ads, elements)
        out = np.zeros(len(ads))
        own = np.flatnonzero(~template)
        _, excess, variance = self.cells.get((ads[own] << _SHIFT) | elements[own], 1.0).T
        out[own] = excess / (variance + 1 / scale[own] ** 2)  # prior N(0, scale²); an unseen cell counts 0
        shared = np.flatnonzero(template)
        found = groups.find((elements[shared] << _SHIFT) | category[shared])
        out[shared] = scale[shared] * np.where(found >= 0, share[np.maximum(found, 0)], common[elements[shared]])
        return out

    def _template_shares(self, size: int) -> tuple[KeyIndex, np.ndarray, np.ndarray]:
        """Each template's quality in each category where it has counts (rows of the returned index, keyed
        template << _SHIFT | category), and its common quality (by element index, ``size`` at least): a
        category's measurement, Σ scale·excess / Σ scale²·variance, deviates from the common quality by
        the category's deviation (variance d²) and its own noise."""
        keys = self.cells.index.keys
        cell_ads, cell_elements = keys >> _SHIFT, keys & ((1 << _SHIFT) - 1)
        scale, category, template = self.world.structure(cell_ads, cell_elements)
        _, excess, variance = self.cells.used()[0].T
        d2 = self.world.config.template_deviation ** 2
        groups = KeyIndex()
        group = groups.add((cell_elements[template] << _SHIFT) | category[template])
        num = np.bincount(group, weights=(scale * excess)[template], minlength=len(groups))
        info = np.bincount(group, weights=(scale * scale * variance)[template], minlength=len(groups))
        element = groups.keys >> _SHIFT
        measured = info > 0
        safe_info = np.where(measured, info, 1.0)
        weight = np.where(measured, 1 / (d2 + 1 / safe_info), 0.0)
        size = max(size, int(element.max(initial=0)) + 1)
        precision = 1 / (1 - d2) + np.bincount(element, weights=weight, minlength=size)
        common = np.bincount(element, weights=weight * num / safe_info, minlength=size) / precision
        return groups, (num + common[element] / d2) / (info + 1 / d2), common

    def select(self, requests: list) -> list[dict[str, str]]:
        index = self.world.elements.index
        pools = [(r, component, ids) for r, request in enumerate(requests)
                 for component, ids in request.candidates.items()]
        ads = np.array([_ad_index(requests[r].ad_id) for r, _, ids in pools for _ in ids])
        elements = np.array([index[e] for _, _, ids in pools for e in ids])
        effect = self.effects(ads, elements)
        chosen: list[dict[str, str]] = [{} for _ in requests]
        start = 0
        for r, component, ids in pools:
            chosen[r][component] = ids[int(np.argmax(effect[start : start + len(ids)]))]
            start += len(ids)
        return chosen


def _ad_index(ad_id: str) -> int:
    return int(ad_id.removeprefix("ad-"))
