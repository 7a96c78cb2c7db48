from __future__ import annotations

from collections.abc import Sequence

from river import linear_model, optim

from contract.events import Bag
from learner.baselines.base import Request, Selection


class ContextLogReg:
    """river's online logistic regression on each shown element crossed with the ad and with the request's age,
    gender and query segments (a request's segments weigh as one value).

    Why: the simple learner that sees context. Scores add up over components, so the best combination is each
    component's best candidate for this request.

    Examples
    --------
    Users of gender 0 click the bold title, those of gender 1 the plain one:

    >>> from contract.events import Bag, SelectionRequest
    >>> pool = {"title": ["plain", "bold"]}
    >>> bags = [Bag(impression_id=f"i{i}", ts=i, ad_id="shoe", candidates=pool,
    ...             user={"age": 30, "gender": i // 2 % 2},
    ...             shown={"title": pool["title"][i % 2]}, clicked=i % 4 in (1, 2)) for i in range(400)]
    >>> model = ContextLogReg()
    >>> model.learn(bags)
    >>> [model.select([SelectionRequest(request_id="r", ad_id="shoe", candidates=pool,
    ...                                 user={"age": 30, "gender": g})])[0] for g in (0, 1)]
    [{'title': 'bold'}, {'title': 'plain'}]
    """

    def __init__(self, lr: float = 0.05, l2: float = 0.0) -> None:
        self.model = linear_model.LogisticRegression(optimizer=optim.AdaGrad(lr), l2=l2)

    @staticmethod
    def _features(record: Request, component: str, element: str) -> dict[str, float]:
        e = f"{component}={element}"
        x = {e: 1.0, f"ad={record.ad_id}|{e}": 1.0}
        if record.user:
            x[f"age={record.user.age}|{e}"] = 1.0
            x[f"gender={record.user.gender}|{e}"] = 1.0
        if record.query and record.query.segments:
            for segment in record.query.segments:
                x[f"segment={segment}|{e}"] = 1.0 / len(record.query.segments)
        return x

    def learn(self, bags: list[Bag]) -> None:
        for bag in bags:
            x = {f"ad={bag.ad_id}": 1.0}
            for component, element in bag.shown.items():
                x.update(self._features(bag, component, element))
            self.model.learn_one(x, bag.clicked)

    def select(self, requests: Sequence[Request]) -> list[Selection]:
        score = self.model.predict_proba_one  # monotone in the candidate's own terms: the rest is shared
        return [
            {c: max(ids, key=lambda e, c=c, r=r: score(self._features(r, c, e))[True])
             for c, ids in r.candidates.items()}
            for r in requests
        ]
