"""The contract's JSON messages (docs/contract.md) as pydantic models.

Every message that enters genco passes through one of these models, so a bad
value is rejected at the border with an error that names the field at fault.
Unknown fields are ignored, as the contract says.

Work per message (docs/operations.md, "Caps"): the model scores the first ``CONSIDERED``
candidates of each component (the paper pads pools to 15), so a request's cost grows with
those, not with the contract's up to 1,000 per component: attention with their square,
context crosses with query segments x them. A message may ask for at most
``MAX_SEGMENT_CROSSES`` segments x considered candidates; ``work_cells`` bounds its cost, and
batches are cut by it (``BATCH_WORK_CELLS``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

MAX_ID_CHARS = 256
MAX_CANDIDATES = 1000
MAX_COMPONENTS = 64
CONSIDERED = 15  # candidates of a component the model scores: the first ones, in the order given
MAX_SEGMENT_CROSSES = 20_000  # query segments x considered candidates
# A batch (of selection requests or of bags for one training step) holds at most this many work
# cells, except a single message over it, which goes alone: it bounds a batch's model memory whatever
# its requests (docs/operations.md, "Caps on work per message").
BATCH_WORK_CELLS = 4_000_000

# How far ahead of genco's clock an event's ts is believed (a producer's clock may be off by this much);
# further ahead, state that expires by event time takes now + FUTURE_GRACE_S instead (stream.join, learner).
FUTURE_GRACE_S = 300.0

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
    Field(min_length=1, max_length=MAX_COMPONENTS),
]


def considered(candidates: dict[str, list[str]]) -> int:
    """How many candidates the model scores: at most ``CONSIDERED`` a component (a logged element beyond
    them takes the last place)."""
    return sum(min(len(ids), CONSIDERED) for ids in candidates.values())


def work_cells(candidates: dict[str, list[str]], query: Query | None) -> int:
    """An upper bound of the model's cells for one message: attention (considered candidates squared),
    context crosses (them x (segments + age + gender)) and the candidates themselves."""
    total = considered(candidates)
    segments = len(query.segments) if query else 0
    return total * total + total * (segments + 3)


def work_batches(messages: list, budget: int = BATCH_WORK_CELLS) -> list[list]:
    """``messages`` (with a ``work_cells``) in order, cut into batches of at most ``budget`` cells each; a
    message over the budget by itself makes a batch of its own."""
    batches: list[list] = []
    cells = budget + 1
    for message in messages:
        cost = message.work_cells
        if cells + cost > budget:
            batches.append([])
            cells = 0
        batches[-1].append(message)
        cells += cost
    return batches


def _check_caps(candidates: dict[str, list[str]], query: Query | None) -> None:
    crosses = considered(candidates) * (len(query.segments) if query else 0)
    if crosses > MAX_SEGMENT_CROSSES:
        raise PydanticCustomError("over_cap", "query.segments x considered candidates: {crosses}, over the cap "
                                  "of {cap}", {"crosses": crosses, "cap": MAX_SEGMENT_CROSSES})


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
        _check_caps(self.candidates, self.query)
        return self

    @property
    def work_cells(self) -> int:
        return work_cells(self.candidates, self.query)


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
        _check_caps(self.candidates, self.query)
        return self

    @property
    def work_cells(self) -> int:
        return work_cells(self.candidates, self.query)


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
    reason: str | None = None  # extension: one of contract.deadletters.Reason
    last_offset: int | None = None  # extension: a refused batch's last offset (``offset`` is its first)


def describe_error(error: ValidationError, most: int = 8) -> str:
    """One line naming each field at fault (the first ``most`` of them), e.g. ``candidates.image: List should
    have at least 1 item``. A message can break thousands of rules at once; its description stays short."""
    parts = []
    for item in error.errors(include_url=False)[:most]:
        where = ".".join(str(p)[:64] for p in item["loc"]) or "value"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(message if message.startswith(("shown.", "candidates", "query.")) else f"{where}: {message}")
    if error.error_count() > most:
        parts.append(f"and {error.error_count() - most} more")
    return "; ".join(parts)


def error_kind(error: ValidationError) -> str:
    """``not_json``, ``over_cap`` or ``invalid``: the dead-letter reason of a validation error."""
    kinds = {item["type"] for item in error.errors(include_url=False)}
    if "json_invalid" in kinds:
        return "not_json"
    return "over_cap" if kinds == {"over_cap"} else "invalid"
