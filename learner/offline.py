"""Offline training from a BAGS.jsonl file, in file order.

Parsing, validation and featurisation run in a worker process while the main
process trains on the previous batch, so the two halves of the work overlap
on two cores. Batches come back in file order: training stays chronological.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import IO

from genco.jsonl import parse_line
from learner.features import Batch, Featurizer, HashSizes
from stream.events import Bag

_featurizer: Featurizer | None = None


def _init(sizes: HashSizes, max_candidates: int) -> None:
    global _featurizer
    import torch

    torch.set_num_threads(1)
    _featurizer = Featurizer(sizes, max_candidates)


def _parse_chunk(chunk: tuple[int, list[bytes]]) -> tuple[Batch | None, list[tuple[int, str]]]:
    first_line, lines = chunk
    bags, bad = [], []
    for lineno, raw in enumerate(lines, first_line):
        if not raw.strip():
            continue
        try:
            bags.append(parse_line(raw, Bag))
        except ValueError as error:
            bad.append((lineno, str(error)))
    assert _featurizer is not None
    return (_featurizer.batch(bags, labelled=True) if bags else None), bad


def _chunks(lines: IO[bytes], size: int) -> Iterator[tuple[int, list[bytes]]]:
    lineno = 1
    while chunk := list(islice(lines, size)):
        yield lineno, chunk
        lineno += len(chunk)


def bag_batches(lines: IO[bytes], featurizer: Featurizer, lines_per_batch: int,
                workers: int = 1) -> Iterator[tuple[Batch | None, list[tuple[int, str]]]]:
    """(featurized batch, [(line number, error)]) per ``lines_per_batch`` lines, in file order.

    A batch can hold fewer bags than lines when some lines are bad; the streaming learner and
    the paper's schedule only need batches to be chronological, not exactly full.
    """
    args = (featurizer.sizes, featurizer.max_candidates)
    if workers <= 0:
        _init(*args)
        yield from map(_parse_chunk, _chunks(lines, lines_per_batch))
        return
    context = multiprocessing.get_context("forkserver")
    with context.Pool(workers, initializer=_init, initargs=args) as pool:
        in_flight: deque = deque()  # bounded, so a fast reader never queues the whole file in memory
        for chunk in _chunks(lines, lines_per_batch):
            in_flight.append(pool.apply_async(_parse_chunk, (chunk,)))
            if len(in_flight) > 2 * workers + 1:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()
