"""Dead letters: why an input was refused, as a fixed reason code and a bounded text, and the letter itself.

Why a fixed set of reasons: the reason is a metric label and a word in ``genco status``.
Labels made from the input's own text (a component name, a field path) would let one
producer create unbounded metric series and write control characters into the
operator's terminal. The free text goes into the letter's ``error`` only, cut at
``MAX_ERROR_CHARS`` and with control characters escaped.

The contract's DeadLetter is extended (never changed): ``reason`` is the code, and
``last_offset`` closes the range when a whole batch was refused (``offset`` is its first).
"""

from __future__ import annotations

import json
from enum import StrEnum

MAX_RAW_CHARS = 64 << 10  # the contract's "original value, at most 64 KiB"
MAX_ERROR_CHARS = 1024

Message = tuple[str, bytes | None, bytes]  # (topic, key, value)


class Reason(StrEnum):
    """Why an input went to the dead-letter topic. The only values of the ``reason`` metric label."""

    NOT_UTF8 = "not_utf8"  # the value's bytes are not UTF-8
    NOT_JSON = "not_json"  # not a JSON document (or nested deeper than the parser's limit)
    INVALID = "invalid"  # JSON, but not the contract's message: a field missing, ill-typed or out of range
    TOO_LARGE = "too_large"  # the value is over the size genco reads
    OVER_CAP = "over_cap"  # valid, but more work than one message may ask for (docs/operations.md, "Caps")
    UNDECODABLE = "undecodable"  # a record batch the Kafka client cannot decode (codec, corruption)
    FAILED = "failed"  # the agent's code raised on this input, again when retried alone
    OUTPUT_REFUSED = "output_refused"  # what the agent made of it was refused by the broker (e.g. too large)


class InvalidInput(ValueError):
    """An input refused at the border; ``str()`` names the field at fault, ``reason`` says which kind of fault."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(bounded(message))
        self.reason = reason


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` with control characters escaped and cut to ``limit`` characters (marked with "…")."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def letter(dead_letters: str, topic: str, partition: int | None, offset: int | None, key: bytes | None, raw: bytes,
           reason: Reason, error: str, last_offset: int | None = None) -> Message:
    """The DeadLetter for input at ``topic``/``partition``/``offset`` (through ``last_offset``), keyed like it; an
    output that was refused has no partition or offset."""
    text = raw[:MAX_RAW_CHARS].decode("utf-8", errors="backslashreplace")[:MAX_RAW_CHARS]
    value = {"topic": topic, "partition": partition, "offset": offset, "error": bounded(error), "raw": text,
             "reason": str(reason)}
    if last_offset is not None:
        value["last_offset"] = last_offset
    return dead_letters, key, json.dumps(value).encode()
