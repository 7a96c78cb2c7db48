"""Quality: how much of the oracle's CTR gain each policy captures on simulated worlds.

For each world size (bags of uniform-random log) and seed, every policy learns
from the same chronological log, then serves 3,000 fresh requests; the world
scores the served combinations with its true CTR. captured = (policy − uniform)
/ (oracle − uniform); lift = policy / uniform − 1. Seeds give the noise.

Worlds: "table1" has every effect (element quality, user context, synergy);
"additive" has element quality only, "context" adds user context, "synergy"
adds cross-component synergy: the GenCO − counter margin on each shows where
the gain comes from.

Run: .venv/bin/python benchmarks/quality.py [--sizes 100000 400000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from genco.compute import configure_compute
from learner.baselines import DCO, Counter, MLPBaseline, Uniform
from learner.policy import Selector
from learner.trainer import Learner, preset
from sim.world import World, WorldConfig
from stream.events import Bag, SelectionRequest

WORLDS = {
    "table1": {},
    "additive": {"context": 0.0, "synergy": 0.0},
    "context": {"synergy": 0.0},
    "synergy": {"context": 0.0, "synergy": 0.25},
}


class GenCOPolicy:
    """Adapter giving a Learner the baselines' learn/select interface."""

    def __init__(self, name: str, **overrides) -> None:
        self.learner = Learner(preset(name, **overrides))

    def learn(self, bags: list) -> None:
        self.learner.learn(bags)

    def select(self, requests: list) -> list[dict[str, str]]:
        selector = Selector(self.learner.model)  # a frozen copy of the model as trained so far
        return [s for i in range(0, len(requests), 1024) for s in selector.select(requests[i : i + 1024])]


POLICIES: dict[str, Callable[[], object]] = {
    "genco": lambda: GenCOPolicy("default"),
    "genco-paper": lambda: GenCOPolicy("paper"),
    "genco w/o MIL": lambda: GenCOPolicy("default", mil=False),
    "genco w/o RL": lambda: GenCOPolicy("default", rl_weight=0.0),
    "genco w/o context": lambda: GenCOPolicy("default", attention=False),
    "genco w/o all": lambda: GenCOPolicy("default", mil=False, rl_weight=0.0, attention=False),
    "genco w/o context prior": lambda: GenCOPolicy("default", context_prior=False),
    "genco w/o pair prior": lambda: GenCOPolicy("fast"),
    "counter": Counter,
    "dco": DCO,
    "mlp": MLPBaseline,
    "uniform": Uniform,
}


def run(world_name: str, size: int, seed: int, policies: list[str], n_ads: int) -> dict[str, dict]:
    world = World(WorldConfig(seed=seed, n_ads=n_ads, **WORLDS[world_name]))
    bags = [Bag.model_validate(b) for b in world.uniform_log(size)]
    raw_requests = [world.request(f"eval-{i}") for i in range(3000)]
    requests = [SelectionRequest.model_validate(r) for r in raw_requests]
    results = {}
    for name in policies:
        torch.manual_seed(seed)
        policy = POLICIES[name]()
        started = time.perf_counter()
        for start in range(0, len(bags), 1024):
            policy.learn(bags[start : start + 1024])
        seconds = time.perf_counter() - started
        score = world.score(raw_requests, policy.select(requests))
        results[name] = {**score, "train_s": round(seconds, 1)}
        print(f"{world_name:<9}{size:>8}{seed:>3}  {name:<18} captured {score['captured']:+.3f}  "
              f"lift {score['lift']:+.3f}  ({seconds:.0f} s)", flush=True)
    return results


def summarise(rows: list[dict]) -> str:
    table = ["| world | bags | policy | captured (mean ± sd over seeds) | lift | seeds |", "|---|---|---|---|---|---|"]
    keys = sorted({(r["world"], r["size"], r["policy"]) for r in rows}, key=lambda k: (k[0], k[1]))
    order = list(POLICIES)
    keys.sort(key=lambda k: (list(WORLDS).index(k[0]), k[1], order.index(k[2])))
    for world, size, policy in keys:
        values = [r for r in rows if (r["world"], r["size"], r["policy"]) == (world, size, policy)]
        cap = [v["captured"] for v in values]
        lift = [v["lift"] for v in values]
        sd = f" ± {statistics.stdev(cap):.3f}" if len(cap) > 1 else ""
        table.append(f"| {world} | {size} | {policy} | {statistics.mean(cap):.3f}{sd} | "
                     f"{statistics.mean(lift):+.3f} | {len(cap)} |")
    table += ["", "GenCO's margin over the click counter, paired by seed (same world, same log):", "",
              "| world | bags | genco − counter (mean ± sd) | seeds |", "|---|---|---|---|"]
    for world, size in sorted({(r["world"], r["size"]) for r in rows}, key=lambda k: (list(WORLDS).index(k[0]), k[1])):
        by_seed = {}
        for r in rows:
            if (r["world"], r["size"]) == (world, size) and r["policy"] in ("genco", "counter"):
                by_seed.setdefault(r["seed"], {})[r["policy"]] = r["captured"]
        margins = [v["genco"] - v["counter"] for v in by_seed.values() if len(v) == 2]
        if margins:
            sd = f" ± {statistics.stdev(margins):.3f}" if len(margins) > 1 else ""
            table.append(f"| {world} | {size} | {statistics.mean(margins):+.3f}{sd} | {len(margins)} |")
    return "\n".join(table)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--worlds", nargs="+", default=["table1"], choices=list(WORLDS))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--ads", type=int, default=200)
    parser.add_argument("--out", default="bench-out/quality.json")
    parser.add_argument("--summarise", nargs="+", metavar="JSON", help="print the tables of earlier runs and stop")
    args = parser.parse_args()
    if args.summarise:
        rows = {(r["world"], r["size"], r["seed"], r["policy"]): r  # a later file's run of the same cell wins
                for path in args.summarise for r in json.loads(Path(path).read_text())}
        print(summarise(list(rows.values())))
        return
    configure_compute()
    rows = []
    for world in args.worlds:
        for size in args.sizes:
            for seed in args.seeds:
                for policy, score in run(world, size, seed, args.policies, args.ads).items():
                    rows.append({"world": world, "size": size, "seed": seed, "policy": policy, **score})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(summarise(rows))


if __name__ == "__main__":
    main()
