"""Policies scored two ways on one simulated world: what a user can measure, and what it stands for.

- calibrated sCTR (the paper's Algorithm 1, ``learner.evaluate``) on a uniform-random log, as
  ``genco evaluate`` computes it from clicks;
- the exact expectation of the same quantity from the world's truth (``KnownTruth.true_sctr``): per
  component, the true CTR when the policy picks that component and the others are drawn uniformly.

If sCTR means anything, the two rank policies alike (``spearman``); tests/test_sctr_truth.py checks it and
benchmarks/paper_tables.py reports it beside the paper's tables. ``genco_selections`` serves one log with
many GenCO models, featurizing it once, in three ways (``MODES``): as served, the element head alone and
the combination head alone (the paper's Table 2 rows "f_ele" and "f_comb").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from learner.evaluate import calibrated_sctr
from learner.features import Batch, Featurizer
from learner.model import GenCO
from learner.policy import answers, choose, hashed_uniform
from learner.serving import ServingModel
from sim.truth import KnownTruth

Selection = dict[str, str]
BATCH = 1024
K = 16  # combinations a request's choice weighs, as genco serves
# served: the policy genco serves (generator samples, scored by the combination head); f_ele: the element
# head's greedy pick in each component; f_comb: the combination head over K uniformly drawn combinations
MODES = ("served", "f_ele", "f_comb")


def combination_head_choice(model: ServingModel, batch: Batch, k: int = K) -> np.ndarray:
    """(G,) positions: the best of ``k`` uniformly drawn combinations by the combination head alone, with no
    generator to propose them (hashed per request, sample and pool, so a request draws the same in any batch)."""
    enc = model.encode(batch)
    pools = batch.pools
    key = (batch.requests.seed.take(pools.request) * 1_000_003 + pools.slot)[None] + np.arange(k)[:, None] * 92_821
    drawn = np.minimum((hashed_uniform(key) * pools.size).astype(np.int64), pools.size - 1)  # (k, G)
    best = model.combination_logit(batch, enc, pools.start + drawn).argmax(0)  # (B,)
    return drawn[best.take(pools.request), np.arange(drawn.shape[1])]


def genco_selections(models: Mapping[str, GenCO], records: Sequence, mode: Mapping[str, str] | None = None,
                     ) -> dict[str, list[Selection]]:
    """Each model's selection for every record (requests or bags), ``mode[name]`` (default "served") saying
    how it chooses; the records are featurized once for all models, which share the featurizer's settings."""
    mode = mode or {}
    serving = {name: ServingModel(model) for name, model in models.items()}
    first = next(iter(models.values())).config
    featurizer = Featurizer(first.sizes, first.max_candidates)
    out: dict[str, list[Selection]] = {name: [] for name in models}
    for start in range(0, len(records), BATCH):
        batch = featurizer.batch(list(records[start : start + BATCH]))
        for name, model in serving.items():
            how = mode.get(name, "served")
            if how == "f_comb":
                picks = combination_head_choice(model, batch)
            else:
                picks = choose(model, batch, 1 if how == "f_ele" else K)
            out[name] += answers(batch, picks.tolist())
    return out


def score(world: KnownTruth, log: Sequence[dict], bags: Sequence, selections: Mapping[str, list[Selection]],
          ) -> dict[str, dict]:
    """Per policy: ``sctr``, calibrated sCTR on the uniform-random ``bags`` (validated; ``log``: the same bags
    as the world wrote them), and ``true``, its exact expectation on the same requests."""
    truth = world.true_sctr(list(log), dict(selections))
    return {name: {"sctr": calibrated_sctr(bags, chosen), "true": truth[name]} for name, chosen in selections.items()}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (no ties expected between continuous estimates)."""
    ranks = [np.argsort(np.argsort(np.asarray(x, dtype=float))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])
