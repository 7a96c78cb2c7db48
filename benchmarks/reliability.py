"""Faults against the real ``genco serve`` in the closed loop, each on a fresh embedded broker.

    python benchmarks/reliability.py [--rate 250] [--seconds 60] [--only two_serves] [--seeds 1 2 3]
                                     [--json bench-out/reliability.json]

Scenarios: clean (three seeds: the noise), 5% garbage (two seeds) on every input topic,
SIGKILL of ``genco serve`` halfway and restart after 2 s, two ``genco serve`` processes
(own state dirs) of which the one holding the joiner and the learner is SIGKILLed
halfway and left dead, the broker frozen (SIGSTOP) for 15 s halfway. For each: requests
lost or answered invalidly, impressions without a bag or with a wrong label, whether
the model trained on each impression exactly once, whether model_version ever went
back, latency, and the share of the oracle's CTR lift over uniform that the learned
policy captured in the last quarter of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from contract.settings import Settings
from sim.adserver import AdServer, Report
from sim.harness import (
    WINDOW,
    bags_seen,
    freeze,
    kill_and_restart,
    read_topic,
    serve_log,
    start_serve,
    stop_serve,
    wait_ready,
)
from sim.world import World, WorldConfig
from stream.embedded import EmbeddedBroker
from stream.kafka import Connection, Topics

TOPICS = Topics("rel.")
SELECTORS = 2  # selector-only serves beside the full one in selector_churn


def captured(report: Report) -> float | None:
    """(learned - uniform) / (oracle - uniform) true CTR over the last quarter of the responses."""
    ctr = report.last_quarter()
    return round((ctr["genco"] - ctr["uniform"]) / (ctr["oracle"] - ctr["uniform"]), 3) if ctr else None


async def churn_selectors(serves: list, broker: str, state_dir: Path, every_s: float, times: int) -> None:
    """``times`` times, after ``every_s``: SIGKILL the oldest selector-only serve (``serves[1]``; ``serves[0]``
    runs every agent) and start a fresh one on a state dir of its own."""
    for n in range(times):
        await asyncio.sleep(every_s)
        victim = serves.pop(1)
        victim.kill()
        victim.wait()
        serves.append(start_serve(broker, TOPICS, state_dir / f"selector-{n + SELECTORS}", agents=("selector",)))


def scenario(name: str, seed: int, rate: float, seconds: float, garbage: float = 0.0) -> dict:
    with tempfile.TemporaryDirectory() as state, EmbeddedBroker() as broker:
        state_dir = Path(state)
        connection = Connection.from_settings(Settings(), broker.url)
        connection.ensure_topics([TOPICS.requests, TOPICS.impressions, TOPICS.clicks], partitions=4)
        serves = [start_serve(broker.url, TOPICS, state_dir)]
        survivor = state_dir / "second" if name == "two_serves" else state_dir
        server = AdServer(World(WorldConfig(seed=seed, n_ads=200)), connection, TOPICS, rate=rate,
                          requests=int(rate * seconds), window_s=WINDOW, window_every_s=seconds / 12,
                          truth_sample=0.3, seed=seed, garbage=garbage)

        async def fault() -> None:
            if name == "sigkill":
                await kill_and_restart(serves, broker.url, TOPICS, state_dir, after_s=seconds / 2)
            elif name == "two_serves":
                await asyncio.sleep(seconds / 2)
                serves[0].kill()
                serves[0].wait()
            elif name == "selector_churn":
                await churn_selectors(serves, broker.url, state_dir, every_s=seconds / 6, times=5)
            elif name == "frozen_broker":
                await freeze(broker, after_s=seconds / 2, for_s=15)

        async def run() -> Report:
            damage = asyncio.create_task(fault())
            report = await server.run(drain_s=90)
            await damage
            return report

        wait_ready(state_dir)
        if name == "two_serves":
            serves.append(start_serve(broker.url, TOPICS, survivor))
            wait_ready(survivor, agents=("selector",))  # its joiner and learner stand by
        if name == "selector_churn":
            for n in range(SELECTORS):
                serves.append(start_serve(broker.url, TOPICS, state_dir / f"selector-{n}", agents=("selector",)))
                wait_ready(state_dir / f"selector-{n}", agents=("selector",))
        report = asyncio.run(run())
        deadline = time.monotonic() + 60
        while bags_seen(survivor) < len(report.labels) and time.monotonic() < deadline:
            time.sleep(0.5)
        bags = asyncio.run(read_topic(connection, TOPICS.bags))
        if name == "selector_churn":
            for serve in serves[1:]:
                stop_serve(serve)
            del serves[1:]
        stop_serve(serves[-1])
        labels: dict[str, set[bool]] = {}
        for bag in bags:
            labels.setdefault(bag["impression_id"], set()).add(bag["clicked"])
        log = serve_log(state_dir) + (serve_log(survivor) if survivor != state_dir else "")
        return {
            "scenario": name, "seed": seed, "requests": report.sent, "lost": report.sent - report.answered,
            "seen_late": report.seen_late,
            "invalid": len(report.invalid), "garbage_sent": sum(report.garbage.values()),
            "error_responses_missing": len(report.errors_due - report.errors_answered),
            "impressions": len(report.labels),
            "without_bag": sum(1 for i in report.labels if i not in labels),
            "wrong_label": sum(1 for i, clicked in report.labels.items() if labels.get(i, {clicked}) != {clicked}),
            "repeated_bags": len(bags) - len(labels),
            "trained_bags_minus_impressions": bags_seen(survivor) - len(report.labels),
            # several selectors follow the versions each on its own: their answers interleave
            "version_went_back": None if name in ("two_serves", "selector_churn")
            else report.versions != sorted(report.versions),
            "agent_restarts": log.count("exited with status"),
            "p50_ms": round(report.latency_percentile(0.5), 1), "p99_ms": round(report.latency_percentile(0.99), 1),
            "max_ms": round(max(report.latencies_ms, default=float("nan")), 1),
            "captured_last_quarter": captured(report),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=250.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="run each scenario once per seed (a fault repeated on that many runs), not its own seeds")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    plan = [("clean", 1, 0.0), ("clean", 2, 0.0), ("clean", 3, 0.0), ("garbage", 1, 0.05), ("garbage", 2, 0.05),
            ("sigkill", 1, 0.0), ("two_serves", 1, 0.0), ("selector_churn", 1, 0.0), ("frozen_broker", 1, 0.0)]
    if args.seeds:
        garbage_of = {name: garbage for name, _, garbage in plan}
        plan = [(name, seed, garbage) for name, garbage in garbage_of.items() for seed in args.seeds]
    results = []
    for name, seed, garbage in plan:
        if args.only and name not in args.only:
            continue
        result = scenario(name, seed, args.rate, args.seconds, garbage)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
