"""Speed of the learner: `genco train` end to end, single and batched selection.

Each figure is printed beside a floor measured in the same run on the same
data (json.loads of the same lines), so machines of different speed compare
as ratios. This machine's speed drifts by up to ~1.5x within minutes, so the
floor and `genco train` are measured in turns, ``--repeats`` times, and their
medians and ranges reported; batched selection likewise.
Run: .venv/bin/python benchmarks/speed.py [--bags 100000] [--repeats 3]
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

from genco.compute import configure_compute
from genco.jsonl import BadLines
from learner.offline import bag_batches
from learner.policy import Selector
from learner.trainer import Learner
from sim.world import World, WorldConfig
from state.snapshots import SnapshotStore
from stream.events import SelectionRequest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bags", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench-out/speed.json")
    args = parser.parse_args()
    configure_compute()
    with tempfile.TemporaryDirectory(prefix="genco-speed-") as work:
        result = measure(args, Path(work))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for key, value in result.items():
        print(f"{key:<30}{value}")


def measure(args: argparse.Namespace, work: Path) -> dict:
    world = World(WorldConfig(seed=0, n_ads=200))
    log = world.uniform_log(args.bags)
    bags_path = work / "bags.jsonl"
    bags_path.write_text("".join(json.dumps(b) + "\n" for b in log))

    # Where the end-to-end time goes: parsing + featurising, and the training step alone.
    learner = Learner()
    gc.disable()  # as in genco train's parser process
    started = time.perf_counter()
    batches = []  # the first 45 kept for the step's timing
    with bags_path.open("rb") as lines:
        for batch in bag_batches(lines, learner.featurizer, 1024, BadLines()):
            if len(batches) < 45:
                batches.append(batch)
    parse = args.bags / (time.perf_counter() - started)
    gc.enable()
    for batch in batches[:5]:  # warm up: the optimisers' state and the allocator's heap
        learner.step_batch(batch)
    started = time.perf_counter()
    for batch in batches[5:45]:
        learner.step_batch(batch)
    step = sum(b.size for b in batches[5:45]) / (time.perf_counter() - started)
    del batches

    floors, trains = [], []
    for repeat in range(args.repeats):
        floors.append(_json_loads_floor(bags_path))
        snapshots = work / f"snap-{repeat}"
        run = subprocess.run([sys.executable, "-m", "genco.cli", "train", str(bags_path), "--snapshot-dir",
                              str(snapshots), "--json"], capture_output=True, text=True, check=True)
        trains.append(json.loads(run.stdout.splitlines()[-1])["bags_per_s"])
    floor, train = statistics.median(floors), statistics.median(trains)

    model = SnapshotStore(work / "snap-0").load().model
    requests = [SelectionRequest.model_validate(world.request(f"s-{i}")) for i in range(5000)]
    selector = Selector(model, k=16)
    for request in requests[:200]:
        selector.select([request])  # warm up
    latencies = []
    for request in requests[:2000]:
        t = time.perf_counter()
        selector.select([request])
        latencies.append(time.perf_counter() - t)
    latencies.sort()
    selector.select(requests[:1024])  # warm up the large-batch path too
    batched_runs = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        for start in range(0, len(requests), 1024):
            selector.select(requests[start : start + 1024])
        batched_runs.append(len(requests) / (time.perf_counter() - started))

    return {
        "bags": args.bags,
        "json_loads_floor_per_s": round(floor),
        "train_bags_per_s": round(train),
        "train_bags_per_s_range": [round(min(trains)), round(max(trains))],
        "train_ratio_to_floor": round(statistics.median(t / f for t, f in zip(trains, floors, strict=True)), 4),
        "parse_featurize_per_s": round(parse),
        "train_step_only_per_s": round(step),
        "select_single_p50_ms": round(1000 * statistics.median(latencies), 3),
        "select_single_p99_ms": round(1000 * latencies[int(0.99 * len(latencies))], 3),
        "select_batched_per_s": round(statistics.median(batched_runs)),
        "select_batched_per_s_range": [round(min(batched_runs)), round(max(batched_runs))],
        "torch_threads": torch.get_num_threads(),
    }


def _json_loads_floor(path: Path) -> float:
    """Lines/s of json.loads alone on the same file: what any JSONL reader pays."""
    lines = path.read_bytes().splitlines()
    started = time.perf_counter()
    for line in lines:
        json.loads(line)
    return len(lines) / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
