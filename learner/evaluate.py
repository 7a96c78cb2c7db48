"""Calibrated sCTR, the paper's Algorithm 1, on a log gathered by a uniform random policy.

For each logged bag r and component j the policy's pick is compared with the
element actually shown; on a match the bag counts n_{r,j} exposures and
n_{r,j}·y_r clicks (n_{r,j}: the component's candidate count). Under uniform
logging a match happens with probability 1/n_{r,j}, so the weighting makes
clicks/exposures an unbiased estimate of the CTR the policy's component choice
would get. "pooled" adds all components' exposures and clicks; "combination"
matches the whole combination with weight Π_j n_{r,j} (the exact IPS value of
the full policy, higher variance). The uniform policy's value is its
expectation: every bag counts once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Selection = dict[str, str]


def _ratio(clicks: float, exposures: float) -> float | None:
    return clicks / exposures if exposures else None


def calibrated_sctr(bags: Sequence, selections: Sequence[Selection]) -> dict:
    """Algorithm 1 per component, pooled and for whole combinations, beside the uniform policy."""
    exposure: dict[str, float] = {}
    clicks: dict[str, float] = {}
    uniform_exposure: dict[str, float] = {}
    uniform_clicks: dict[str, float] = {}
    combo_exposure = combo_clicks = 0.0
    for bag, selection in zip(bags, selections, strict=True):
        y = 1.0 if bag.clicked else 0.0
        all_match = True
        for component, element in bag.shown.items():
            n = len(bag.candidates[component])
            uniform_exposure[component] = uniform_exposure.get(component, 0.0) + 1.0
            uniform_clicks[component] = uniform_clicks.get(component, 0.0) + y
            if selection.get(component) == element:
                exposure[component] = exposure.get(component, 0.0) + n
                clicks[component] = clicks.get(component, 0.0) + n * y
            else:
                all_match = False
        if all_match:
            weight = math.prod(len(bag.candidates[c]) for c in bag.shown)
            combo_exposure += weight
            combo_clicks += weight * y
    components = sorted(uniform_exposure)
    total = len(bags)
    return {
        "bags": total,
        "policy": {
            "per_component": {c: _ratio(clicks.get(c, 0.0), exposure.get(c, 0.0)) for c in components},
            "pooled": _ratio(sum(clicks.values()), sum(exposure.values())),
            "combination": _ratio(combo_clicks, combo_exposure),
        },
        "uniform": {
            "per_component": {c: _ratio(uniform_clicks[c], uniform_exposure[c]) for c in components},
            "pooled": _ratio(sum(uniform_clicks.values()), sum(uniform_exposure.values())),
            "combination": _ratio(sum(1.0 for b in bags if b.clicked), total),
        },
        "exposures": {c: exposure.get(c, 0.0) for c in components},
    }
