"""Offline training input: a BAGS.jsonl file read as chronological, featurized mini-batches.

``file_batches`` parses and featurizes in a forked process while the caller trains, so
``genco train`` runs at the pace of the slower of the two rather than their sum. The
parser sends each batch (without the ids behind the pools, which training does not need)
through a queue a few batches deep, which keeps it ahead of the trainer without holding the
file in memory. The batch's arrays travel through shared memory: a few slots mapped before the
fork, each handed back to the parser when the trainer drops the batch that reads it, so a batch
costs one copy instead of a pickle, a pipe and an unpickle; the queue carries the rest, with
each array's place in the slot where the array was. The parser process runs without the cyclic
garbage collector: validation and featurisation make no reference cycles, and collections took a
large share of parse time (pausing it per batch still left some: the first collection after each
pause walked the whole batch).
"""

from __future__ import annotations

import gc
import mmap
import multiprocessing
import traceback
import weakref
from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice
from typing import IO, NamedTuple

import numpy as np
from river import stats

from contract.events import Bag
from contract.jsonl import BadLines, read_records
from learner.features import Batch, Featurizer

QUEUE_DEPTH = 4  # batches the parser may run ahead of the trainer
SLOTS = QUEUE_DEPTH + 2  # shared-memory slots: the queue's, the one being filled, the one being trained on
SLOT_BYTES = 64 << 20  # address space, of which a batch of 1,024 Table-1 bags touches a small part
_ALIGN = 64


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


def _parse_into(queue: multiprocessing.Queue, free: multiprocessing.SimpleQueue, slots: list[mmap.mmap],
                path: str, featurizer: Featurizer, lines_per_batch: int) -> None:
    """The parser process: every batch, then the bad-line tally (reported on stderr as found).

    A batch's arrays go into a free shared slot when there is one and they fit, else the batch is pickled
    through the queue (a caller holding on to its batches only makes the run slower)."""
    gc.disable()  # for good: this process only parses, and exits when the file ends
    bad = BadLines()
    try:
        with open(path, "rb") as lines:
            for batch in bag_batches(lines, featurizer, lines_per_batch, bad):
                batch = batch.without_ids()
                slot = None if free.empty() else free.get()  # the only reader of ``free``: no race
                placed = None if slot is None else _copy_into(slots[slot], batch)
                if placed is None:
                    if slot is not None:
                        free.put(slot)
                    queue.put(("batch", batch))
                else:
                    queue.put(("shared", (slot, placed)))
        queue.put(("done", (bad.count, bad.examples)))
    except BaseException:  # the trainer re-raises it; a parser that just died would leave it waiting
        queue.put(("error", traceback.format_exc()))


class Place(NamedTuple):
    """Where an array lies in a shared slot; a batch sent through a slot holds these instead of its arrays."""

    dtype: str
    shape: tuple[int, ...]
    offset: int  # in bytes


class _SlotFull(Exception):
    pass


def _copy_into(slot: mmap.mmap, batch: Batch) -> Batch | None:
    """Copy the batch's arrays into ``slot`` back to back (aligned): the batch with their places instead of
    them, or None when they do not fit."""
    offset = 0

    def place(array: np.ndarray) -> Place:
        nonlocal offset
        if offset + array.nbytes > len(slot):
            raise _SlotFull
        view = np.frombuffer(slot, dtype=array.dtype, count=array.size, offset=offset)
        view.reshape(array.shape)[...] = array
        placed = Place(array.dtype.str, array.shape, offset)
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
        return placed

    try:
        return batch.map_arrays(place)
    except _SlotFull:
        return None


def _read_from(slot: mmap.mmap, placed: Batch, release: Callable[[], None]) -> Batch:
    """The batch ``_copy_into`` placed, its arrays views of ``slot``; ``release`` runs once no view (or
    tensor) is left."""
    memory = np.frombuffer(slot, dtype=np.uint8)
    weakref.finalize(memory, release)

    def view(place: Place) -> np.ndarray:
        dtype = np.dtype(place.dtype)
        count = int(np.prod(place.shape, dtype=np.int64))
        return memory[place.offset : place.offset + count * dtype.itemsize].view(dtype).reshape(place.shape)

    return placed.map_arrays(view)


def file_batches(path: str, featurizer: Featurizer, lines_per_batch: int, bad: BadLines) -> Iterator[Batch]:
    """``bag_batches`` of the file at ``path``, parsed in a forked process ahead of the caller.

    Fork, not spawn: the child needs only what is already imported, and re-importing torch would
    cost seconds. The child runs no torch operation, so the parent's thread pools do not matter.
    """
    context = multiprocessing.get_context("fork")
    queue = context.Queue(maxsize=QUEUE_DEPTH)
    free = context.SimpleQueue()
    slots = [mmap.mmap(-1, SLOT_BYTES) for _ in range(SLOTS)]  # anonymous and shared: the fork inherits them
    for slot in range(SLOTS):
        free.put(slot)
    parser = context.Process(target=_parse_into, args=(queue, free, slots, path, featurizer, lines_per_batch),
                             daemon=True)
    parser.start()
    try:
        while True:
            kind, payload = queue.get()
            if kind == "batch":
                yield payload
            elif kind == "shared":
                slot, placed = payload
                yield _read_from(slots[slot], placed, partial(free.put, slot))
            elif kind == "done":
                bad.count, bad.examples = payload
                return
            else:
                raise RuntimeError(f"the parser process failed:\n{payload}")
    finally:
        if parser.is_alive():
            parser.kill()
        parser.join()


CURVE_POINTS = 200  # windows of a snapshot's learning curve: enough for a plot, small in a manifest


class ProgressiveLogLoss:
    """Log loss of each bag's prediction made before the step that learns from it, beside that of
    predicting the running mean CTR; per batch in numpy, weighted into river's running means. Each batch's
    figures are kept too (three numbers a batch), for the learning curve a snapshot carries (``curve``)."""

    def __init__(self) -> None:
        self.model, self.running_mean = stats.Mean(), stats.Mean()
        self.clicks = self.bags = 0
        self._batches: list[tuple[int, float, float]] = []  # (bags, model's mean loss, running mean's)

    def update(self, clicked: np.ndarray, predicted: np.ndarray) -> None:
        n = len(clicked)
        if not n:
            return
        seen = self.bags + np.arange(n)
        before = self.clicks + np.cumsum(clicked) - clicked
        mean = np.clip(np.divide(before, seen, out=np.zeros(n), where=seen > 0), 1e-6, 1 - 1e-6)
        model, running_mean = (float(_log_loss(clicked, np.clip(predicted, 1e-15, 1 - 1e-15)).mean()),
                               float(_log_loss(clicked, mean).mean()))
        self.model.update(model, w=n)
        self.running_mean.update(running_mean, w=n)
        self._batches.append((n, model, running_mean))
        self.clicks += float(clicked.sum())
        self.bags += n

    def curve(self, before: dict | None = None, bags_before: int = 0, points: int = CURVE_POINTS) -> dict:
        """The progressive log loss in at most ``points`` windows of about equal bags, as JSON lists: ``bags``,
        the bags learned by each window's end (counted from ``bags_before``), and each window's mean log loss,
        ``model`` and ``running_mean``. ``before``: the curve of the training this one resumes, which it
        continues (windows are merged two by two until they fit)."""
        series = {"bags": [], "model": [], "running_mean": []} if before is None else {
            key: list(before[key]) for key in ("bags", "model", "running_mean")}
        widths = np.diff([0, *series["bags"]]).tolist()
        end = bags_before
        for n, model, running_mean in self._batches:
            end += n
            widths.append(n)
            series["bags"].append(end)
            series["model"].append(model)
            series["running_mean"].append(running_mean)
        while len(widths) > points:  # merge neighbours: each window's mean weighted by its bags
            pairs = range(0, len(widths) - 1, 2)
            merged: dict[str, list] = {"bags": [], "model": [], "running_mean": []}
            new_widths = []
            for i in pairs:
                w = widths[i] + widths[i + 1]
                new_widths.append(w)
                merged["bags"].append(series["bags"][i + 1])
                for key in ("model", "running_mean"):
                    merged[key].append((series[key][i] * widths[i] + series[key][i + 1] * widths[i + 1]) / w)
            if len(widths) % 2:
                new_widths.append(widths[-1])
                for key in merged:
                    merged[key].append(series[key][-1])
            series, widths = merged, new_widths
        return {"bags": series["bags"], "model": [round(x, 6) for x in series["model"]],
                "running_mean": [round(x, 6) for x in series["running_mean"]]}


def _log_loss(clicked: np.ndarray, p: np.ndarray) -> np.ndarray:
    return -(clicked * np.log(p) + (1 - clicked) * np.log1p(-p))
