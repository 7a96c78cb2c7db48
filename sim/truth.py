"""What every simulated world with exact truth gives a benchmark: selections scored by their true CTR.

A world provides ``values(request)`` (the uniform policy's and the oracle's true CTR, and the oracle's
combination) and ``click_probability(request, shown)``; ``KnownTruth`` turns them into the figures
every benchmark reports, so that the worlds of sim/world.py and sim/zoo.py are scored alike.
"""

from __future__ import annotations

import numpy as np


class KnownTruth:
    """``score`` for a world that knows each request's true CTRs."""

    def __init__(self) -> None:
        # values() remembered per request id: several policies are scored on one request set; a world
        # that reissues an id drops its entry
        self._value_cache: dict[str, tuple[float, float]] = {}

    def values(self, request: dict) -> tuple[float, float, dict[str, str]]:
        raise NotImplementedError

    def click_probability(self, request: dict, shown: dict[str, str]) -> float:
        raise NotImplementedError

    def ctr_grid(self, request: dict) -> np.ndarray:
        """The true CTR of every combination of the request's candidates, one axis per component (in the
        order of ``request["candidates"]``): worlds that can enumerate them (sim/zoo.py) give it."""
        raise NotImplementedError

    def true_sctr(self, requests: list[dict], selections: dict[str, list[dict[str, str]]]) -> dict[str, dict]:
        """What calibrated sCTR (Algorithm 1, ``learner.evaluate``) estimates, exactly, for each policy's
        ``selections`` of ``requests`` (policy -> one selection per request), laid out as ``calibrated_sctr``
        lays out its estimate: ``policy``, per component the mean true CTR when the policy chooses that
        component and every other is drawn uniformly, pooled the same over every (request, component), and for
        the whole combination the mean true CTR of the selection; ``uniform``, the same for the uniform policy.
        Each request's grid is enumerated once for every policy."""
        sums: dict[str, dict[str, float]] = {name: {} for name in selections}
        counts: dict[str, int] = {}
        uniform: dict[str, float] = {}
        uniform_whole = 0.0
        combination = dict.fromkeys(selections, 0.0)
        for i, request in enumerate(requests):
            grid, candidates = self.ctr_grid(request), request["candidates"]
            axes = tuple(range(grid.ndim))
            # each candidate's true CTR with the other components drawn uniformly: once for every policy
            marginals = [grid.mean(axis=axes[:j] + axes[j + 1 :]).tolist() for j in axes]
            index = {c: {e: k for k, e in enumerate(ids)} for c, ids in candidates.items()}
            mean = float(grid.mean())
            uniform_whole += mean
            for component in candidates:
                counts[component] = counts.get(component, 0) + 1
                uniform[component] = uniform.get(component, 0.0) + mean
            for name, chosen in selections.items():
                picks = tuple(index[c][chosen[i][c]] for c in candidates)
                combination[name] += float(grid[picks])
                for component, pick, marginal in zip(candidates, picks, marginals, strict=True):
                    sums[name][component] = sums[name].get(component, 0.0) + marginal[pick]

        def figures(total: dict[str, float], whole: float) -> dict:
            return {"per_component": {c: total[c] / counts[c] for c in sorted(counts)},
                    "pooled": sum(total.values()) / sum(counts.values()), "combination": whole / len(requests)}

        exact_uniform = figures(uniform, uniform_whole)
        return {name: {"policy": figures(sums[name], combination[name]), "uniform": exact_uniform}
                for name in selections}

    def _uniform_and_oracle(self, request: dict) -> tuple[float, float]:
        key = request["request_id"]
        if key not in self._value_cache:
            self._value_cache[key] = self.values(request)[:2]
        return self._value_cache[key]

    def true_ctr(self, requests: list[dict], selections: list[dict[str, str]]) -> np.ndarray:
        """Each selection's true CTR: what paired comparisons of two policies on one request set read."""
        return np.array([self.click_probability(r, s) for r, s in zip(requests, selections, strict=True)])

    def score(self, requests: list[dict], selections: list[dict[str, str]]) -> dict[str, float]:
        """True CTR of the selections beside the uniform policy and the oracle."""
        return self.summarise(requests, self.true_ctr(requests, selections))

    def summarise(self, requests: list[dict], policy: np.ndarray) -> dict[str, float]:
        """``score`` from the selections' ``true_ctr``."""
        uniform, oracle = np.array([self._uniform_and_oracle(r) for r in requests]).T
        gap = oracle.mean() - uniform.mean()
        return {
            "ctr": float(policy.mean()),
            "uniform_ctr": float(uniform.mean()),
            "oracle_ctr": float(oracle.mean()),
            "lift": float(policy.mean() / uniform.mean() - 1),
            "captured": float((policy.mean() - uniform.mean()) / gap) if gap > 0 else 0.0,
        }


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
