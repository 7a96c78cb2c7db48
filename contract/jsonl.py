"""Read contract records from JSON lines, reporting and skipping the bad ones.

A bad line never stops a run: it is reported on stderr with its line number and
the field at fault, counted, and skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from pydantic import BaseModel, TypeAdapter, ValidationError

from contract.deadletters import InvalidInput, Reason
from contract.events import describe_error, error_kind

MAX_LINE_BYTES = 5 << 20
_ANY_JSON = TypeAdapter(object)


@dataclass
class BadLines:
    """Counts bad lines and tells the operator about each (up to ``report_limit`` of them)."""

    report_limit: int = 100
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, lineno: int, error: str, out: IO[str] | None = None) -> None:
        self.count += 1
        message = f"line {lineno}: {error}"
        if len(self.examples) < 5:
            self.examples.append(message)
        if self.count <= self.report_limit:
            print(message, file=out or sys.stderr)
        elif self.count == self.report_limit + 1:
            print("further bad lines are counted, not shown", file=out or sys.stderr)


def parse_line(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """Validate one line; raises InvalidInput (a ValueError) naming the field at fault and the kind of fault."""
    if len(raw) > MAX_LINE_BYTES:
        raise InvalidInput(Reason.TOO_LARGE, f"line of {len(raw)} bytes exceeds the {MAX_LINE_BYTES}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInput(Reason.NOT_UTF8, f"not UTF-8 at byte {error.start}") from None
    try:
        return model.model_validate_json(text)
    except ValidationError as error:
        raise InvalidInput(Reason(error_kind(error)), describe_error(error)) from None


def read_records(lines: Iterable[bytes], model: type[BaseModel], bad: BadLines,
                 first_line: int = 1) -> Iterator[tuple[int, BaseModel]]:
    """Yield (line number, record) for each valid non-blank line; report the rest to ``bad``."""
    for lineno, raw in enumerate(lines, first_line):
        if not raw.strip():
            continue
        try:
            yield lineno, parse_line(raw, model)
        except ValueError as error:
            bad.add(lineno, str(error))


def readable_request_id(raw: bytes) -> str | None:
    """The request_id of a line that failed validation, when it can still be read.

    pydantic's JSON parser, not ``json.loads``: it stops at a fixed nesting depth with an error
    where ``json.loads`` raises RecursionError (1,100 ``[`` are enough), and the line is parsed
    the same way as for validation.
    """
    if len(raw) > MAX_LINE_BYTES:
        return None
    try:
        value = _ANY_JSON.validate_json(raw)
    except ValidationError:
        return None
    request_id = value.get("request_id") if isinstance(value, dict) else None
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= 256 else None
