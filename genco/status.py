"""``genco status``: the operator's one-screen view of a running ``genco serve``.

It reads the Prometheus endpoint that ``genco serve`` already exposes (one source of
truth, no second channel into the agents) and the snapshot store in the state dir,
which answers even when nothing is running.

It also judges health, for operators and container healthchecks: an agent that was
restarted ``max_restarts`` times in the last 10 minutes (a crash loop), or whose
consumer has not returned from a fetch for ``max_fetch_age_s`` (stuck), makes the
status unhealthy, and ``genco status`` exits with 2.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from contract.deadletters import bounded
from learner.snapshots import SnapshotError, SnapshotStore

MAX_RESTARTS = 3  # restarts of one agent in the last 10 minutes that count as a crash loop
MAX_FETCH_AGE_S = 60.0  # an agent that has not fetched for longer is stuck


def scrape(url: str, timeout_s: float = 3.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric samples by name (counters without their ``_total`` suffix)."""
    # Imported here, not at the top: importing prometheus_client fixes its value class (multiprocess or not)
    # from the environment, and the genco CLI imports this module before ``genco serve`` sets that up.
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name.removesuffix("_total"), []).append((sample.labels, sample.value))
    return samples


def collect(metrics_url: str, state_dir: str | Path, now: float | None = None, max_restarts: int = MAX_RESTARTS,
            max_fetch_age_s: float = MAX_FETCH_AGE_S) -> dict:
    """Lag, pending bags, dead letters by reason, duplicates, trained bags, the model and its age; agents'
    restarts, last errors and fetch ages, and whether all is healthy (``problems`` says what is not)."""
    now = now or time.time()
    status: dict = {"metrics_url": metrics_url, "running": False}
    newest = _newest_snapshot(Path(state_dir) / "snapshots", now)
    if newest:
        status["newest_snapshot"] = newest
    try:
        samples = scrape(metrics_url)
    except OSError as error:
        status["error"] = f"no metrics at {metrics_url} ({error}): is genco serve running?"
        return status

    def total(name: str) -> float:
        return sum(value for _, value in samples.get(name, []))

    def by(name: str, *labels: str) -> dict[str, float]:
        return {"/".join(ls[label] for label in labels): v for ls, v in samples.get(name, []) if v}

    loaded_at = total("genco_model_loaded_timestamp_seconds")
    status.update({
        "running": True,
        "agents_ready": sorted(ls["agent"] for ls, v in samples.get("genco_agent_ready", []) if v),
        "serving_model_version": int(total("genco_model_version")),
        "serving_model_loaded_s_ago": round(now - loaded_at, 1) if loaded_at else None,
        "consumer_lag": by("genco_consumer_lag", "agent", "topic"),
        "pending_impressions": int(total("genco_pending_impressions")),
        "dead_letters": by("genco_dead_letters", "topic", "reason"),
        "duplicates_skipped": by("genco_duplicates_skipped", "kind"),
        "orphan_clicks": int(total("genco_orphan_clicks")),
        "events_in": by("genco_events_in", "topic"),
        "bags_out": by("genco_bags_out", "clicked"),
        "trained_bags": int(total("genco_trained_bags")),
        "selections": by("genco_selections", "policy"),
        "snapshot_load_failures": int(total("genco_snapshot_load_failures")),
        "serving_policy": next((ls["policy"] for ls, v in samples.get("genco_serving_policy", []) if v), None),
        "agents": _agents(samples, now),
    })
    status["problems"] = _problems(status["agents"], max_restarts, max_fetch_age_s)
    status["healthy"] = not status["problems"]
    return status


def _agents(samples: dict, now: float) -> dict[str, dict]:
    """Per agent: restarts (all, and in the last 10 minutes), last exit and last error, seconds since its last
    fetch (None when it has not fetched since it last started)."""
    agents: dict[str, dict] = {}

    def agent(labels: dict[str, str]) -> dict:
        return agents.setdefault(labels["agent"], {"restarts": 0, "recent_restarts": 0, "last_exit": None,
                                                   "last_error": None, "fetched_s_ago": None})

    for labels, value in samples.get("genco_agent_restarts", []):
        agent(labels)["restarts"] = int(value)
    for labels, value in samples.get("genco_agent_recent_restarts", []):
        agent(labels)["recent_restarts"] = int(value)
    for labels, value in samples.get("genco_agent_last_fetch_timestamp_seconds", []):
        if value:
            agent(labels)["fetched_s_ago"] = round(now - value, 1)
    for name, field, label in (("genco_agent_last_exit_timestamp_seconds", "last_exit", "status"),
                               ("genco_agent_last_error_timestamp_seconds", "last_error", "error")):
        for labels, value in samples.get(name, []):
            entry = agent(labels)
            if value and (entry[field] is None or value > now - entry[field]["s_ago"]):
                entry[field] = {label: labels[label], "s_ago": round(now - value, 1)}
    return dict(sorted(agents.items()))


def _problems(agents: dict[str, dict], max_restarts: int, max_fetch_age_s: float) -> list[str]:
    problems = []
    for name, agent in agents.items():
        if agent["recent_restarts"] >= max_restarts:
            problems.append(f"agent {name} restarted {agent['recent_restarts']} times in 10 minutes (crash loop)")
        if agent["fetched_s_ago"] is not None and agent["fetched_s_ago"] > max_fetch_age_s:
            problems.append(f"agent {name} has not fetched for {agent['fetched_s_ago']:.0f} s")
    return problems


def _newest_snapshot(directory: Path, now: float) -> dict | None:
    try:
        manifest = SnapshotStore(directory).manifest()
    except SnapshotError:
        return None
    return {"version": manifest.version, "bags_seen": manifest.bags_seen, "age_s": round(now - manifest.created, 1),
            "serving": manifest.serving, "estimates": manifest.estimates or {}}


def _render_estimates(estimates: dict[str, dict]) -> str:
    """"genco 0.05210 ± 0.00080, ..." (a policy without an exposure yet: "-")."""
    return ", ".join(f"{policy} " + (f"{e['sctr']:.5f} ± {e['se']:.5f}" if e.get("sctr") is not None else "-")
                     for policy, e in estimates.items())


def render(status: dict) -> list[str]:
    """The status as aligned human lines."""
    lines = []
    if "newest_snapshot" in status:
        s = status["newest_snapshot"]
        lines.append(f"newest snapshot      v{s['version']}, {s['bags_seen']} bags seen, {s['age_s']:.0f} s old")
        estimates = f"; explore-slice sCTR {_render_estimates(s['estimates'])}" if s["estimates"] else ""
        lines.append(f"snapshot serves      {s['serving']}{estimates}")
    if not status["running"]:
        return [*lines, status["error"]]
    lines.append(f"health               {'ok' if status['healthy'] else '; '.join(status['problems'])}")
    lines.append(f"agents ready         {', '.join(status['agents_ready']) or 'none yet'}")
    for name, agent in status["agents"].items():
        fetched = agent["fetched_s_ago"]
        line = f"  {name:<9} restarts {agent['restarts']} ({agent['recent_restarts']} in 10 min), last fetch " + (
            f"{fetched:.0f} s ago" if fetched is not None else "none since start")
        if agent["last_exit"]:
            line += f", last exit status {agent['last_exit']['status']} {agent['last_exit']['s_ago']:.0f} s ago"
        if agent["last_error"]:
            line += f", last error {agent['last_error']['error']} {agent['last_error']['s_ago']:.0f} s ago"
        lines.append(line)
    age = status["serving_model_loaded_s_ago"]
    if "selector" not in status["agents"]:  # genco serve --agents without one: nothing here serves
        lines.append("serving model        none here (this genco serve runs no selector)")
    else:
        lines.append(f"serving model        v{status['serving_model_version']}"
                     + (f" (loaded {age:.0f} s ago)" if age is not None else " (uniform fallback: no snapshot yet)"))
    if status["serving_policy"]:  # the readout the selector serves now (the snapshot above may be newer)
        lines.append(f"serving policy       {status['serving_policy']}")
    lines.append(f"pending impressions  {status['pending_impressions']}")
    lines.append(f"trained bags         {status['trained_bags']}")
    lines.append(f"orphan clicks        {status['orphan_clicks']}")
    lines.append(f"snapshot load fails  {status['snapshot_load_failures']}")
    for title, key in (("consumer lag", "consumer_lag"), ("dead letters", "dead_letters"),
                       ("duplicates skipped", "duplicates_skipped"), ("events in", "events_in"),
                       ("bags out (clicked)", "bags_out"), ("selections", "selections")):
        values = status[key]
        lines.append(f"{title:<20} " + (", ".join(f"{k} {v:.0f}" for k, v in sorted(values.items())) or "none"))
    return [bounded(line, 4096) for line in lines]  # label values reach the terminal: control characters escaped
