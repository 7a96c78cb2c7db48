"""Speed of the learner: `genco train` end to end, single and batched selection.

Each figure is printed beside a floor measured in the same run on the same
data (json.loads of the same lines), so machines of different speed compare
as ratios. This machine's speed drifts by up to ~1.5x within minutes, so the
floor and `genco train` are measured in turns, ``--repeats`` times, and their
medians and ranges reported; batched selection likewise, with one thread and with
two (``Selector(threads=2)``, as ``genco select --threads 2``), in a process of its own that does
nothing else, as the selector agent's. Each preset (default:
the default and ``fast``, the default without the pair prior) runs in turn with
the others at every stage, so their figures compare as ratios.
Run: .venv/bin/python benchmarks/speed.py [--bags 100000] [--ads 200] [--repeats 3] [--presets default fast]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from contract.events import SelectionRequest
from contract.jsonl import BadLines
from learner.compute import configure_compute
from learner.offline import bag_batches
from learner.policy import Selector
from learner.snapshots import SnapshotStore
from learner.trainer import PRESETS, Learner, preset
from sim.world import World, WorldConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bags", type=int, default=100_000)
    parser.add_argument("--ads", type=int, default=200, help="the world's ads; impressions of one ad share its pools")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["default", "fast"], choices=list(PRESETS),
                        help="measured in turns, so their figures compare as ratios")
    parser.add_argument("--out", default="bench-out/speed.json")
    parser.add_argument("--selection", nargs=2, metavar=("SNAPSHOTS", "REQUESTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_compute()
    if args.selection:  # the child process that times selection (see measure_selection)
        print(json.dumps(measure_selection(args, *map(Path, args.selection))))
        return
    with tempfile.TemporaryDirectory(prefix="genco-speed-") as work:
        result = measure(args, Path(work))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for key, value in result.items():
        print(f"{key:<30}{value}")


def measure(args: argparse.Namespace, work: Path) -> dict:
    world = World(WorldConfig(seed=0, n_ads=args.ads))
    log = world.uniform_log(args.bags)
    bags_path = work / "bags.jsonl"
    bags_path.write_text("".join(json.dumps(b) + "\n" for b in log))
    del log  # 100k dicts left alive would make every full collection during the timings walk them

    # Where the end-to-end time goes: parsing + featurising, and the training step alone.
    learners = {name: Learner(preset(name)) for name in args.presets}
    gc.disable()  # as in genco train's parser process
    started = time.perf_counter()
    batches = []  # the first 45 kept for the step's timing
    with bags_path.open("rb") as lines:
        for batch in bag_batches(lines, learners[args.presets[0]].featurizer, 1024, BadLines()):
            if len(batches) < 45:
                batches.append(batch)
    parse = args.bags / (time.perf_counter() - started)
    gc.enable()
    step_seconds = dict.fromkeys(args.presets, 0.0)
    for i, batch in enumerate(batches):  # the presets in turns; the first 5 batches warm each up
        for name in args.presets if i % 2 else args.presets[::-1]:
            started = time.perf_counter()
            learners[name].step_batch(batch)
            if i >= 5:
                step_seconds[name] += time.perf_counter() - started
    stepped = sum(b.size for b in batches[5:45])
    del batches

    floors, trains = [], {name: [] for name in args.presets}
    for repeat in range(args.repeats):
        floors.append(_json_loads_floor(bags_path))
        for name in args.presets:
            snapshots = work / f"snap-{name}-{repeat}"  # the first of each is what selection loads
            run = subprocess.run([sys.executable, "-m", "genco.cli", "train", str(bags_path), "--snapshot-dir",
                                  str(snapshots), "--preset", name, "--json"], capture_output=True, text=True,
                                 check=True)
            trains[name].append(json.loads(run.stdout.splitlines()[-1])["bags_per_s"])

    requests_path = work / "requests.jsonl"
    requests_path.write_text("".join(json.dumps(world.request(f"s-{i}")) + "\n" for i in range(6 * 1024)))
    run = subprocess.run([sys.executable, __file__, "--selection", str(work / "snap"), str(requests_path),
                          "--repeats", str(args.repeats), "--presets", *args.presets],
                         capture_output=True, text=True, check=True)
    selection = json.loads(run.stdout.splitlines()[-1])

    result = {"bags": args.bags, "ads": args.ads, "json_loads_floor_per_s": round(statistics.median(floors)),
              "parse_featurize_per_s": round(parse), "torch_threads": torch.get_num_threads()}
    for name in args.presets:
        ratios = [t / f for t, f in zip(trains[name], floors, strict=True)]
        result[name] = {
            "train_bags_per_s": round(statistics.median(trains[name])),
            "train_bags_per_s_range": [round(min(trains[name])), round(max(trains[name]))],
            "train_ratio_to_floor": round(statistics.median(ratios), 4),
            "train_step_only_per_s": round(stepped / step_seconds[name]),
            **selection[name],
        }
    return result


def measure_selection(args: argparse.Namespace, snapshots: Path, requests_path: Path) -> dict:
    """Selection timed in a process that does nothing else, as the selector agent is: in the process that
    had parsed and trained, the same selections ran ~20% slower (its heap, not the arithmetic)."""
    requests = [SelectionRequest.model_validate_json(line) for line in requests_path.read_bytes().splitlines()]
    models = {name: SnapshotStore(f"{snapshots}-{name}-0").load().model for name in args.presets}
    selectors = {name: Selector(model, k=16) for name, model in models.items()}
    threaded = {name: Selector(model, k=16, threads=2) for name, model in models.items()}
    latencies, first_sight = {}, {}
    for name, selector in selectors.items():
        first_sight[name] = []  # a lone request for pools the selector has not seen: its cache's misses
        for request in requests[2000:]:  # warm up: a selector that has served a while has seen its head ads
            t = time.perf_counter()
            cached = selector.cached_pools
            selector.select([request])
            if selector.cached_pools > cached:
                first_sight[name].append(time.perf_counter() - t)
        latencies[name] = []
        for request in requests[:2000]:
            t = time.perf_counter()
            selector.select([request])
            latencies[name].append(time.perf_counter() - t)
        latencies[name].sort()
        selector.select(requests[:1024])  # warm up the large-batch path too
        threaded[name].select(requests[:2048])
    batched_runs = {(name, threads): [] for name in args.presets for threads in (1, 2)}
    for _ in range(args.repeats):  # six batches of 1,024, one thread and two in turn
        for name in args.presets:
            for threads, selector in ((1, selectors[name]), (2, threaded[name])):
                selector.select(requests[:1024])  # untimed: the other preset's tables have left the caches
                started = time.perf_counter()
                selector.select(requests)
                batched_runs[name, threads].append(len(requests) / (time.perf_counter() - started))
    result = {}
    for name in args.presets:
        lat, runs, two = latencies[name], batched_runs[name, 1], batched_runs[name, 2]
        result[name] = {
            "select_single_p50_ms": round(1000 * statistics.median(lat), 3),
            "select_single_p99_ms": round(1000 * lat[int(0.99 * len(lat))], 3),
            "select_single_new_pools_p50_ms": round(1000 * statistics.median(first_sight[name]), 3),
            "select_batched_per_s": round(statistics.median(runs)),
            "select_batched_per_s_range": [round(min(runs)), round(max(runs))],
            "select_batched_2_threads_per_s": round(statistics.median(two)),
            "select_batched_2_threads_per_s_range": [round(min(two)), round(max(two))],
        }
    return result


def _json_loads_floor(path: Path) -> float:
    """Lines/s of json.loads alone on the same file: what any JSONL reader pays."""
    lines = path.read_bytes().splitlines()
    started = time.perf_counter()
    for line in lines:
        json.loads(line)
    return len(lines) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
