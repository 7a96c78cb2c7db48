"""``genco demo``: the whole system live on the embedded broker, against a simulated ad server.

One command starts the embedded Kafka-protocol broker, every agent (joiner,
learner, selector, each its own process) and the built-in ad server
(``sim.adserver``), which sends selection requests, shows what genco chose,
and clicks with the simulated world's *true* probability. Because that truth is
known, the demo reports the true CTR of what genco served beside the uniform
policy and the best possible (oracle), window by window, then a summary and a plot.

The terminal is for the user: the agents' log lines go to a file in the demo's state
dir (its path printed first), and a status line that rewrites itself shows what is
happening between the table's rows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from contract.settings import AGENTS, Settings
from sim.adserver import AdServer, Report
from sim.world import World, WorldConfig
from stream.agent import LOG_FORMAT
from stream.kafka import Connection, Topics
from stream.serve import broker_for, prepare_metrics, ready_agents, running_agents

DEMO_WINDOW_S = 2.0  # the simulated users click within seconds, so the demo closes windows fast
READY_TIMEOUT_S = 90.0  # agents import torch and join their groups; past this the traffic starts anyway


class StatusLine:
    """One line at the bottom of a terminal, rewritten in place; lasting lines print above it.

    On a pipe or a file it stays silent, so a captured demo holds only the lasting lines.
    """

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.width = 0

    def show(self, text: str) -> None:
        if self.live:
            text = text[: shutil.get_terminal_size().columns - 1]  # a wrapped line could not be rewritten
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)

    def clear(self) -> None:
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.width = 0

    def print(self, text: str) -> None:
        self.clear()
        print(text, file=self.stream, flush=True)


def _log_to(path: Path) -> None:
    """This process's own log lines (the supervisor's, the Kafka clients' warnings) go where the agents' do."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, filename=path, force=True)
    logging.getLogger("kafka").setLevel(logging.WARNING)


def _wait_for_agents(metrics: Path, status: StatusLine) -> None:
    """Until every agent has its partitions: the traffic's clock starts then, not during imports."""
    started = time.monotonic()
    while (waiting := [name for name in AGENTS if name not in ready_agents(metrics)]):
        elapsed = time.monotonic() - started
        if elapsed > READY_TIMEOUT_S:
            status.print(f"warning: {', '.join(waiting)} not ready after {elapsed:.0f} s; starting traffic anyway")
            return
        status.show(f"starting the agents ({elapsed:.0f} s): waiting for {', '.join(waiting)}")
        time.sleep(0.2)
    status.print(f"agents ready after {time.monotonic() - started:.0f} s: {', '.join(AGENTS)}")


async def _drive(server: AdServer, seconds: float, status: StatusLine) -> tuple[Report, float]:
    """The ad server's run, with its progress on the status line; returns the report and the seconds it took."""
    started = time.monotonic()
    run = asyncio.create_task(server.run())
    while not run.done():
        report = server.report
        elapsed = time.monotonic() - started
        phase = f"{elapsed:.0f}/{seconds:.0f} s" if report.sent < server.requests else f"{elapsed:.0f} s, draining"
        model = report.versions[-1] if report.versions else 0
        status.show(f"  {phase}: {report.sent} requests sent, {report.answered} answered, serving model v{model}")
        await asyncio.wait({run}, timeout=0.5)
    return run.result(), time.monotonic() - started


def is_tail(window: dict, earlier: list[dict]) -> bool:
    """Whether a window holds under half the median of the ``earlier`` windows' responses: the run ends
    mid-window, and a tail of a few dozen responses samples a handful of requests, whose uniform and oracle
    CTRs can fall by half, a drop that no policy made."""
    return len(earlier) > 1 and window["responses"] < 0.5 * statistics.median(r["responses"] for r in earlier)


def plotted_windows(windows: list[dict]) -> list[dict]:
    """The windows the plot shows: those with a uniform CTR, less a last one that is the run's tail."""
    rows = [r for r in windows if r["uniform_ctr"] is not None]
    if len(rows) > 2 and is_tail(rows[-1], rows[:-1]):
        rows = rows[:-1]
    return rows


def _printer(status: StatusLine) -> Callable[[dict], None]:
    """Prints each window's row as it closes, marking a tail (``is_tail``), which the plot leaves out."""
    shown: list[dict] = []

    def show(window: dict) -> None:
        note = "  (the run's last seconds: too few to read)" if is_tail(window, shown) else ""
        shown.append(window)
        status.print(_row(window) + note)

    return show


def _plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = plotted_windows(report.windows)
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


def _row(window: dict) -> str:
    return (f"{window['t']:>6.0f}{window['responses']:>10}{'v' + str(window['model_version']):>7}"
            f"{_fmt(window['genco_ctr']):>9}{_fmt(window['uniform_ctr']):>9}{_fmt(window['oracle_ctr']):>9}")


def _summary(report: Report, elapsed: float) -> list[str]:
    ctr = report.last_quarter() or {"genco": 0.0, "uniform": 0.0, "oracle": 0.0}
    genco, uniform, oracle = ctr["genco"], ctr["uniform"], ctr["oracle"]
    lines = [f"last quarter, true CTR:  GenCO {_fmt(genco)}   uniform {_fmt(uniform)}   oracle {_fmt(oracle)}"]
    if uniform:
        lines.append(f"GenCO vs uniform: {genco / uniform - 1:+.1%}; captured "
                     f"{(genco - uniform) / (oracle - uniform):.0%} of the oracle's gain")
    lines.append(f"selection: {report.answered}/{report.sent} answered, {len(report.invalid)} invalid, "
                 f"{report.answered / elapsed:.0f} responses/s, request->response p50 "
                 f"{report.latency_percentile(0.5):.0f} ms, p99 {report.latency_percentile(0.99):.0f} ms")
    lines.append(f"served by: {report.policies}; newest model v{max(report.versions, default=0)}")
    return lines


def run_demo(settings: Settings, rate: float = 300.0, seconds: float = 60.0) -> int:
    state = Path(settings.state_dir) / "demo"
    shutil.rmtree(state, ignore_errors=True)  # the embedded broker starts empty, so must the agents' state
    state.mkdir(parents=True)
    agents_log = state / "agents.log"
    _log_to(agents_log)
    settings = replace(settings, state_dir=str(state), click_window_s=DEMO_WINDOW_S, broker="")
    metrics = prepare_metrics(str(state))  # the agents report readiness there
    world = World(WorldConfig(seed=7, n_ads=200))
    status = StatusLine()
    print(f"simulated ad server: {world.config.n_ads} ads with Table-1-shaped creative pools, "
          f"{rate:.0f} requests/s for {seconds:.0f} s; clicks within {DEMO_WINDOW_S:.0f} s")
    print(f"agents' log: {os.path.relpath(agents_log)}")
    with broker_for(settings, None) as url:
        with running_agents(settings, url, log_path=agents_log):
            _wait_for_agents(metrics, status)
            server = AdServer(world, Connection.from_settings(settings, url), Topics(settings.topic_prefix),
                              rate=rate, requests=int(rate * seconds), window_s=DEMO_WINDOW_S, window_every_s=10.0)
            server.on_window = _printer(status)
            status.print("the first requests get the uniform fallback until the learner's first snapshot")
            status.print(f"{'t (s)':>6}{'responses':>10}{'model':>7}{'GenCO':>9}{'uniform':>9}{'oracle':>9}")
            report, elapsed = asyncio.run(_drive(server, seconds, status))
            status.show("stopping the agents (the learner writes its last checkpoint)")
        status.clear()
    plot = state / "demo.png"
    _plot(report, plot)
    print()
    print("\n".join(_summary(report, elapsed)))
    print(f"plot: {os.path.relpath(plot)}")
    print(f"agents' log: {os.path.relpath(agents_log)}")
    return 0
