"""Snapshots as a chain of publications: the whole model now and then, and between, the rows that changed.

Why: selectors on other hosts get each new model over Kafka, and a whole model is ~100 MiB (19 MiB
compressed; hash tables of fixed size, docs/decisions.md "Snapshots over Kafka"). Sent whole every few
seconds, that would fill a broker by gigabytes an hour. A mini-batch touches a few thousand rows of those
tables, so a *delta* carries only the rows that differ from the version before; a *base* carries everything
and starts a new chain, so a selector that starts late reads one base and the deltas after it.

A publication is one safetensors file (tensors only, never pickled; the manifest is its JSON metadata),
compressed with zlib and checked by a SHA-256 of the compressed bytes. A delta names the version it applies
to; a replica that does not hold that version refuses it (``ChainBroken``) and waits for the next base.

>>> import numpy as np
>>> differ, replica = Differ(base_every=3), Replica()
>>> table = np.zeros((10_000, 8), dtype=np.float32)
>>> first = differ.publication({"table": table}, {"version": 1})
>>> first.manifest["kind"], replica.apply(decode(encode(first)))
('base', 1)
>>> table[7] = 1.0
>>> second = differ.publication({"table": table}, {"version": 2})
>>> second.manifest["kind"], second.tensors["table/rows"].tolist()
('delta', [7])
>>> replica.apply(decode(encode(second))), float(replica.weights["table"][7, 0])
(2, 1.0)
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass

import numpy as np

WHOLE_BELOW_BYTES = 1 << 16  # tensors smaller than this go whole: their rows are not worth indexing
BASE_EVERY = 60  # publications per chain: at one every 4 s, a base every 4 minutes (docs/decisions.md)


class PublicationError(ValueError):
    """A publication that does not decode or fails its checksum."""


class ChainBroken(PublicationError):
    """A delta for a version the replica does not hold: wait for the next base."""


@dataclass(frozen=True)
class Publication:
    """``manifest``: the snapshot's manifest plus ``kind`` ("base" or "delta"), ``shapes`` (every tensor's
    shape in this version: safetensors gives a scalar back with one dimension) and, for a delta, ``previous``
    (the version it applies to). ``tensors``: whole tensors by
    name; a delta's changed rows as ``NAME/rows`` (int64 row indices) and ``NAME/values``."""

    manifest: dict
    tensors: dict[str, np.ndarray]


def encode(publication: Publication) -> bytes:
    """The compressed safetensors bytes of a publication."""
    from safetensors.numpy import save

    metadata = {"genco": json.dumps(publication.manifest)}
    return zlib.compress(save({k: np.ascontiguousarray(v) for k, v in publication.tensors.items()},
                              metadata=metadata), 1)


def decode(blob: bytes) -> Publication:
    """The publication in ``blob``; ``PublicationError`` naming what is wrong when it is not one."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        raw = zlib.decompress(blob)
        tensors = load(raw)
        # the safetensors layout: an 8-byte little-endian header length, then the JSON header with the metadata
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        manifest = json.loads(header["__metadata__"]["genco"])
    except (zlib.error, SafetensorError, ValueError, KeyError, TypeError) as error:
        raise PublicationError(f"not a publication: {type(error).__name__}: {error}") from error
    return Publication(manifest, tensors)


def checksum(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class Differ:
    """The learner's side: each version as a base (every ``base_every``-th, and the first) or as a delta from
    the version published before it. Keeps a copy of what it last published to diff against."""

    def __init__(self, base_every: int = BASE_EVERY) -> None:
        self.base_every = base_every
        self.published: dict[str, np.ndarray] = {}
        self.version = 0
        self.chain_length = 0

    def publication(self, weights: dict[str, np.ndarray], manifest: dict) -> Publication:
        weights = {name: np.asarray(value) for name, value in weights.items()}
        shapes = {name: list(value.shape) for name, value in weights.items()}
        if not self.published or self.chain_length >= self.base_every:
            publication = Publication({**manifest, "kind": "base", "shapes": shapes}, dict(weights))
            self.chain_length = 1
        else:
            publication = Publication({**manifest, "kind": "delta", "previous": self.version, "shapes": shapes},
                                      self._changes(weights))
            self.chain_length += 1
        self.published = {name: value.copy() for name, value in weights.items()}
        self.version = manifest["version"]
        return publication

    def _changes(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        changes: dict[str, np.ndarray] = {}
        for name, new in weights.items():
            old = self.published.get(name)
            if old is None or new.nbytes < WHOLE_BELOW_BYTES or not _grows_along_rows(old, new):
                changes[name] = new
                continue
            kept = len(old)
            differs = (new[:kept].reshape(kept, -1) != old.reshape(kept, -1)).any(axis=1)
            rows = np.concatenate([np.flatnonzero(differs), np.arange(kept, len(new))]).astype(np.int64)
            if len(rows):
                changes[f"{name}/rows"], changes[f"{name}/values"] = rows, new[rows]
        return changes


def _grows_along_rows(old: np.ndarray, new: np.ndarray) -> bool:
    """True when ``new`` is ``old`` with rows changed or appended (same dtype and row shape, no fewer rows)."""
    return old.ndim == new.ndim >= 1 and old.dtype == new.dtype and old.shape[1:] == new.shape[1:] \
        and len(new) >= len(old)


class Replica:
    """The selector's side: the newest version applied, as whole tensors. A delta never writes into arrays
    already handed out (a serving model may hold them): each changed tensor is a new array."""

    def __init__(self) -> None:
        self.weights: dict[str, np.ndarray] = {}
        self.manifest: dict = {}

    @property
    def version(self) -> int:
        return self.manifest.get("version", 0)

    def apply(self, publication: Publication) -> int:
        """Apply ``publication``; the version now held. ``ChainBroken`` for a delta of another version."""
        manifest, tensors = publication.manifest, publication.tensors
        base = manifest.get("kind") == "base"
        if not base and (manifest.get("kind") != "delta" or manifest.get("previous") != self.version):
            raise ChainBroken(f"a {manifest.get('kind')} for v{manifest.get('previous')}, holding v{self.version}")
        weights = {}
        for name, shape in manifest["shapes"].items():
            if name in tensors:
                weights[name] = tensors[name].reshape(shape)
                continue
            old = self.weights[name]
            if f"{name}/rows" not in tensors:
                weights[name] = old
                continue
            new = np.zeros(shape, dtype=old.dtype)
            new[: len(old)] = old
            new[tensors[f"{name}/rows"]] = tensors[f"{name}/values"]
            weights[name] = new
        self.weights, self.manifest = weights, manifest
        return self.version
