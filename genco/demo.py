"""``genco demo``: the whole system live on the embedded broker, against a simulated ad server.

One command starts the embedded Kafka-protocol broker, every agent (joiner,
learner, selector, each its own process) and the built-in ad server
(``sim.adserver``), which sends selection requests, shows what genco chose,
and clicks with the simulated world's *true* probability. Because that truth is
known, the demo reports the true CTR of what genco served beside the uniform
policy and the best possible (oracle), window by window, then a table and a plot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from genco.config import Settings
from sim.adserver import AdServer, Report
from sim.world import World, WorldConfig
from stream.kafka import Connection, Topics
from stream.serve import broker_for, prepare_metrics, running_agents, wait_until_ready

DEMO_WINDOW_S = 2.0  # the simulated users click within seconds, so the demo closes windows fast


def _plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.windows if r["uniform_ctr"] is not None]
    x = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("oracle_ctr", "oracle", "k--"), ("genco_ctr", "GenCO (learned policy)", "C0-o"),
                              ("uniform_ctr", "uniform", "C7:")):
        ax.plot(x, [100 * r[key] if r[key] is not None else float("nan") for r in rows], style, label=label)
    ax.set_xlabel("seconds of live traffic")
    ax.set_ylabel("true CTR of served combinations (%)")
    ax.set_title("genco demo: learning online from its own traffic")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    return f"{100 * x:6.2f}%" if x is not None else "     - "


def run_demo(settings: Settings, rate: float = 300.0, seconds: float = 60.0) -> int:
    state = Path(settings.state_dir) / "demo"
    shutil.rmtree(state, ignore_errors=True)  # the embedded broker starts empty, so must the agents' state
    settings = replace(settings, state_dir=str(state), click_window_s=DEMO_WINDOW_S, broker="")
    topics = Topics(settings.topic_prefix)
    metrics = prepare_metrics(str(state))  # the agents report readiness there
    with broker_for(settings, None) as url:
        connection = Connection.from_settings(settings, url)
        with running_agents(settings, url):
            world = World(WorldConfig(seed=7, n_ads=200))
            server = AdServer(world, connection, topics, rate=rate, requests=int(rate * seconds),
                              window_s=DEMO_WINDOW_S, window_every_s=10.0)
            print(f"simulated ad server: {world.config.n_ads} ads with Table-1-shaped creative pools, "
                  f"{rate:.0f} requests/s for {seconds:.0f} s; clicks within {DEMO_WINDOW_S:.0f} s")
            print("agents starting (the first requests get the uniform fallback until a snapshot exists)")
            print(f"{'t (s)':>6}{'responses':>10}{'model':>7}{'GenCO':>9}{'uniform':>9}{'oracle':>9}")
            server.on_window = lambda r: print(
                f"{r['t']:>6.0f}{r['responses']:>10}{'v' + str(r['model_version']):>7}{_fmt(r['genco_ctr']):>9}"
                f"{_fmt(r['uniform_ctr']):>9}{_fmt(r['oracle_ctr']):>9}", flush=True)
            if not wait_until_ready(metrics):  # the clock starts once every agent has its partitions
                print("warning: not every agent was ready after 90 s; starting traffic anyway")
            started = time.monotonic()
            report = asyncio.run(server.run())
            elapsed = time.monotonic() - started
    plot = state / "demo.png"
    _plot(report, plot)
    ctr = report.last_quarter() or {"genco": 0.0, "uniform": 0.0, "oracle": 0.0}
    genco, uniform, oracle = ctr["genco"], ctr["uniform"], ctr["oracle"]
    print()
    print(f"last quarter, true CTR:  GenCO {_fmt(genco)}   uniform {_fmt(uniform)}   oracle {_fmt(oracle)}")
    if uniform:
        print(f"GenCO vs uniform: {genco / uniform - 1:+.1%}; captured {(genco - uniform) / (oracle - uniform):.0%} "
              "of the oracle's gain")
    print(f"selection: {report.answered}/{report.sent} answered, {len(report.invalid)} invalid, "
          f"{report.answered / elapsed:.0f} responses/s, request->response p50 "
          f"{report.latency_percentile(0.5):.0f} ms, p99 {report.latency_percentile(0.99):.0f} ms")
    print(f"served by: {report.policies}; newest model v{max(report.versions, default=0)}")
    print(f"plot: {os.path.relpath(plot)}")
    return 0
