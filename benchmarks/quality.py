"""Quality: how much of the oracle's CTR gain each policy captures on worlds of the zoo (sim/zoo.py).

For each family and seed a world is drawn; every policy learns from the same chronological
uniform-random log, fed to all of them in the same mini-batches, and at each checkpoint (bags
learned so far) serves fresh requests, which the world scores with its true CTR.
captured = (policy − uniform) / (oracle − uniform); lift = policy / uniform − 1.

Figures and defaults come from held-out seeds only (``--seeds held-out``, the default); the
tuning seeds are for trying things. Tables: per family and checkpoint, every policy's captured
share, and genco against the *best* baseline (the one with the highest mean there), paired by seed.
``--policies "known structure"`` adds a learner told each world's structure (sim/bound.py): no baseline,
but how far estimating additive quality from the log can go; genco is printed against it too.

Run: .venv/bin/python benchmarks/quality.py [--families paper churn] [--seeds held-out | tuning | 1000 1001]
     [--sizes 100000 400000] [--policies genco hierarchical] [--out bench-out/quality.json]
     .venv/bin/python benchmarks/quality.py --summarise bench-out/quality.json
     .venv/bin/python benchmarks/quality.py --ceiling   # what the best fixed combination per ad captures
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from contract.events import Bag, SelectionRequest
from learner.baselines import AdElementEB, ClickCounter, ContextLogReg, HierarchicalCounter, PooledBeta, Uniform
from learner.compute import configure_compute
from learner.policy import Selector
from learner.trainer import Learner, preset
from sim.bound import KnownStructure
from sim.zoo import FAMILIES, HELD_OUT_SEEDS, TUNING_SEEDS, ZooWorld, draw_world

BATCH = 1024
EVAL_REQUESTS = 20_000  # of the world as it stands at the checkpoint; ``paired_se`` says what they leave uncertain


class GenCOPolicy:
    """A Learner behind the baselines' learn/select interface."""

    def __init__(self, name: str, train: dict | None = None, **overrides) -> None:
        self.learner = Learner(preset(name, train, **overrides))

    def learn(self, bags: list) -> None:
        self.learner.learn(bags)

    def select(self, requests: list) -> list[dict[str, str]]:
        return Selector(self.learner.model).select(requests)  # a frozen copy of the model as trained so far


class PriorsAlone(GenCOPolicy):
    """genco trained as usual, serving with the network's blend weights at zero: what the count-based priors
    (with pairs, the combination head's candidates and the pair ascent) choose on their own."""

    def select(self, requests: list) -> list[dict[str, str]]:
        model = copy.deepcopy(self.learner.model)
        with torch.no_grad():
            model.network_weight.zero_()
        return Selector(model).select(requests)


GENCO = "genco"
BOUND = "known structure"  # not a baseline: told the world's structure (sim/bound.py), what estimation can reach
POLICIES: dict[str, Callable[[ZooWorld], object]] = {  # each made for the world it will learn
    GENCO: lambda world: GenCOPolicy("default"),
    "priors alone": lambda world: PriorsAlone("default"),
    # The priors' spreads as the method of moments finds them, with no minimum (docs/decisions.md)
    "genco w/o min spread": lambda world: GenCOPolicy("default", prior_min_spread=(0.0, 0.0)),
    # The paper's ablations, on the network alone: with the priors on, they would hide its contribution.
    "network alone": lambda world: GenCOPolicy("default", prior=False),
    "network w/o MIL": lambda world: GenCOPolicy("default", prior=False, mil=False),
    "network w/o RL": lambda world: GenCOPolicy("default", prior=False, rl_weight=0.0),
    "network w/o attention": lambda world: GenCOPolicy("default", prior=False, attention=False),
    "genco-paper": lambda world: GenCOPolicy("paper"),
    "hierarchical": lambda world: HierarchicalCounter(),
    "ad x element eb": lambda world: AdElementEB(),
    "pooled beta": lambda world: PooledBeta(),
    "logreg": lambda world: ContextLogReg(),
    "counter": lambda world: ClickCounter(),
    "uniform": lambda world: Uniform(),
    BOUND: KnownStructure,
}
BASELINES = ("hierarchical", "ad x element eb", "pooled beta", "logreg", "counter")
DEFAULT_POLICIES = (GENCO, *BASELINES)


def run(family: str, seed: int, sizes: list[int], names: list[str]) -> list[dict]:
    """Rows of (family, seed, size, policy) scores: all policies learn the same log in lockstep."""
    world = draw_world(family, seed)
    print(f"{family} {seed}: {world.describe()}", flush=True)
    policies = {}
    for name in names:
        torch.manual_seed(seed)
        policies[name] = POLICIES[name](world)
    seconds = dict.fromkeys(names, 0.0)
    rows, learned = [], 0
    for size in sorted(sizes):
        while learned < size:
            bags = [Bag.model_validate(b) for b in world.uniform_log(min(BATCH, size - learned), start=learned)]
            for name, policy in policies.items():
                started = time.perf_counter()
                policy.learn(bags)
                seconds[name] += time.perf_counter() - started
            learned += len(bags)
        raw = world.requests_now(EVAL_REQUESTS, f"eval-{size}")
        requests = [SelectionRequest.model_validate(r) for r in raw]
        ctr = {name: world.true_ctr(raw, policy.select(requests)) for name, policy in policies.items()}
        ads = np.unique([r["ad_id"] for r in raw], return_inverse=True)[1]
        for name in policies:
            score = world.summarise(raw, ctr[name])
            rows.append({"family": family, "seed": seed, "size": size, "policy": name,
                         "learn_s": round(seconds[name], 1), **score, "paired_se": paired_se(ctr, name, score),
                         "paired_top_ad": paired_top_ad(ctr, name, score, ads)})
            print(f"{family:<8}{seed:>6}{size:>8}  {name:<22} captured {score['captured']:+.3f}  "
                  f"lift {score['lift']:+.3f}  ({seconds[name]:.0f} s)", flush=True)
    return rows


def paired_se(ctr: dict[str, np.ndarray], name: str, score: dict[str, float]) -> dict[str, float]:
    """The standard error, over the evaluation requests, of ``name``'s captured share less each other
    policy's on the same requests: how much of a paired difference the choice of requests alone explains."""
    gap = score["oracle_ctr"] - score["uniform_ctr"]
    return {other: float((ctr[name] - values).std(ddof=1) / np.sqrt(len(values)) / gap) if gap > 0 else 0.0
            for other, values in ctr.items() if other != name}


def paired_top_ad(ctr: dict[str, np.ndarray], name: str, score: dict[str, float], ads: np.ndarray,
                  ) -> dict[str, float]:
    """The part of ``name``'s captured share less each other policy's that the one ad contributing most
    brings (signed; ``ads``: each request's ad). Traffic is Zipf-distributed, so one choice at a head ad
    can carry a seed's whole difference, however many requests measured it."""
    gap = score["oracle_ctr"] - score["uniform_ctr"]
    if gap <= 0:
        return {other: 0.0 for other in ctr if other != name}
    parts = {other: np.bincount(ads, weights=ctr[name] - values) / len(values) / gap
             for other, values in ctr.items() if other != name}
    return {other: float(part[np.abs(part).argmax()]) for other, part in parts.items()}


def _mean_sd(values: list[float]) -> str:
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):+.3f}{sd}"


def summarise(rows: list[dict]) -> str:
    """Per family and size: every policy's captured share, then genco − best baseline paired by seed."""
    out = []
    cells = sorted({(r["family"], r["size"]) for r in rows}, key=lambda k: (list(FAMILIES).index(k[0]), k[1]))
    for family, size in cells:
        here = [r for r in rows if (r["family"], r["size"]) == (family, size)]
        by_policy: dict[str, dict[int, float]] = {}
        for r in here:
            by_policy.setdefault(r["policy"], {})[r["seed"]] = r["captured"]
        seeds = sorted({r["seed"] for r in here})
        out += [f"### {family}, {size:,} bags (seeds {', '.join(map(str, seeds))})", "",
                "| policy | captured (mean ± sd) | per seed |", "|---|---|---|"]
        for name in sorted(by_policy, key=lambda p: list(POLICIES).index(p)):
            values = [by_policy[name][s] for s in seeds if s in by_policy[name]]
            out.append(f"| {name} | {_mean_sd(values)} | {', '.join(f'{v:+.3f}' for v in values)} |")
        baselines = [b for b in BASELINES if b in by_policy]
        if GENCO in by_policy and baselines:
            best = max(baselines, key=lambda b: statistics.mean(by_policy[b].values()))
            paired = [by_policy[GENCO][s] - by_policy[best][s] for s in seeds
                      if s in by_policy[GENCO] and s in by_policy[best]]
            noise = [r["paired_se"][best] for r in here if r["policy"] == GENCO and best in r.get("paired_se", {})]
            noise_note = f"; the requests' noise ±{statistics.mean(noise):.3f} a seed (1 se)" if noise else ""
            top = [r["paired_top_ad"][best] for r in here
                   if r["policy"] == GENCO and best in r.get("paired_top_ad", {})]
            if top:
                noise_note += f"; one ad's part of a seed's difference: {', '.join(f'{t:+.3f}' for t in top)}"
            out += ["", f"genco − best baseline ({best}), paired by seed: {_mean_sd(paired)} "
                        f"(min {min(paired):+.3f}, {sum(p > 0 for p in paired)}/{len(paired)} seeds ahead{noise_note})"]
        if GENCO in by_policy and BOUND in by_policy:
            paired = [by_policy[GENCO][s] - by_policy[BOUND][s] for s in seeds
                      if s in by_policy[GENCO] and s in by_policy[BOUND]]
            out += ["", f"genco − {BOUND} (told the world's structure, additive only), paired by seed: "
                        f"{_mean_sd(paired)} (min {min(paired):+.3f}, max {max(paired):+.3f})"]
        out.append("")
    return "\n".join(out)


def ceiling(family: str, seed: int, sizes: list[int]) -> list[float]:
    """At each checkpoint, on the very requests ``run`` evaluates, what the best fixed combination per ad,
    known exactly, captures: what is left to a learner beyond it is context, and below it estimation."""
    world, captured = draw_world(family, seed), []
    for size in sorted(sizes):
        world.advance(size - world.tick)
        raw = world.requests_now(EVAL_REQUESTS, f"eval-{size}")
        captured.append(world.summarise(raw, world.best_fixed_ctr(raw))["captured"])
    return captured


def seeds_from(spec: list[str]) -> list[int]:
    """``held-out`` or ``tuning`` (their first five), or explicit seeds."""
    if spec == ["held-out"]:
        return list(HELD_OUT_SEEDS)[:5]
    if spec == ["tuning"]:
        return list(TUNING_SEEDS)[:5]
    return [int(s) for s in spec]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", default=["held-out"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), choices=list(POLICIES))
    parser.add_argument("--out", default="bench-out/quality.json")
    parser.add_argument("--summarise", nargs="+", metavar="JSON", help="print the tables of earlier runs and stop")
    parser.add_argument("--ceiling", action="store_true",
                        help="print what the best fixed combination per ad captures (no learning) and stop")
    args = parser.parse_args()
    if args.ceiling:
        print("| family | bags | best fixed combination per ad, per seed | mean |\n|---|---|---|---|")
        for family in args.families:
            per_seed = [ceiling(family, seed, args.sizes) for seed in seeds_from(args.seeds)]
            for i, size in enumerate(sorted(args.sizes)):
                values = [c[i] for c in per_seed]
                print(f"| {family} | {size // 1000}k | {', '.join(f'{v:.3f}' for v in values)} | "
                      f"{statistics.mean(values):.3f} |", flush=True)
        return
    if args.summarise:
        rows = {(r["family"], r["size"], r["seed"], r["policy"]): r  # a later file's run of the same cell wins
                for path in args.summarise for r in json.loads(Path(path).read_text())}
        print(summarise(list(rows.values())))
        return
    configure_compute()
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for family in args.families:
        for seed in seeds_from(args.seeds):
            rows += run(family, seed, args.sizes, args.policies)
            out.write_text(json.dumps(rows, indent=1))  # after every world: a long run keeps what it measured
    print(summarise(rows))


if __name__ == "__main__":
    main()
