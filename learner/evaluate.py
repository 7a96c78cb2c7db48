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

import numpy as np

from learner.model import GenCO
from learner.policy import Selector
from learner.serving import readouts

Selection = dict[str, str]


def _ratio(clicks: float, exposures: float) -> float | None:
    return clicks / exposures if exposures else None


def exposure(bag, selection: Selection) -> float:
    """A bag's exposures pooled over components: Σ_j n_{r,j} over the components where the policy's pick is the
    shown element; its clicks are this times y_r. What ``calibrated_sctr``'s pooled figure sums, bag by bag."""
    return float(sum(len(bag.candidates[c]) for c, element in bag.shown.items() if selection.get(c) == element))


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


def snapshot_sctr(model: GenCO, serving: str, bags: Sequence, k: int = 16, threads: int = 1,
                  ) -> tuple[dict, dict[str, list[Selection]]]:
    """What ``genco evaluate`` reports of a snapshot's model on a uniform-random log: Algorithm 1 of the readout
    that serves (``serving``, as ``genco select`` answers), with ``serving`` and every readout's figures
    (``readouts``: {readout: its ``policy`` figures}) beside it; and each readout's selections."""
    selections = {name: Selector(model, k, threads=threads, readout=name).select(list(bags))
                  for name in readouts(model.config)}
    each = {name: calibrated_sctr(bags, chosen) for name, chosen in selections.items()}
    result = each[serving]
    result["serving"] = serving
    result["readouts"] = {name: sctr["policy"] for name, sctr in each.items()}
    return result, selections


# The paper's Table 4 brackets of candidate counts, as (low, high) inclusive: [<3, 3-5, >5] for title, image and
# marketing; [<4, 4-8, >8] for the others.
PAPER_BRACKETS: dict[str, tuple[tuple[int, int], ...]] = {
    **dict.fromkeys(("title", "image", "marketing"), ((1, 2), (3, 5), (6, 1000))),
    **dict.fromkeys(("highlight", "attribute", "structure_attribute"), ((1, 3), (4, 8), (9, 1000))),
}
MIN_BUCKET_BAGS = 200  # a bracket with fewer bags says nothing: the component's counts are split in tertiles instead


def _bracket_name(low: int, high: int) -> str:
    if low == high:
        return str(low)
    if low <= 1:
        return f"<{high + 1}"
    return f">{low - 1}" if high >= 1000 else f"{low}-{high}"


def brackets(component: str, counts: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """The candidate-count brackets of ``component`` (``counts``: its candidate count in each bag): the paper's
    where each holds at least ``MIN_BUCKET_BAGS`` bags, else tertiles of the counts (fewer where they tie)."""
    paper = PAPER_BRACKETS.get(component)
    if paper and all(sum(low <= n <= high for n in counts) >= MIN_BUCKET_BAGS for low, high in paper):
        return paper
    edges = sorted({int(q) for q in np.quantile(np.asarray(counts), [1 / 3, 2 / 3])} | {max(counts)})
    out, low = [], min(counts)
    for edge in edges:
        if edge >= low:
            out.append((low, edge))
            low = edge + 1
    return tuple(out)


def sctr_by_candidates(bags: Sequence, selections: Sequence[Selection]) -> list[dict]:
    """Algorithm 1 per component within brackets of its candidate count (the paper's Table 4): each bucket's bags,
    the policy's calibrated sCTR (with its standard error, delta method), the uniform policy's and the lift."""
    rows: dict[str, list[tuple[int, bool, bool]]] = {}  # component -> (candidates, matched, clicked) per bag
    for bag, selection in zip(bags, selections, strict=True):
        for component, element in bag.shown.items():
            rows.setdefault(component, []).append(
                (len(bag.candidates[component]), selection.get(component) == element, bool(bag.clicked)))
    buckets = []
    for component in sorted(rows):
        n, matched, clicked = (np.array(column) for column in zip(*rows[component], strict=True))
        for low, high in brackets(component, n.tolist()):
            inside = (n >= low) & (n <= high)
            weight = np.where(matched & inside, n, 0).astype(float)
            y = clicked.astype(float)
            exposure = weight.sum()
            policy = float(weight @ y / exposure) if exposure else None
            uniform = float(y[inside].mean()) if inside.any() else None
            se = float(np.sqrt(((weight * (y - policy)) ** 2).sum()) / exposure) if exposure else None
            buckets.append({"component": component, "candidates": _bracket_name(low, high), "low": low,
                            "high": high, "bags": int(inside.sum()), "matched": int((matched & inside).sum()),
                            "policy": policy, "policy_se": se, "uniform": uniform,
                            "lift": policy / uniform - 1 if policy is not None and uniform else None})
    return buckets
