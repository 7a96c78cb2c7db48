"""Offline training input: a BAGS.jsonl file read as chronological, featurized mini-batches.

``file_batches`` parses and featurizes in a forked process while the caller trains, so
``genco train`` runs at the pace of the slower of the two rather than their sum. The
parser sends each batch as the numpy arrays of its layout (the ids behind the pools are
not needed to train) through a queue a few batches deep, which keeps it ahead of the
trainer without holding the file in memory. The parser process runs without the cyclic
garbage collector: validation and featurisation make no reference cycles, and collections
cost ~40% of parse time (pausing it per batch still left ~10%: the first collection after
each pause walked the whole batch).
"""

from __future__ import annotations

import gc
import multiprocessing
import traceback
from collections.abc import Iterator
from itertools import islice
from typing import IO

import numpy as np
from river import stats

from genco.jsonl import BadLines, read_records
from learner.features import Batch, Featurizer
from stream.events import Bag

QUEUE_DEPTH = 4  # batches the parser may run ahead of the trainer


def bag_batches(lines: IO[bytes], featurizer: Featurizer, lines_per_batch: int, bad: BadLines) -> Iterator[Batch]:
    """One featurized batch per ``lines_per_batch`` lines, in file order; bad lines go to ``bad``.

    A batch holds fewer bags than lines when some lines are bad: training only needs batches
    to be chronological, not exactly full.
    """
    lineno = 1
    while chunk := list(islice(lines, lines_per_batch)):
        bags = [bag for _, bag in read_records(chunk, Bag, bad, first_line=lineno)]
        batch = featurizer.batch(bags, labelled=True) if bags else None
        lineno += len(chunk)
        if batch is not None:
            yield batch


def _parse_into(queue: multiprocessing.Queue, path: str, featurizer: Featurizer, lines_per_batch: int) -> None:
    """The parser process: every batch's arrays, then the bad-line tally (reported on stderr as found)."""
    gc.disable()  # for good: this process only parses, and exits when the file ends
    bad = BadLines()
    try:
        with open(path, "rb") as lines:
            for batch in bag_batches(lines, featurizer, lines_per_batch, bad):
                queue.put(("batch", batch.without_ids()))
        queue.put(("done", (bad.count, bad.examples)))
    except BaseException:  # the trainer re-raises it; a parser that just died would leave it waiting
        queue.put(("error", traceback.format_exc()))


def file_batches(path: str, featurizer: Featurizer, lines_per_batch: int, bad: BadLines) -> Iterator[Batch]:
    """``bag_batches`` of the file at ``path``, parsed in a forked process ahead of the caller.

    Fork, not spawn: the child needs only what is already imported, and re-importing torch would
    cost seconds. The child runs no torch operation, so the parent's thread pools do not matter.
    """
    context = multiprocessing.get_context("fork")
    queue = context.Queue(maxsize=QUEUE_DEPTH)
    parser = context.Process(target=_parse_into, args=(queue, path, featurizer, lines_per_batch), daemon=True)
    parser.start()
    try:
        while True:
            kind, payload = queue.get()
            if kind == "batch":
                yield payload
            elif kind == "done":
                bad.count, bad.examples = payload
                return
            else:
                raise RuntimeError(f"the parser process failed:\n{payload}")
    finally:
        if parser.is_alive():
            parser.kill()
        parser.join()


class ProgressiveLogLoss:
    """Log loss of each bag's prediction made before the step that learns from it, beside that of
    predicting the running mean CTR; per batch in numpy, weighted into river's running means."""

    def __init__(self) -> None:
        self.model, self.running_mean = stats.Mean(), stats.Mean()
        self.clicks = self.bags = 0

    def update(self, clicked: np.ndarray, predicted: np.ndarray) -> None:
        n = len(clicked)
        if not n:
            return
        seen = self.bags + np.arange(n)
        before = self.clicks + np.cumsum(clicked) - clicked
        mean = np.clip(np.divide(before, seen, out=np.zeros(n), where=seen > 0), 1e-6, 1 - 1e-6)
        self.model.update(float(_log_loss(clicked, np.clip(predicted, 1e-15, 1 - 1e-15)).mean()), w=n)
        self.running_mean.update(float(_log_loss(clicked, mean).mean()), w=n)
        self.clicks += float(clicked.sum())
        self.bags += n


def _log_loss(clicked: np.ndarray, p: np.ndarray) -> np.ndarray:
    return -(clicked * np.log(p) + (1 - clicked) * np.log1p(-p))
