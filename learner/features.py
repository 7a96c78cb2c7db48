"""Turn requests and bags into the arrays (and tensors) the GenCO model reads.

Keys and rows: every id becomes a 64-bit key of its kind (user, age, gender, ad,
query, query segment, or the component of an element; ``ops.id_key``). The count
priors index those keys collision-free; the embeddings take a key's low bits as its
row in the kind's own row range of one table, so a single gather serves every kind.
Components outside the paper's six share one element range, keyed by the component
name, so an unseen component is served rather than rejected.

Layout: elements are ragged, not padded to 6 x 15. A *pool* is one (request, component)
list of candidates; each element knows its pool, its position in the pool and its
position in the request. With Table-1 pools most of a dense 6 x 15 grid would be padding.
A :class:`Batch` holds one dataclass per axis (requests, segments, pools, elements,
crosses) and the layouts built on them (attention, the logged combination, distinct rows);
each field's comment says what it holds and its length.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import torch

from learner.ops import combine, id_key, mix64, pair_key, upper_pairs

PAPER_COMPONENTS = ("title", "image", "marketing", "highlight", "attribute", "structure_attribute")
CONTEXT_KINDS = ("user", "age", "gender", "ad", "query")


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
_USER, _AGE, _GENDER, _AD, _QUERY = (CONTEXT_KINDS.index(kind) for kind in ("user", "age", "gender", "ad", "query"))

Array = TypeVar("Array", np.ndarray, torch.Tensor)  # an axis's arrays: numpy, or torch tensors sharing their memory
_NOT_AN_ARRAY = {"array": False}  # metadata of an axis's fields that ``_Axis.map`` leaves as they are


class _Axis(Generic[Array]):
    """The arrays of one axis of a batch (or of one layout built on the axes), one dataclass field each."""

    def map(self, fn: Callable) -> _Axis:
        """The same axis with ``fn`` applied to each of its arrays: torch views, shared-memory copies."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if f.metadata.get("array", True)})

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self) if f.metadata.get("array", True))


@dataclass
class Requests(_Axis[Array]):
    """Per request (B)."""

    context: Array  # (B, 5) rows of its user, age, gender, ad and query in the context table
    context_key: Array  # (B, 5) their keys
    segment_offsets: Array  # (B,) where its query segments start (into S)
    segment_count: Array  # (B,) how many query segments it has
    pool_stats: Array  # (B, 7) float: log(1 + candidates) of each paper component, then of the others together
    clicked: Array  # (B,) float: its label; zeros when unlabelled
    seed: Array  # (B,) stable per request (ad, user, query), so that sampling does not depend on the batch

    @property
    def ad_key(self) -> Array:
        """(B,) its ad's key."""
        return self.context_key[:, _AD]


@dataclass
class Segments(_Axis[Array]):
    """Per query segment (S): each request's in turn."""

    row: Array  # (S,) context-table row
    key: Array  # (S,)
    request: Array  # (S,) its request (into B)


@dataclass
class Pools(_Axis[Array]):
    """Per pool (G), one (request, component): each request's in turn, in the order of its candidates."""

    request: Array  # (G,) its request (into B)
    slot: Array  # (G,) its position among its request's pools
    cell: Array  # (G,) its cell in the (B, combination_width) grid of combinations: request * width + slot
    component: Array  # (G,) component-table row
    size: Array  # (G,) candidates considered (at most the featurizer's ``max_candidates``)
    start: Array  # (G,) its first element (into L)
    shown: Array  # (G,) the logged element (into L), or -1 (always, when unlabelled)


@dataclass
class Elements(_Axis[Array]):
    """Per candidate element (L): each pool's in turn."""

    row: Array  # (L,) element-table row
    key: Array  # (L,) its key (which includes its component)
    cell_key: Array  # (L,) the key of the element in its request's ad
    pool: Array  # (L,) its pool (into G)
    request: Array  # (L,) its request (into B)
    component: Array  # (L,) component-table row
    pos: Array  # (L,) its position in its pool
    slot: Array  # (L,) its position among its request's elements
    pool_cell: Array  # (L,) its cell in the (G, pool_width) grid of pools: pool * width + pos


class AttentionBlock(NamedTuple):
    """Requests of similar size attended together: ``rows`` requests padded to ``width`` elements."""

    start: int  # first position of the block in the padded (sum rows * width) element buffer
    mask_start: int  # first position of its (rows, width, width) score bias in ``Attention.bias``
    rows: int
    width: int


@dataclass
class Attention(_Axis[Array]):
    """Where cross-component attention reads and writes: blocks of requests of similar size, each padded to
    its widest, one after another in a buffer. Requests that share an earlier request's pools (pool sharing)
    are not attended again: their elements read that request's outputs."""

    attended: Array  # (N,) the elements attended (into L): those of requests that listed their own pools
    attended_cell: Array  # (N,) their cells in the padded buffer
    element_cell: Array  # (L,) each element's output cell in the padded buffer (its twin's, in a shared request)
    bias: Array  # float: every block's (rows, width, width) score bias, flattened: -inf where not attended
    blocks: list[AttentionBlock] = field(metadata=_NOT_AN_ARRAY)


@dataclass
class Crosses(_Axis[Array]):
    """Per (element, context value) cross (C): each element with its request's age, with its gender, and with
    each of its query segments; what the context prior counts."""

    element: Array  # (C,) the element (into L)
    key: Array  # (C,) the key of the element with the value
    weight: Array  # (C,) float: 1 for age and gender, 1 / segments for a segment (a request's count as one)


@dataclass
class Logged(_Axis[Array]):
    """The logged combinations (labelled batches only), laid out in the parser process so that the trainer
    filters nothing."""

    element: Array  # (N,) the shown elements (into L), request by request
    request: Array  # (N,) their requests
    cross: Array  # (X,) the shown elements' crosses (into C)
    cross_request: Array  # (X,) their requests
    pair_first: Array  # (P,) every two shown elements of one request (what the pair prior counts): the first
    pair_second: Array  # (P,) and the second (both into L)
    pair_key: Array  # (P,) the pair's key


@dataclass
class DistinctRows(_Axis[Array]):
    """Each embedding table's distinct rows in the batch, the layout of its sparse gradient (training only)."""

    element_rows: Array  # element-table rows, sorted
    element_inverse: Array  # (L,) each element's index among them
    context_rows: Array  # context-table rows of the requests' context and segments, sorted
    context_inverse: Array  # (5B + S,) each context row's index among them, then each segment row's

    @classmethod
    def of(cls, requests: Requests[np.ndarray], segments: Segments[np.ndarray],
           elements: Elements[np.ndarray]) -> DistinctRows[np.ndarray]:
        element_rows, element_inverse = np.unique(elements.row, return_inverse=True)
        looked_up = np.concatenate([requests.context.ravel(), segments.row])
        context_rows, context_inverse = np.unique(looked_up, return_inverse=True)
        return cls(element_rows, element_inverse.ravel(), context_rows, context_inverse.ravel())


@dataclass
class BatchTensors:
    """The parts of a batch the model reads, as torch tensors (``Batch.tensors``)."""

    requests: Requests[torch.Tensor]
    segments: Segments[torch.Tensor]
    pools: Pools[torch.Tensor]
    elements: Elements[torch.Tensor]
    attention: Attention[torch.Tensor]
    logged: Logged[torch.Tensor] | None
    distinct: DistinctRows[torch.Tensor]


@dataclass
class Batch:
    """A mini-batch of requests (and, for training, their shown combination and label), as numpy arrays.

    Besides the ids' rows it carries every index layout the model reads (attention blocks, pool grid,
    combination grid, each table's distinct rows), computed here so that neither training nor serving
    spends tensor operations on bookkeeping, and so a parser process can compute them.
    """

    requests: Requests[np.ndarray]
    segments: Segments[np.ndarray]
    pools: Pools[np.ndarray]
    elements: Elements[np.ndarray]
    attention: Attention[np.ndarray]
    crosses: Crosses[np.ndarray]
    logged: Logged[np.ndarray] | None  # labelled batches only
    pool_width: int  # the widest pool
    combination_width: int  # the most pools in one request
    distinct: DistinctRows[np.ndarray] | None = None  # training only: ``add_distinct_rows``
    candidate_ids: list[list[str]] = field(default_factory=list)  # (G) the ids behind each pool (selection)
    component_names: list[str] = field(default_factory=list)  # (G) component name of each pool (selection)

    @cached_property
    def tensors(self) -> BatchTensors:
        """The parts the model reads as torch tensors sharing their arrays' memory, made on first use:
        serving never pays for them."""
        self.add_distinct_rows()
        tensor = torch.from_numpy
        return BatchTensors(self.requests.map(tensor), self.segments.map(tensor), self.pools.map(tensor),
                            self.elements.map(tensor), self.attention.map(tensor),
                            None if self.logged is None else self.logged.map(tensor), self.distinct.map(tensor))

    def add_distinct_rows(self) -> None:
        """Each table's distinct rows, the layout of the embeddings' sparse gradient (training only)."""
        if self.distinct is None:
            self.distinct = DistinctRows.of(self.requests, self.segments, self.elements)

    def without_ids(self) -> Batch:
        """The same batch without the ids behind its pools: all training needs, and cheap to send."""
        return replace(self, candidate_ids=[], component_names=[])

    def map_arrays(self, fn: Callable) -> Batch:
        """The same batch with ``fn`` applied to every array of every part (``offline`` sends the arrays
        through shared memory with it)."""
        return replace(self, **{f.name: part.map(fn) for f in fields(self)
                                if isinstance(part := getattr(self, f.name), _Axis)})

    @property
    def size(self) -> int:
        return len(self.requests.seed)

    @property
    def nbytes(self) -> int:
        """Bytes of the batch's arrays (not of the ids behind its pools)."""
        return sum(part.nbytes for f in fields(self) if isinstance(part := getattr(self, f.name), _Axis))

    def request_pools(self) -> list[range]:
        """The pools of each request."""
        first = np.flatnonzero(self.pools.slot == 0).tolist()
        return [range(a, b) for a, b in itertools.pairwise([*first, len(self.pools.slot)])]

    def pool_grid(self, element_values: np.ndarray) -> np.ndarray:
        """(G, widest pool) grid of per-element values, one row per pool, -inf on padding."""
        shape = (len(self.pools.size), self.pool_width)
        grid = np.full(shape[0] * shape[1], -np.inf, dtype=element_values.dtype)
        grid[self.elements.pool_cell] = element_values
        return grid.reshape(shape)


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


@dataclass
class _Listing:
    """What featurisation looks up id by id, in Python; every layout is derived from it with numpy. Flat
    lists and where each request's part starts, not objects per request: allocating those woke the cyclic
    garbage collector far more often."""

    context: list[int] = field(default_factory=list)  # per request: its user, age, gender, ad and query keys
    segment_at: list[int] = field(default_factory=list)  # per request: where its segments start in ``segments``
    pool_at: list[int] = field(default_factory=list)  # per request: where its pools start
    pool_count: list[int] = field(default_factory=list)  # per request: how many pools it has
    element_at: list[int] = field(default_factory=list)  # per request: where its pools' elements start
    twin: list[int] = field(default_factory=list)  # per request: the earlier one whose pools it shares, else itself
    segments: list[int] = field(default_factory=list)  # per segment: its key
    pool_size: list[int] = field(default_factory=list)  # per pool: candidates considered
    shown: list[int] = field(default_factory=list)  # per pool: the logged element's position in it, else -1
    candidate_ids: list[list[str]] = field(default_factory=list)  # per pool: the ids considered
    component_names: list[str] = field(default_factory=list)  # per pool
    elements: list[int] = field(default_factory=list)  # per element: its key


class _PoolSharing:
    """Pool sharing: the impressions of one ad mostly share its pools, so each set of pools is listed once a
    batch. A request whose candidates equal those of the last request of its ad that listed its own copies
    that request's part of the listing (``copy``); attention depends on a request's pools alone, so it reads
    that request's outputs too (``_attention_layout``)."""

    def __init__(self, records: list, labelled: bool) -> None:
        self.records, self.labelled = records, labelled
        self.listed: dict[str, int] = {}  # ad id -> the last request that listed its pools plainly

    def copy(self, listing: _Listing, record) -> bool:
        """List ``record``'s pools as a copy of an earlier request's; False when none has the same."""
        twin = self.listed.get(record.ad_id)
        if twin is None or self.records[twin].candidates != record.candidates:
            return False
        count = listing.pool_count[twin]
        pools = slice(listing.pool_at[twin], listing.pool_at[twin] + count)
        if self.labelled:
            positions = list(map(_position, listing.candidate_ids[pools],
                                 map(record.shown.get, listing.component_names[pools])))
            if None in positions:  # a logged element the copy lacks: the request lists its pools itself
                return False
        else:
            positions = [-1] * count
        listing.shown.extend(positions)
        listing.elements.extend(listing.elements[listing.element_at[twin] : listing.element_at[twin + 1]])
        listing.pool_size.extend(listing.pool_size[pools])
        listing.candidate_ids.extend(listing.candidate_ids[pools])
        listing.component_names.extend(listing.component_names[pools])
        listing.twin.append(twin)
        return True

    def listed_plainly(self, request: int, record) -> None:
        """``request`` listed its pools as they are: later requests of its ad may copy them."""
        self.listed[record.ad_id] = request


class Featurizer:
    """Maps contract records to a :class:`Batch`; pure function of its sizes and cap."""

    def __init__(self, sizes: HashSizes | None = None, max_candidates: int = 15) -> None:
        self.sizes = sizes or HashSizes()
        self.max_candidates = max_candidates
        offsets = self.sizes.context_offsets()
        self._context_offset = np.array([offsets[kind] for kind in CONTEXT_KINDS], dtype=np.int64)
        self._context_mask = np.array([getattr(self.sizes, kind) - 1 for kind in CONTEXT_KINDS], dtype=np.int64)
        self._segment_offset, self._segment_mask = offsets["segment"], self.sizes.segment - 1
        self._context = {kind: _Keys(kind) for kind in (*CONTEXT_KINDS, "segment")}
        self._elements: dict[str, _Keys] = {}
        self._components: dict[str, int] = {}

    def _element_keys(self, component: str) -> _Keys:
        table = self._elements.get(component)
        if table is None:
            if len(self._elements) >= 4096:  # component names are open strings: bound them too
                self._elements.clear()
            table = self._elements[component] = _Keys(component)
        return table

    def _component(self, component: str) -> int:
        """The component-table row of a component name: the paper's six in order, the others hashed into the
        rows after them."""
        found = self._components.get(component)
        if found is None:
            if len(self._components) >= 4096:
                self._components.clear()
            if component in PAPER_COMPONENTS:
                found = PAPER_COMPONENTS.index(component)
            else:
                spare = self.sizes.component - len(PAPER_COMPONENTS)
                found = len(PAPER_COMPONENTS) + id_key("component", component) % spare
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
        return int(self.element_rows(key, np.array([self._component(component)]))[0])

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

        The listing (``_list``) is the one Python loop: it collects only what needs a per-id lookup. Every
        layout is then derived from it with numpy, which keeps featurisation off the training path.
        """
        listing = self._list(records, labelled)
        clicked = [1.0 if r.clicked else 0.0 for r in records] if labelled else [0.0] * len(records)
        pools, combination_width = self._pool_layout(listing)
        requests = self._request_layout(listing, _pool_stats(pools, len(records)), clicked)
        segments = self._segment_layout(listing, requests)
        elements, pool_width = self._element_layout(listing, pools, requests)
        crosses = _context_crosses(requests, segments, elements)
        logged = _logged_layout(pools, elements, crosses, len(records), combination_width) if labelled else None
        batch = Batch(requests, segments, pools, elements, _attention_layout(listing, elements), crosses, logged,
                      pool_width, combination_width, candidate_ids=listing.candidate_ids,
                      component_names=listing.component_names)
        if labelled:
            batch.add_distinct_rows()
        return batch

    def with_request(self, template: Batch, record) -> Batch:
        """A one-request batch for ``record`` from ``template``, a one-request unlabelled batch of the same ad
        and candidates: the pools and every layout on them are the template's, the context the record's."""
        listing = _Listing()
        self._list_context(listing, record)
        requests = self._request_layout(listing, template.requests.pool_stats, [0.0])
        segments = self._segment_layout(listing, requests)
        return replace(template, requests=requests, segments=segments,
                       crosses=_context_crosses(requests, segments, template.elements))

    # -- the listing ----------------------------------------------------------------------------
    def _list(self, records: list, labelled: bool) -> _Listing:
        """Every request's context and segment keys, and its pools' ids and elements' keys: listed by the
        request, or copied from an earlier request with the same pools (``_PoolSharing``)."""
        listing = _Listing()
        pool_at, pool_count, element_at = listing.pool_at, listing.pool_count, listing.element_at
        pool_size, elements, twin = listing.pool_size, listing.elements, listing.twin
        list_context = self._list_context
        sharing = _PoolSharing(records, labelled)
        for r, record in enumerate(records):
            list_context(listing, record)
            pool_at.append(len(pool_size))
            element_at.append(len(elements))
            pool_count.append(len(record.candidates))
            if sharing.copy(listing, record):
                continue
            if self._list_pools(listing, record, labelled):
                sharing.listed_plainly(r, record)
            twin.append(r)
        return listing

    def _list_context(self, listing: _Listing, record) -> None:
        """A request's context keys, and its query segments' keys with where they start."""
        listing.context.extend(self.context_keys(record))
        listing.segment_at.append(len(listing.segments))
        if record.query:
            listing.segments.extend(map(self._context["segment"].__getitem__, record.query.segments))

    def _list_pools(self, listing: _Listing, record, labelled: bool) -> bool:
        """List a request's pools, each cut to ``max_candidates``. False when a logged element past the cut
        took a pool's last place (to keep it trainable): pools no other request has."""
        cap, tables, new_table = self.max_candidates, self._elements, self._element_keys
        shown, elements, pool_size = listing.shown, listing.elements, listing.pool_size
        candidate_ids, component_names = listing.candidate_ids, listing.component_names
        plain = True
        for component, ids in record.candidates.items():
            considered = ids if len(ids) <= cap else ids[:cap]
            position = _position(considered, record.shown.get(component) if labelled else None)
            if position is None:  # keep the logged element trainable
                considered, position = [*considered[: cap - 1], record.shown[component]], cap - 1
                plain = False
            shown.append(position)
            elements.extend(map((tables.get(component) or new_table(component)).__getitem__, considered))
            pool_size.append(len(considered))
            candidate_ids.append(considered)
            component_names.append(component)
        return plain

    # -- the layouts ----------------------------------------------------------------------------
    def _pool_layout(self, listing: _Listing) -> tuple[Pools[np.ndarray], int]:
        """The combination grid: each pool's request, its slot there and its cell in the (B, most pools)
        grid; and the grid's width."""
        size = np.asarray(listing.pool_size, dtype=np.int64)
        count = np.asarray(listing.pool_count, dtype=np.int64)
        request = np.repeat(np.arange(len(count)), count)
        slot = np.arange(len(size)) - np.asarray(listing.pool_at, dtype=np.int64)[request]
        start = np.cumsum(size) - size
        shown = np.asarray(listing.shown, dtype=np.int64)
        width = int(count.max())
        component = np.asarray(list(map(self._component, listing.component_names)), dtype=np.int64)
        return Pools(request, slot, request * width + slot, component, size, start,
                     np.where(shown >= 0, start + shown, -1)), width

    def _request_layout(self, listing: _Listing, pool_stats: np.ndarray, clicked: list[float],
                        ) -> Requests[np.ndarray]:
        """Each request's context rows and keys, where its segments lie, its ``pool_stats`` and its seed."""
        context_key = np.asarray(listing.context, dtype=np.int64).reshape(-1, len(CONTEXT_KINDS))
        segment_offsets = np.asarray(listing.segment_at, dtype=np.int64)
        ad_key = context_key[:, _AD]
        return Requests(
            context=self._context_offset + (context_key & self._context_mask),
            context_key=context_key,
            segment_offsets=segment_offsets,
            segment_count=np.diff(np.append(segment_offsets, len(listing.segments))),
            pool_stats=pool_stats,
            clicked=np.asarray(clicked, dtype=np.float32),
            seed=mix64(combine(ad_key, combine(context_key[:, _USER], context_key[:, _QUERY]))) & 0x7FFFFFFF,
        )

    def _segment_layout(self, listing: _Listing, requests: Requests[np.ndarray]) -> Segments[np.ndarray]:
        key = np.asarray(listing.segments, dtype=np.int64)
        request = np.repeat(np.arange(len(requests.segment_count)), requests.segment_count)
        return Segments(self._segment_offset + (key & self._segment_mask), key, request)

    def _element_layout(self, listing: _Listing, pools: Pools[np.ndarray], requests: Requests[np.ndarray],
                  ) -> tuple[Elements[np.ndarray], int]:
        """The pool grid: each element's pool, request and position in both, its cell in the (G, widest
        pool) grid; its rows and keys. And the grid's width."""
        key = np.asarray(listing.elements, dtype=np.int64)
        pool = np.repeat(np.arange(len(pools.size)), pools.size)
        request = pools.request[pool]
        index = np.arange(len(key))
        pos = index - pools.start[pool]
        component = pools.component[pool]
        width = int(pools.size.max())
        return Elements(
            row=self.element_rows(key, component),
            key=key,
            cell_key=combine(key, requests.ad_key[request]),
            pool=pool,
            request=request,
            component=component,
            pos=pos,
            slot=index - np.asarray(listing.element_at, dtype=np.int64)[request],
            pool_cell=pool * width + pos,
        ), width


def _pool_stats(pools: Pools[np.ndarray], n: int) -> np.ndarray:
    """(n, 7) float: log(1 + candidates) of each of the n requests' paper components, then of the others together."""
    columns = len(PAPER_COMPONENTS) + 1  # the components beyond the paper's six share the last
    column = np.minimum(pools.component, len(PAPER_COMPONENTS))
    stats = np.bincount(pools.request * columns + column, weights=pools.size, minlength=n * columns)
    return np.log1p(stats.reshape(n, columns).astype(np.float32))


def _attention_layout(listing: _Listing, elements: Elements[np.ndarray]) -> Attention[np.ndarray]:
    """Attention for the requests with pools of their own (pool sharing's second half): a request that copied
    an earlier request's pools (its ``twin``) reads that request's outputs instead of being attended again
    (a batch of many impressions of few ads attends about one request per ad)."""
    twin = np.asarray(listing.twin, dtype=np.int64)
    first_element = np.asarray(listing.element_at, dtype=np.int64)
    own = twin == np.arange(len(twin))
    attended = np.flatnonzero(own[elements.request])
    renumbered = np.cumsum(own) - 1
    cell, bias, blocks = _padded_blocks(renumbered[elements.request[attended]], elements.slot[attended],
                                        elements.pool[attended], int(own.sum()))
    cell_of = np.empty(len(elements.request), dtype=np.int64)
    cell_of[attended] = cell
    element_cell = cell_of[first_element[twin[elements.request]] + elements.slot]
    return Attention(attended, cell, element_cell, bias, blocks)


def _padded_blocks(element_request: np.ndarray, element_slot: np.ndarray, element_pool: np.ndarray,
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
    pool = np.full(cell_start, -1, dtype=np.int64)
    pool[cell] = element_pool
    bias = np.zeros(mask_start, dtype=np.float32)
    for block in blocks:
        g = pool[block.start : block.start + block.rows * block.width].reshape(block.rows, block.width)
        blocked = ((g[:, None, :] == g[:, :, None]) & ~np.eye(block.width, dtype=bool)) | (g < 0)[:, None, :]
        scores = bias[block.mask_start : block.mask_start + block.rows * block.width**2].reshape(blocked.shape)
        np.copyto(scores, np.float32(-np.inf), where=blocked)
    return cell, bias, blocks


def _context_crosses(requests: Requests[np.ndarray], segments: Segments[np.ndarray],
                     elements: Elements[np.ndarray]) -> Crosses[np.ndarray]:
    """Every element paired with its request's age, gender and each query segment."""
    n_elements = np.bincount(elements.request, minlength=len(requests.context_key))
    first_element = np.cumsum(n_elements) - n_elements
    per_segment = n_elements[segments.request]  # a segment crosses every element of its request
    starts = np.repeat(np.cumsum(per_segment) - per_segment, per_segment)
    segment_element = np.repeat(first_element[segments.request], per_segment) + np.arange(len(starts)) - starts
    every = np.arange(len(elements.key))
    element = np.concatenate([every, every, segment_element])
    context_key = requests.context_key
    value = np.concatenate([context_key[elements.request, _AGE], context_key[elements.request, _GENDER],
                            np.repeat(segments.key, per_segment)])
    weight = np.concatenate([np.ones(2 * len(elements.key)),
                             np.repeat(1 / requests.segment_count[segments.request], per_segment)])
    return Crosses(element, combine(elements.key[element], value), weight)


def _logged_layout(pools: Pools[np.ndarray], elements: Elements[np.ndarray], crosses: Crosses[np.ndarray],
                   n: int, width: int) -> Logged[np.ndarray]:
    """Where the logged combination sits: its elements and their requests, the context-prior crosses of those
    elements and their requests, and every two elements of one request's combination (what the pair prior
    counts). ``n`` requests, at most ``width`` pools in one."""
    shown = pools.shown
    logged = shown >= 0
    element = shown[logged]
    is_shown = np.zeros(len(elements.row), dtype=bool)
    is_shown[element] = True
    cross = np.flatnonzero(is_shown[crosses.element])
    dense = np.full(n * width, -1, dtype=np.int64)
    dense[pools.cell] = shown
    dense = dense.reshape(n, width)
    i, j = upper_pairs(width)
    first, second = dense[:, i], dense[:, j]
    both = (first >= 0) & (second >= 0)
    first, second = first[both], second[both]
    return Logged(element, pools.request[logged], cross, elements.request[crosses.element[cross]], first, second,
                  pair_key(elements.key[first], elements.key[second]))
