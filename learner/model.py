"""The GenCO network (paper §"Generative Element Modeling and Multi-Instance Reward Learning").

Read top to bottom, in the paper's order:

1. context encoder   h = Enc(user, age, gender, ad, query, segments, pool stats)   MLP [32,16,8] + BN
2. cross-component   z = Attn(emb(e); {emb(e)} ∪ candidates of the other components)   hidden 4
3. element features  f_e = (emb(e), emb(C_j), z)
4. element scores    p_e = φ(h, f_e)            φ: shared MLP [64,32,8] -> 1, plus <W h, emb(e)>
5. combination       f_c = Σ_j w_j(h, f) f_e_j  (MIL: context-dependent weights over shown elements)
                     s   = φ(h, f_c)

Beyond the paper (docs/model.md): both scores also get the count-based priors of learner/priors.py,
in log-odds: the ad's CTR, each element's excess over it in this ad, its shift for this request's
context, and for a combination, its pairs' synergy. The network learns what counting misses.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from learner.features import CONTEXT_KINDS, PAPER_COMPONENTS, Batch, HashSizes
from learner.ops import gather_rows, pair_key, take_rows, upper_pairs
from learner.priors import LoggedKeys, PriorKeys, Priors, PriorScores


@dataclass
class ModelConfig:
    dim: int = 8
    attention: bool = True  # cross-component attention; off = the paper's "w/o context"
    mil: bool = True  # combination head + L_comb; off = the paper's "w/o MIL"
    rl_weight: float = 0.15  # λ of L_RL; 0 = the paper's "w/o RL"
    taste: bool = True  # φ also scores <W h, emb(e)>: the request's taste against the element's embedding
    prior: bool = True  # count-based priors added to the scores (learner/priors.py)
    context_prior: bool = True  # with ``prior``: each element's shift for the request's age, gender, segments
    pair_prior: bool = True  # with ``prior``: combinations also score their pairs' synergy (off: preset "fast")
    prior_half_life: float | None = None  # impressions after which a count weighs half; None: never fades
    # The smallest spreads (sd, log-odds) the priors assume of elements around their component and of an element's
    # cells (its ads) around it, whatever the method of moments finds
    # (docs/decisions.md, "Spreads: a minimum under the moments")
    prior_min_spread: tuple[float, float] = (0.1, 0.1)
    encoder: tuple[int, ...] = (32, 16, 8)
    policy: tuple[int, ...] = (64, 32, 8)
    attention_hidden: int = 4
    max_candidates: int = 15
    sizes: HashSizes = field(default_factory=HashSizes)

    def to_dict(self) -> dict:
        """Plain JSON types, so a manifest written and read back compares equal."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["sizes"] = HashSizes(**data.get("sizes", {}))
        for key in ("encoder", "policy", "prior_min_spread"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def _mlp(sizes: list[int], batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))  # in place: one allocation and memory pass less a layer
    return nn.Sequential(*layers)


@dataclass
class Encoded:
    """Per-batch intermediate results shared by the element and combination scores."""

    h: torch.Tensor  # (B, 8) context embedding
    features: torch.Tensor  # (L, F) f_e
    element_network: torch.Tensor  # (L,) p_e as the network alone scores it
    element_prior: torch.Tensor | None  # (L,) the element's priors over its ad's CTR
    request_prior: torch.Tensor | None  # (B,) the ad's CTR in log-odds
    prior: PriorScores | None  # what the priors said (numpy), for pairs and Thompson sampling

    def element_logit(self, request: torch.Tensor, network_weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        """p_e with the priors: the network's score weighted by ``network_weight``; ``request``: each
        element's request (``Batch.elements.request``)."""
        if self.element_prior is None:
            return self.element_network
        return network_weight * self.element_network + self.element_prior + self.request_prior.index_select(0, request)


class GenCO(nn.Module):
    """Scores every candidate element (``encode``) and any combination of them (``combination_logit``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        sizes = c.sizes
        self.context_table = nn.Embedding(sizes.context_rows, c.dim, sparse=True)
        self.element_table = nn.Embedding(sizes.element_rows, c.dim, sparse=True)
        nn.init.normal_(self.context_table.weight, std=0.05)
        # An element never trained scores as its component does, with no noise of its own for the serving
        # blend to add to the priors' cold start (docs/decisions.md, "Element rows start at zero").
        nn.init.zeros_(self.element_table.weight)
        self.component_embedding = nn.Embedding(sizes.component, c.dim)
        context_in = (len(CONTEXT_KINDS) + 1) * c.dim + len(PAPER_COMPONENTS) + 1
        self.encoder = _mlp([context_in, *c.encoder], batch_norm=True)
        hidden = c.attention_hidden
        self.query = nn.Linear(c.dim, hidden, bias=False)
        self.key = nn.Linear(c.dim, hidden, bias=False)
        self.value = nn.Linear(c.dim, hidden, bias=False)
        feature_dim = 2 * c.dim + hidden
        h_dim = c.encoder[-1]
        self.phi = _mlp([h_dim + feature_dim, *c.policy, 1])
        if c.taste:  # starts at zero: it adds what the data shows, not an initialisation's noise
            self.taste = nn.Linear(h_dim, c.dim, bias=False)
            nn.init.zeros_(self.taste.weight)
        self.mil_weight = _mlp([h_dim + feature_dim, 8, 1])
        self.priors: Priors | None = None
        if c.prior:  # counted, not learned: empirical Bayes sets how far each is trusted
            self.priors = Priors(context=c.context_prior, pairs=c.pair_prior, half_life=c.prior_half_life,
                                 min_spread=c.prior_min_spread, cross_cells=sizes.cross, pair_cells=sizes.pair)
            # How much of the network's scores serving adds to the priors', (element, combination): learned
            # from each batch before the network learns from it, so a network that scores noise where
            # counting already knows better gets no say (docs/decisions.md, "Serving blend").
            self.network_weight = nn.Parameter(torch.zeros(2))

    # -- 1..4: context, attention, element scores ---------------------------------------------
    def encode(self, batch: Batch) -> Encoded:
        c, t = self.config, batch.tensors
        n, d = batch.size, c.dim
        requests, elements, distinct = t.requests, t.elements, t.distinct
        context_rows = gather_rows(self.context_table.weight, distinct.context_rows, distinct.context_inverse)
        ctx, seg_rows = context_rows.split([n * len(CONTEXT_KINDS), len(context_rows) - n * len(CONTEXT_KINDS)])
        ctx = ctx.view(n, -1)
        seg = ctx.new_zeros(n, d).index_add(0, t.segments.request, seg_rows)
        seg = seg / requests.segment_count.clamp(min=1)[:, None]
        h = self.encoder(torch.cat([ctx, seg, requests.pool_stats], 1))

        emb = gather_rows(self.element_table.weight, distinct.element_rows, distinct.element_inverse)
        comp = self.component_embedding.weight.index_select(0, elements.component)
        if c.attention:
            z = self._cross_component_attention(batch, emb)
        else:
            z = emb.new_zeros(emb.shape[0], c.attention_hidden)
        features = torch.cat([emb, comp, z], 1)
        request_h = h.index_select(0, elements.request)
        network = self.phi(torch.cat([request_h, features], 1)).squeeze(1)
        if c.taste:
            network = network + (self.taste(request_h) * emb).sum(1)
        if self.priors is None:
            return Encoded(h, features, network, None, None, None)
        prior = self.priors.scores(PriorKeys.of(batch))
        element_prior = prior.element if prior.context is None else prior.element + prior.context
        # The ad's CTR sets each request's level, so scores are calibrated from the first batch instead of
        # waiting for φ's output bias to crawl from 0 to the log-odds of a typical CTR.
        return Encoded(h, features, network, torch.from_numpy(element_prior).float(),
                       torch.from_numpy(prior.request).float(), prior)

    def observe(self, batch: Batch, enc: Encoded) -> None:
        """Count the batch into the priors; after the step, so a label never sees itself."""
        if self.priors is not None:
            self.priors.observe(PriorKeys.of(batch), batch.requests.clicked.astype(np.float64),
                                LoggedKeys.of(batch, enc.prior.element))

    def pair_prior(self, batch: Batch, enc: Encoded, dense: np.ndarray) -> np.ndarray:
        """(K, B) each combination's pairs' synergy summed, in log-odds. dense: (K, B, M) elements (into L),
        -1 where the request has no pool; every combination fills the same pools, so the pairs are found once."""
        k, n, width = dense.shape
        i, j = upper_pairs(width)
        present = dense[0] >= 0
        request, pair = np.nonzero(present[:, i] & present[:, j])
        first, second = dense[:, request, i[pair]].ravel(), dense[:, request, j[pair]].ravel()
        keys, effect = batch.elements.key, enc.prior.element
        shift = self.priors.pair_shift(pair_key(keys[first], keys[second]), effect[first] + effect[second])
        cell = (np.arange(k)[:, None] * n + request).ravel()
        return np.bincount(cell, weights=shift, minlength=k * n).reshape(k, n)

    def logged_pair_prior(self, batch: Batch, enc: Encoded) -> np.ndarray:
        """(B,) ``pair_prior`` of the logged combinations, from their pairs as the featurizer laid them out."""
        logged, effect = batch.logged, enc.prior.element
        first, second = logged.pair_first, logged.pair_second
        shift = self.priors.pair_shift(logged.pair_key, effect[first] + effect[second])
        return np.bincount(batch.elements.request[first], weights=shift, minlength=batch.size)

    def weights(self) -> dict[str, torch.Tensor]:
        """Everything a snapshot holds: the network's state and the priors' tables."""
        weights = dict(self.state_dict())
        if self.priors is not None:
            weights |= {f"priors.{name}": torch.from_numpy(array) for name, array in self.priors.state().items()}
        return weights

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        network = {name: value for name, value in weights.items() if not name.startswith("priors.")}
        self.load_state_dict(network)
        if self.priors is not None:
            self.priors.load({name.removeprefix("priors."): value.numpy() for name, value in weights.items()
                              if name.startswith("priors.")})

    def _cross_component_attention(self, batch: Batch, emb: torch.Tensor) -> torch.Tensor:
        """Each element attends to itself and every candidate of the *other* components of its request,
        in the featurizer's blocks of similarly sized requests (``features.Attention``); requests with the
        same pools as an earlier one read its outputs. The mask is an additive bias, so it rides in the score
        matmul (baddbmm) instead of a pass of its own."""
        hidden, attention = self.config.attention_hidden, batch.tensors.attention
        qkv = emb.index_select(0, attention.attended) @ torch.cat([self.query.weight * hidden**-0.5, self.key.weight,
                                                                   self.value.weight]).T
        sizes = [block.rows * block.width for block in attention.blocks]
        padded = qkv.new_zeros(sum(sizes), 3 * hidden).index_copy(0, attention.attended_cell, qkv)
        outputs = []
        # split, not sliced: the backward joins the blocks' gradients in one pass instead of a zeroed copy each
        for block, part in zip(attention.blocks, padded.split(sizes), strict=True):
            rows, width = block.rows, block.width
            q, k, v = part.view(rows, width, 3 * hidden).split(hidden, 2)
            bias = attention.bias[block.mask_start : block.mask_start + rows * width * width]
            scores = torch.baddbmm(bias.view(rows, width, width), q, k.transpose(1, 2))
            outputs.append(torch.bmm(torch.softmax(scores, 2), v).view(rows * width, hidden))
        return torch.cat(outputs).index_select(0, attention.element_cell)

    # -- 5: combination scores ------------------------------------------------------------------
    def element_logit(self, batch: Batch, enc: Encoded) -> torch.Tensor:
        """p_e as serving scores it: the priors and the network, blended."""
        weight = 1.0 if self.priors is None else self.network_weight[0]
        return enc.element_logit(batch.tensors.elements.request, weight)

    def combination_parts(self, batch: Batch, enc: Encoded, picks: torch.Tensor,
                          pair_prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """s for K combinations per request, as (the network's part, the priors' part or None). picks: (K, G)
        element index per pool, -1 where absent; ``pair_prior``: their (K, B) ``pair_prior``, where the
        caller has it already."""
        c = self.config
        k, n, width = picks.shape[0], batch.size, batch.combination_width
        dense = picks.new_full((k, n * width), -1).index_copy(1, batch.tensors.pools.cell, picks).view(k, n, width)
        present = dense >= 0
        index = dense.clamp(min=0)
        if c.mil:
            f = take_rows(enc.features, index)  # (K, B, M, F)
            h = enc.h.expand(k, n, -1)
            weight_logit = self.mil_weight(torch.cat([h.unsqueeze(2).expand(-1, -1, width, -1), f], 3)).squeeze(3)
            weight = torch.softmax(weight_logit.masked_fill(~present, float("-inf")), 2)
            combined = (weight.unsqueeze(3) * f).sum(2)
            network = self.phi(torch.cat([h, combined], 2)).squeeze(2)
            if c.taste:
                network = network + (self.taste(h) * combined[..., : c.dim]).sum(2)
        else:  # without MIL a combination scores as the sum of its element scores
            network = (take_rows(enc.element_network, index) * present).sum(2)
        if self.priors is None:
            return network, None
        prior = (take_rows(enc.element_prior, index) * present).sum(2) + enc.request_prior
        if c.pair_prior:
            if pair_prior is None:
                pair_prior = torch.from_numpy(self.pair_prior(batch, enc, dense.numpy())).float()
            prior = prior + pair_prior
        return network, prior

    def combination_logit(self, batch: Batch, enc: Encoded, picks: torch.Tensor) -> torch.Tensor:
        """s for K combinations per request as serving scores them: the priors and the network, blended."""
        network, prior = self.combination_parts(batch, enc, picks)
        return network if prior is None else self.network_weight[1] * network + prior
