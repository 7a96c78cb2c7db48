"""Baseline serving policies that GenCO is measured against.

All follow one small river-like interface (:class:`Policy`): ``learn`` takes a
chronological mini-batch of bags and updates state incrementally; ``select``
returns one element per requested component, always one of that component's
candidates, for components never seen before too.

- :class:`Uniform`: the logging policy; the floor any learner must beat.
- :class:`Counter`: smoothed per-element click rates; context-free and additive.
- :class:`DCO`: the paper's bandit baseline, successive elimination per (ad, component).
- :class:`MLPBaseline`: the paper's "MLP": a network scoring whole combinations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from learner.features import PAPER_COMPONENTS, Featurizer, HashSizes
from stream.events import Bag, SelectionRequest

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


class Counter:
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
        logit = self.model(
            torch.tensor([self.featurizer.context_rows(b) for b in bags]), torch.tensor(items), torch.tensor(offsets)
        )
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
