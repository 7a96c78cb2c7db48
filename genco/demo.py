"""``genco demo``: watch GenCO learn on a simulated ad server with known true CTR.

The simulator serves uniformly at random (the unbiased log the paper trains
on), GenCO learns from it chronologically in mini-batches, and after every
chunk of traffic the learned policy's *true* CTR on fresh requests is measured
beside the uniform policy, the smoothed click counter and the oracle.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from genco.config import Settings
from learner.baselines import Counter
from learner.policy import Selector
from learner.trainer import Learner
from sim.world import World, WorldConfig
from state.snapshots import SnapshotStore
from stream.events import Bag, SelectionRequest


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["bags"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("oracle", "oracle", "k--"), ("genco", "GenCO", "C0-o"),
                              ("counter", "click counter", "C1-s"), ("uniform", "uniform", "C7:")):
        ax.plot(x, [100 * r[key] for r in rows], style, label=label)
    ax.set_xlabel("impressions learned from")
    ax.set_ylabel("true CTR of served combinations (%)")
    ax.set_title("genco demo: learned policy vs uniform and oracle")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(settings: Settings, bags: int = 200_000, chunk: int = 20_000, eval_requests: int = 1000) -> int:
    world = World(WorldConfig(seed=7, n_ads=200))
    learner = Learner()
    counter = Counter()
    selector = Selector(learner.model)
    rows: list[dict] = []
    print(f"simulated ad server: {world.config.n_ads} ads, Table-1-shaped creative pools; "
          f"learning from {bags} uniform-random impressions")
    print(f"{'impressions':>12}{'genco CTR':>11}{'counter':>9}{'uniform':>9}{'oracle':>9}{'captured':>10}"
          f"{'train bags/s':>14}")
    seen = 0
    while seen < bags:
        log = [Bag.model_validate(b) for b in world.uniform_log(min(chunk, bags - seen), start=seen)]
        started = time.perf_counter()
        learner.learn(log)
        rate = len(log) / (time.perf_counter() - started)
        counter.learn(log)
        seen += len(log)
        requests = [world.request(f"eval-{seen}-{i}") for i in range(eval_requests)]
        parsed = [SelectionRequest.model_validate(r) for r in requests]
        genco = world.score(requests, selector.select(parsed))
        counted = world.score(requests, counter.select(parsed))
        rows.append({"bags": seen, "genco": genco["ctr"], "counter": counted["ctr"], "uniform": genco["uniform_ctr"],
                     "oracle": genco["oracle_ctr"], "captured": genco["captured"]})
        print(f"{seen:>12}{genco['ctr']:>11.4f}{counted['ctr']:>9.4f}{genco['uniform_ctr']:>9.4f}"
              f"{genco['oracle_ctr']:>9.4f}{genco['captured']:>10.2f}{rate:>14.0f}", flush=True)
    state = Path(settings.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    store = SnapshotStore(state / "demo-snapshots")
    manifest = store.save(learner.model, version=store.latest_version() + 1, bags_seen=learner.bags_seen,
                          steps=learner.steps, train_config=learner.preset.train.to_dict())
    plot = state / "demo.png"
    _plot(rows, plot)
    last = rows[-1]
    print()
    print(f"true CTR after {seen} impressions (mean of the last evaluation, {eval_requests} fresh requests):")
    for name in ("uniform", "counter", "genco", "oracle"):
        print(f"  {name:<8} {last[name]:.4f}  ({last[name] / last['uniform'] - 1:+.1%} vs uniform)")
    print(f"GenCO captured {last['captured']:.0%} of the oracle's gain over uniform")
    print(f"snapshot v{manifest.version}: {store.directory}    plot: {os.path.relpath(plot)}")
    return 0
