"""Count-based priors: what counting clicks knows about each candidate, added to the network's scores.

Not in the paper (docs/model.md says why): one pass of SGD over hashed embeddings learns an element's
quality far more slowly than counting its clicks does, and an element new to an ad has to start from
what is known about it rather than from an untrained embedding. Training adds these priors to the
network's logits, so the network learns what counting misses; serving adds the same priors, computed
by the same numpy code from the same tables.

Impressions are counted as (n, Σ excess, Σ variance): an impression's excess is its click less its ad's
own CTR r, so a product's appeal stays out of its creatives' credit, and its variance is r(1 - r). A row's
effect in log-odds over its ads' CTR is then Σ excess / Σ variance, known to within a variance of
1 / Σ variance: one Newton step of a logistic model with the ad's CTR as offset, so effects of one size
in log-odds count alike on ads of 1% and of 10% CTR. Levels:

    ad        the ad's CTR (plain clicks), shrunk towards the overall CTR
    component a component's mean excess
    element   an element across every ad that lists it (a template shared by many ads)
    cell      an element in one ad
    cross     an element with one context value: an age, a gender, a query segment
    pair      two elements shown together

Shrinkage is hierarchical and empirical-Bayes, in log-odds (normal approximations): a cell is shrunk towards its
element's record in the *other* ads, which is shrunk towards its component's mean; so a new element in
an ad starts from its template's history across ads, else from its component's mean. The spread of
each level around its parent is estimated from the counts (method of moments, refit as they grow),
not tuned. A cross is shrunk the same way towards its element's effect over all ads; a pair towards the
sum of its two elements' effects, with a strength chosen by how well each candidate strength predicts the next
batch (``_choose_pair_strength``; docs/decisions.md).

Counts fade with a half-life in impressions (``ModelConfig.prior_half_life``), so retired elements and
drifted CTRs let go, as the paper's recency-first training intends. Ads, elements and cells are indexed
collision-free (``idmap.KeyIndex``); crosses and pairs, whose key spaces grow as elements × values and
elements², hash into fixed tables, where only keys with many impressions carry weight anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from learner.idmap import KeyIndex
from learner.ops import logit, mix64

if TYPE_CHECKING:
    from learner.features import Batch

PAIR_STRENGTHS = tuple(float(round(10 ** (1.5 + x / 2))) for x in range(8))  # pseudo-impressions; the last ~ off
COMPONENT_ROWS = 64
_PAIR_CAUTION = 2  # steps of PAIR_STRENGTHS (half-decades) stronger than the strength that predicts best
_REFIT_EVERY = 8  # steps between two refits of the spreads
_REFIT_SAMPLE = 1 << 16  # rows of a hashed table the cross spread is measured on
_RESCALE_AT = 1e60  # the fading weight's bound before every table is rescaled
_FLOOR = 1e-4  # the smallest spread (log-odds²): no detectable differences shrink a level (almost) to its parent
_TINY = 1e-12
_MIN_INFORMATION = 100.0  # Σ Bernoulli variance (~2,000 impressions at 5% CTR) before a spread is estimated
_MIN_ROW_INFORMATION = 2.0  # ... and of a row for it to count (~40 impressions at 5% CTR)


class CountTable:
    """(n, Σ excess, Σ variance) per int64 key, each row remembering its parent's row (a cell's element's,
    an element's component's, a cross's element's): exact rows from a KeyIndex, or ``cells`` hashed cells
    (where colliding keys share a row, and the last one to count sets its parent)."""

    def __init__(self, cells: int | None = None) -> None:
        self.index = KeyIndex() if cells is None else None
        self.cells = cells
        self.counts = np.zeros((cells or 1024, 3))
        self.parents = np.zeros(len(self.counts), dtype=np.int64)

    def rows(self, keys: np.ndarray, add: bool = False) -> np.ndarray:
        """Each key's row; -1 for an exact table's unknown keys unless ``add``."""
        if self.index is None:
            return (mix64(keys) >> (64 - (self.cells.bit_length() - 1))) & (self.cells - 1)
        rows = self.index.add(keys) if add else self.index.find(keys)
        if len(self.index) > len(self.counts):
            size = max(len(self.index), 2 * len(self.counts))
            self.counts = np.concatenate([self.counts, np.zeros((size - len(self.counts), 3))])
            self.parents = np.concatenate([self.parents, np.zeros(size - len(self.parents), dtype=np.int64)])
        return rows

    def get(self, keys: np.ndarray, scale: float) -> np.ndarray:
        """(len(keys), 3) counts of the keys divided by ``scale``, zeros for unknown keys."""
        rows = self.rows(keys)
        counts = self.counts.take(np.maximum(rows, 0), axis=0)
        counts[rows < 0] = 0.0
        counts /= scale
        return counts

    def add(self, keys: np.ndarray, weights: np.ndarray | float, excess: np.ndarray, variance: np.ndarray,
            parents: np.ndarray) -> np.ndarray:
        """Count one impression (of ``weights``) per key; returns the keys' rows."""
        rows = self.rows(keys, add=True)
        distinct, inverse = np.unique(rows, return_inverse=True)
        weights = np.broadcast_to(weights, excess.shape)
        for column, values in enumerate((weights, weights * excess, weights * variance)):
            self.counts[distinct, column] += np.bincount(inverse, weights=values, minlength=len(distinct))
        self.parents[rows] = parents
        return rows

    def used(self) -> tuple[np.ndarray, np.ndarray]:
        """The counts and parents of the rows in use (every row, for a hashed table)."""
        used = len(self.index) if self.index is not None else len(self.counts)
        return self.counts[:used], self.parents[:used]

    def state(self, prefix: str) -> dict[str, np.ndarray]:
        counts, parents = self.used()
        state = {f"{prefix}.counts": counts, f"{prefix}.parents": parents}
        if self.index is not None:
            state[f"{prefix}.keys"] = self.index.keys
        return state

    def load(self, prefix: str, state: dict[str, np.ndarray]) -> None:
        counts, parents = state[f"{prefix}.counts"], state[f"{prefix}.parents"]
        size = len(counts) if self.index is None else max(len(counts), 1024)
        self.counts, self.parents = np.zeros((size, 3)), np.zeros(size, dtype=np.int64)
        self.counts[: len(counts)], self.parents[: len(counts)] = counts, parents
        if self.index is not None:
            self.index = KeyIndex(state[f"{prefix}.keys"])


@dataclass
class PriorKeys:
    """What the priors read of a batch: keys from the featurizer (``features.Batch``)."""

    ad: np.ndarray  # (B,) each request's ad
    element: np.ndarray  # (L,) each candidate element, keyed with its component
    cell: np.ndarray  # (L,) the element in its request's ad
    component: np.ndarray  # (L,) the element's component row (< COMPONENT_ROWS)
    element_request: np.ndarray  # (L,)
    cross: np.ndarray  # (C,) an element with one of its request's context values
    cross_element: np.ndarray  # (C,) that element (into L)
    cross_weight: np.ndarray  # (C,) 1 for age and gender, 1 / segments for a query segment

    @classmethod
    def of(cls, batch: Batch) -> PriorKeys:
        elements, crosses = batch.elements, batch.crosses
        return cls(batch.requests.ad_key, elements.key, elements.cell_key, elements.component, elements.request,
                   crosses.key, crosses.element, crosses.weight)


@dataclass
class LoggedKeys:
    """The logged combinations' keys, which ``observe`` counts, and what pairs are measured against."""

    request: np.ndarray  # (S,) the request of each shown element
    element: np.ndarray  # (S,)
    cell: np.ndarray  # (S,)
    component: np.ndarray  # (S,)
    cross: np.ndarray  # (X,) the shown elements' crosses
    cross_shown: np.ndarray  # (X,) their shown element (into S)
    cross_request: np.ndarray  # (X,)
    cross_weight: np.ndarray  # (X,)
    pair: np.ndarray  # (P,) every two shown elements of one request
    pair_request: np.ndarray  # (P,)
    pair_additive: np.ndarray  # (P,) the sum of the pair's two elements' effects, before this batch
    effect_sum: np.ndarray  # (B,) the effects of each request's shown elements, summed

    @classmethod
    def of(cls, batch: Batch, effect: np.ndarray) -> LoggedKeys:
        """From a labelled batch's layout and its elements' effects (``PriorScores.element``)."""
        logged, elements, crosses = batch.logged, batch.elements, batch.crosses
        shown, request, cross = logged.element, logged.request, logged.cross
        first, second = logged.pair_first, logged.pair_second
        position = np.full(len(elements.key), -1)
        position[shown] = np.arange(len(shown))
        return cls(request, elements.key[shown], elements.cell_key[shown], elements.component[shown],
                   crosses.key[cross], position[crosses.element[cross]], logged.cross_request, crosses.weight[cross],
                   logged.pair_key, elements.request[first], effect[first] + effect[second],
                   np.bincount(request, weights=effect[shown], minlength=batch.size))


@dataclass
class PriorScores:
    """A batch's priors, in log-odds: what ``GenCO.encode`` adds to the network's scores."""

    request: np.ndarray  # (B,) the ad's CTR
    element: np.ndarray  # (L,) the element in this ad, over the ad's CTR
    context: np.ndarray | None  # (L,) how much better the element does with this request's context
    variance: np.ndarray  # (L,) of ``element``, for Thompson sampling
    pooled: np.ndarray  # (L,) the element's effect over every ad, which its context crosses deviate from


class Priors:
    """The count tables and the spreads fitted to them; ``scores`` before a batch, ``observe`` after."""

    def __init__(self, context: bool = True, pairs: bool = True, half_life: float | None = None,
                 ad_strength: float = 20.0, min_spread: tuple[float, float] = (0.0, 0.0), cross_cells: int = 1 << 20,
                 pair_cells: int = 1 << 20) -> None:
        """``min_spread``: the smallest spreads (sd, log-odds) of elements around their component and of cells
        around their element, whatever the method of moments finds (``refit``)."""
        self.half_life, self.ad_strength = half_life, ad_strength
        self.ads, self.elements, self.cells = CountTable(), CountTable(), CountTable()
        self.components = np.zeros((COMPONENT_ROWS, 3))
        self.crosses = CountTable(cross_cells) if context else None
        self.pairs = CountTable(pair_cells) if pairs else None
        self.total = np.zeros(2)  # (n, clicks)
        self.weight = 1.0  # an impression counted now, against one counted at the last rescale
        # τ² (log-odds) of elements around components, cells around them, crosses: never below these
        self.min_spreads = np.maximum(np.array([min_spread[0] ** 2, min_spread[1] ** 2, 0.0]), _FLOOR)
        self.spreads = self.min_spreads.copy()
        self.pair_strength = PAIR_STRENGTHS[-1]
        self.pair_gains = np.zeros((3, len(PAIR_STRENGTHS)))  # per strength, decayed: (batches, Σ gain, Σ gain²)
        self.steps = 0

    # -- reading ------------------------------------------------------------------------------
    def base_rate(self) -> float:
        n, clicks = self.total / self.weight
        return (clicks + 1.0) / (n + 20.0)

    def ad_rate(self, ad_keys: np.ndarray) -> np.ndarray:
        n, clicks, _ = self.ads.get(ad_keys, self.weight).T
        return (clicks + self.ad_strength * self.base_rate()) / (n + self.ad_strength)

    def _shrunk(self, excess: np.ndarray, information: np.ndarray, prior: np.ndarray | float,
                prior_variance: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of a log-odds effect measured as Σ excess / Σ variance (``excess``,
        ``information``) under a normal prior."""
        precision = information + 1 / prior_variance
        return (excess + prior / prior_variance) / precision, 1 / precision

    def element_posterior(self, element: np.ndarray, component: np.ndarray, own: np.ndarray,
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Each element's effect from its counts ``element`` (rows of n, Σ excess, Σ variance) less one ad's
        ``own``, shrunk towards its ``component``'s mean."""
        _, s_c, v_c = (self.components.take(component, axis=0) / self.weight).T
        other = element - own
        return self._shrunk(other[:, 1], np.maximum(other[:, 2], 0.0), s_c / (v_c + 1.0), self.spreads[0])

    def cell_posterior(self, cell: np.ndarray, element: np.ndarray, component: np.ndarray,
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Each element's effect in its ad, from the counts of the cell and of its element."""
        element_mean, element_variance = self.element_posterior(element, component, cell)
        return self._shrunk(cell[:, 1], cell[:, 2], element_mean, self.spreads[1] + element_variance)

    def pooled_effect(self, element: np.ndarray) -> np.ndarray:
        """Each element's effect over every ad, shrunk towards zero (what crosses deviate from)."""
        return self._shrunk(element[:, 1], element[:, 2], 0.0, self.spreads[0])[0]

    def cross_deviation(self, cross: np.ndarray, pooled: np.ndarray) -> np.ndarray:
        """How much better each (element, context value) does than its element's ``pooled`` effect, shrunk."""
        return self._shrunk(cross[:, 1] - cross[:, 2] * pooled, cross[:, 2], 0.0, self.spreads[2])[0]

    def scores(self, keys: PriorKeys) -> PriorScores:
        scores = self.pool_scores(keys)
        scores.context = self.context_scores(keys, scores.pooled)
        return scores

    def pool_scores(self, keys: PriorKeys) -> PriorScores:
        """The scores that depend on the requests' ads and candidates alone, not on who asks: all but
        ``context``, which is None (serving keeps these per ad; ``policy.Selector``)."""
        element = self.elements.get(keys.element, self.weight)
        effect, variance = self.cell_posterior(self.cells.get(keys.cell, self.weight), element, keys.component)
        return PriorScores(logit(self.ad_rate(keys.ad)), effect, None, variance, self.pooled_effect(element))

    def context_scores(self, keys: PriorKeys, pooled: np.ndarray) -> np.ndarray | None:
        """(L,) each element's shift for its request's context (None without the context prior); ``pooled``:
        the elements' effects over every ad (``PriorScores.pooled``)."""
        if self.crosses is None:
            return None
        deviation = self.cross_deviation(self.crosses.get(keys.cross, self.weight), pooled[keys.cross_element])
        return np.bincount(keys.cross_element, weights=deviation * keys.cross_weight, minlength=len(pooled))

    def pair_shift(self, pair_keys: np.ndarray, additive: np.ndarray) -> np.ndarray:
        """How much better each pair does together than its two elements' effects (summed in ``additive``)
        say, in log-odds: its own effect shrunk towards that sum, by the chosen strength."""
        _, s, v = self.pairs.get(pair_keys, self.weight).T
        return (s - v * additive) / (v + self._pair_information())

    def _pair_information(self, strengths: np.ndarray | float | None = None) -> np.ndarray | float:
        """A strength in pseudo-impressions as information (Σ variance) at the overall CTR."""
        base = self.base_rate()
        return (self.pair_strength if strengths is None else strengths) * base * (1 - base)

    # -- counting -----------------------------------------------------------------------------
    def observe(self, keys: PriorKeys, clicked: np.ndarray, logged: LoggedKeys) -> None:
        """Count a batch (after the step that learned from it, so a label never sees itself)."""
        # against the ad's CTR before this batch: one that had counted the click would shrink its excess
        ad_rate = self.ad_rate(keys.ad)
        excess, variance = clicked - ad_rate, ad_rate * (1 - ad_rate)
        self.ads.add(keys.ad, self.weight, clicked, np.zeros(len(clicked)), np.zeros(len(clicked), dtype=np.int64))
        self.total += self.weight * np.array([len(clicked), clicked.sum()])
        if self.pairs is not None:
            self._choose_pair_strength(excess, variance, logged)
            self.pairs.add(logged.pair, self.weight, excess[logged.pair_request], variance[logged.pair_request],
                           logged.pair_request)
        shown_excess, shown_variance = excess[logged.request], variance[logged.request]
        elements = self.elements.add(logged.element, self.weight, shown_excess, shown_variance, logged.component)
        self.cells.add(logged.cell, self.weight, shown_excess, shown_variance, elements)
        for column, values in enumerate((np.ones(len(shown_excess)), shown_excess, shown_variance)):
            self.components[:, column] += self.weight * np.bincount(logged.component, weights=values,
                                                                    minlength=COMPONENT_ROWS)
        if self.crosses is not None:
            self.crosses.add(logged.cross, self.weight * logged.cross_weight, excess[logged.cross_request],
                             variance[logged.cross_request], elements[logged.cross_shown])
        self._fade(len(clicked))
        self.steps += 1
        if self.steps < 4 * _REFIT_EVERY or self.steps % _REFIT_EVERY == 0:  # while the tables are small, always
            self.refit()

    def _fade(self, impressions: int) -> None:
        """Later impressions weigh more: 2× per half-life. Kept as one growing weight, not a pass per table."""
        if self.half_life is None:
            return
        self.weight *= 2.0 ** (impressions / self.half_life)
        if self.weight > _RESCALE_AT:
            for table in (self.ads, self.elements, self.cells, self.crosses, self.pairs):
                if table is not None:
                    table.counts /= self.weight
            self.components /= self.weight
            self.total /= self.weight
            self.weight = 1.0

    def refit(self) -> None:
        """Each level's spread around its parent: the variance of the rows' effects beyond their noise (and
        beyond the parent's own uncertainty), weighted by information; the elements' and cells' no smaller
        than ``min_spreads``.

        Why a minimum: on faint effects (sd 0.05-0.15 in log-odds) the moments are mostly noise and come out at
        the floor, and on traffic served greedily each ad shows one element nearly always, whose excess over
        the ad's CTR (which it sets) is ~0: the rows show no spread at all. At the floor a cell's posterior
        is τ² · Σ excess, so candidates rank by summed excess, the served element's stays ahead, and what
        serving does not show is never believed (docs/decisions.md, "Spreads: a minimum under the moments")."""
        _, s_c, v_c = (self.components / self.weight).T
        elements, element_components = self.elements.used()
        elements = elements / self.weight
        self.spreads[0] = max(between_variance(elements[:, 1], elements[:, 2],
                                               (s_c / (v_c + 1.0))[element_components], default=self.spreads[0]),
                              self.min_spreads[0])
        cells, cell_elements = self.cells.used()
        cells = cells / self.weight
        mean, mean_variance = self.element_posterior(elements.take(cell_elements, axis=0),
                                                     element_components.take(cell_elements), cells)
        self.spreads[1] = max(between_variance(cells[:, 1], cells[:, 2], mean, mean_variance, default=self.spreads[1]),
                              self.min_spreads[1])
        if self.crosses is not None:
            crosses, cross_elements = self.crosses.used()
            seen = np.flatnonzero(crosses[:, 2] > 0)
            if len(seen) > _REFIT_SAMPLE:
                seen = seen[:: len(seen) // _REFIT_SAMPLE + 1]
            crosses = crosses.take(seen, axis=0) / self.weight  # take: fancy indexing copies row by row
            pooled = self.pooled_effect(elements.take(cross_elements.take(seen), axis=0))
            self.spreads[2] = between_variance(crosses[:, 1], crosses[:, 2], pooled, default=self.spreads[2])

    def _choose_pair_strength(self, excess: np.ndarray, variance: np.ndarray, logged: LoggedKeys,
                              decay: float = 0.99) -> None:
        """Take the pairs' shrinkage by how well each candidate strength predicts this batch's clicks from
        the counts so far: a weaker one only when clearly better than the strongest (z > 2), and then
        ``_PAIR_CAUTION`` steps stronger than the best predictor, since serving's argmax over summed pair
        shifts pays more for noise than prediction does. Prequential, not empirical Bayes: the spread of pair
        cells also holds what persists besides synergy (docs/decisions.md)."""
        _, s, v = self.pairs.get(logged.pair, self.weight).T
        strengths = np.array(PAIR_STRENGTHS)
        shifts = (s - v * logged.pair_additive)[:, None] / (v[:, None] + self._pair_information(strengths))
        predicted = variance[:, None] * np.stack(
            [np.bincount(logged.pair_request, weights=column, minlength=len(excess)) for column in shifts.T], 1)
        miss = ((excess - variance * logged.effect_sum)[:, None] - predicted) ** 2
        gain = miss[:, -1:] - miss  # squared error saved against the strongest, as good as off
        self.pair_gains = decay * self.pair_gains + np.stack([np.full(len(strengths), len(excess)),
                                                              gain.sum(0), (gain * gain).sum(0)])
        count, total, squares = self.pair_gains
        z = total / np.sqrt(np.maximum(squares - total * total / np.maximum(count, 1), 1e-12))
        trusted = np.where(z > 2, total, 0.0)
        best = int(trusted.argmax()) if (trusted > 0).any() else len(strengths) - 1
        self.pair_strength = float(strengths[min(best + _PAIR_CAUTION, len(strengths) - 1)])

    # -- persistence --------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        state = {"components": self.components, "total": self.total, "spreads": self.spreads,
                 "pair_gains": self.pair_gains,
                 "scalars": np.array([self.weight, self.pair_strength, self.steps], dtype=np.float64)}
        for name in ("ads", "elements", "cells", "crosses", "pairs"):
            table = getattr(self, name)
            if table is not None:
                state |= table.state(name)
        return state

    def load(self, state: dict[str, np.ndarray]) -> None:
        for name in ("ads", "elements", "cells", "crosses", "pairs"):
            table = getattr(self, name)
            if table is not None:
                table.load(name, state)
        self.components = np.array(state["components"], dtype=np.float64)
        self.total, self.spreads = np.array(state["total"]), np.array(state["spreads"])
        self.pair_gains = np.array(state["pair_gains"])
        self.weight, self.pair_strength, steps = (float(x) for x in state["scalars"])
        self.steps = int(steps)


def between_variance(excess: np.ndarray, information: np.ndarray, prior: np.ndarray | float,
                     prior_variance: np.ndarray | float = 0.0, default: float = _FLOOR) -> float:
    """Method-of-moments variance of true effects around ``prior`` among rows measured at all: a row's effect
    excess / information deviates from it by τ² + ``prior_variance`` + 1 / information in expectation;
    weighted by information. Only rows of ``_MIN_ROW_INFORMATION`` count: a row of a few impressions is
    measured against an ad's CTR that is itself still mostly its prior, and one measured against a CTR too
    high (a tail ad of 1% shrunk towards 5%) shows less spread than it has. ``default`` until the rows
    hold ``_MIN_INFORMATION``: a few clicks at a low CTR make the moments wild."""
    seen = information >= _MIN_ROW_INFORMATION
    if information[seen].sum() < _MIN_INFORMATION:
        return default
    excess, information = excess[seen], information[seen]
    prior = prior[seen] if isinstance(prior, np.ndarray) else prior
    prior_variance = prior_variance[seen] if isinstance(prior_variance, np.ndarray) else prior_variance
    d = excess / information - prior
    return max(float((information * (d * d - prior_variance) - 1.0).sum() / information.sum()), _FLOOR)
