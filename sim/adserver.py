"""A simulated ad server speaking only the contract: the closed loop that demo, tests and benchmarks drive.

It sends SelectionRequests at a steady rate, shows whatever each SelectionResponse
chose, publishes the Impression, and clicks with the world's *true* probability
after a delay inside the attribution window. Because the world's truth is known,
it scores what genco served (true CTR) beside the uniform policy and the oracle,
window by window, and checks every response against the contract.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import random
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from sim.garbage import corrupt
from sim.world import World
from stream.kafka import Connection, Topics


@dataclass
class Window:
    """Scores of the responses received in one stretch of time."""

    start: float
    served: list[float] = field(default_factory=list)  # true CTR of every served combination
    learned: list[float] = field(default_factory=list)  # ... of those the learned policy chose
    uniform: list[float] = field(default_factory=list)  # sampled: the uniform policy's CTR
    oracle: list[float] = field(default_factory=list)
    versions: set[int] = field(default_factory=set)

    def row(self) -> dict:
        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return {"t": round(self.start, 1), "responses": len(self.served), "served_ctr": mean(self.served),
                "genco_ctr": mean(self.learned), "uniform_ctr": mean(self.uniform), "oracle_ctr": mean(self.oracle),
                "model_version": max(self.versions, default=0)}


@dataclass
class Report:
    sent: int = 0
    answered: int = 0
    invalid: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    policies: dict[str, int] = field(default_factory=dict)
    impressions: int = 0
    clicks: int = 0
    labels: dict[str, bool] = field(default_factory=dict)  # impression_id -> clicked (the truth bags must match)
    versions: list[int] = field(default_factory=list)  # model_version of each response, in arrival order
    windows: list[dict] = field(default_factory=list)
    garbage: dict[str, int] = field(default_factory=dict)  # broken messages sent, by topic
    errors_due: set[str] = field(default_factory=set)  # broken requests whose request_id is readable
    errors_answered: set[str] = field(default_factory=set)  # ... that got their error response
    seen_late: int = 0  # answered, but found only by reading the responses again after the run (``_sweep``)

    def last_quarter(self) -> dict[str, float] | None:
        """True CTR of the learned, uniform and oracle policies over the last quarter of the responses: the
        newest windows that together hold a quarter of them, weighted by responses (the run's final window
        is often a short tail, and a quarter of six windows is one)."""
        rows = [r for r in self.windows if r["genco_ctr"] is not None and r["uniform_ctr"] is not None]
        quarter = sum(r["responses"] for r in rows) / 4
        picked: list[dict] = []
        while rows and sum(r["responses"] for r in picked) < quarter:
            picked.append(rows.pop())
        n = sum(r["responses"] for r in picked)
        if not n:
            return None
        return {k: sum(r[f"{k}_ctr"] * r["responses"] for r in picked) / n for k in ("genco", "uniform", "oracle")}

    def latency_percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


def check_response(response: dict, request: dict) -> str | None:
    """Why a response breaks the contract, or None."""
    if "error" in response:
        return f"error response: {response['error']}"
    shown = response.get("shown")
    if not isinstance(shown, dict) or set(shown) != set(request["candidates"]):
        return "shown does not cover exactly the requested components"
    if any(shown[c] not in ids for c, ids in request["candidates"].items()):
        return "shown element not among the candidates"
    if response.get("policy") not in ("genco", "explore", "fallback"):
        return f"unknown policy {response.get('policy')!r}"
    if response["policy"] != "genco" and not response.get("propensity"):
        return "explore/fallback response without propensity"
    if not isinstance(response.get("model_version"), int):
        return "model_version missing"
    return None


class AdServer:
    def __init__(self, world: World, connection: Connection, topics: Topics, rate: float, requests: int,
                 window_s: float, window_every_s: float = 10.0, truth_sample: float = 0.1, seed: int = 0,
                 garbage: float = 0.0) -> None:
        self.world = world
        self.connection = connection
        self.topics = topics
        self.rate = rate
        self.requests = requests
        self.window_s = window_s
        self.window_every_s = window_every_s
        self.truth_sample = truth_sample
        self.rng = random.Random(seed)
        self.garbage = garbage  # share of messages followed by a broken copy on the same topic
        self.garbage_rng = random.Random(seed + 1)  # its own stream: the good traffic stays as without garbage
        self.report = Report()
        self.outstanding: dict[str, tuple[float, dict]] = {}
        self.clicks: list[tuple[float, bytes, bytes]] = []
        self.window: Window | None = None
        self.on_window = None  # optional callback(row) for live progress
        # optional callback(request, response, true CTR) for every valid answer: for a caller that scores by
        # request rather than by window of time (benchmarks/live.py, by tenth of the run)
        self.on_response = None

    async def run(self, drain_s: float = 30.0) -> Report:
        # Batches of ~5 messages rather than one each: the embedded broker's cost per fetch grows with the
        # number of batches stored (docs/architecture.md, "The embedded broker"); 10 ms is what an ad
        # server would accept.
        producer = self.connection.producer(linger_ms=10)
        await producer.start()
        consumer = AIOKafkaConsumer(bootstrap_servers=list(self.connection.servers), group_id=None,
                                    enable_auto_commit=False, fetch_max_wait_ms=10,
                                    **dict(self.connection.security))
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(self.topics.responses) or {0}
            tps = [TopicPartition(self.topics.responses, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)
            self.started = time.time()
            self.window = Window(0.0)
            reader = asyncio.create_task(self._read(consumer, producer))
            clicker = asyncio.create_task(self._click(producer))
            await self._send(producer)
            deadline = time.monotonic() + drain_s
            while (self.outstanding or self.clicks) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            reader.cancel()
            clicker.cancel()
            await asyncio.gather(reader, clicker, return_exceptions=True)
            if self.outstanding:
                await self._sweep(consumer, tps)
            self._close_window()
            await producer.flush()
        finally:
            await consumer.stop()
            await producer.stop()
        return self.report

    async def _send(self, producer) -> None:
        start = time.monotonic()
        while self.report.sent < self.requests:
            due = min(int((time.monotonic() - start) * self.rate) + 1, self.requests)
            while self.report.sent < due:
                request_id = f"r-{self.report.sent}"
                request = self.world.request(request_id)
                request["ts"] = time.time()
                self.outstanding[request_id] = (time.monotonic(), request)
                value = json.dumps(request).encode()
                await producer.send(self.topics.requests, value, key=request_id.encode())
                await self._maybe_garbage(producer, "request", value)
                self.report.sent += 1
            await asyncio.sleep(0.005)

    async def _click(self, producer) -> None:
        """Clicks are sent when due by a loop of their own, as by a click tracker beside the ad server: a
        request send that waits on the broker (aiokafka blocks once a partition's batch is full) must not
        hold back clicks, or the simulator itself would deliver them after later impressions."""
        while True:
            now = time.time()
            while self.clicks and self.clicks[0][0] <= now:
                _, key, value = heapq.heappop(self.clicks)
                await producer.send(self.topics.clicks, value, key=key)
                await self._maybe_garbage(producer, "click", value)
                self.report.clicks += 1
            await asyncio.sleep(0.005)

    async def _maybe_garbage(self, producer, kind: str, value: bytes) -> None:
        """With probability ``garbage``, follow the good message ``value`` with a broken copy of it."""
        if not self.garbage or self.garbage_rng.random() >= self.garbage:
            return
        topic = {"request": self.topics.requests, "impression": self.topics.impressions,
                 "click": self.topics.clicks}[kind]
        bad = corrupt(kind, json.loads(value), self.garbage_rng)
        await producer.send(topic, bad.raw)
        self.report.garbage[topic] = self.report.garbage.get(topic, 0) + 1
        if bad.request_id is not None:
            self.report.errors_due.add(bad.request_id)

    async def _read(self, consumer, producer) -> None:
        while True:
            batches = await consumer.getmany(timeout_ms=100)
            for records in batches.values():
                for record in records:
                    await self._on_response(record.value, producer)

    async def _sweep(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        """Read the responses again from the beginning for the requests still outstanding.

        On the embedded broker a consumer that follows a partition which several producers write at once
        (two selectors' responses) can skip a whole batch: a later batch becomes readable before an earlier
        one, and the reader's position moves past it. A response found here was given, only not seen in
        time: it counts as answered (``Report.seen_late``), with no latency and no impression.
        """
        await consumer.seek_to_beginning(*tps)
        idle = 0
        while idle < 2 and self.outstanding:
            batches = await consumer.getmany(timeout_ms=500)
            idle = 0 if batches else idle + 1
            for record in (record for records in batches.values() for record in records):
                try:
                    response = json.loads(record.value)
                    request_id = response["request_id"]
                except (ValueError, KeyError, TypeError):
                    continue  # judged when it was read the first time
                if self._claim(request_id, response):
                    self.report.seen_late += 1

    def _claim(self, request_id: str, response: dict) -> tuple[float, dict] | None:
        """The outstanding request a response answers (when it was sent, the request), now counted as answered;
        None when none is outstanding (a repeated answer, allowed after a crash, or another client's) or when
        the response breaks the contract (then recorded as invalid)."""
        entry = self.outstanding.pop(request_id, None)
        if entry is None:
            return None
        problem = check_response(response, entry[1])
        if problem:
            self.report.invalid.append(f"{request_id}: {problem}")
            return None
        self.report.answered += 1
        return entry

    async def _on_response(self, raw: bytes, producer) -> None:
        received = time.monotonic()
        try:
            response = json.loads(raw)
            request_id = response["request_id"]
        except (ValueError, KeyError, TypeError):
            self.report.invalid.append(f"unparseable response {raw[:200]!r}")
            return
        if request_id in self.report.errors_due:
            if "error" in response:
                self.report.errors_answered.add(request_id)
            else:
                self.report.invalid.append(f"{request_id}: a broken request was answered")
            return
        entry = self._claim(request_id, response)
        if entry is None:
            return
        sent_at, request = entry
        report = self.report
        report.latencies_ms.append(1000 * (received - sent_at))
        report.policies[response["policy"]] = report.policies.get(response["policy"], 0) + 1
        report.versions.append(response["model_version"])
        shown = response["shown"]
        p = self.world.click_probability(request, shown)
        self._score(request, response, p)
        if self.on_response:
            self.on_response(request, response, p)
        ts = time.time()
        impression_id = f"imp-{request_id}"
        impression = {**request, "impression_id": impression_id, "ts": ts, "shown": shown,
                      "policy": response["policy"], "propensity": response["propensity"]}
        value = json.dumps(impression).encode()
        await producer.send(self.topics.impressions, value, key=impression_id.encode())
        await self._maybe_garbage(producer, "impression", value)
        report.impressions += 1
        clicked = self.rng.random() < p
        report.labels[impression_id] = clicked
        if clicked:
            delay = self.rng.uniform(0.05, 0.8 * self.window_s)
            click = json.dumps({"impression_id": impression_id, "ts": ts + delay}).encode()
            heapq.heappush(self.clicks, (ts + delay, impression_id.encode(), click))

    def _score(self, request: dict, response: dict, p: float) -> None:
        elapsed = time.time() - self.started
        if elapsed - self.window.start >= self.window_every_s:
            self._close_window()
            self.window = Window(elapsed - elapsed % self.window_every_s)
        window = self.window
        window.served.append(p)
        window.versions.add(response["model_version"])
        if response["policy"] == "genco":
            window.learned.append(p)
        if self.rng.random() < self.truth_sample:
            uniform, oracle, _ = self.world.values(request)
            window.uniform.append(uniform)
            window.oracle.append(oracle)

    def _close_window(self) -> None:
        if self.window and self.window.served:
            row = self.window.row()
            self.report.windows.append(row)
            if self.on_window:
                self.on_window(row)
