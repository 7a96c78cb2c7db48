"""``genco status``: the operator's one-screen view of a running ``genco serve``.

It reads the Prometheus endpoint that ``genco serve`` already exposes (one source of
truth, no second channel into the agents) and the snapshot store in the state dir,
which answers even when nothing is running.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from state.snapshots import SnapshotError, SnapshotStore


def scrape(url: str, timeout_s: float = 3.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Metric samples by name (counters without their ``_total`` suffix)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name.removesuffix("_total"), []).append((sample.labels, sample.value))
    return samples


def collect(metrics_url: str, state_dir: str | Path, now: float | None = None) -> dict:
    """Lag, pending bags, dead letters by reason, duplicates, trained bags, the model and its age."""
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
    })
    return status


def _newest_snapshot(directory: Path, now: float) -> dict | None:
    try:
        manifest = SnapshotStore(directory).manifest()
    except SnapshotError:
        return None
    return {"version": manifest.version, "bags_seen": manifest.bags_seen, "age_s": round(now - manifest.created, 1)}


def render(status: dict) -> list[str]:
    """The status as aligned human lines."""
    lines = []
    if "newest_snapshot" in status:
        s = status["newest_snapshot"]
        lines.append(f"newest snapshot      v{s['version']}, {s['bags_seen']} bags seen, {s['age_s']:.0f} s old")
    if not status["running"]:
        return [*lines, status["error"]]
    lines.append(f"agents ready         {', '.join(status['agents_ready']) or 'none yet'}")
    age = status["serving_model_loaded_s_ago"]
    lines.append(f"serving model        v{status['serving_model_version']}"
                 + (f" (loaded {age:.0f} s ago)" if age is not None else " (uniform fallback: no snapshot yet)"))
    lines.append(f"pending impressions  {status['pending_impressions']}")
    lines.append(f"trained bags         {status['trained_bags']}")
    lines.append(f"orphan clicks        {status['orphan_clicks']}")
    for title, key in (("consumer lag", "consumer_lag"), ("dead letters", "dead_letters"),
                       ("duplicates skipped", "duplicates_skipped"), ("events in", "events_in"),
                       ("bags out (clicked)", "bags_out"), ("selections", "selections")):
        values = status[key]
        lines.append(f"{title:<20} " + (", ".join(f"{k} {v:.0f}" for k, v in sorted(values.items())) or "none"))
    return lines
