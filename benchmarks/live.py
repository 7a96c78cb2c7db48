"""Live learning: how fast each policy learns from the traffic it serves itself.

On a world of the zoo with 3,000 ads (held-out seeds), 60,000 requests at 500 a second, 5% served
uniformly at random: genco (its priors sampled from their posteriors, and as the best combination
under their means) beside an empirical-Bayes counter with Thompson sampling and the same counter
greedy, and the ad x element and pooled Beta counters with Thompson sampling, every one in the
closed loop of sim/loop.py (the model lag of ``genco serve``: a 2 s click window, a snapshot every
4 s). Reported: the share of the oracle's lift over uniform that each captured, by tenths of the run
and over its last quarter. ``--rate`` takes several rates: one block of rows per rate.

With ``--kafka``, genco also runs the real loop on the same world (``world_of``, the same seed): the
embedded broker, ``genco serve`` (every agent, a subprocess) and the simulated ad server (sim/adserver.py)
sending the same requests in the same order (the world draws them by tick) at the same rate, as
``sim.harness.serve_loop`` runs them. The same in both: the world's click model, the exploration share
(``GENCO_EXPLORE``), the click window (``GENCO_CLICK_WINDOW_S``, clicks 0.05-1.6 s after the impression)
and the scoring (by tenth of the requests sent, 30% of them with exact uniform and oracle CTRs). What
differs: time is the wall clock's, not simulated, so the model lags by however long the learner takes to
train and publish on this machine (a starved learner lags more: each row records the load average)
rather than by exactly 4 s, and the first seconds are served by the uniform fallback until the first
snapshot; the selector draws its own explorations and the ad server its own clicks; and a request
answered late or not at all is missing from its tenth (``answered`` beside ``sent``, and the p99
latency of the answers, in the row).

Run: .venv/bin/python benchmarks/live.py [--family paper] [--seeds 1000 1001] [--rate 300 500] [--kafka]
     [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from learner.baselines import AdElementEB, HierarchicalCounter, PooledBeta, ThompsonCounter
from learner.compute import configure_compute
from learner.policy import Selector
from learner.trainer import Learner, preset
from sim.harness import serve_loop
from sim.loop import Frozen, LoopConfig, LoopReport, run_loop
from sim.zoo import FAMILIES, HELD_OUT_SEEDS, ZooWorld, draw_config

KAFKA = "genco serve (kafka)"
REPEAT_SEEDS = 10_000  # a loop's draws: seed + REPEAT_SEEDS x repeat (repeat 0: the world's seed, as before)


class GenCOLive:
    """A Learner in the loop: each snapshot serves through a frozen Selector, as the selector agent does."""

    def __init__(self, thompson: bool, **overrides) -> None:
        self.learner = Learner(preset("default", **overrides))
        self.thompson = thompson

    def learn(self, bags: list) -> None:
        self.learner.learn(bags)

    def snapshot(self) -> Selector:
        return Selector(self.learner.model, thompson=self.thompson)


POLICIES = {
    "genco (posterior sampling)": lambda: GenCOLive(thompson=True),
    "genco (best combination)": lambda: GenCOLive(thompson=False),
    "genco w/o min spread": lambda: GenCOLive(thompson=False, prior_min_spread=(0.0, 0.0)),
    "counter (Thompson)": lambda: Frozen(ThompsonCounter()),
    "counter (greedy)": lambda: Frozen(HierarchicalCounter()),
    "ad x element eb (Thompson)": lambda: Frozen(AdElementEB(thompson=True)),
    "pooled beta (Thompson)": lambda: Frozen(PooledBeta(thompson=True)),
}


def world_of(family: str, seed: int, ads: int) -> ZooWorld:
    return ZooWorld(dataclasses.replace(draw_config(family, seed), n_ads=ads))


def _row(family: str, seed: int, rate: float, policy: str, report: LoopReport) -> dict:
    return {"family": family, "seed": seed, "rate": rate, "policy": policy, "tenths": report.captured_by_tenth(),
            "last_quarter": report.captured_last_quarter(), "load": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="paper", choices=list(FAMILIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(HELD_OUT_SEEDS)[:2])
    parser.add_argument("--ads", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--rate", type=float, nargs="+", default=[500.0], help="requests a second; one block each")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--repeats", type=int, default=1,
                        help="loops per world and policy, each with its own draws (explorations, clicks)")
    parser.add_argument("--kafka", action="store_true", help="also genco serve on the embedded broker")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    configure_compute()
    rows = []
    for rate in args.rate:
        config = LoopConfig(rate=rate, requests=args.requests)
        for seed in args.seeds:
            if args.kafka:
                loop, served = serve_loop(world_of(args.family, seed, args.ads), config, seed)
                row = _row(args.family, seed, rate, KAFKA, loop)
                row.update(sent=served.sent, answered=served.answered, invalid=len(served.invalid),
                           p99_ms=round(served.latency_percentile(0.99), 1), served_by=served.policies)
                rows.append(row)
                print(json.dumps(row), flush=True)
            for name in args.policies:
                for repeat in range(args.repeats):
                    torch.manual_seed(seed)
                    report = run_loop(world_of(args.family, seed, args.ads), POLICIES[name](), config,
                                      seed=seed + REPEAT_SEEDS * repeat)
                    rows.append({**_row(args.family, seed, rate, name, report), "repeat": repeat})
                    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
