"""The `genco` command line as a user runs it: train, select and evaluate on files, bad lines included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contract.events import Bag
from learner.evaluate import calibrated_sctr
from tests.conftest import make_log, write_jsonl

GENCO = [sys.executable, "-m", "genco.cli"]


def genco(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*GENCO, *args], input=stdin, capture_output=True, check=False, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, list[dict], list[dict]]:
    """A snapshot trained by `genco train` on a log with bad lines mixed in, and a held-out log."""
    root = tmp_path_factory.mktemp("cli")
    _, log = make_log(seed=5, n_ads=30, bags=8000)
    train, held_out = log[:6000], log[6000:]
    lines = [json.dumps(b) for b in train]
    lines.insert(10, "{not json")
    lines.insert(20, json.dumps({**train[0], "shown": {"title": "nope"}}))
    lines.insert(30, json.dumps({k: v for k, v in train[1].items() if k != "clicked"}))
    bags = root / "bags.jsonl"
    bags.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad bytes\n")
    snapshots = root / "snap"
    result = genco("train", str(bags), "--snapshot-dir", str(snapshots), "--json")
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert summary["trained"] == 6000 and summary["bad_lines"] == 4 and summary["version"] == 1
    stderr = result.stderr.decode()
    assert "line 11: " in stderr
    assert "line 21: shown.title 'nope' is not among candidates.title" in stderr
    assert "line 31: clicked: Field required" in stderr
    assert "line 6004: not UTF-8" in stderr
    return snapshots, write_jsonl(root / "held_out.jsonl", held_out), train, held_out


def test_train_again_resumes_and_advances_the_version(trained, tmp_path):
    snapshots, held_out_path, _, _ = trained
    copy = tmp_path / "snap"
    subprocess.run(["cp", "-r", str(snapshots), str(copy)], check=True)
    result = genco("train", str(held_out_path), "--snapshot-dir", str(copy), "--json")
    summary = json.loads(result.stdout.decode().splitlines()[-1])
    assert summary["version"] == 2 and summary["bags_seen"] == 8000


def test_select_answers_every_request_validly_and_reports_bad_ones(trained):
    snapshots, _, _, held_out = trained
    requests = [{k: b[k] for k in ("request_id", "ad_id", "ts", "user", "query", "candidates")} for b in held_out[:300]]
    lines = [json.dumps(r) for r in requests]
    lines.insert(5, json.dumps({"request_id": "broken-1", "ad_id": "a", "candidates": {"title": []}}))
    lines.insert(7, "garbage")
    result = genco("select", "--snapshot-dir", str(snapshots), stdin=("\n".join(lines) + "\n").encode())
    assert result.returncode == 0, result.stderr.decode()
    responses = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert len(responses) == 301
    error = next(r for r in responses if r["request_id"] == "broken-1")
    assert "candidates.title" in error["error"]
    good = [r for r in responses if "error" not in r]
    assert [r["request_id"] for r in good] == [r["request_id"] for r in requests]
    for request, response in zip(requests, good, strict=True):
        assert set(response["shown"]) == set(request["candidates"])
        assert all(response["shown"][c] in request["candidates"][c] for c in request["candidates"])
        assert response["policy"] == "genco" and response["model_version"] == 1 and response["propensity"] is None
    assert "line 8: " in result.stderr.decode()


def test_select_without_snapshot_falls_back_to_uniform_with_propensities(tmp_path):
    request = {"request_id": "r", "ad_id": "a", "candidates": {"title": ["t1", "t2"], "image": ["i1", "i2", "i3"]}}
    result = genco("select", "--snapshot-dir", str(tmp_path / "none"), stdin=(json.dumps(request) + "\n").encode())
    response = json.loads(result.stdout)
    assert response["policy"] == "fallback" and response["model_version"] == 0
    assert response["propensity"] == pytest.approx(1 / 6)


def test_select_with_explore_one_serves_the_uniform_slice(trained):
    snapshots, _, _, held_out = trained
    requests = "".join(json.dumps({k: b[k] for k in ("request_id", "ad_id", "candidates")}) + "\n"
                       for b in held_out[:50])
    result = genco("select", "--snapshot-dir", str(snapshots), "--explore", "1", stdin=requests.encode())
    responses = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert {r["policy"] for r in responses} == {"explore"}
    for r, b in zip(responses, held_out, strict=False):
        expected = 1.0
        for ids in b["candidates"].values():
            expected /= len(ids)
        assert r["propensity"] == pytest.approx(expected)


def test_evaluate_equals_algorithm_1_on_select_output(trained):
    snapshots, held_out_path, _, held_out = trained
    requests = "".join(json.dumps({**b, "request_id": f"x-{i}"}) + "\n" for i, b in enumerate(held_out))
    selected = genco("select", "--snapshot-dir", str(snapshots), "--batch-size", "97", "--threads", "3",
                     stdin=requests.encode())
    selections = [json.loads(line)["shown"] for line in selected.stdout.decode().splitlines()]
    result = genco("evaluate", str(held_out_path), "--snapshot-dir", str(snapshots), "--json")
    reported = json.loads(result.stdout.decode().splitlines()[-1])

    # Algorithm 1 written out independently.
    expected = {}
    for component in sorted({c for b in held_out for c in b["shown"]}):
        exposure = clicks = 0.0
        for bag, pick in zip(held_out, selections, strict=True):
            if component in bag["shown"] and pick[component] == bag["shown"][component]:
                n = len(bag["candidates"][component])
                exposure += n
                clicks += n * bag["clicked"]
        expected[component] = clicks / exposure
    assert reported["policy"]["per_component"] == pytest.approx(expected, rel=1e-12)
    ctr = sum(b["clicked"] for b in held_out) / len(held_out)
    assert reported["uniform"]["combination"] == pytest.approx(ctr)
    readouts = reported.pop("readouts")
    assert reported == {**calibrated_sctr([Bag.model_validate(b) for b in held_out], selections),
                        "bad_lines": 0, "model_version": 1, "serving": "genco"}
    assert set(readouts) == {"genco", "priors", "pooled"} and readouts["genco"] == reported["policy"], (
        "each readout of the snapshot beside the one it serves (genco train's snapshots serve genco)")


def test_simulate_writes_a_uniform_log_that_train_learns_from(tmp_path):
    bags = tmp_path / "bags.jsonl"
    result = genco("simulate", "--log", "2000", "--out", str(bags), "--seed", "4", "--ads", "40")
    assert result.returncode == 0, result.stderr.decode()
    lines = bags.read_text().splitlines()
    assert len(lines) == 2000
    logged = [Bag.model_validate_json(line) for line in lines]
    assert len({bag.impression_id for bag in logged}) == 2000
    assert [bag.ts for bag in logged] == sorted(bag.ts for bag in logged)
    assert {bag.policy for bag in logged} == {"explore"} and 0 < sum(bag.clicked for bag in logged) < 2000
    trained = genco("train", str(bags), "--snapshot-dir", str(tmp_path / "snap"), "--json")
    assert trained.returncode == 0, trained.stderr.decode()
    summary = json.loads(trained.stdout.decode().splitlines()[-1])
    assert summary["trained"] == 2000 and summary["bad_lines"] == 0 and summary["version"] == 1


@pytest.mark.integration
@pytest.mark.slow
def test_demo_runs_the_live_system_and_leaves_a_plot(tmp_path):
    env = {**os.environ, "GENCO_STATE_DIR": str(tmp_path), "GENCO_METRICS_PORT": "0"}
    result = subprocess.run([*GENCO, "demo", "--rate", "150", "--seconds", "25"], capture_output=True, text=True,
                            env=env, timeout=300, check=True)
    assert "genco: embedded broker at kafka://127.0.0.1:" in result.stdout
    answered = next(line for line in result.stdout.splitlines() if line.startswith("selection:"))
    assert "3750/3750 answered, 0 invalid" in answered, result.stdout
    assert "last quarter, true CTR:" in result.stdout
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    # The agents' log lines go to a file, not into the progress table.
    assert f"agents' log: {os.path.relpath(tmp_path / 'demo' / 'agents.log')}" in result.stdout
    agents_log = (tmp_path / "demo" / "agents.log").read_text()
    assert all(f"genco.{agent}" in agents_log for agent in ("joiner", "learner", "selector"))
    assert " INFO " not in result.stdout + result.stderr


def test_the_demo_plot_leaves_out_a_short_last_window():
    from genco.demo import plotted_windows

    full = [{"t": 10.0 * i, "responses": 3000, "uniform_ctr": 0.05} for i in range(5)]
    tail = {"t": 50.0, "responses": 40, "uniform_ctr": 0.025}
    assert plotted_windows([*full, tail]) == full
    assert plotted_windows([*full, {**tail, "responses": 2000}]) == [*full, {**tail, "responses": 2000}]
    assert plotted_windows([{**full[0], "uniform_ctr": None}, *full[1:]]) == full[1:]


def test_the_demo_table_marks_the_short_last_window_the_plot_leaves_out():
    from genco.demo import _printer

    class Lines:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def print(self, text: str) -> None:
            self.lines.append(text)

    out = Lines()
    show = _printer(out)
    row = {"model_version": 3, "genco_ctr": 0.06, "uniform_ctr": 0.05, "oracle_ctr": 0.2}
    for i in range(5):
        show({**row, "t": 10.0 * i, "responses": 3000})
    show({**row, "t": 50.0, "responses": 40})
    assert ["last seconds" in line for line in out.lines] == [False] * 5 + [True]
