"""What every baseline is: a :class:`Policy` that learns from bags and selects for requests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from contract.events import Bag, SelectionRequest

Request = SelectionRequest | Bag  # a bag carries every field of its request, so it can be served again
Selection = dict[str, str]


@runtime_checkable
class Policy(Protocol):
    """What the benchmark drives: incremental ``learn`` on bags, ``select`` on requests.

    ``learn`` takes a chronological mini-batch of bags and updates state incrementally; ``select`` returns one
    element per requested component, always one of that component's candidates, for components never seen
    before too.
    """

    def learn(self, bags: list[Bag]) -> None: ...

    def select(self, requests: Sequence[Request]) -> list[Selection]: ...
