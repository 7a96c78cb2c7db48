"""Small operations the learner is built from: one hash family, and gathers with cheap gradients.

Hashing: an id string becomes a 64-bit key once (``id_key``, BLAKE2b salted by the id's kind: stable
across processes and machines, unlike Python's ``hash``); everything derived from keys (table rows,
the keys of an element in an ad, of an element with a context value, of a pair) mixes them with
splitmix64's finaliser (``mix64``).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch


def id_key(kind: str, value: str) -> int:
    """The 64-bit key (signed) of an id of one kind (``"ad"``, ``"title"``, ``"segment"``...)."""
    digest = hashlib.blake2b(f"{len(kind)}:{kind}{value}".encode(), digest_size=8)  # the kind's length: no
    return int.from_bytes(digest.digest(), "little", signed=True)  # (kind, value) pair spells another


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U_GOLDEN, _U_MIX1, _U_MIX2 = (np.uint64(c) for c in (_GOLDEN, _MIX1, _MIX2))
_U_30, _U_27, _U_31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MASK = (1 << 64) - 1
_SHORT = 8  # keys up to which Python's ints mix faster than numpy, which pays ~1 µs an operation on any array


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of int64 keys: every output bit depends on every input bit. Products wrap, as intended.
    Run on an unsigned view, whose right shifts are logical already, in place: a third fewer calls, which is
    what a short array's hash costs; the shortest (a lone request's seed) in Python's ints. Snapshots hold
    tables hashed with it, so its outputs must never change (a test pins them, and holds both ways alike)."""
    x = np.asarray(x, dtype=np.int64).view(np.uint64)
    if x.size <= _SHORT:
        return np.array([_mix_int(v) for v in x.ravel().tolist()], dtype=np.uint64).reshape(x.shape).view(np.int64)
    x = x * _U_GOLDEN
    x ^= x >> _U_30
    x *= _U_MIX1
    x ^= x >> _U_27
    x *= _U_MIX2
    x ^= x >> _U_31
    return x.view(np.int64)


def _mix_int(x: int) -> int:
    """``mix64`` of one unsigned 64-bit key, in Python ints."""
    x = (x * _GOLDEN) & _MASK
    x ^= x >> 30
    x = (x * _MIX1) & _MASK
    x ^= x >> 27
    x = (x * _MIX2) & _MASK
    return x ^ (x >> 31)


def combine(a, b):
    """The key of an ordered pair of keys (an element in an ad, an element with a context value)."""
    return mix64(a ^ mix64(b))


def pair_key(a, b):
    """The key of an unordered pair of element keys: the wrapping sum of their mixes."""
    return mix64(a) + mix64(b)


@functools.cache
def upper_pairs(width: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.triu_indices(width, 1)``, read-only: every two of ``width`` slots, (i, j) with i < j. Kept per width,
    since building them costs more than a lone request's whole pair sum."""
    i, j = np.triu_indices(width, 1)
    i.flags.writeable = j.flags.writeable = False
    return i, j


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


class _GatherRows(torch.autograd.Function):
    """``weight[rows][inverse]`` whose gradient is sparse over the distinct ``rows``, already coalesced.

    nn.Embedding's sparse gradient has one row per lookup, and SparseAdam sorts it to coalesce; the
    featurizer already knows each batch's distinct rows, so the sort is not repeated.
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
    """``values[index]`` for an index of any shape, by ``index_select``, which is faster than advanced
    indexing forward and backward (an ``index_add``)."""
    return values.index_select(0, index.reshape(-1)).view(*index.shape, *values.shape[1:])
