"""What a snapshot learned, read from its own scores on a log of requests: ``genco report``'s component figures.

Two readings per component, side by side, because they answer different questions:

- **component importance** (genco's): how much choosing the model's best element rather than a uniformly
  drawn one raises the CTR the model predicts, σ(max_e p_e) − mean_e σ(p_e) over the component's considered
  candidates, averaged over the requests that have the component. It is in CTR units, so it says what
  choosing well in that component is worth to the model, pool size and all: a component whose candidates
  the model cannot tell apart scores 0, however heavily the MIL head weighs it.
- **MIL weights** (the paper's Figure 3): the softmax weight w_j(h, f) that the combination head gives each
  shown element when it pools the logged combination's features (``ServingModel.mil_weights``), averaged
  over the requests that have the component. A weight is a share of features, not of clicks: it says what
  the combination head looks at, not how much a choice there changes the CTR. The weights of a request sum
  to 1 over its components, so ``mil_weights_relative`` also gives them times the request's number of
  components: 1 is an equal share, whatever the number of components.

Both are given overall and for the ads with the most bags (``GROUPS``): a log carries no product category,
and an ad is the finest grouping in which the paper's category effects show (which components matter
differs between a phone's ad and a dress's).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from learner.features import Featurizer
from learner.serving import ServingModel

GROUPS = 8  # the ads with the most bags, each read on its own
BATCH = 1024


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _means(values: np.ndarray, component: np.ndarray, names: list[str], where: np.ndarray) -> dict[str, float]:
    """Mean of ``values`` per component (``component``: each row's index into ``names``) over rows ``where``."""
    count = np.bincount(component[where], minlength=len(names))
    total = np.bincount(component[where], weights=values[where], minlength=len(names))
    return {name: float(total[i] / count[i]) for i, name in enumerate(names) if count[i]}


def explain(model: ServingModel, featurizer: Featurizer, bags: Sequence) -> dict:
    """Component importance and MIL weights of ``model`` on ``bags`` (validated Bags of any policy's log: the
    MIL weights are those of each bag's shown combination), overall and for the ``GROUPS`` busiest ads."""
    ads = Counter(bag.ad_id for bag in bags)
    top = [ad for ad, _ in ads.most_common(GROUPS)]
    group_of = {ad: g for g, ad in enumerate(top)}
    names: dict[str, int] = {}
    parts: dict[str, list[np.ndarray]] = {"component": [], "group": [], "gain": [], "mil": [], "relative": []}
    for start in range(0, len(bags), BATCH):
        chunk = bags[start : start + BATCH]
        batch = featurizer.batch(list(chunk), labelled=True)
        enc = model.encode(batch)
        predicted = _sigmoid(batch.pool_grid(enc.element_logit).astype(np.float64))  # padding: σ(-inf) = 0
        size = batch.pools.size
        gain = predicted.max(1) - predicted.sum(1) / size
        pools = batch.pools
        parts["component"].append(np.array([names.setdefault(c, len(names)) for c in batch.component_names]))
        request_group = np.array([group_of.get(bag.ad_id, -1) for bag in chunk])
        parts["group"].append(request_group.take(pools.request))
        parts["gain"].append(gain)
        if model.config.mil:
            weight = model.mil_weights(batch, enc, pools.shown[None])[0]
            parts["mil"].append(weight)
            parts["relative"].append(weight * np.bincount(pools.request, minlength=batch.size).take(pools.request))
    columns = {key: np.concatenate(value) if value else None for key, value in parts.items()}
    component, group, order = columns["component"], columns["group"], list(names)
    everywhere = np.ones(len(component), dtype=bool)

    def reading(where: np.ndarray) -> dict:
        out = {"component_importance": _means(columns["gain"], component, order, where)}
        if columns["mil"] is not None:
            out["mil_weights"] = _means(columns["mil"], component, order, where)
            out["mil_weights_relative"] = _means(columns["relative"], component, order, where)
        return out

    overall = reading(everywhere)
    return {
        "component_importance": overall["component_importance"],
        "mil_weights": overall.get("mil_weights"),
        "mil_weights_relative": overall.get("mil_weights_relative"),
        "requests_with": {name: int(n) for name, n in zip(order, np.bincount(component, minlength=len(order)),
                                                             strict=True)},
        "by_ad": [{"ad_id": ad, "bags": ads[ad], **reading(group == g)} for g, ad in enumerate(top)],
    }
