"""Serving: choose one combination per request (paper eq. 24-25).

GenCO samples K combinations from the per-component softmaxes and keeps the
one the combination head scores highest. We always put the greedy
combination (each component's top element) among the K, so sampling can only
add options, never lose the best single-element choices. With the pair prior
two more candidates join them: the greedy combination improved, every pool at once
taking its best element given the others' picks and pair scores, twice
(``pair_ascent``), since K independent samples rarely
hit the elements that go together.

Sampling noise is a hash of (request seed, sample, slot), not a generator
draw: a request gets the same answer alone or inside any batch, which makes
``genco select`` and ``genco evaluate`` agree exactly.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np

from learner.features import GOLDEN, Batch, Featurizer
from learner.model import GenCO
from learner.serving import Encoded, ServingModel

_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def hashed_uniform(key: np.ndarray) -> np.ndarray:
    """Deterministic U(0,1) per int64 key (splitmix64 finaliser; int64 products wrap, as intended)."""
    x = key.astype(np.int64) * GOLDEN
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX2
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return (((x >> 11) & ((1 << 53) - 1)).astype(np.float64) + 0.5) / float(1 << 53)


def sample_combinations(batch: Batch, element_logit: np.ndarray, k: int, temperature: float = 1.0) -> np.ndarray:
    """(k, G) positions: row 0 the greedy combination, rows 1.. Gumbel-max samples of each pool's softmax.

    Noise is drawn for real elements only (not the padded pool grid) and keyed by the request's
    seed, the sample and the element's position in the request.
    """
    grid = batch.pool_grid(element_logit)
    greedy = grid.argmax(1)[None]
    if k <= 1:
        return greedy
    element_group = batch.arrays["element_group"]
    request = batch.arrays["group_request"][element_group]
    element_key = batch.arrays["seed"][request] * 1_000_003 + batch.arrays["element_slot"]
    key = element_key[None] + np.arange(1, k)[:, None] * 65_537
    noisy = element_logit / np.float32(temperature) - np.log(-np.log(hashed_uniform(key))).astype(np.float32)
    dense = np.full((k - 1, *grid.shape), -np.inf, dtype=np.float32)
    dense[:, element_group, batch.arrays["element_pos"]] = noisy
    return np.concatenate([greedy, dense.argmax(2)])


def pair_ascent(model: ServingModel, batch: Batch, enc: Encoded, start: np.ndarray,
                sweeps: int = 2) -> list[np.ndarray]:
    """(G,) positions after each sweep: from ``start``, every pool takes the element that is best given
    the other pools' current picks, its score plus the pair prior with each of them (all pools at once)."""
    a = batch.arrays
    sizes, width = a["group_size"], batch.combination_width
    group_start = np.cumsum(sizes) - sizes
    present = np.zeros(batch.size * width, dtype=bool)
    present[a["group_cell"]] = True
    # every (element, slot of another pool of its request): the same partners' slots in each sweep
    element, slot = np.nonzero(present.reshape(batch.size, width).take(a["element_request"], axis=0))
    other = slot != a["group_slot"].take(a["element_group"].take(element))
    element, partner_cell = element[other], a["element_request"].take(element[other]) * width + slot[other]
    picks, results = start, []
    for _ in range(sweeps):
        dense = np.zeros(batch.size * width, dtype=np.int64)
        dense[a["group_cell"]] = group_start + picks
        shift = model.pair_shift(batch, enc, element, dense.take(partner_cell))
        shift = np.bincount(element, weights=shift, minlength=len(enc.element_logit)).astype(np.float32)
        picks = batch.pool_grid(enc.element_logit + shift).argmax(1)
        results.append(picks)
    return results


def choose(model: ServingModel, batch: Batch, k: int = 16, temperature: float = 1.0) -> np.ndarray:
    """Chosen position inside each pool (G,): the combination the combination head scores highest."""
    enc = model.encode(batch)
    candidates = sample_combinations(batch, enc.element_logit, k, temperature)
    if k <= 1:
        return candidates[0]
    if model.config.prior and model.config.pair_prior:
        candidates = np.concatenate([candidates, np.stack(pair_ascent(model, batch, enc, candidates[0]))])
    sizes = batch.arrays["group_size"]
    combo_score = model.combination_logit(batch, enc, np.cumsum(sizes) - sizes + candidates)  # (k, B)
    best = combo_score.argmax(0)[batch.arrays["group_request"]]
    return candidates[best, np.arange(candidates.shape[1])]


class Selector:
    """Picks combinations for contract SelectionRequests with the model as it was when the Selector was made."""

    def __init__(self, model: GenCO, k: int = 16, temperature: float = 1.0) -> None:
        self.model = ServingModel(model)
        self.k = k
        self.temperature = temperature
        self.featurizer = Featurizer(model.config.sizes, model.config.max_candidates)

    def select(self, requests: list) -> list[dict[str, str]]:
        if not requests:
            return []
        batch = self.featurizer.batch(requests)
        picks = choose(self.model, batch, self.k, self.temperature).tolist()
        return [
            {batch.group_names[g]: batch.candidate_ids[g][picks[g]] for g in groups}
            for groups in batch.request_groups()
        ]


def uniform_propensity(candidates: dict[str, list[str]]) -> float:
    """Probability that the uniform policy shows one given combination: Π 1/n_j."""
    return math.prod(1.0 / len(ids) for ids in candidates.values())


class ServingPolicy:
    """Answers SelectionRequests: the learned policy, an exploration slice, or the uniform fallback.

    ``explore`` of the requests get a uniform random combination with its exact propensity, so
    the log keeps the unbiased slice that Algorithm 1 and future training need.
    """

    def __init__(self, model: GenCO | None, version: int = 0, explore: float = 0.0, k: int = 16,
                 seed: int | None = None) -> None:
        self.selector = Selector(model, k) if model is not None else None
        self.version = version if model is not None else 0
        self.explore = explore
        self.rng = random.Random(seed)

    def respond(self, requests: list) -> list[dict]:
        now = time.time()
        learned = [r for r in requests if self.selector and not (self.explore and self.rng.random() < self.explore)]
        picks = dict(zip(map(id, learned), self.selector.select(learned), strict=True)) if learned else {}
        responses = []
        for request in requests:
            shown = picks.get(id(request))
            if shown is not None:
                policy, propensity = "genco", None
            else:
                policy = "explore" if self.selector else "fallback"
                shown = {c: self.rng.choice(ids) for c, ids in request.candidates.items()}
                propensity = uniform_propensity(request.candidates)
            responses.append({"request_id": request.request_id, "ad_id": request.ad_id, "shown": shown,
                              "policy": policy, "propensity": propensity, "model_version": self.version,
                              "ts": now})
        return responses
