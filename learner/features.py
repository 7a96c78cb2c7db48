"""Turn requests and bags into the tensors the GenCO model reads.

Keys and rows: every id becomes a 64-bit key of its kind (user, age, gender, ad,
query, query segment, or the component of an element; ``ops.id_key``). The count
priors index those keys collision-free; the embeddings take a key's low bits as its
row in the kind's own row range of one table, so a single gather serves every kind.
Components outside the paper's six share one element range, keyed by the component
name, so an unseen component is served rather than rejected.

Layout: elements are ragged, not padded to 6 x 15. A *group* is one
(request, component) pool; each element knows its group, its position in the
group and its position in the request. With Table-1 pools ~75% of a dense
6 x 15 grid would be padding.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cached_property
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch

from learner.ops import combine, id_key, mix64, pair_key

PAPER_COMPONENTS = ("title", "image", "marketing", "highlight", "attribute", "structure_attribute")
CONTEXT_KINDS = ("user", "age", "gender", "ad", "query")
_STAT_COLUMN = {name: i for i, name in enumerate(PAPER_COMPONENTS)}


@dataclass(frozen=True)
class HashSizes:
    """Embedding rows per id kind, each a power of two (a key's low bits are its row), and the cells of the
    priors' hashed tables; the paper sizes embeddings by distinct ids seen, we fix them up front."""

    user: int = 1 << 17
    age: int = 64
    gender: int = 16
    ad: int = 1 << 17
    query: int = 1 << 16
    segment: int = 1 << 15
    component: int = 64
    element: int = 1 << 17  # per paper component
    other_element: int = 1 << 16  # shared by components outside the paper's six
    cross: int = 1 << 20  # (element, age / gender / query segment) cells of the context prior; a power of two
    pair: int = 1 << 20  # (element, element) cells of the pair prior; a power of two

    def __post_init__(self) -> None:
        for kind in (*CONTEXT_KINDS, "segment", "element", "other_element", "cross", "pair"):
            rows = getattr(self, kind)
            if rows < 2 or rows & (rows - 1):
                raise ValueError(f"sizes.{kind} must be a power of two, not {rows}")

    def context_offsets(self) -> dict[str, int]:
        offsets, start = {}, 0
        for kind in (*CONTEXT_KINDS, "segment"):
            offsets[kind] = start
            start += getattr(self, kind)
        offsets["end"] = start
        return offsets

    @property
    def context_rows(self) -> int:
        return self.context_offsets()["end"]

    @property
    def element_rows(self) -> int:
        return self.element * len(PAPER_COMPONENTS) + self.other_element


ATTENTION_ROWS = 256  # requests attended in one block: sorted by size, so padding stays near each block's own


class AttentionBlock(NamedTuple):
    """Requests of similar size attended together: ``rows`` requests padded to ``width`` elements."""

    start: int  # first position of the block in the padded (sum rows * width) element buffer
    mask_start: int  # first position of its (rows, width, width) score bias in ``attention_bias``
    rows: int
    width: int


@dataclass
class Batch:
    """A mini-batch of requests (and, for training, their shown combination and label), as numpy arrays.

    Besides the ids' rows it carries every index layout the model reads (attention blocks, pool grid,
    combination grid, each table's distinct rows), computed here so that neither training nor serving
    spends tensor operations on bookkeeping, and so a parser process can compute them. ``arrays``:

    - per request (B): ``context`` (B, 5) rows of user, age, gender, ad, query in the context table;
      ``segment_offsets`` start of its segments; ``segment_count`` how many; ``pool_stats`` (B, 7)
      log(1 + pool size) per paper component plus "other"; ``clicked`` labels (zeros when unlabelled);
      ``seed`` stable per-request seed (sampling must not depend on the batch)
    - per segment (S): ``segments`` context-table rows; ``segment_request``
    - per pool, one (request, component) (G): ``group_request``; ``group_slot`` position inside its
      request; ``group_cell`` flat cell in the (B, combination_width) grid; ``group_component``
      component-table row; ``group_size`` candidates considered; ``shown`` element (into L) shown, or -1
    - per candidate element (L): ``element`` element-table row; ``element_group``, ``element_request``,
      ``element_component``; ``element_pos`` position in its pool; ``element_slot`` position in its
      request; ``element_pool_cell`` flat cell in the (G, pool_width) grid; ``element_attention_cell``
      flat cell of its attention output in the padded buffer (shared by requests with the same pools)
    - per attended element (A, the elements of requests that listed their own pools rather than copying an
      earlier impression's of the same ad): ``attended`` element (into L); ``attended_cell`` its cell in the
      padded attention buffer
    - ``attention_bias``: every block's (rows, width, width) score bias, flattened: -inf where not attended
    - per (element, context value) cross (C): ``cross_element`` element (into L); ``cross_row`` its cell in the
      cross table (element row x age, gender or query-segment row, hashed); ``cross_weight`` 1 for age and
      gender, 1 / segments for a segment (the request's segments count as one)
    - labelled only: ``shown_element`` the logged combination's elements (into L) and ``shown_request``
      theirs; ``shown_cross`` their crosses (into C) and ``shown_cross_request``; ``shown_pair_first`` and
      ``shown_pair_second`` every two of them in one request
    - training only (``add_distinct_rows``): ``element_rows`` distinct element-table rows and
      ``element_inverse`` (L) each element's index among them; ``context_table_rows`` and
      ``context_inverse`` (5B + S) the same for the context rows, then the segment rows
    """

    arrays: dict[str, np.ndarray]
    attention_blocks: list[AttentionBlock]
    pool_width: int  # the widest pool
    combination_width: int  # the most pools in one request
    candidate_ids: list[list[str]] = field(default_factory=list)  # (G) the ids behind each pool (selection)
    group_names: list[str] = field(default_factory=list)  # (G) component name of each pool (selection)

    @cached_property
    def tensors(self) -> SimpleNamespace:
        """The arrays as torch tensors sharing their memory, made on first use: serving never pays for them."""
        self.add_distinct_rows()
        return SimpleNamespace(**{name: torch.from_numpy(array) for name, array in self.arrays.items()})

    def add_distinct_rows(self) -> None:
        """Each table's distinct rows, the layout of the embeddings' sparse gradient (training only)."""
        arrays = self.arrays
        if "element_rows" in arrays:
            return
        arrays["element_rows"], inverse = np.unique(arrays["element"], return_inverse=True)
        arrays["element_inverse"] = inverse.ravel()
        looked_up = np.concatenate([arrays["context"].ravel(), arrays["segments"]])
        arrays["context_table_rows"], inverse = np.unique(looked_up, return_inverse=True)
        arrays["context_inverse"] = inverse.ravel()

    def without_ids(self) -> Batch:
        """The same batch without the ids behind its pools: all training needs, and cheap to send."""
        return Batch(self.arrays, self.attention_blocks, self.pool_width, self.combination_width)

    @property
    def size(self) -> int:
        return len(self.arrays["seed"])

    def request_groups(self) -> list[range]:
        """The pools of each request."""
        first = np.flatnonzero(self.arrays["group_slot"] == 0).tolist()
        return [range(a, b) for a, b in itertools.pairwise([*first, len(self.arrays["group_slot"])])]

    def pool_grid(self, element_values: np.ndarray) -> np.ndarray:
        """(G, widest pool) grid of per-element values, one row per pool, -inf on padding."""
        shape = (len(self.arrays["group_size"]), self.pool_width)
        grid = np.full(shape[0] * shape[1], -np.inf, dtype=element_values.dtype)
        grid[self.arrays["element_pool_cell"]] = element_values
        return grid.reshape(shape)


def _attention_layout(twin: np.ndarray, element_request: np.ndarray, element_slot: np.ndarray,
                      element_group: np.ndarray, first_element: np.ndarray,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[AttentionBlock]]:
    """Where cross-component attention reads and writes, for requests with pools of their own only.

    Attention depends on a request's pools alone, not on its user or query, and the impressions of one
    ad share their pools: a request whose ``twin`` (B) is an earlier request with the same pools reads
    that request's outputs instead of being attended again (a batch of 1,024 impressions of 200 ads
    attends ~200). Returns the attended elements (into L), their cells in the padded buffer, every
    element's output cell (its twin's, for a repeated request), the score biases and the blocks.
    """
    n = len(twin)
    own = twin == np.arange(n)
    attended = np.flatnonzero(own[element_request])
    renumbered = np.cumsum(own) - 1
    cell, bias, blocks = _padded_blocks(renumbered[element_request[attended]], element_slot[attended],
                                        element_group[attended], int(own.sum()))
    cell_of = np.empty(len(element_request), dtype=np.int64)
    cell_of[attended] = cell
    return attended, cell, cell_of[first_element[twin[element_request]] + element_slot], bias, blocks


def _padded_blocks(element_request: np.ndarray, element_slot: np.ndarray, element_group: np.ndarray,
                   n: int) -> tuple[np.ndarray, np.ndarray, list[AttentionBlock]]:
    """Requests sorted by element count, cut into blocks of ``ATTENTION_ROWS``, each padded to its widest.

    Returns each element's cell in the padded buffer, the blocks' score biases (-inf: not attended)
    flattened, and the blocks. An element attends to itself and to every element of the other components of its
    request; a padded row attends to its request's elements so no softmax row is empty.
    """
    sizes = np.bincount(element_request, minlength=n)
    order = np.argsort(sizes, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(n)
    blocks, cell_start = [], 0
    block_start = np.empty(n, dtype=np.int64)  # per rank: (buffer start of its block, first rank, width)
    block_first = np.empty(n, dtype=np.int64)
    block_width = np.empty(n, dtype=np.int64)
    mask_start = 0
    for first in range(0, n, ATTENTION_ROWS):
        last = min(first + ATTENTION_ROWS, n)
        rows, width = last - first, int(sizes[order[last - 1]])
        blocks.append(AttentionBlock(cell_start, mask_start, rows, width))
        block_start[first:last], block_first[first:last], block_width[first:last] = cell_start, first, width
        cell_start += rows * width
        mask_start += rows * width * width
    element_rank = rank[element_request]
    cell = block_start[element_rank] + (element_rank - block_first[element_rank]) * block_width[element_rank]
    cell += element_slot
    group = np.full(cell_start, -1, dtype=np.int64)
    group[cell] = element_group
    bias = np.zeros(mask_start, dtype=np.float32)
    for block in blocks:
        g = group[block.start : block.start + block.rows * block.width].reshape(block.rows, block.width)
        blocked = ((g[:, None, :] == g[:, :, None]) & ~np.eye(block.width, dtype=bool)) | (g < 0)[:, None, :]
        scores = bias[block.mask_start : block.mask_start + block.rows * block.width**2].reshape(blocked.shape)
        np.copyto(scores, np.float32(-np.inf), where=blocked)
    return cell, bias, blocks


def _context_crosses(element_key: np.ndarray, element_request: np.ndarray, context_key: np.ndarray,
                     segment_key: np.ndarray, segment_request: np.ndarray, segment_count: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every element paired with its request's age, gender and each query segment: (element, key, weight)."""
    n_elements = np.bincount(element_request, minlength=len(context_key))
    first_element = np.cumsum(n_elements) - n_elements
    per_segment = n_elements[segment_request]  # a segment crosses every element of its request
    starts = np.repeat(np.cumsum(per_segment) - per_segment, per_segment)
    segment_element = np.repeat(first_element[segment_request], per_segment) + np.arange(len(starts)) - starts
    every = np.arange(len(element_key))
    cross_element = np.concatenate([every, every, segment_element])
    value = np.concatenate([context_key[element_request, 1], context_key[element_request, 2],
                            np.repeat(segment_key, per_segment)])
    weight = np.concatenate([np.ones(2 * len(element_key)),
                             np.repeat(1 / segment_count[segment_request], per_segment)])
    return cross_element, combine(element_key[cross_element], value), weight


def _logged_layout(arrays: dict[str, np.ndarray], n: int, width: int) -> dict[str, np.ndarray]:
    """Where the logged combination sits, for training (computed in the parser process, so the trainer
    filters nothing): its elements and their requests, the context-prior crosses of those elements and
    their requests, and every two elements of one request's combination (what the pair prior counts)."""
    shown, cross_element = arrays["shown"], arrays["cross_element"]
    logged = shown >= 0
    element = shown[logged]
    is_shown = np.zeros(len(arrays["element"]), dtype=bool)
    is_shown[element] = True
    cross = np.flatnonzero(is_shown[cross_element])
    dense = np.full(n * width, -1, dtype=np.int64)
    dense[arrays["group_cell"]] = shown
    dense = dense.reshape(n, width)
    i, j = np.triu_indices(width, 1)
    first, second = dense[:, i], dense[:, j]
    both = (first >= 0) & (second >= 0)
    first, second, keys = first[both], second[both], arrays["element_key"]
    return {"shown_element": element, "shown_request": arrays["group_request"][logged],
            "shown_cross": cross, "shown_cross_request": arrays["element_request"][cross_element[cross]],
            "shown_pair_first": first, "shown_pair_second": second,
            "shown_pair_key": pair_key(keys[first], keys[second])}


class _Keys(dict):
    """id -> its 64-bit key (``ops.id_key``) for one kind of id, computed on first sight. Lookups of known ids
    stay in C (``map(keys.__getitem__, ids)``), which is most of featurisation's speed; the cache starts
    over past ``limit`` ids so memory stays bounded."""

    def __init__(self, kind: str, limit: int = 1 << 20) -> None:
        super().__init__()
        self.kind, self.limit = kind, limit

    def __missing__(self, value: str) -> int:
        if len(self) >= self.limit:
            self.clear()
        key = self[value] = id_key(self.kind, value)
        return key


def _position(considered: list[str], pick: str | None) -> int | None:
    """Where the logged ``pick`` sits in a pool: -1 when nothing was logged, None when the pool lacks it."""
    if pick is None:
        return -1
    return considered.index(pick) if pick in considered else None


class Featurizer:
    """Maps contract records to :class:`Batch` tensors; pure function of its sizes and cap."""

    def __init__(self, sizes: HashSizes | None = None, max_candidates: int = 15) -> None:
        self.sizes = sizes or HashSizes()
        self.max_candidates = max_candidates
        offsets = self.sizes.context_offsets()
        self._context_offset = np.array([offsets[kind] for kind in CONTEXT_KINDS], dtype=np.int64)
        self._context_mask = np.array([getattr(self.sizes, kind) - 1 for kind in CONTEXT_KINDS], dtype=np.int64)
        self._segment_offset, self._segment_mask = offsets["segment"], self.sizes.segment - 1
        self._context = {kind: _Keys(kind) for kind in (*CONTEXT_KINDS, "segment")}
        self._elements: dict[str, _Keys] = {}
        self._components: dict[str, tuple[int, int]] = {}

    def _element_keys(self, component: str) -> _Keys:
        table = self._elements.get(component)
        if table is None:
            if len(self._elements) >= 4096:  # component names are open strings: bound them too
                self._elements.clear()
            table = self._elements[component] = _Keys(component)
        return table

    def _component(self, component: str) -> tuple[int, int]:
        """(component-table row, pool-stats column) of a component name."""
        found = self._components.get(component)
        if found is None:
            if len(self._components) >= 4096:
                self._components.clear()
            if component in PAPER_COMPONENTS:
                found = PAPER_COMPONENTS.index(component), _STAT_COLUMN[component]
            else:
                spare = self.sizes.component - len(PAPER_COMPONENTS)
                found = len(PAPER_COMPONENTS) + id_key("component", component) % spare, len(PAPER_COMPONENTS)
            self._components[component] = found
        return found

    def element_rows(self, keys: np.ndarray, component_rows: np.ndarray) -> np.ndarray:
        """Element-table rows of element keys, by their components' rows: each paper component has a range
        of its own, the other components share one."""
        paper = component_rows < len(PAPER_COMPONENTS)
        start = np.where(paper, component_rows, len(PAPER_COMPONENTS)) * self.sizes.element
        return start + (keys & np.where(paper, self.sizes.element - 1, self.sizes.other_element - 1))

    def element_row(self, component: str, element: str) -> int:
        key = np.array([self._element_keys(component)[element]])
        return int(self.element_rows(key, np.array([self._component(component)[0]]))[0])

    def context_row(self, kind: str, value: str) -> int:
        """The context-table row of one id of a context kind (or ``"segment"``)."""
        offsets = self.sizes.context_offsets()
        return offsets[kind] + (self._context[kind][value] & (getattr(self.sizes, kind) - 1))

    def context_keys(self, record) -> tuple[int, int, int, int, int]:
        """Keys of the record's user, age, gender, ad and query; absent parts as empty ids."""
        ctx, user, query = self._context, record.user, record.query
        if user:
            user_keys = ctx["user"][user.id or ""], ctx["age"][str(user.age)], ctx["gender"][str(user.gender)]
        else:
            user_keys = ctx["user"][""], ctx["age"][""], ctx["gender"][""]
        return (*user_keys, ctx["ad"][record.ad_id], ctx["query"][(query.id or "") if query else ""])

    def context_rows(self, record) -> np.ndarray:
        """Context-table rows of the record's user, age, gender, ad and query."""
        return self._context_offset + (np.array(self.context_keys(record), dtype=np.int64) & self._context_mask)

    def batch(self, records: list, labelled: bool = False) -> Batch:
        """Featurize requests; ``labelled`` Bags also carry their shown combination and click label.

        The Python loop collects only what needs a per-id lookup; every index layout is then
        derived from the pool sizes with numpy, which keeps featurisation off the training path.
        """
        cap, tables, new_table = self.max_candidates, self._elements, self._element_keys
        context_keys, segment_key = self.context_keys, self._context["segment"].__getitem__
        context, segments, segment_offsets, groups_per_request = [], [], [], []
        element, group_size, shown_pos, candidate_ids, group_names = [], [], [], [], []
        # The impressions of one ad mostly share its pools, so each is listed once a batch: a request whose
        # candidates equal those of the last request of its ad copies that one's span of the lists, and
        # reads its attention outputs (``twins``). Spans and request numbers, not objects per request:
        # allocating those made the collector run ~2x as often.
        listed: dict[str, int] = {}  # ad id -> the last request that listed its pools plainly
        group_at, element_at = [], []  # per request: where its pools and their elements start
        twins = []  # per request: the earlier request whose listing it copied, else itself
        for r, record in enumerate(records):
            query = record.query
            context.extend(context_keys(record))
            segment_offsets.append(len(segments))
            if query:
                segments.extend(map(segment_key, query.segments))
            group_at.append(len(group_size))
            element_at.append(len(element))
            groups_per_request.append(len(record.candidates))
            twin = listed.get(record.ad_id)
            if twin is not None and records[twin].candidates == record.candidates:
                pools = slice(group_at[twin], group_at[twin] + groups_per_request[twin])
                positions = (list(map(_position, candidate_ids[pools], map(record.shown.get, group_names[pools])))
                             if labelled else [-1] * groups_per_request[twin])
                if None not in positions:  # else a logged element the listing lacks: listed on its own below
                    shown_pos.extend(positions)
                    element.extend(element[element_at[twin] : element_at[twin + 1]])
                    group_size.extend(group_size[pools])
                    candidate_ids.extend(candidate_ids[pools])
                    group_names.extend(group_names[pools])
                    twins.append(twin)
                    continue
            plain = True
            for component, ids in record.candidates.items():
                considered = ids if len(ids) <= cap else ids[:cap]
                position = _position(considered, record.shown.get(component) if labelled else None)
                if position is None:  # keep the logged element trainable
                    considered, position = [*considered[: cap - 1], record.shown[component]], cap - 1
                    plain = False
                shown_pos.append(position)
                element.extend(map((tables.get(component) or new_table(component)).__getitem__, considered))
                group_size.append(len(considered))
                candidate_ids.append(considered)
                group_names.append(component)
            if plain:
                listed[record.ad_id] = r
            twins.append(r)
        group_component, group_stat = zip(*map(self._component, group_names), strict=True)

        n = len(records)
        sizes = np.asarray(group_size, dtype=np.int64)
        per_request = np.asarray(groups_per_request, dtype=np.int64)
        group_request = np.repeat(np.arange(n), per_request)
        first_group, first_element = np.asarray(group_at, dtype=np.int64), np.asarray(element_at, dtype=np.int64)
        group_start = np.cumsum(sizes) - sizes
        group_slot = np.arange(len(sizes)) - first_group[group_request]
        element_group = np.repeat(np.arange(len(sizes)), sizes)
        element_request = group_request[element_group]
        element_pos = np.arange(len(element)) - group_start[element_group]
        element_slot = np.arange(len(element)) - first_element[element_request]
        columns = len(PAPER_COMPONENTS) + 1
        stats = np.bincount(group_request * columns + np.asarray(group_stat, dtype=np.int64), weights=sizes,
                            minlength=n * columns).reshape(n, columns).astype(np.float32)
        shown = np.asarray(shown_pos, dtype=np.int64)
        clicked = [1.0 if r.clicked else 0.0 for r in records] if labelled else [0.0] * n
        context_key = np.asarray(context, dtype=np.int64).reshape(-1, len(CONTEXT_KINDS))
        segment_key, element_key = np.asarray(segments, dtype=np.int64), np.asarray(element, dtype=np.int64)
        segment_count = np.diff(np.append(np.asarray(segment_offsets, dtype=np.int64), len(segments)))
        group_component = np.asarray(group_component, dtype=np.int64)
        element_component = group_component[element_group]
        ad_key = context_key[:, 3]
        pool_width, combination_width = int(sizes.max()), int(per_request.max())
        attended, attention_cell, element_attention_cell, attention_bias, blocks = _attention_layout(
            np.asarray(twins, dtype=np.int64), element_request, element_slot, element_group, first_element)
        segment_request = np.repeat(np.arange(n), segment_count)
        cross_element, cross_key, cross_weight = _context_crosses(
            element_key, element_request, context_key, segment_key, segment_request, segment_count)
        arrays = {
            "context": self._context_offset + (context_key & self._context_mask),
            "context_key": context_key,
            "segments": self._segment_offset + (segment_key & self._segment_mask),
            "segment_offsets": np.asarray(segment_offsets, dtype=np.int64),
            "segment_request": segment_request,
            "segment_count": segment_count,
            "pool_stats": np.log1p(stats),
            "element": self.element_rows(element_key, element_component),
            "element_key": element_key,
            "cell_key": combine(element_key, ad_key[element_request]),
            "element_group": element_group,
            "element_request": element_request,
            "element_component": element_component,
            "element_pos": element_pos,
            "element_slot": element_slot,
            "element_pool_cell": element_group * pool_width + element_pos,
            "element_attention_cell": element_attention_cell,
            "attended": attended,
            "attended_cell": attention_cell,
            "attention_bias": attention_bias,
            "cross_element": cross_element,
            "cross_key": cross_key,
            "cross_weight": cross_weight,
            "group_request": group_request,
            "group_slot": group_slot,
            "group_cell": group_request * combination_width + group_slot,
            "group_component": group_component,
            "group_size": sizes,
            "shown": np.where(shown >= 0, group_start + shown, -1),
            "clicked": np.asarray(clicked, dtype=np.float32),
            # stable per request, so that sampling does not depend on the batch
            "seed": mix64(combine(ad_key, combine(context_key[:, 0], context_key[:, 4]))) & 0x7FFFFFFF,
        }
        if labelled:
            arrays.update(_logged_layout(arrays, n, combination_width))
        batch = Batch(arrays, blocks, pool_width, combination_width, candidate_ids, group_names)
        if labelled:
            batch.add_distinct_rows()
        return batch
