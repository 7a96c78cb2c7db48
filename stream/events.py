"""The contract's JSON messages (../shared/interface.md) as pydantic models.

Every message that enters genco passes through one of these models, so a bad
value is rejected at the border with an error that names the field at fault.
Unknown fields are ignored, as the contract says.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_ID_CHARS = 256
MAX_CANDIDATES = 1000

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
Timestamp = Annotated[float, Field(allow_inf_nan=False)]  # a NaN or infinite ts would never close a window


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class User(_Message):
    id: Id | None = None
    age: int | None = None
    gender: int | None = None


class Query(_Message):
    id: Id | None = None
    segments: list[Id] = Field(default_factory=list, max_length=MAX_CANDIDATES)


Candidates = Annotated[
    dict[Id, Annotated[list[Id], Field(min_length=1, max_length=MAX_CANDIDATES)]],
    Field(min_length=1, max_length=64),
]


def _check_distinct(candidates: dict[str, list[str]]) -> None:
    for component, elements in candidates.items():
        if len(set(elements)) != len(elements):
            raise ValueError(f"candidates.{component} has repeated element ids")


def _check_shown(shown: dict[str, str], candidates: dict[str, list[str]]) -> None:
    for component, element in shown.items():
        if component not in candidates:
            raise ValueError(f"shown.{component} is not a component of candidates")
        if element not in candidates[component]:
            raise ValueError(f"shown.{component} {element!r} is not among candidates.{component}")


class SelectionRequest(_Message):
    request_id: Id
    ad_id: Id
    candidates: Candidates
    ts: Timestamp | None = None
    user: User | None = None
    query: Query | None = None

    @model_validator(mode="after")
    def _distinct(self) -> SelectionRequest:
        _check_distinct(self.candidates)
        return self


class SelectionResponse(_Message):
    request_id: str
    ad_id: str
    shown: dict[str, str]
    policy: str
    propensity: float | None
    model_version: int
    ts: float


class Impression(_Message):
    impression_id: Id
    ts: Timestamp
    ad_id: Id
    candidates: Candidates
    shown: dict[Id, Id] = Field(min_length=1)
    user: User | None = None
    query: Query | None = None
    request_id: Id | None = None
    policy: str | None = None
    propensity: float | None = None

    @model_validator(mode="after")
    def _shown_among_candidates(self) -> Impression:
        _check_distinct(self.candidates)
        _check_shown(self.shown, self.candidates)
        return self


class Click(_Message):
    impression_id: Id
    ts: Timestamp


class Bag(Impression):
    """An impression with its click label: one line of BAGS.jsonl, one value on the bags topic."""

    clicked: bool
    click_ts: Timestamp | None = None


class DeadLetter(_Message):
    topic: str
    partition: int | None = None
    offset: int | None = None
    error: str
    raw: str


def describe_error(error: ValidationError) -> str:
    """One line naming each field at fault, e.g. ``candidates.image: List should have at least 1 item``."""
    parts = []
    for item in error.errors(include_url=False):
        where = ".".join(str(p) for p in item["loc"]) or "value"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(message if message.startswith(("shown.", "candidates.")) else f"{where}: {message}")
    return "; ".join(parts)
