"""The simulated ad server's scoring, which demo and benchmarks report from."""

from __future__ import annotations

import pytest

from sim.adserver import Report


def window(responses: int, genco: float) -> dict:
    return {"responses": responses, "genco_ctr": genco, "uniform_ctr": 0.07, "oracle_ctr": 0.2}


def test_last_quarter_is_the_newest_quarter_of_responses_so_a_short_tail_does_not_drag_it():
    report = Report(windows=[window(3000, 0.05)] * 6 + [window(3000, 0.095), window(20, 0.01)])
    assert report.last_quarter()["genco"] == pytest.approx((3000 * 0.05 + 3000 * 0.095 + 20 * 0.01) / 6020)
    demo = Report(windows=[window(3000, 0.05)] * 5 + [window(3000, 0.095), window(12, 0.01)])  # genco demo's shape
    assert demo.last_quarter()["genco"] == pytest.approx((3000 * 0.05 + 3000 * 0.095 + 12 * 0.01) / 6012)
    assert Report().last_quarter() is None
