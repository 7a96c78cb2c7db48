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
