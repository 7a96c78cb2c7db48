"""The GenCO network (paper §"Generative Element Modeling and Multi-Instance Reward Learning").

Read top to bottom:

1. context encoder   h = Enc(user, age, gender, ad, query, segments, pool stats)   MLP [32,16,8] + BN
2. cross-component   z = Attn(emb(e); {emb(e)} ∪ candidates of the other components)   hidden 4
3. element features  f_e = (emb(e), emb(C_j), z)
4. element scores    p_e = φ(h, f_e)            φ: shared MLP [64,32,8] -> 1
5. combination       f_c = Σ_j w_j(h, f) f_e_j  (MIL: context-dependent weights over shown elements)
                     s   = φ(h, f_c)

Beyond the paper (``prior``; measured in the README): every score also gets a
count-based prior, the smoothed log-odds of the element's clicks *in excess of its
ad's own CTR*. One-pass SGD on hashed embeddings learns element quality far more
slowly than counting does, and measuring an element against the product it was
shown with keeps product appeal out of its credit (the paper's third challenge).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from learner.features import CONTEXT_KINDS, PAPER_COMPONENTS, Batch, HashSizes


@dataclass
class ModelConfig:
    dim: int = 8
    attention: bool = True  # cross-component attention; off = the paper's "w/o context"
    mil: bool = True  # combination head + L_comb; off = the paper's "w/o MIL"
    rl_weight: float = 0.15  # λ of L_RL; 0 = the paper's "w/o RL"
    prior: bool = True  # count-based element and ad priors added to the scores
    prior_strength: float = 20.0  # pseudo-impressions at the running mean CTR
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
        for key in ("encoder", "policy"):
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
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class Encoded:
    """Per-batch intermediate results shared by the element and combination scores."""

    h: torch.Tensor  # (B, 8) context embedding
    features: torch.Tensor  # (L, F) f_e
    element_logit: torch.Tensor  # (L,) p_e, prior included
    element_prior: torch.Tensor | None  # (L,) the element's prior relative to the mean, reused by s
    request_prior: torch.Tensor | None  # (B,) mean CTR's log-odds plus the ad's prior


class GenCO(nn.Module):
    """Scores every candidate element (``encode``) and any combination of them (``combination_logit``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        sizes = c.sizes
        self.context_table = nn.Embedding(sizes.context_rows, c.dim, sparse=True)
        self.element_table = nn.Embedding(sizes.element_rows, c.dim, sparse=True)
        for table in (self.context_table, self.element_table):
            nn.init.normal_(table.weight, std=0.05)
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
        self.mil_weight = _mlp([h_dim + feature_dim, 8, 1])
        if c.prior:  # counted, not learned, and saved with the weights
            self.register_buffer("element_counts", torch.zeros(sizes.element_rows, 2))  # (n, Σ y − ad CTR)
            self.register_buffer("ad_counts", torch.zeros(sizes.context_rows, 2))  # (n, Σ y)
            self.register_buffer("total_counts", torch.zeros(2))
            self.prior_weight = nn.Parameter(torch.ones(2))

    # -- 1..4: context, attention, element scores ---------------------------------------------
    def encode(self, batch: Batch) -> Encoded:
        c = self.config
        n, d = batch.size, c.dim
        element_request = batch.group_request[batch.element_group]
        ctx = self.context_table(batch.context).flatten(1)
        if batch.segments.numel():
            seg = F.embedding_bag(batch.segments, self.context_table.weight, batch.segment_offsets,
                                  mode="mean", sparse=True)
            seg = F.pad(seg, (0, 0, 0, n - seg.shape[0]))  # embedding_bag drops trailing empty bags
        else:
            seg = ctx.new_zeros(n, d)
        h = self.encoder(torch.cat([ctx, seg, batch.pool_stats], 1))

        emb = self.element_table(batch.element)
        comp = self.component_embedding(batch.group_component[batch.element_group])
        if c.attention:
            z = self._cross_component_attention(batch, emb, element_request)
        else:
            z = emb.new_zeros(emb.shape[0], c.attention_hidden)
        features = torch.cat([emb, comp, z], 1)
        logit = self.phi(torch.cat([h[element_request], features], 1)).squeeze(1)
        if not c.prior:
            return Encoded(h, features, logit, None, None)
        # The running mean CTR's log-odds sets the level, so scores are calibrated from the first
        # batch instead of waiting for φ's output bias to crawl from 0 to about -2.5.
        base = torch.logit(self._base_rate())
        element_prior = self.prior_weight[0] * self._prior(self.element_counts[batch.element], relative=True)
        request_prior = base + self.prior_weight[1] * self._prior(self.ad_counts[batch.context[:, 3]], relative=False)
        return Encoded(h, features, logit + element_prior + base, element_prior, request_prior)

    @torch.no_grad()
    def prior_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The priors ``encode`` adds, for every row at once: each element row's, each context row's as a
        request's ad (meaningful for ad rows), and the running mean CTR's log-odds. Serving freezes them."""
        base = torch.logit(self._base_rate())
        return (self.prior_weight[0] * self._prior(self.element_counts, relative=True),
                base + self.prior_weight[1] * self._prior(self.ad_counts, relative=False), base)

    def _base_rate(self) -> torch.Tensor:
        return (self.total_counts[1] + 1.0) / (self.total_counts[0] + 20.0)

    def _ad_rate(self, ads: torch.Tensor) -> torch.Tensor:
        counts, m = self.ad_counts[ads], self.config.prior_strength
        return (counts[:, 1] + m * self._base_rate()) / (counts[:, 0] + m)

    def _prior(self, counts: torch.Tensor, relative: bool) -> torch.Tensor:
        """Smoothed log-odds of a row's CTR against the running mean CTR.

        Element rows hold (impressions, Σ click − its ad's CTR): the element's effect measured
        against the product it was shown with, so an element reused by strong ads is not credited
        with their appeal (the paper's creative-versus-product disentangling).
        """
        base, m = self._base_rate(), self.config.prior_strength
        excess = counts[:, 1] if relative else counts[:, 1] - counts[:, 0] * base
        rate = (base + excess / (counts[:, 0] + m)).clamp(1e-4, 1 - 1e-4)
        return torch.logit(rate) - torch.logit(base)

    @torch.no_grad()
    def observe(self, batch: Batch) -> None:
        """Count the batch's shown elements and ads; called after the step so a label never sees itself."""
        if not self.config.prior:
            return
        valid = batch.shown >= 0
        request = batch.group_request[valid]
        excess = (batch.clicked - self._ad_rate(batch.context[:, 3]))[request]
        shown_rows = batch.element[batch.shown[valid]]
        self.element_counts.index_add_(0, shown_rows, torch.stack([torch.ones_like(excess), excess], 1))
        ads = torch.stack([torch.ones_like(batch.clicked), batch.clicked], 1)
        self.ad_counts.index_add_(0, batch.context[:, 3], ads)
        self.total_counts += ads.sum(0)

    def _cross_component_attention(self, batch: Batch, emb: torch.Tensor, element_request: torch.Tensor):
        """Each element attends to itself and every candidate of the *other* components of its request.

        Requests are sorted by size and attended in chunks, so padding stays near the chunk's own
        largest request instead of the batch's.
        """
        n = batch.size
        sizes = torch.bincount(element_request, minlength=n)
        order = torch.argsort(sizes)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n)
        chunk = max(64, (n + 7) // 8)
        q, k, v = self.query(emb), self.key(emb), self.value(emb)
        z = emb.new_empty(emb.shape[0], q.shape[1])
        element_rank = rank[element_request]
        for start in range(0, n, chunk):
            members = torch.nonzero((element_rank >= start) & (element_rank < start + chunk)).squeeze(1)
            row, slot = element_rank[members] - start, batch.element_slot[members]
            rows, width = min(chunk, n - start), int(sizes[order[min(start + chunk, n) - 1]])
            group = torch.full((rows, width), -1, dtype=torch.long)
            group[row, slot] = batch.element_group[members]
            allowed = (group.unsqueeze(1) != group.unsqueeze(2)) & (group >= 0).unsqueeze(1)
            allowed |= torch.eye(width, dtype=torch.bool)
            dense = [x.new_zeros(rows, width, x.shape[1]).index_put((row, slot), x[members]) for x in (q, k, v)]
            out = F.scaled_dot_product_attention(*dense, attn_mask=allowed)
            z = z.index_put((members,), out[row, slot])
        return z

    # -- 5: combination scores ------------------------------------------------------------------
    def combination_logit(self, batch: Batch, enc: Encoded, picks: torch.Tensor) -> torch.Tensor:
        """s for K combinations per request. picks: (K, G) element index per pool, -1 where absent."""
        c = self.config
        k, n = picks.shape[0], batch.size
        width = int(batch.group_slot.max()) + 1
        dense = torch.full((k, n, width), -1, dtype=torch.long)
        dense[:, batch.group_request, batch.group_slot] = picks
        present = dense >= 0
        index = dense.clamp(min=0)
        f = enc.features[index]  # (K, B, M, F)
        h = enc.h.expand(k, n, -1)
        if c.mil:
            weight_logit = self.mil_weight(torch.cat([h.unsqueeze(2).expand(-1, -1, width, -1), f], 3)).squeeze(3)
            weight = torch.softmax(weight_logit.masked_fill(~present, float("-inf")), 2)
            combined = (weight.unsqueeze(3) * f).sum(2)
            logit = self.phi(torch.cat([h, combined], 2)).squeeze(2)
            if enc.element_prior is not None:
                logit = logit + (enc.element_prior[index] * present).sum(2)
        else:  # without MIL a combination scores as the sum of its element scores
            logit = (enc.element_logit[index] * present).sum(2)
        if enc.request_prior is not None:
            logit = logit + enc.request_prior
        return logit
