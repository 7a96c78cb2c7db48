"""Baseline serving policies that GenCO is measured against.

All follow one small river-like interface (:class:`Policy`): ``learn`` takes a
chronological mini-batch of bags and updates state incrementally; ``select``
returns one element per requested component, always one of that component's
candidates, for components never seen before too.

- :class:`Uniform`: the logging policy; the floor any learner must beat.
- :class:`ClickCounter`: smoothed per-element click rates; context-free and additive.
- :class:`HierarchicalCounter`: empirical-Bayes (ad, element) rates shrunk towards the element across ads;
  :class:`ThompsonCounter` serves it by posterior sampling.
- :class:`ContextLogReg`: river's logistic regression on element x ad and element x context crosses.
- :class:`DCO`: the paper's bandit baseline, successive elimination per (ad, component).
- :class:`MLPBaseline`: the paper's "MLP": a network scoring whole combinations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from river import linear_model, optim
from torch import nn

from contract.events import Bag, SelectionRequest
from learner.features import PAPER_COMPONENTS, Featurizer, HashSizes

Request = SelectionRequest | Bag
Selection = dict[str, str]


@runtime_checkable
class Policy(Protocol):
    """What the benchmark drives: incremental ``learn`` on bags, ``select`` on requests."""

    def learn(self, bags: list[Bag]) -> None: ...

    def select(self, requests: Sequence[Request]) -> list[Selection]: ...


class Uniform:
    """Uniform random element per component: the logging policy, i.e. zero captured value."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def learn(self, bags: list[Bag]) -> None:
        """Nothing to learn."""

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        return [
            {c: ids[int(self.rng.integers(len(ids)))] for c, ids in r.candidates.items()} for r in requests
        ]


class ClickCounter:
    """Smoothed click rate per (component, element), blind to context, ad and other components.

    Why: the simplest learner that exploits element quality. Shrinking towards the running
    overall CTR ``p0`` with ``strength`` pseudo-impressions keeps rarely-shown elements from
    winning on a lucky click; an element never seen scores exactly ``p0``.
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


class _Counts:
    """Impressions and summed excess clicks per key, in numpy arrays that grow; a key gets a row on first sight
    and remembers its parent's row in the level above (for the hierarchy's shrinkage)."""

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


def _between_variance(n: np.ndarray, s: np.ndarray, prior: np.ndarray, noise: float, extra: np.ndarray | float = 0.0,
                      floor: float = 1e-6) -> float:
    """Method-of-moments variance of true rates around ``prior`` among rows shown at least once:
    E[(mean − prior)²] = τ² + ``extra`` + noise / n, weighted by impressions."""
    seen = n > 0
    if not seen.any():
        return floor
    n, d = n[seen], s[seen] / n[seen] - prior[seen]
    extra = extra[seen] if isinstance(extra, np.ndarray) else extra
    return max(float((n * (d * d - extra) - noise).sum() / n.sum()), floor)


class HierarchicalCounter:
    """Empirical-Bayes click counter: each (ad, element) shrunk towards the element in other ads, which is shrunk
    towards its component's mean, all counted as clicks in excess of the ad's own CTR.

    Why: the strongest simple learner of additive element quality. Counting against the ad's CTR keeps product
    appeal out of an element's credit; the element's record in *other* ads is what a new (ad, element) cell is
    worth before it has data of its own (a template shared across ads), and an ad-specific element, with no
    other ads, starts from its component's mean. The shrinkage strengths are not tuned but estimated from the
    data (method of moments on the spread of each level around its parent), refit whenever the counts change.
    """

    def __init__(self, ad_strength: float = 50.0, seed: int = 0) -> None:
        self.ad_strength = ad_strength  # pseudo-impressions at the overall CTR for an ad's own CTR
        self.rng = np.random.default_rng(seed)
        self.ads, self.components, self.elements, self.cells = _Counts(), _Counts(), _Counts(), _Counts()
        self.bags = self.clicks = 0
        self._fitted: tuple[float, float, float] | None = None  # (noise, τ² of elements, τ² of cells)

    @property
    def p0(self) -> float:
        return (self.clicks + 1.0) / (self.bags + 20.0)

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
            tau_element = _between_variance(el.n, el.s, component_mean[el.parent], noise)
            cells = self.cells
            mean, var = self._element_prior(cells.parent, cells.n, cells.s, noise, tau_element)
            tau_cell = _between_variance(cells.n, cells.s, mean, noise, extra=var)
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
        return mean

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        out = []
        for r in requests:
            pick = {}
            for component, ids in r.candidates.items():
                pick[component] = ids[int(np.argmax(self._draw(*self.posterior(r.ad_id, component, ids))))]
            out.append(pick)
        return out


class ThompsonCounter(HierarchicalCounter):
    """:class:`HierarchicalCounter` serving by Thompson sampling: each candidate's score is drawn from its
    posterior, so an element with little data is tried in proportion to its chance of being the best."""

    def _draw(self, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        return mean + np.sqrt(var) * self.rng.standard_normal(len(mean))


class ContextLogReg:
    """river's online logistic regression on each shown element crossed with the ad and with the request's age,
    gender and query segments (a request's segments weigh as one value).

    Why: the simple learner that sees context. Scores add up over components, so the best combination is each
    component's best candidate for this request.
    """

    def __init__(self, lr: float = 0.05, l2: float = 0.0) -> None:
        self.model = linear_model.LogisticRegression(optimizer=optim.AdaGrad(lr), l2=l2)

    @staticmethod
    def _features(record: Request, component: str, element: str) -> dict[str, float]:
        e = f"{component}={element}"
        x = {e: 1.0, f"ad={record.ad_id}|{e}": 1.0}
        if record.user:
            x[f"age={record.user.age}|{e}"] = 1.0
            x[f"gender={record.user.gender}|{e}"] = 1.0
        if record.query and record.query.segments:
            for segment in record.query.segments:
                x[f"segment={segment}|{e}"] = 1.0 / len(record.query.segments)
        return x

    def learn(self, bags: list[Bag]) -> None:
        for bag in bags:
            x = {f"ad={bag.ad_id}": 1.0}
            for component, element in bag.shown.items():
                x.update(self._features(bag, component, element))
            self.model.learn_one(x, bag.clicked)

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        score = self.model.predict_proba_one  # monotone in the candidate's own terms: the rest is shared
        return [
            {c: max(ids, key=lambda e, c=c, r=r: score(self._features(r, c, e))[True])
             for c, ids in r.candidates.items()}
            for r in requests
        ]


class DCO:
    """Dynamic Creative Optimisation (Wei et al. 2022) by successive elimination per (ad, component).

    Why: the paper's bandit baseline. Each (ad, component) pool is a k-armed bandit; an arm
    survives while its Hoeffding upper bound reaches the best lower bound, and DCO serves
    uniformly among survivors while it still explores. Arms are judged on the current pool
    each time, so churned-in elements (unpulled, infinite radius) are always explored.
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


_OTHER_SLOT = len(PAPER_COMPONENTS)
_SLOTS = _OTHER_SLOT + 1  # the six paper components, then the sum of all others
_SLOT = {name: i for i, name in enumerate(PAPER_COMPONENTS)}


class _CombinationMLP(nn.Module):
    def __init__(self, sizes: HashSizes, dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        # Small init: an untrained model should score combinations alike, not by embedding noise.
        self.context = nn.Embedding(sizes.context_rows, dim, sparse=True)
        self.elements = nn.EmbeddingBag(sizes.element_rows, dim, mode="sum", sparse=True)
        nn.init.normal_(self.context.weight, std=0.1)
        nn.init.normal_(self.elements.weight, std=0.1)
        layers: list[nn.Module] = []
        width = dim * (5 + _SLOTS)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, context: torch.Tensor, items: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Logits (N,) from context rows (N, 5) and N * 7 element bags (flat items, bag offsets)."""
        n = context.shape[0]
        slots = self.elements(items, offsets).view(n, -1)  # an empty bag embeds to zeros
        return self.mlp(torch.cat([self.context(context).view(n, -1), slots], 1)).squeeze(1)


class MLPBaseline:
    """The paper's "MLP" baseline: an MLP predicts the CTR of a whole combination.

    Why: it models context and cross-component effects that the counters cannot, but has no
    generative element scorer, so serving must search combinations by brute force: all of them
    up to ``max_combinations``, else that many uniformly sampled ones. Input: embeddings of
    user id, age, gender, ad and query, one slot per paper component for its shown element
    (zeros if absent), and one slot summing the embeddings of any other components.
    """

    def __init__(
        self,
        sizes: HashSizes | None = None,
        dim: int = 8,
        hidden: tuple[int, ...] = (64, 32),
        lr: float = 3e-3,
        max_combinations: int = 256,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        self.featurizer = Featurizer(sizes)
        self.batch_size = batch_size  # tuned: at 1024 bags a step it learns nothing in 10^5 bags
        self.max_combinations = max_combinations
        self.rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = _CombinationMLP(self.featurizer.sizes, dim, hidden)
        self.dense = torch.optim.Adam(self.model.mlp.parameters(), lr=lr)
        self.sparse = torch.optim.SparseAdam([self.model.context.weight, self.model.elements.weight], lr=lr)
        self.last_loss: float | None = None

    def _bags(self, combos: Sequence[Selection]) -> tuple[list[int], list[int]]:
        """Flat element rows and bag offsets, 7 bags per combination, in slot order."""
        items: list[int] = []
        offsets: list[int] = []
        row = self.featurizer.element_row
        for combo in combos:
            by_slot: list[list[int]] = [[] for _ in range(_SLOTS)]
            for component, element in combo.items():
                by_slot[_SLOT.get(component, _OTHER_SLOT)].append(row(component, element))
            for rows in by_slot:
                offsets.append(len(items))
                items.extend(rows)
        return items, offsets

    def learn(self, bags: list[Bag]) -> None:
        """Adam/SparseAdam steps of binary cross-entropy on the bags' shown combinations."""
        for start in range(0, len(bags), self.batch_size):
            self._step(bags[start : start + self.batch_size])

    def _step(self, bags: list[Bag]) -> None:
        if not bags:
            return
        self.model.train()
        items, offsets = self._bags([b.shown for b in bags])
        context = torch.from_numpy(np.stack([self.featurizer.context_rows(b) for b in bags]))
        logit = self.model(context, torch.tensor(items), torch.tensor(offsets))
        label = torch.tensor([float(b.clicked) for b in bags])
        loss = nn.functional.binary_cross_entropy_with_logits(logit, label)
        self.dense.zero_grad()
        self.sparse.zero_grad()
        loss.backward()
        self.dense.step()
        self.sparse.step()
        self.last_loss = float(loss.detach())

    def _combinations(self, r: Request) -> tuple[list[str], np.ndarray]:
        """Component names and (C, m) candidate positions: all combinations, or uniform samples."""
        comps = list(r.candidates)
        sizes = [len(r.candidates[c]) for c in comps]
        if math.prod(sizes) <= self.max_combinations:
            index = np.array(list(itertools.product(*[range(s) for s in sizes])), dtype=np.int64)
        else:
            index = self.rng.integers(0, sizes, size=(self.max_combinations, len(comps)))
        return comps, index

    @torch.no_grad()
    def select(self, requests: Sequence[Request]) -> list[Selection]:
        if not requests:
            return []
        self.model.eval()
        contexts: list[np.ndarray] = []
        item_parts: list[np.ndarray] = []
        offset_parts: list[np.ndarray] = []
        counts: list[int] = []
        plans: list[tuple[list[str], np.ndarray]] = []
        n_items = 0
        row = self.featurizer.element_row
        for r in requests:
            comps, index = self._combinations(r)
            order = sorted(range(len(comps)), key=lambda j: _SLOT.get(comps[j], _OTHER_SLOT))
            rows = [np.array([row(comps[j], e) for e in r.candidates[comps[j]]]) for j in order]
            items = np.stack([rows[i][index[:, j]] for i, j in enumerate(order)], 1)  # (C, m) slot order
            per_slot = np.zeros(_SLOTS, dtype=np.int64)
            for c in comps:
                per_slot[_SLOT.get(c, _OTHER_SLOT)] += 1
            start = np.concatenate([[0], np.cumsum(per_slot)[:-1]])
            n = len(index)
            offset_parts.append(n_items + np.arange(n)[:, None] * len(comps) + start[None, :])
            item_parts.append(items.reshape(-1))
            contexts.append(np.tile(self.featurizer.context_rows(r), (n, 1)))
            counts.append(n)
            plans.append((comps, index))
            n_items += items.size
        logit = self.model(
            torch.from_numpy(np.concatenate(contexts)),
            torch.from_numpy(np.concatenate(item_parts)),
            torch.from_numpy(np.concatenate(offset_parts).reshape(-1)),
        ).numpy()
        out = []
        first = 0
        for r, (comps, index), n in zip(requests, plans, counts, strict=True):
            best = index[int(np.argmax(logit[first : first + n]))]
            out.append({c: r.candidates[c][int(k)] for c, k in zip(comps, best, strict=True)})
            first += n
        return out
