"""Live learning: how fast each policy learns from the traffic it serves itself.

On a world of the zoo with 3,000 ads (held-out seeds), 60,000 requests at 500 a second, 5% served
uniformly at random: genco (its priors sampled from their posteriors, and as the best combination
under their means) beside an empirical-Bayes counter with Thompson sampling and the same counter
greedy, and the ad x element and pooled Beta counters with Thompson sampling, every one in the
closed loop of sim/loop.py (the model lag of ``genco serve``: a 2 s click window, a snapshot every
4 s). With ``--kafka``, genco also runs the real loop: ``genco serve`` on
the embedded broker and the simulated ad server. Reported: the share of the oracle's lift over
uniform that each captured, by tenths of the run and over its last quarter.

Run: .venv/bin/python benchmarks/live.py [--family paper] [--seeds 1000 1001] [--kafka] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from learner.baselines import AdElementEB, HierarchicalCounter, PooledBeta, ThompsonCounter
from learner.compute import configure_compute
from learner.policy import Selector
from learner.trainer import Learner, preset
from sim.loop import Frozen, LoopConfig, run_loop
from sim.zoo import FAMILIES, HELD_OUT_SEEDS, ZooWorld, draw_config


class GenCOLive:
    """A Learner in the loop: each snapshot serves through a frozen Selector, as the selector agent does."""

    def __init__(self, thompson: bool) -> None:
        self.learner = Learner(preset("default"))
        self.thompson = thompson

    def learn(self, bags: list) -> None:
        self.learner.learn(bags)

    def snapshot(self) -> Selector:
        return Selector(self.learner.model, thompson=self.thompson)


POLICIES = {
    "genco (posterior sampling)": lambda: GenCOLive(thompson=True),
    "genco (best combination)": lambda: GenCOLive(thompson=False),
    "counter (Thompson)": lambda: Frozen(ThompsonCounter()),
    "counter (greedy)": lambda: Frozen(HierarchicalCounter()),
    "ad x element eb (Thompson)": lambda: Frozen(AdElementEB(thompson=True)),
    "pooled beta (Thompson)": lambda: Frozen(PooledBeta(thompson=True)),
}


def world_of(family: str, seed: int, ads: int) -> ZooWorld:
    return ZooWorld(dataclasses.replace(draw_config(family, seed), n_ads=ads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="paper", choices=list(FAMILIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(HELD_OUT_SEEDS)[:2])
    parser.add_argument("--ads", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    configure_compute()
    config = LoopConfig(rate=args.rate, requests=args.requests)
    rows = []
    for seed in args.seeds:
        for name in args.policies:
            torch.manual_seed(seed)
            report = run_loop(world_of(args.family, seed, args.ads), POLICIES[name](), config, seed=seed)
            row = {"family": args.family, "seed": seed, "policy": name, "tenths": report.captured_by_tenth(),
                   "last_quarter": report.captured_last_quarter()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
