"""Failures show: an agent in a crash loop makes ``genco status`` unhealthy (exit 2) and says which, and why."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from rocksdict import Options, Rdict

from genco.status import collect
from sim.harness import serve_env, serve_log, start_serve, stop_serve, wait_ready
from stream.embedded import free_port
from stream.kafka import Topics


def genco_status(broker: str, topics: Topics, state, port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genco.cli", "status", *args], capture_output=True, text=True,
                          env=serve_env(broker, topics, state, port), timeout=60)


@pytest.mark.integration
def test_a_crash_looping_agent_makes_status_unhealthy_until_it_recovers(broker, tmp_path):
    topics = Topics(f"h{uuid.uuid4().hex[:8]}.")
    port = free_port()
    (tmp_path / "learner").mkdir()
    lock = Rdict(str(tmp_path / "learner"), Options(raw_mode=True))  # the learner cannot open its store
    serve = start_serve(broker, topics, tmp_path, port)
    try:
        deadline = time.monotonic() + 120
        url = f"http://127.0.0.1:{port}/metrics"
        while collect(url, tmp_path).get("agents", {}).get("learner", {}).get("recent_restarts", 0) < 2:
            assert time.monotonic() < deadline, serve_log(tmp_path)[-3000:]
            time.sleep(0.5)
        done = genco_status(broker, topics, tmp_path, port, "--json", "--max-restarts", "2")
        report = json.loads(done.stdout.splitlines()[-1])
        learner = report["agents"]["learner"]
        human = genco_status(broker, topics, tmp_path, port, "--max-restarts", "2")
        assert done.returncode == 2 and not report["healthy"], report
        assert report["problems"] == [f"agent learner restarted {learner['recent_restarts']} times in 10 minutes "
                                      "(crash loop)"]
        assert learner["last_exit"]["status"] == "1" and learner["last_error"]["error"]
        assert "learner" not in report["agents_ready"], "a dead agent does not count as ready"
        assert human.returncode == 2 and "crash loop" in human.stdout and "last error" in human.stdout
        for other in ("joiner", "selector"):
            assert report["agents"].get(other, {}).get("restarts", 0) == 0

        lock.close()  # the fault goes away: the next restart sticks and status recovers
        lock = None
        wait_ready(tmp_path)
        assert genco_status(broker, topics, tmp_path, port, "--max-restarts", "99").returncode == 0
        print(human.stdout)  # what an operator sees during a crash loop (pytest -s shows it)
    finally:
        if lock is not None:
            lock.close()
        stop_serve(serve)
    assert serve.returncode == 0, serve_log(tmp_path)[-3000:]


def test_the_cli_leaves_prometheus_unimported_until_serve_has_set_up_multiprocess_metrics():
    """prometheus_client picks its value class (shared files or process memory) when first imported: imported by
    the CLI before ``genco serve`` sets PROMETHEUS_MULTIPROC_DIR, the supervisor's restart counts were invisible."""
    probe = "import sys, genco.cli; print('prometheus_client' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip() == "False"


def test_status_of_a_serve_without_a_selector_says_nothing_serves_there():
    """A learner-only ``genco serve --agents`` has no serving model: its status must not read as a selector
    stuck on the uniform fallback."""
    from genco.status import render

    agent = {"restarts": 0, "recent_restarts": 0, "last_exit": None, "last_error": None, "fetched_s_ago": 0.5}
    status = {"running": True, "healthy": True, "problems": [], "agents_ready": ["learner"],
              "agents": {"learner": agent}, "serving_model_version": 0, "serving_model_loaded_s_ago": None,
              "serving_policy": None, "pending_impressions": 0, "trained_bags": 10, "orphan_clicks": 0,
              "snapshot_load_failures": 0, "consumer_lag": {}, "dead_letters": {}, "duplicates_skipped": {},
              "events_in": {}, "bags_out": {}, "selections": {}}
    assert "serving model        none here (this genco serve runs no selector)" in render(status)
    status["agents"]["selector"] = agent
    assert "serving model        v0 (uniform fallback: no snapshot yet)" in render(status)
