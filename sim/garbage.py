"""Broken messages of every kind the contract says genco must survive, for the closed loop and tests.

``corrupt`` turns a good request, impression or click into a broken copy with one
known fault. Ids are prefixed ``bad-`` so a broken message never shares an id with
good traffic, and the result says whether the selector can still read its
request_id (it then owes an error response as well as a dead letter).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

BIG_VALUE_BYTES = 5_000_000

COMMON = ("malformed_json", "not_utf8", "not_an_object", "missing_field", "wrong_type", "id_too_long", "nan_ts")
WITH_CANDIDATES = ("no_components", "empty_candidates", "too_many_candidates", "repeated_candidate")
FAULTS = {
    "request": COMMON + WITH_CANDIDATES,
    "impression": COMMON + WITH_CANDIDATES + ("shown_not_a_candidate",),
    "click": COMMON,
}
ID_FIELD = {"request": "request_id", "impression": "impression_id", "click": "impression_id"}


@dataclass(frozen=True)
class Garbage:
    fault: str
    raw: bytes
    request_id: str | None  # a request's id that is still readable, so an error response is due


def corrupt(kind: str, message: dict, rng: random.Random, fault: str | None = None) -> Garbage:
    """A broken copy of ``message`` (a ``kind``: request, impression or click) with ``fault`` (random if None)."""
    fault = fault or rng.choice(FAULTS[kind])
    id_field = ID_FIELD[kind]
    bad = {**json.loads(json.dumps(message)), id_field: f"bad-{message[id_field]}"}
    readable = kind == "request"
    first = next(iter(bad.get("candidates", {})), None)
    if fault == "malformed_json":
        text = json.dumps(bad)
        return Garbage(fault, text[: rng.randrange(1, len(text) - 1)].encode(), None)
    if fault == "not_utf8":
        return Garbage(fault, b"\xff\xfe" + json.dumps(bad).encode(), None)
    if fault == "not_an_object":
        return Garbage(fault, json.dumps([bad]).encode(), None)
    if fault == "missing_field":
        del bad["ad_id" if kind != "click" else "ts"]
    elif fault == "wrong_type":
        if kind == "request":
            bad["candidates"] = ",".join(bad["candidates"][first])
        else:
            bad["ts"] = "soon"
    elif fault == "id_too_long":
        if kind == "click":
            bad[id_field] = "bad-" + "x" * 300
        else:
            bad["ad_id"] = "a" * 257
    elif fault == "nan_ts":
        bad["ts"] = float("nan")
    elif fault == "no_components":
        bad["candidates"] = {}
    elif fault == "empty_candidates":
        bad["candidates"][first] = []
    elif fault == "too_many_candidates":
        bad["candidates"][first] = [f"e{i}" for i in range(1001)]
    elif fault == "repeated_candidate":
        bad["candidates"][first] = bad["candidates"][first] * 2
    elif fault == "shown_not_a_candidate":
        bad["shown"][first] = "not-a-candidate"
    elif fault == "big_value":  # 5 MB that is invalid too (a big valid message is not garbage)
        bad["padding"] = "x" * BIG_VALUE_BYTES
        del bad["ts" if kind == "click" else "candidates"]
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return Garbage(fault, json.dumps(bad).encode(), bad[id_field] if readable else None)
