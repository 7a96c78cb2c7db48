from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contract.events import Bag
from learner.baselines.base import Request, Selection


class Uniform:
    """Uniform random element per component: the logging policy, i.e. zero captured value.

    Why: the floor any learner must beat, and the policy that gathers the logs the others learn from.

    Examples
    --------
    >>> from contract.events import SelectionRequest
    >>> request = SelectionRequest(request_id="r", ad_id="shoe",
    ...                            candidates={"title": ["plain", "bold", "new"], "image": ["red", "blue"]})
    >>> policy = Uniform(seed=1)
    >>> policy.select([request, request])
    [{'title': 'bold', 'image': 'blue'}, {'title': 'new', 'image': 'blue'}]
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def learn(self, bags: list[Bag]) -> None:
        """Nothing to learn."""

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        return [
            {c: ids[int(self.rng.integers(len(ids)))] for c, ids in r.candidates.items()} for r in requests
        ]
