"""The paper's Tables 2 and 3 on held-out simulated worlds, by calibrated sCTR and by the true CTR.

Table 2 compares policies: Uniform, DCO, MLP, f_ele only (the element head's greedy pick), f_comb only (the
combination head over K uniformly drawn combinations, no generator) and GenCO as served. Table 3 takes one
module out at a time: w/o MIL, w/o RL, w/o attention (the paper's "w/o context") and w/o all three, each with
genco's count priors on (the default) and off (the network alone, as the paper's model is).

For each held-out world (sim/zoo.py ``HELD_OUT_SEEDS``, family ``paper``) every policy learns the same
chronological uniform-random log in lockstep (``--bags``), then is scored on the next ``--evaluate`` bags of
that log two ways (``sim.scorecard``): calibrated sCTR (Algorithm 1, what ``genco evaluate`` reports) and its
exact expectation from the world's truth, per component, pooled and for the whole combination. Lifts are
relative to the uniform policy (its exact value); Table 3's differences are to GenCO with the same priors
setting; both paired by seed, mean ± sd over seeds. Each world also gives the Spearman correlation between the
policies' pooled sCTR and their pooled true CTR: does the offline metric rank them as the truth does?

The paper's figures are online A/B lifts (Table 2) and offline sCTR differences (Table 3) on JD.com's traffic;
they are printed beside ours for their direction and size, not as targets a simulator should hit.

Run: .venv/bin/python benchmarks/paper_tables.py [--seeds 1000 1001 1002] [--bags 100000] [--evaluate 40000]
     [--out bench-out/paper_tables.json]
     .venv/bin/python benchmarks/paper_tables.py --summarise bench-out/paper_tables.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from contract.events import Bag
from learner.baselines import DCO, MLPBaseline, Uniform
from learner.compute import configure_compute
from learner.trainer import Learner, preset
from sim.scorecard import genco_selections, score, spearman
from sim.zoo import HELD_OUT_SEEDS, NAMES, draw_world

FAMILY = "paper"
BATCH = 1024
ABLATIONS = {"GenCO": {}, "w/o MIL": {"mil": False}, "w/o RL": {"rl_weight": 0.0},
             "w/o attention": {"attention": False}, "w/o all": {"mil": False, "rl_weight": 0.0, "attention": False}}
TABLE2 = ("Uniform", "DCO", "MLP", "f_ele only", "f_comb only", "GenCO")
# The paper's figures: Table 2, online CTR lift over Uniform; Table 3, sCTR change per component without a module.
PAPER_TABLE2 = {"Uniform": "-", "DCO": "+0.76%", "MLP": "+1.25%", "f_ele only": "+2.47%", "f_comb only": "+0.96%",
                "GenCO": "+3.88%"}
PAPER_TABLE3 = {  # title, image, marketing, highlight, attribute, structure_attribute
    "w/o MIL": ("-0.126%", "-0.084%", "-0.165%", "+0.071%", "-0.010%", "-0.128%"),
    "w/o RL": ("-0.553%", "-1.882%", "-0.025%", "-0.106%", "-0.088%", "-0.378%"),
    "w/o attention": ("-0.044%", "-0.070%", "-0.283%", "+0.234%", "-0.044%", "-0.158%"),
    "w/o all": ("-0.640%", "-1.914%", "-0.129%", "+0.074%", "-0.026%", "-0.041%"),
}


def _name(ablation: str, prior: bool) -> str:
    return ablation if prior else f"{ablation} (no priors)"


def run(seed: int, bags: int, evaluate: int) -> list[dict]:
    """One row per policy of the world of ``seed``: its sCTR and true figures, and the seconds it took to learn."""
    world = draw_world(FAMILY, seed)
    print(f"{FAMILY} {seed}: {world.describe()}", flush=True)
    torch.manual_seed(seed)
    learners = {_name(ablation, prior): Learner(preset("default", prior=prior, **overrides))
                for prior in (True, False) for ablation, overrides in ABLATIONS.items()}
    # Uniform draws from its own stream: DCO draws uniformly among its survivors, and with the same seed it would
    # serve the very same combinations while it has eliminated nothing
    baselines = {"Uniform": Uniform(seed + 1), "DCO": DCO(seed=seed), "MLP": MLPBaseline(seed=seed)}
    seconds: dict[str, float] = dict.fromkeys([*learners, *baselines], 0.0)
    for start in range(0, bags, BATCH):
        batch = [Bag.model_validate(b) for b in world.uniform_log(min(BATCH, bags - start), start=start)]
        for name, policy in [*learners.items(), *baselines.items()]:
            started = time.perf_counter()
            (policy.step if name in learners else policy.learn)(batch)
            seconds[name] += time.perf_counter() - started
    log = world.uniform_log(evaluate, start=bags)
    held_out = [Bag.model_validate(b) for b in log]
    models = {name: learner.model for name, learner in learners.items()}
    models["f_ele only"], models["f_comb only"] = models["GenCO"], models["GenCO"]
    started = time.perf_counter()
    selections = genco_selections(models, held_out, {"f_ele only": "f_ele", "f_comb only": "f_comb"})
    for name, baseline in baselines.items():
        selections[name] = baseline.select(held_out)
    print(f"  selections in {time.perf_counter() - started:.0f} s", flush=True)
    scores = score(world, log, held_out, selections)
    rows = []
    for name, s in scores.items():
        rows.append({"family": FAMILY, "seed": seed, "bags": bags, "evaluate": evaluate, "policy": name,
                     "learn_s": round(seconds.get(name, 0.0), 1), "sctr": s["sctr"], "true": s["true"]})
        print(f"  {name:<28} true pooled {s['true']['policy']['pooled']:.5f}  sCTR pooled "
              f"{s['sctr']['policy']['pooled']:.5f}  combination true {s['true']['policy']['combination']:.5f}",
              flush=True)
    rho, error = agreement(rows)
    print(f"  Spearman(pooled sCTR, pooled true CTR) over {len(rows)} policies: {rho:.3f}; sCTR's error "
          f"beyond the part common to all (sd, relative): {100 * error:.1f}%", flush=True)
    return rows


def agreement(rows: list[dict]) -> tuple[float, float]:
    """Over one world's policies (``rows``): Spearman's correlation of pooled calibrated sCTR with pooled true
    CTR, and the sd over the policies of sCTR's relative error against the truth. The part of the error common to
    every policy (the clicks the log happened to draw) does not change their order; this sd is what sets the
    smallest difference between two policies that sCTR can rank."""
    measured = np.array([row["sctr"]["policy"]["pooled"] for row in rows])
    true = np.array([row["true"]["policy"]["pooled"] for row in rows])
    return spearman(measured, true), float(np.std(measured / true - 1))


# -- tables -----------------------------------------------------------------------------------------

def _lift(row: dict, measure: str, key: str, component: str | None = None) -> float | None:
    """The policy's lift over the uniform policy, relative, by ``measure`` ("true" or "sctr")."""
    figures = row[measure]
    policy, uniform = figures["policy"][key], figures["uniform"][key]
    if component is not None:
        policy, uniform = policy.get(component), uniform.get(component)
    return None if policy is None or not uniform else policy / uniform - 1


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    sd = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{mean:+.2f}{sd}"


COLUMNS = [*NAMES, "pooled", "combination"]


def _values(rows: dict[int, dict], measure: str, column: str, minus: dict[int, dict] | None = None) -> list[float]:
    """Per seed, the lift in ``column`` (a component, "pooled" or "combination"), less ``minus``'s lift there."""
    out = []
    for seed, row in rows.items():
        key, component = (column, None) if column in ("pooled", "combination") else ("per_component", column)
        value = _lift(row, measure, key, component)
        if minus is not None:
            other = _lift(minus[seed], measure, key, component)
            value = None if value is None or other is None else value - other
        if value is not None:
            out.append(value)
    return out


def summarise(rows: list[dict]) -> str:
    by_policy: dict[str, dict[int, dict]] = {}
    for row in rows:
        by_policy.setdefault(row["policy"], {})[row["seed"]] = row
    seeds = sorted({row["seed"] for row in rows})
    first = rows[0]
    out = [f"Worlds: {FAMILY}, held-out seeds {', '.join(map(str, seeds))}; {first['bags']:,} uniform-random bags "
           f"learned, then scored on the next {first['evaluate']:,}. Cells: mean ± sd over seeds, in %. By sCTR the "
           "whole combination is left out: it matches a bag only when every component does (weight Π n_j), a few "
           "dozen bags here, too few to say anything."]
    for measure, what in (("true", "true CTR (exact)"), ("sctr", "calibrated sCTR (Algorithm 1)")):
        columns = COLUMNS if measure == "true" else COLUMNS[:-1]
        header = "| policy | " + " | ".join(columns) + " |"
        rule = "|---" * (len(columns) + 1) + "|"
        out += ["", f"#### Table 2 by {what}: lift over the uniform policy", "", header[:-1] + "| paper (online CTR) |",
                rule + "---|"]
        for name in TABLE2:
            out.append(f"| {name} | " + " | ".join(_cell(_values(by_policy[name], measure, c)) for c in columns)
                       + f" | {PAPER_TABLE2[name]} |")
        out += ["", f"#### Table 3 by {what}: change in lift without a module, against GenCO with the same priors "
                    "setting (paired by seed)", "", header, rule]
        for prior in (True, False):
            reference = by_policy[_name("GenCO", prior)]
            out.append(f"| *{_name('GenCO', prior)}: its lift over uniform* | "
                       + " | ".join(_cell(_values(reference, measure, c)) for c in columns) + " |")
            for ablation in list(ABLATIONS)[1:]:
                out.append(f"| {_name(ablation, prior)} | " + " | ".join(
                    _cell(_values(by_policy[_name(ablation, prior)], measure, c, reference)) for c in columns) + " |")
    out += ["", "The paper's Table 3 (offline calibrated sCTR, change without the module):", "",
            "| policy | " + " | ".join(NAMES) + " |", "|---" * (len(NAMES) + 1) + "|"]
    out += [f"| {ablation} | " + " | ".join(figures) + " |" for ablation, figures in PAPER_TABLE3.items()]
    out += ["", "Does calibrated sCTR rank the policies as their true CTR does? Per world, Spearman's correlation of "
                "pooled sCTR with pooled true CTR, over every policy above and over Table 2's six, and sCTR's "
                "error against the truth beyond the part common to every policy (sd over the policies, relative):", "",
            "| seed | Spearman, all policies | Spearman, Table 2's | sd of sCTR's error |", "|---|---|---|---|"]
    for seed in seeds:
        everything = [row for row in rows if row["seed"] == seed]
        rho, error = agreement(everything)
        table2, _ = agreement([row for row in everything if row["policy"] in TABLE2])
        out.append(f"| {seed} | {rho:.3f} ({len(everything)}) | {table2:.3f} | {100 * error:.1f}% |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(HELD_OUT_SEEDS)[:3])
    parser.add_argument("--bags", type=int, default=100_000)
    parser.add_argument("--evaluate", type=int, default=40_000)
    parser.add_argument("--out", default="bench-out/paper_tables.json")
    parser.add_argument("--summarise", nargs="+", metavar="JSON", help="print the tables of earlier runs and stop")
    args = parser.parse_args()
    if args.summarise:
        print(summarise([row for path in args.summarise for row in json.loads(Path(path).read_text())]))
        return
    configure_compute()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for seed in args.seeds:
        rows += run(seed, args.bags, args.evaluate)
        out.write_text(json.dumps(rows, indent=1))  # after every world: a long run keeps what it measured
    print(summarise(rows))


if __name__ == "__main__":
    main()
