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
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from learner.features import Batch, Featurizer
from learner.model import GenCO
from learner.ops import mix64
from learner.serving import PoolScores, ServingEncoded, ServingModel


def hashed_uniform(key: np.ndarray) -> np.ndarray:
    """Deterministic U(0,1) per int64 key."""
    return (((mix64(key.astype(np.int64)) >> 11) & ((1 << 53) - 1)).astype(np.float64) + 0.5) / float(1 << 53)


def sample_combinations(batch: Batch, element_logit: np.ndarray, k: int, temperature: float = 1.0) -> np.ndarray:
    """(k, G) positions: row 0 the greedy combination, rows 1.. draws from each pool's softmax.

    A draw inverts its pool's cumulative softmax at one uniform keyed by the request's seed, the
    sample and the pool's slot in the request: one uniform a pool rather than Gumbel noise on every
    element (a hash per pool, not per candidate), and a request draws the same alone or inside any batch.
    """
    grid = batch.pool_grid(element_logit)
    greedy = grid.argmax(1)
    if k <= 1:
        return greedy[None]
    scaled = grid / np.float32(temperature)
    shares = np.exp(scaled - scaled[np.arange(len(greedy)), greedy][:, None])
    cumulative = np.cumsum(shares.T, axis=0, dtype=np.float64)  # (pool width, G): a column per position
    cumulative /= cumulative[-1]  # padding adds nothing, so each pool ends at exactly 1, above any uniform
    pools = batch.pools
    key = (batch.requests.seed.take(pools.request) * 1_000_003 + pools.slot)[None] + np.arange(1, k)[:, None] * 65_537
    uniform = hashed_uniform(key)  # (k - 1, G)
    # the drawn position is how many cumulative shares lie at or below u: one comparison of every position
    # with every draw, not a pass per position (a single request paid ~15 numpy calls for it)
    drawn = (cumulative[:-1, None] <= uniform).sum(0, dtype=np.int16)
    return np.concatenate([greedy[None], drawn])


def pair_ascent(model: ServingModel, batch: Batch, enc: ServingEncoded, start: np.ndarray,
                sweeps: int = 2) -> list[np.ndarray]:
    """(G,) positions after each sweep: from ``start``, every pool takes the element that is best given
    the other pools' current picks, its score plus the pair prior with each of them (all pools at once)."""
    pools, elements, width = batch.pools, batch.elements, batch.combination_width
    # every (element, slot of another pool of its request): the same partners' slots in each sweep
    partners = np.bincount(pools.request, minlength=batch.size).take(elements.request) - 1
    element = np.repeat(np.arange(len(partners)), partners)
    nth = np.arange(len(element)) - np.repeat(np.cumsum(partners) - partners, partners)
    slot = nth + (nth >= pools.slot.take(elements.pool).take(element))  # skipping its own
    partner_cell = elements.request.take(element) * width + slot
    picks, results = start, []
    for _ in range(sweeps):
        dense = np.zeros(batch.size * width, dtype=np.int64)
        dense[pools.cell] = pools.start + picks
        shift = model.pair_shift(enc.pools, element, dense.take(partner_cell))
        shift = np.bincount(element, weights=shift, minlength=len(enc.element_logit)).astype(np.float32)
        picks = batch.pool_grid(enc.element_logit + shift).argmax(1)
        results.append(picks)
    return results


def hashed_normal(key: np.ndarray) -> np.ndarray:
    """Deterministic N(0, 1) per int64 key (Box-Muller on two hashed uniforms)."""
    radius = np.sqrt(-2.0 * np.log(hashed_uniform(key)))
    return radius * np.cos(2.0 * np.pi * hashed_uniform(key ^ 0x5DEECE66D))


def choose(model: ServingModel, batch: Batch, k: int = 16, temperature: float = 1.0,
           thompson: bool = False, pools: PoolScores | None = None) -> np.ndarray:
    """Chosen position inside each pool (G,): the combination the combination head scores highest.
    ``thompson``: the priors' element effects are drawn from their posteriors first (keyed by request and
    element, so a request draws the same alone or in any batch), and the best combination for the draw wins.
    ``pools``: the batch's ``ServingModel.score_pools``, where the caller keeps them. The ``pooled`` readout
    takes each pool's best element by its pooled effect: its combination score would be their sum, which the
    greedy combination maximises."""
    if model.readout == "pooled":
        return batch.pool_grid(model.pooled_logit(batch, pools)).argmax(1)
    noise = None
    if thompson and model.priors is not None:
        noise = hashed_normal(mix64(batch.elements.key ^ batch.requests.seed.take(batch.elements.request)))
    enc = model.encode(batch, noise, pools)
    candidates = sample_combinations(batch, enc.element_logit, k, temperature)
    if k <= 1:
        return candidates[0]
    if model.priors is not None and model.config.pair_prior:
        candidates = np.concatenate([candidates, np.stack(pair_ascent(model, batch, enc, candidates[0]))])
    combo_score = model.combination_logit(batch, enc, batch.pools.start + candidates)  # (k, B)
    best = combo_score.argmax(0)[batch.pools.request]
    return candidates[best, np.arange(candidates.shape[1])]


def answers(batch: Batch, picks: list[int]) -> list[dict[str, str]]:
    """Each request's shown combination, {component: element id}, from ``choose``'s positions."""
    return [{batch.component_names[g]: batch.candidate_ids[g][picks[g]] for g in pools}
            for pools in batch.request_pools()]


EVERY_PAIR_ELEMENTS = 128  # a cached request's table of every pair's shift holds L² of them (128 KB here)


class Selector:
    """Picks combinations for contract SelectionRequests with the model as it was when the Selector was made.

    Requests are scored in batches of ``batch_size``; with ``threads`` > 1 that many batches at once.
    numpy releases the GIL inside its loops, so on two cores two threads answer more requests than one
    (benchmarks/speed.py measures how many more). The agents keep one: their processes share the cores
    (genco/compute.py).

    A request that comes alone (the selector agent's whole fetch at low traffic, where latency shows) reuses
    what an earlier lone request of the same ad and candidates computed from its pools: their layouts and
    ``ServingModel.score_pools``, every pair's shift included where the request considers at most
    ``EVERY_PAIR_ELEMENTS`` elements. Only its context is computed anew, and the answer is the same to the
    bit (a test checks it). The cache holds up to ``cache_bytes`` of arrays, the ad asked for least recently
    leaving first: with Zipf traffic the head ads stay. Its size is counted in bytes, not ads, because a
    request may list up to 64 components of 15 candidates, whose pair table alone is 7 MB.

    ``readout``: which of the snapshot's policies it serves (``serving.READOUTS``; the snapshot names it).
    """

    def __init__(self, model: GenCO, k: int = 16, temperature: float = 1.0, threads: int = 1,
                 batch_size: int = 1024, thompson: bool = False, cache_bytes: int = 64 << 20,
                 readout: str = "genco") -> None:
        self.model = ServingModel(model, readout)
        self.k = k
        self.temperature = temperature
        self.thompson = thompson
        self.batch_size = batch_size
        self.featurizer = Featurizer(model.config.sizes, model.config.max_candidates)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="genco-select") if threads > 1 else None
        # (ad, candidates) -> a lone request's batch, its pool scores and their bytes
        self._pools: OrderedDict[tuple, tuple[Batch, PoolScores, int]] = OrderedDict()
        self._cache_bytes, self.cached_bytes = cache_bytes, 0
        self._pools_lock = threading.Lock()  # callers in several threads may each send a lone request

    def select(self, requests: list) -> list[dict[str, str]]:
        batches = [requests[i : i + self.batch_size] for i in range(0, len(requests), self.batch_size)]
        answers = self._pool.map(self._select_batch, batches) if self._pool else map(self._select_batch, batches)
        return [answer for batch in answers for answer in batch]

    def _select_batch(self, requests: list) -> list[dict[str, str]]:
        if len(requests) == 1:
            batch, pool_scores = self._lone(requests[0])
        else:
            batch, pool_scores = self.featurizer.batch(requests), None
        return answers(batch, choose(self.model, batch, self.k, self.temperature, self.thompson, pool_scores).tolist())

    @property
    def cached_pools(self) -> int:
        """How many ads' pools (with their candidates) lone requests can reuse now."""
        return len(self._pools)

    def _lone(self, request) -> tuple[Batch, PoolScores]:
        """A lone request's batch and pool scores, from the cache when its ad and candidates are there."""
        key = (request.ad_id, tuple((component, tuple(ids)) for component, ids in request.candidates.items()))
        with self._pools_lock:
            cached = self._pools.get(key)
            if cached is not None:
                self._pools.move_to_end(key)
        if cached is not None:
            template, pool_scores, _ = cached
            return self.featurizer.with_request(template, request), pool_scores
        batch = self.featurizer.batch([request])
        pool_scores = self._score_pools(batch)
        self._keep(key, batch, pool_scores)
        return batch, pool_scores

    def warm(self, previous: Selector, seconds: float = 0.1) -> int:
        """Score for this selector's model the pools ``previous`` kept for lone requests, the most recently
        asked for first, for up to ``seconds``; returns how many. The learner publishes a snapshot every few
        seconds, and each gets a new Selector: warmed before the swap (``stream.selector``), its cache
        starts with the ads being asked for, and that work stays off the request path. Layouts depend on
        the featurizer's sizes, so a previous selector with other sizes warms nothing."""
        if (previous.featurizer.sizes, previous.featurizer.max_candidates) != (
                self.featurizer.sizes, self.featurizer.max_candidates):
            return 0
        deadline = time.monotonic() + seconds
        with previous._pools_lock:
            recent_first = [(key, template) for key, (template, _, _) in reversed(previous._pools.items())]
        warmed = []
        for key, template in recent_first:
            if time.monotonic() > deadline:
                break
            warmed.append((key, template, self._score_pools(template)))
        for key, template, pool_scores in reversed(warmed):  # the most recent kept last, so it leaves last
            self._keep(key, template, pool_scores)
        return len(warmed)

    def _score_pools(self, batch: Batch) -> PoolScores:
        return self.model.score_pools(batch, every_pair=len(batch.elements.key) <= EVERY_PAIR_ELEMENTS)

    def _keep(self, key: tuple, batch: Batch, pool_scores: PoolScores) -> None:
        """Cache a lone request's batch and pool scores, the least recently asked for leaving to make room."""
        size = batch.nbytes + pool_scores.nbytes
        if size > self._cache_bytes:
            return
        with self._pools_lock:
            replaced = self._pools.pop(key, None)  # another thread's copy of the same
            self._pools[key] = batch, pool_scores, size
            self.cached_bytes += size - (replaced[2] if replaced else 0)
            while self.cached_bytes > self._cache_bytes:
                self.cached_bytes -= self._pools.popitem(last=False)[1][2]


def uniform_propensity(candidates: dict[str, list[str]]) -> float:
    """Probability that the uniform policy shows one given combination: Π 1/n_j."""
    return math.prod(1.0 / len(ids) for ids in candidates.values())


class ServingPolicy:
    """Answers SelectionRequests: the learned policy, an exploration slice, or the uniform fallback.

    ``explore`` of the requests get a uniform random combination with its exact propensity, so
    the log keeps the unbiased slice that Algorithm 1 and future training need. The learned answers serve the
    snapshot's ``readout`` and say ``genco`` (the contract's name for the learned policy, whichever readout).
    """

    def __init__(self, model: GenCO | None, version: int = 0, explore: float = 0.0, k: int = 16,
                 seed: int | None = None, threads: int = 1, readout: str = "genco") -> None:
        self.selector = Selector(model, k, threads=threads, readout=readout) if model is not None else None
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
