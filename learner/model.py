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
With ``context_prior``, the element's prior also moves by how much better it does
with this request's age, gender and query segments than with everyone (the same
excess clicks, counted per (element, value) cell and shrunk towards the element's
own rate): user context, learned by counting too. With ``pair_prior``, a combination's
score also moves by how much better each two of its elements do together than their own
rates add up to (counted per pair, shrunk by whichever strength best predicted each next
batch's clicks), and
serving searches for combinations that pair well: synergy, learned by counting.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from learner.features import CONTEXT_KINDS, PAIR_HASHES, PAPER_COMPONENTS, Batch, HashSizes, pair_cells, pair_keys

# Shrinkage strengths (pseudo-impressions) the pair prior chooses among, half a decade apart; the last
# is as good as off.
PAIR_STRENGTHS = tuple(float(round(10 ** (1.5 + x / 2))) for x in range(8))


@dataclass
class ModelConfig:
    dim: int = 8
    attention: bool = True  # cross-component attention; off = the paper's "w/o context"
    mil: bool = True  # combination head + L_comb; off = the paper's "w/o MIL"
    rl_weight: float = 0.15  # λ of L_RL; 0 = the paper's "w/o RL"
    prior: bool = True  # count-based element and ad priors added to the scores
    prior_strength: float = 20.0  # pseudo-impressions at the running mean CTR
    context_prior: bool = True  # with ``prior``: the element's excess clicks per age, gender, query segment
    context_prior_strength: float = 200.0  # pseudo-impressions at the element's own excess rate
    pair_prior: bool = True  # with ``prior``: combinations also score their pairs' excess clicks (off: preset "fast")
    pair_hash: str = "mixed-sum"  # how pairs find their cells (``features.pair_cells``)
    encoder: tuple[int, ...] = (32, 16, 8)
    policy: tuple[int, ...] = (64, 32, 8)
    attention_hidden: int = 4
    max_candidates: int = 15
    sizes: HashSizes = field(default_factory=HashSizes)

    def __post_init__(self) -> None:
        if self.pair_hash not in PAIR_HASHES:
            raise ValueError(f"pair_hash must be one of {PAIR_HASHES}, not {self.pair_hash!r}")

    def to_dict(self) -> dict:
        """Plain JSON types, so a manifest written and read back compares equal."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["sizes"] = HashSizes(**data.get("sizes", {}))
        data.setdefault("context_prior", False)  # snapshots from before it existed have no cross counts
        data.setdefault("pair_prior", False)
        data.setdefault("pair_hash", "modulo")  # pair counts from before mixed-sum sit in modulo cells
        for key in ("encoder", "policy"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def pair_shift(cell: torch.Tensor, additive: torch.Tensor, base: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """Log-odds shift of pairs: the cell's excess rate shrunk towards ``additive``, the sum of its two
    elements' own excess rates."""
    rate = (cell[..., 1] + strength * additive) / (cell[..., 0] + strength)
    return torch.logit((base + rate).clamp(1e-4, 1 - 1e-4)) - torch.logit((base + additive).clamp(1e-4, 1 - 1e-4))


class _GatherRows(torch.autograd.Function):
    """``weight[rows][inverse]`` whose gradient is sparse over the distinct ``rows``, already coalesced.

    nn.Embedding's sparse gradient has one row per lookup, and SparseAdam sorts it to coalesce (~10 ms a
    batch here); the featurizer already knows each batch's distinct rows, so the sort is not repeated.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows, inverse)
        ctx.shape = weight.shape
        return weight.index_select(0, rows).index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, inverse = ctx.saved_tensors
        values = grad.new_zeros(len(rows), grad.shape[1]).index_add_(0, inverse, grad)
        return (torch.sparse_coo_tensor(rows[None], values, ctx.shape, is_coalesced=True, check_invariants=False),
                None, None)


def gather_rows(weight: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return _GatherRows.apply(weight, rows, inverse)


def take_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for an index of any shape, by ``index_select``: ~3x faster than advanced indexing
    here, forward and backward (an ``index_add``)."""
    return values.index_select(0, index.reshape(-1)).view(*index.shape, *values.shape[1:])


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
class LoggedPairs:
    """The logged combination's pairs, looked up once a step: the loss scores them, ``observe`` counts them."""

    cells: torch.Tensor  # (P,) each pair's cell in ``pair_counts``
    counts: torch.Tensor  # (P, 2) those cells' counts before this batch
    additive: torch.Tensor  # (P,) the sum of the pair's two elements' own excess rates
    request: torch.Tensor  # (P,) the request each pair was shown in
    own_sum: torch.Tensor  # (B,) the own excess rates of each request's shown elements, summed


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
        if c.prior and c.context_prior:
            self.register_buffer("cross_counts", torch.zeros(sizes.cross, 2))  # (n, Σ y − ad CTR) per cell
            self.context_prior_weight = nn.Parameter(torch.zeros(()))  # earns its weight from the loss

        if c.prior and c.pair_prior:
            self.register_buffer("pair_counts", torch.zeros(sizes.pair, 2))  # (n, Σ y − ad CTR) per cell
            self.register_buffer("pair_strength", torch.tensor(PAIR_STRENGTHS[-1]))  # pseudo-impressions, chosen
            self.register_buffer("pair_strengths", torch.tensor(PAIR_STRENGTHS), persistent=False)
            # per strength, decayed: (requests, Σ gain, Σ gain²), gain = squared error saved against the last
            self.register_buffer("pair_gains", torch.zeros(3, len(PAIR_STRENGTHS)))

    # -- 1..4: context, attention, element scores ---------------------------------------------
    def encode(self, batch: Batch) -> Encoded:
        c, t = self.config, batch.tensors
        n, d = batch.size, c.dim
        context_rows = gather_rows(self.context_table.weight, t.context_table_rows, t.context_inverse)
        ctx, seg_rows = context_rows.split([n * len(CONTEXT_KINDS), len(context_rows) - n * len(CONTEXT_KINDS)])
        ctx = ctx.view(n, -1)
        seg = ctx.new_zeros(n, d).index_add(0, t.segment_request, seg_rows) / t.segment_count.clamp(min=1)[:, None]
        h = self.encoder(torch.cat([ctx, seg, t.pool_stats], 1))

        emb = gather_rows(self.element_table.weight, t.element_rows, t.element_inverse)
        comp = self.component_embedding.weight.index_select(0, t.element_component)
        if c.attention:
            z = self._cross_component_attention(batch, emb)
        else:
            z = emb.new_zeros(emb.shape[0], c.attention_hidden)
        features = torch.cat([emb, comp, z], 1)
        logit = self.phi(torch.cat([h.index_select(0, t.element_request), features], 1)).squeeze(1)
        if not c.prior:
            return Encoded(h, features, logit, None, None)
        # The running mean CTR's log-odds sets the level, so scores are calibrated from the first
        # batch instead of waiting for φ's output bias to crawl from 0 to about -2.5.
        base = torch.logit(self._base_rate())
        element_counts = take_rows(self.element_counts, t.element)
        element_prior = self.prior_weight[0] * self._prior(element_counts, relative=True)
        if c.context_prior:
            element_prior = element_prior + self.context_prior_weight * self._context_prior(batch, element_counts)
        request_prior = base + self.prior_weight[1] * self._prior(self.ad_counts[t.context[:, 3]], relative=False)
        return Encoded(h, features, logit + element_prior + base, element_prior, request_prior)

    @torch.no_grad()
    def prior_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The priors ``encode`` adds, for every row at once: each element row's, each context row's as a
        request's ad (meaningful for ad rows), and the running mean CTR's log-odds. Serving freezes them."""
        base = torch.logit(self._base_rate())
        return (self.prior_weight[0] * self._prior(self.element_counts, relative=True),
                base + self.prior_weight[1] * self._prior(self.ad_counts, relative=False), base)

    @torch.no_grad()
    def _context_prior(self, batch: Batch, element_counts: torch.Tensor) -> torch.Tensor:
        """(L,) how much better each element does with this request's age, gender and query segments
        than with everyone, in log-odds: its excess click rate in each (element, value) cell, shrunk
        towards its own excess rate, against that rate; a request's segments weigh as one value.
        ``element_counts``: each element's row of ``self.element_counts``."""
        t, base = batch.tensors, self._base_rate()
        own_rate = self.own_rates(element_counts)  # over the ad's CTR
        own_logit = torch.logit((base + own_rate).clamp(1e-4, 1 - 1e-4))  # per element, not per cell
        cell = take_rows(self.cross_counts, t.cross_row)
        m = self.config.context_prior_strength
        cell_rate = (cell[:, 1] + m * own_rate.index_select(0, t.cross_element)) / (cell[:, 0] + m)
        cell_logit = torch.logit((base + cell_rate).clamp(1e-4, 1 - 1e-4))
        weighted = own_rate.new_zeros(len(own_rate)).index_add_(0, t.cross_element, cell_logit * t.cross_weight)
        weights = own_rate.new_zeros(len(own_rate)).index_add_(0, t.cross_element, t.cross_weight)
        return weighted - weights * own_logit

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
    def observe(self, batch: Batch, logged: LoggedPairs | None = None) -> None:
        """Count the batch's shown elements and ads; called after the step so a label never sees itself.
        ``logged``: the batch's ``logged_pairs``, if the step already looked them up."""
        if not self.config.prior:
            return
        t = batch.tensors
        request_excess = t.clicked - self._ad_rate(t.context[:, 3])
        if self.config.pair_prior:
            self._observe_pairs(batch, request_excess, logged or self.logged_pairs(batch))
        excess = request_excess.index_select(0, t.shown_request)
        shown_rows = t.element.index_select(0, t.shown_element)
        self.element_counts.index_add_(0, shown_rows, torch.stack([torch.ones_like(excess), excess], 1))
        if self.config.context_prior:  # every cell of a shown element counts the impression
            cross_excess = request_excess.index_select(0, t.shown_cross_request)
            self.cross_counts.index_add_(0, t.cross_row.index_select(0, t.shown_cross),
                                         torch.stack([torch.ones_like(cross_excess), cross_excess], 1))
        ads = torch.stack([torch.ones_like(t.clicked), t.clicked], 1)
        self.ad_counts.index_add_(0, t.context[:, 3], ads)
        self.total_counts += ads.sum(0)

    def own_rates(self, counts: torch.Tensor | None = None) -> torch.Tensor:
        """Each element row's excess click rate over its ads' CTR, shrunk (the prior's rate); ``counts``:
        some rows of ``element_counts`` (default: all)."""
        counts = self.element_counts if counts is None else counts
        return counts[:, 1] / (counts[:, 0] + self.config.prior_strength)

    @torch.no_grad()
    def _pair_prior(self, batch: Batch, dense: torch.Tensor) -> torch.Tensor:
        """(K, B) Σ over each combination's pairs of how much better the pair does together than its two
        elements' own excess rates add up to, shrunk, in log-odds. dense: (K, B, M) elements, -1 absent;
        only the pairs of pools a request has are looked up (about a third of the M·(M−1)/2 slots)."""
        k, n, width = dense.shape
        i, j = torch.triu_indices(width, width, 1)
        first, second = dense[..., i], dense[..., j]
        combination, request, pair = torch.nonzero((first >= 0) & (second >= 0), as_tuple=True)
        first, second = first[combination, request, pair], second[combination, request, pair]
        own = self.own_rates(self.element_counts.index_select(0, batch.tensors.element))
        shift = pair_shift(take_rows(self.pair_counts, self._pair_cells(batch, first, second)),
                           own.index_select(0, first) + own.index_select(0, second), self._base_rate(),
                           self.pair_strength)
        return shift.new_zeros(k * n).index_add_(0, combination * n + request, shift).view(k, n)

    @torch.no_grad()
    def logged_pairs(self, batch: Batch) -> LoggedPairs:
        """The logged combination's pairs (as the featurizer laid them out for training), looked up."""
        t = batch.tensors
        first, second = t.shown_pair_first, t.shown_pair_second
        cells = self._pair_cells(batch, first, second)
        own = self.own_rates(self.element_counts.index_select(0, t.element))
        own_sum = own.new_zeros(batch.size).index_add_(0, t.shown_request, own.index_select(0, t.shown_element))
        return LoggedPairs(cells, self.pair_counts.index_select(0, cells),
                           own.index_select(0, first) + own.index_select(0, second),
                           t.element_request.index_select(0, first), own_sum)

    @torch.no_grad()
    def logged_pair_prior(self, batch: Batch, logged: LoggedPairs) -> torch.Tensor:
        """(B,) ``_pair_prior`` of the logged combination, from its pairs as the featurizer laid them out."""
        shift = pair_shift(logged.counts, logged.additive, self._base_rate(), self.pair_strength)
        return shift.new_zeros(batch.size).index_add_(0, logged.request, shift)

    def _pair_cells(self, batch: Batch, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """The pair-count cells of pairs of the batch's elements (indices into L)."""
        rows, scheme = batch.tensors.element, self.config.pair_hash
        return pair_cells(pair_keys(take_rows(rows, first), scheme), pair_keys(take_rows(rows, second), scheme),
                          self.config.sizes.pair, scheme)

    def _observe_pairs(self, batch: Batch, excess: torch.Tensor, logged: LoggedPairs, decay: float = 0.99) -> None:
        """Choose the pairs' shrinkage by how well each candidate strength predicted this batch's clicks
        from the counts so far, then count the batch's shown pairs. ``excess``: (B,) each request's click
        less its ad's CTR.

        Prequential, not empirical Bayes: the spread of pair cells' excess also holds what persists in the
        counts besides synergy (an element's rate in one ad against its rate across ads, an ad's rate
        drifting as its pools churn), and shrinking by it was ~10x too weak (README, Decision 5)."""
        cell, request, strengths = logged.counts, logged.request, self.pair_strengths
        shifts = (cell[:, 1:] - cell[:, :1] * logged.additive[:, None]) / (cell[:, :1] + strengths)  # (P, strengths)
        predicted = shifts.new_zeros(batch.size, len(strengths)).index_add_(0, request, shifts)
        miss = ((excess - logged.own_sum)[:, None] - predicted) ** 2
        gain = miss[:, -1:] - miss  # (B, strengths) squared error saved against the strongest, as good as off
        self.pair_gains.mul_(decay).add_(torch.stack([gain.new_full((len(strengths),), batch.size),
                                                      gain.sum(0), (gain * gain).sum(0)]))
        n, total, squares = self.pair_gains
        z = total / (squares - total * total / n.clamp(min=1)).clamp(min=1e-12).sqrt()
        trusted = torch.where(z > 2, total, 0.0)  # a weaker shrinkage must be clearly better to be taken
        best = int(trusted.argmax()) if bool((trusted > 0).any()) else len(strengths) - 1
        # One step stronger than the best predictor: serving takes the best of many combinations, each
        # summing ~15 pair shifts, so noise that costs little in prediction costs more in the argmax.
        self.pair_strength.copy_(strengths[min(best + 1, len(strengths) - 1)])
        pair_excess = excess.index_select(0, request)
        self.pair_counts.index_add_(0, logged.cells, torch.stack([torch.ones_like(pair_excess), pair_excess], 1))

    def _cross_component_attention(self, batch: Batch, emb: torch.Tensor) -> torch.Tensor:
        """Each element attends to itself and every candidate of the *other* components of its request,
        in the featurizer's blocks of similarly sized requests (``Batch.attention_blocks``); requests with
        the same pools as an earlier one read its outputs (``features._attention_layout``). The mask is
        an additive bias, so it rides in the score matmul (baddbmm) instead of a pass of its own."""
        hidden, t = self.config.attention_hidden, batch.tensors
        qkv = emb.index_select(0, t.attended) @ torch.cat([self.query.weight * hidden**-0.5, self.key.weight,
                                                           self.value.weight]).T
        sizes = [block.rows * block.width for block in batch.attention_blocks]
        padded = qkv.new_zeros(sum(sizes), 3 * hidden).index_copy(0, t.attended_cell, qkv)
        outputs = []
        # split, not sliced: the backward joins the blocks' gradients in one pass instead of a zeroed copy each
        for block, part in zip(batch.attention_blocks, padded.split(sizes), strict=True):
            rows, width = block.rows, block.width
            q, k, v = part.view(rows, width, 3 * hidden).split(hidden, 2)
            bias = t.attention_bias[block.mask_start : block.mask_start + rows * width * width]
            scores = torch.baddbmm(bias.view(rows, width, width), q, k.transpose(1, 2))
            outputs.append(torch.bmm(torch.softmax(scores, 2), v).view(rows * width, hidden))
        return torch.cat(outputs).index_select(0, t.element_attention_cell)

    # -- 5: combination scores ------------------------------------------------------------------
    def combination_logit(self, batch: Batch, enc: Encoded, picks: torch.Tensor,
                          pair_prior: torch.Tensor | None = None) -> torch.Tensor:
        """s for K combinations per request. picks: (K, G) element index per pool, -1 where absent;
        ``pair_prior``: their (K, B) ``_pair_prior``, where the caller has it already."""
        c = self.config
        k, n, width = picks.shape[0], batch.size, batch.combination_width
        dense = picks.new_full((k, n * width), -1).index_copy(1, batch.tensors.group_cell, picks).view(k, n, width)
        present = dense >= 0
        index = dense.clamp(min=0)
        f = take_rows(enc.features, index)  # (K, B, M, F)
        h = enc.h.expand(k, n, -1)
        if c.mil:
            weight_logit = self.mil_weight(torch.cat([h.unsqueeze(2).expand(-1, -1, width, -1), f], 3)).squeeze(3)
            weight = torch.softmax(weight_logit.masked_fill(~present, float("-inf")), 2)
            combined = (weight.unsqueeze(3) * f).sum(2)
            logit = self.phi(torch.cat([h, combined], 2)).squeeze(2)
            if enc.element_prior is not None:
                logit = logit + (take_rows(enc.element_prior, index) * present).sum(2)
        else:  # without MIL a combination scores as the sum of its element scores
            logit = (take_rows(enc.element_logit, index) * present).sum(2)
        if c.prior and c.pair_prior:
            logit = logit + (self._pair_prior(batch, dense) if pair_prior is None else pair_prior)
        if enc.request_prior is not None:
            logit = logit + enc.request_prior
        return logit
