"""GenCO's scores for serving, in numpy: ``GenCO.encode`` and ``combination_logit`` in eval mode.

Why a copy: one request through the torch model is hundreds of tiny tensor ops, each paying torch's
dispatch, which costs far more than the arithmetic; numpy's overhead an op is a fraction of it.
Training stays in torch; ``ServingModel(model)`` freezes a trained model's weights and priors
(BatchNorm folded into the layer before it), and a test checks that both score every element and
combination alike. Rows are gathered with ``take(index, axis=0)``, not ``array[index]``: numpy's
fancy indexing copies row by row, and on these shapes (tens of thousands of rows of a few to a few
dozen floats) ``take`` is much faster.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from learner.features import Batch
from learner.model import GenCO, ModelConfig
from learner.ops import mix64, upper_pairs
from learner.priors import PriorKeys, PriorScores

Layer = tuple[np.ndarray, np.ndarray, bool]  # (weight (in, out), bias, ReLU after)


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().numpy().copy()


def _freeze_mlp(sequential: nn.Sequential) -> list[Layer]:
    layers: list[Layer] = []
    for module in sequential:
        if isinstance(module, nn.Linear):
            layers.append((_array(module.weight.T), _array(module.bias), False))
        elif isinstance(module, nn.BatchNorm1d):
            weight, bias, _ = layers[-1]
            scale = _array(module.weight) / np.sqrt(_array(module.running_var) + module.eps)
            layers[-1] = (weight * scale, (bias - _array(module.running_mean)) * scale + _array(module.bias), False)
        elif isinstance(module, nn.ReLU):
            layers[-1] = (*layers[-1][:2], True)
    return layers


@dataclass
class SplitMLP:
    """An MLP over cat[h, f], its first layer split so h's share is computed once per request
    rather than once per element or combination (the same sum, far fewer multiplications)."""

    h_weight: np.ndarray
    f_weight: np.ndarray
    bias: np.ndarray
    rest: list[Layer]

    @classmethod
    def freeze(cls, sequential: nn.Sequential, h_dim: int) -> SplitMLP:
        (weight, bias, relu), *rest = _freeze_mlp(sequential)
        assert relu, "the first layer of φ and of the MIL weights is followed by a ReLU"
        return cls(weight[:h_dim], weight[h_dim:], bias, rest)

    def h_share(self, h: np.ndarray) -> np.ndarray:
        """h's share of the first layer, the layer's bias included: added once per request, not per row."""
        share = h @ self.h_weight
        share += self.bias
        return share

    def __call__(self, f_part: np.ndarray, h_share: np.ndarray) -> np.ndarray:
        """The output for first-layer shares already computed: ``f @ f_weight`` (``PoolScores`` keeps it, so it
        is not overwritten) and ``h_share``, broadcast or gathered to its rows."""
        hidden = f_part + h_share
        return _mlp(self.rest, np.maximum(hidden, 0, out=hidden))


def _mlp(layers: list[Layer], x: np.ndarray) -> np.ndarray:
    """The layers on the last axis; flattened to 2-D first, since numpy runs a stacked matmul as one
    small BLAS call per matrix."""
    shape = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    for weight, bias, relu in layers:
        x = x @ weight
        x += bias
        if relu:
            np.maximum(x, 0, out=x)
    return x.reshape(*shape, x.shape[-1])


def _softmax_masked(scores: np.ndarray, allowed: np.ndarray, axis: int) -> np.ndarray:
    scores = np.where(allowed, scores, -np.inf)
    scores = np.exp(scores - scores.max(axis, keepdims=True))
    return scores / scores.sum(axis, keepdims=True)


@dataclass
class PoolScores:
    """``encode``'s share that depends on the requests' pools alone (their ads and candidates), not on who
    asks: a Selector keeps it per ad for requests that come one at a time (``policy.Selector``)."""

    emb: np.ndarray  # (L, dim) the elements' embeddings
    features: np.ndarray  # (L, F) f_e
    phi_f: np.ndarray  # (L, φ's first layer) f_e's share of φ's first layer
    mil_f: np.ndarray | None  # (L, 8) f_e's share of the MIL weights' first layer (with MIL)
    prior: PriorScores | None  # the priors without context
    mixed_key: np.ndarray | None  # each element's key mixed once, for its pairs' keys (with the pair prior)
    pair_shifts: np.ndarray | None = None  # (L, L) every two elements' pair shift, where computed up front

    @property
    def nbytes(self) -> int:
        """Bytes of its arrays and of its priors' (read from the fields, so a field added is counted too)."""
        parts = [*vars(self).values(), *(vars(self.prior).values() if self.prior is not None else ())]
        return sum(part.nbytes for part in parts if isinstance(part, np.ndarray))


@dataclass
class ServingEncoded:
    """Per-batch results shared by the element and combination scores (numpy twin of ``model.Encoded``)."""

    h: np.ndarray
    phi_h: np.ndarray  # h's share of φ's first layer, its bias included
    taste: np.ndarray | None  # W h: the request's taste, which φ scores each element's embedding against
    pools: PoolScores
    element_network: np.ndarray  # p_e as the network alone scores it
    element_logit: np.ndarray  # p_e as serving scores it
    element_prior: np.ndarray | None
    request_prior: np.ndarray | None
    prior: PriorScores | None = None


READOUTS = ("genco", "priors", "pooled")
"""The policies one snapshot can serve (docs/decisions.md, "Champion and challenger: readouts of one snapshot"):
``genco`` the full model; ``priors`` the count priors alone, the network's blend weights at zero (the hierarchical
click counter, pairs and context included); ``pooled`` each element's effect pooled over every ad, greedy per
component, with no ad, context, pairs or network (the per-element click counter)."""


def readouts(config: ModelConfig) -> tuple[str, ...]:
    """The readouts a model of ``config`` can serve: a model without priors (preset ``paper``) has only genco."""
    return READOUTS if config.prior else READOUTS[:1]


class ServingModel:
    """A trained GenCO's weights, frozen, scoring batches in numpy; nothing here changes after creation.

    ``readout``: which of ``READOUTS`` it serves (``with_readout`` gives another from the same arrays).
    ``frozen``: copy the embedding and count tables, which the learner keeps training and counting into; a
    caller done with it before the model learns again (``learner.referee``) reads them in place and saves the
    copies."""

    def __init__(self, model: GenCO, readout: str = "genco", frozen: bool = True) -> None:
        c = self.config = model.config
        table = _array if frozen else (lambda weight: weight.detach().numpy())  # not frozen: views, no copies
        self.context_table = table(model.context_table.weight)
        self.element_table = table(model.element_table.weight)
        self.component_table = _array(model.component_embedding.weight)
        self.encoder = _freeze_mlp(model.encoder)
        self.phi = SplitMLP.freeze(model.phi, c.encoder[-1])
        self.taste = _array(model.taste.weight.T) if c.taste else None
        self.mil_weight = SplitMLP.freeze(model.mil_weight, c.encoder[-1])
        self.qkv = np.concatenate([_array(m.weight).T for m in (model.query, model.key, model.value)], 1)
        self.qkv[:, : c.attention_hidden] *= c.attention_hidden**-0.5  # the score scale, folded into the query
        self.priors = copy.deepcopy(model.priors) if frozen else model.priors
        self.network_weight = (1.0, 1.0)
        if self.priors is not None:
            self.network_weight = tuple(float(w) for w in model.network_weight.detach())
        self.learned_weight = self.network_weight  # what the full model blends in, whatever the readout
        self._read(readout)

    def with_readout(self, readout: str) -> ServingModel:
        """The same model serving another readout: a shallow copy sharing every array."""
        other = copy.copy(self)
        other._read(readout)
        return other

    def _read(self, readout: str) -> None:
        if readout not in readouts(self.config):
            raise ValueError(f"readout {readout!r} is not one of {', '.join(readouts(self.config))}")
        self.readout = readout
        if self.priors is not None:
            self.network_weight = self.learned_weight if readout == "genco" else (0.0, 0.0)

    def pooled_logit(self, batch: Batch, pools: PoolScores | None = None) -> np.ndarray:
        """(L,) each element's effect pooled over every ad (``PriorScores.pooled``): the ``pooled`` readout's
        scores, from ``pools`` where the caller has them, else from the count tables alone."""
        prior = pools.prior if pools is not None else self.priors.pool_scores(PriorKeys.of(batch))
        return prior.pooled

    def score_pools(self, batch: Batch, every_pair: bool = False) -> PoolScores:
        """What ``encode`` computes from the batch's pools alone. ``every_pair``: also every two elements'
        pair shift (with the pair prior), which a one-request batch's pair ascent and combinations then read
        instead of looking pairs up each time."""
        c, elements = self.config, batch.elements
        emb = self.element_table.take(elements.row, axis=0)
        comp = self.component_table.take(elements.component, axis=0)
        if c.attention:
            z = self._cross_component_attention(batch, emb)
        else:
            z = np.zeros((len(emb), c.attention_hidden), dtype=np.float32)
        features = np.concatenate([emb, comp, z], 1)
        mil_f = features @ self.mil_weight.f_weight if c.mil else None
        prior = mixed_key = None
        if self.priors is not None:
            prior = self.priors.pool_scores(PriorKeys.of(batch))
            mixed_key = mix64(elements.key) if c.pair_prior else None
        pools = PoolScores(emb, features, features @ self.phi.f_weight, mil_f, prior, mixed_key)
        if every_pair and mixed_key is not None:
            first, second = np.divmod(np.arange(len(mixed_key) ** 2), len(mixed_key))
            pools.pair_shifts = self._looked_up_pair_shift(pools, first, second).reshape(len(mixed_key), -1)
        return pools

    def encode(self, batch: Batch, noise: np.ndarray | None = None, pools: PoolScores | None = None,
               ) -> ServingEncoded:
        """``noise``: (L,) standard normal draws, one per element, to sample the priors' element effects from
        their posteriors (Thompson sampling); none: their means. ``pools``: the batch's ``score_pools``,
        where the caller has them already."""
        c, requests, elements = self.config, batch.requests, batch.elements
        pools = pools or self.score_pools(batch)
        n, d = batch.size, c.dim
        segments = batch.segments.row
        seg = np.zeros((n, d), dtype=np.float32)
        if len(segments):  # the mean of each request's segments; requests without any keep zeros
            count = requests.segment_count
            has = np.flatnonzero(count)
            seg[has] = np.add.reduceat(self.context_table.take(segments, axis=0), requests.segment_offsets[has])
            seg[has] /= count[has, None]
        ctx = self.context_table.take(requests.context.ravel(), axis=0).reshape(n, -1)
        h = _mlp(self.encoder, np.concatenate([ctx, seg, requests.pool_stats], 1))

        element_request = elements.request
        phi_h = self.phi.h_share(h)
        network = self.phi(pools.phi_f, phi_h.take(element_request, axis=0))[:, 0]
        taste = None
        if self.taste is not None:
            taste = h @ self.taste
            network += (taste.take(element_request, axis=0) * pools.emb).sum(1)
        if self.priors is None:
            return ServingEncoded(h, phi_h, taste, pools, network, network, None, None)
        prior = replace(pools.prior, context=self.priors.context_scores(PriorKeys.of(batch), pools.prior.pooled))
        element_prior = prior.element if prior.context is None else prior.element + prior.context
        if noise is not None:
            element_prior = element_prior + np.sqrt(prior.variance) * noise
        request_prior = prior.request.astype(np.float32)
        element_logit = self.network_weight[0] * network + element_prior + request_prior.take(element_request)
        return ServingEncoded(h, phi_h, taste, pools, network, element_logit.astype(np.float32),
                              element_prior.astype(np.float32), request_prior, prior)

    def _cross_component_attention(self, batch: Batch, emb: np.ndarray) -> np.ndarray:
        """Each element attends to itself and every candidate of the other components of its request,
        in the featurizer's blocks of similarly sized requests (``features.Attention``), once per distinct
        set of pools. Scores are laid out (keys, queries), so the softmax reduces along the axis numpy
        reduces fastest."""
        hidden, attention = self.config.attention_hidden, batch.attention
        last = attention.blocks[-1]
        padded = np.zeros((last.start + last.rows * last.width, 3 * hidden), dtype=np.float32)
        padded[attention.attended_cell] = emb.take(attention.attended, axis=0) @ self.qkv
        bias = attention.bias
        outputs = []
        for block in attention.blocks:
            rows, width = block.rows, block.width
            x = padded[block.start : block.start + rows * width].reshape(rows, width, 3 * hidden)
            scores = x[..., hidden : 2 * hidden] @ x[..., :hidden].transpose(0, 2, 1)
            scores += bias[block.mask_start : block.mask_start + rows * width * width].reshape(
                rows, width, width).transpose(0, 2, 1)
            scores -= scores.max(1, keepdims=True)
            weights = np.exp(scores, out=scores)
            weights /= weights.sum(1, keepdims=True)
            outputs.append((weights.transpose(0, 2, 1) @ x[..., 2 * hidden :]).reshape(rows * width, hidden))
        return np.concatenate(outputs).take(attention.element_cell, axis=0)

    def combination_logit(self, batch: Batch, enc: ServingEncoded, picks: np.ndarray) -> np.ndarray:
        """s for K combinations per request. picks: (K, G) element index per pool.

        Laid out (slot, request, K): sums over a combination's elements run along the first axis, which
        numpy reduces far faster than a short last one, and each (slot, request) holds its K picks in a row.
        """
        dense, present, index = self._slots(batch, picks)
        if self.config.mil:
            weight = self._mil_weight(batch, enc, index, present)
            combined = np.einsum("mbk,mbkf->bkf", weight, enc.pools.features.take(index, axis=0))
            network = self.phi(combined @ self.phi.f_weight, enc.phi_h[:, None])[..., 0]
            if enc.taste is not None:
                network += np.einsum("bkd,bd->bk", combined[..., : self.config.dim], enc.taste)
        else:  # the sum of the network's element scores
            network = (enc.element_network.take(index) * present).sum(0)
        if self.priors is None:
            return network.T
        logit = self.network_weight[1] * network + (enc.element_prior.take(index) * present).sum(0)
        if self.config.pair_prior:
            logit += self._pair_sum(enc.pools, dense)
        logit += enc.request_prior[:, None]
        return logit.T

    def mil_weights(self, batch: Batch, enc: ServingEncoded, picks: np.ndarray) -> np.ndarray:
        """(K, G) the MIL weight w_j(h, f) of each pool's element in K combinations per request (picks: (K, G)
        element index per pool): the share of the combination's features that its element brings, which the
        paper reads as component importance (its Figure 3). Beside ``combination_logit``, not inside it, so
        selection computes nothing it does not use."""
        if not self.config.mil:
            raise ValueError("the model has no MIL head (ModelConfig.mil is off)")
        _, present, index = self._slots(batch, picks)
        weight = self._mil_weight(batch, enc, index, present)  # (width, B, K)
        return weight[batch.pools.slot, batch.pools.request].T

    @staticmethod
    def _slots(batch: Batch, picks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """K combinations' elements laid out (slot, request, K), -1 where a request has no pool; whether each is
        present; and the elements with 0 for the absent ones, safe to index with."""
        dense = np.full((batch.combination_width, batch.size, picks.shape[0]), -1, dtype=np.int64)
        dense[batch.pools.slot, batch.pools.request] = picks.T
        present = dense >= 0
        return dense, present, np.maximum(dense, 0)

    def _mil_weight(self, batch: Batch, enc: ServingEncoded, index: np.ndarray, present: np.ndarray) -> np.ndarray:
        """(slot, request, K) softmax of the MIL weight logits over each combination's present elements."""
        # an element's MIL weight logit depends on its request, not on the combination: once per element
        mil_h = self.mil_weight.h_share(enc.h).take(batch.elements.request, axis=0)
        mil_logit = self.mil_weight(enc.pools.mil_f, mil_h)[:, 0]
        return _softmax_masked(mil_logit.take(index), present, 0)

    def _pair_sum(self, pools: PoolScores, dense: np.ndarray) -> np.ndarray:
        """(B, K) each combination's pair shifts summed. dense: (width, B, K) elements, -1 where the request
        has no pool; every combination fills the same slots, so the real pairs are found once for all K."""
        width, n, k = dense.shape
        i, j = upper_pairs(width)
        present = dense[:, :, 0] >= 0
        pair, request = np.nonzero(present[i] & present[j])
        rows = dense.reshape(width * n, k)
        shift = self.pair_shift(pools, rows.take(i[pair] * n + request, axis=0).ravel(),
                                rows.take(j[pair] * n + request, axis=0).ravel())
        cell = (request[:, None] * k + np.arange(k)).ravel()
        return np.bincount(cell, weights=shift, minlength=n * k).reshape(n, k).astype(np.float32)

    def pair_shift(self, pools: PoolScores, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """``Priors.pair_shift`` of pairs of a batch's elements (indices into them, both real), from its ``pools``:
        read from their table of every pair's shift where they have one, else looked up."""
        if pools.pair_shifts is not None:
            return pools.pair_shifts[first, second]
        return self._looked_up_pair_shift(pools, first, second)

    def _looked_up_pair_shift(self, pools: PoolScores, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        effect = pools.prior.element
        return self.priors.pair_shift(pools.mixed_key.take(first) + pools.mixed_key.take(second),
                                      effect.take(first) + effect.take(second))
