"""Unit checks of the priors' empirical-Bayes arithmetic (learner/priors.py)."""

from __future__ import annotations

import numpy as np

from learner.priors import between_variance


def _measured_rows(rng: np.random.Generator, spread: float, information: np.ndarray) -> np.ndarray:
    """Σ excess of rows whose true log-odds effects have variance ``spread``: effect × information plus
    the Bernoulli noise a row of that information carries."""
    effect = rng.normal(0.0, np.sqrt(spread), information.size)
    return effect * information + rng.normal(0.0, np.sqrt(information))


def test_between_variance_recovers_the_spread_of_true_effects():
    rng = np.random.default_rng(0)
    information = rng.uniform(5.0, 50.0, 4000)
    excess = _measured_rows(rng, 0.04, information)
    assert abs(between_variance(excess, information, 0.0) - 0.04) < 0.006


def test_between_variance_ignores_rows_measured_too_thinly_to_count():
    # Thin rows measured against an ad CTR still mostly its prior look alike whatever their effects;
    # counted, they would pull the spread towards zero and shrink every row to its parent.
    rng = np.random.default_rng(1)
    information = np.concatenate([rng.uniform(5.0, 50.0, 2000), np.full(20_000, 0.5)])
    excess = np.concatenate([_measured_rows(rng, 0.04, information[:2000]), np.zeros(20_000)])
    assert abs(between_variance(excess, information, 0.0) - 0.04) < 0.008


def test_between_variance_keeps_its_default_until_the_rows_hold_enough_information():
    information = np.full(10, 3.0)
    assert between_variance(np.ones(10), information, 0.0, default=0.123) == 0.123


def _greedy_log(ads: int = 100, per_ad: int = 100, seed: int = 0) -> list:
    """Bags of ads that each show their first title 95% of the time, as greedy serving with 5% explored does;
    the titles are alike and the ads' CTRs spread as product appeal does (log-odds sd 0.6)."""
    from contract.events import Bag

    rng = np.random.default_rng(seed)
    appeal = rng.normal(-3.0, 0.6, ads)
    pools = [{"title": [f"t{a}-served", f"t{a}-rare"]} for a in range(ads)]
    return [Bag(impression_id=f"{t}-{a}", ts=t, ad_id=f"ad{a}", candidates=pools[a],
                shown={"title": pools[a]["title"][int(rng.random() < 0.05)]},
                clicked=bool(rng.random() < 1 / (1 + np.exp(-appeal[a]))))
            for t in range(per_ad) for a in range(ads)]


def test_spreads_stay_at_their_minimum_where_greedy_traffic_shows_none():
    # Each ad's served title sets the ad's CTR, so its excess is ~0 and the rows show no spread: the moments
    # fall to the floor, where an unshown title could never be believed better. The minimum holds instead.
    from learner.trainer import Learner, preset

    bags = _greedy_log()
    spreads = {}
    for minimum in ((0.0, 0.0), (0.1, 0.1)):
        learner = Learner(preset("default", prior_min_spread=minimum))
        for first in range(0, len(bags), 1024):
            learner.learn(bags[first : first + 1024])
        spreads[minimum] = learner.model.priors.spreads
    assert spreads[(0.0, 0.0)][:2].max() < 0.001  # what the moments alone find on such traffic
    assert np.allclose(spreads[(0.1, 0.1)][:2], [0.01, 0.01])
