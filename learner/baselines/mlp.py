from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from contract.events import Bag
from learner.baselines.base import Request, Selection
from learner.features import PAPER_COMPONENTS, Featurizer, HashSizes

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

    Examples
    --------
    Only the bold title with the blue image is clicked; serving searches the pool's 6 combinations for it:

    >>> from contract.events import Bag, SelectionRequest
    >>> pool = {"title": ["plain", "bold", "new"], "image": ["red", "blue"]}
    >>> bags = [Bag(impression_id=f"i{i}", ts=i, ad_id="shoe", candidates=pool,
    ...             shown={"title": pool["title"][i % 3], "image": pool["image"][i % 2]},
    ...             clicked=i % 3 == 1 and i % 2 == 1) for i in range(2000)]
    >>> mlp = MLPBaseline(seed=0)
    >>> mlp.learn(bags)
    >>> mlp.select([SelectionRequest(request_id="r", ad_id="shoe", candidates=pool)])
    [{'title': 'bold', 'image': 'blue'}]
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
