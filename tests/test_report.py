"""`genco report` as a user runs it, and what it says: on a world whose components matter in an order set here,
component importance ranks them in that order."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.events import Bag
from learner.evaluate import brackets, sctr_by_candidates
from learner.offline import ProgressiveLogLoss
from sim.world import World, WorldConfig
from tests.conftest import write_jsonl

# Four components with pools of one size distribution, whose element effects' scales are set apart, in an order
# unlike Table 1's (where the image leads), with no context or synergy effects (those are alike in every component
# of this world): the true order of what choosing well in each is worth.
TRUE_ORDER = ("highlight", "title", "marketing", "image")
COMPONENTS = tuple((name, 1.0, 5.0, scale) for name, scale in zip(TRUE_ORDER, (1.2, 0.7, 0.4, 0.15), strict=True))
TRAIN, HELD_OUT = 20_000, 6_000


def genco(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genco.cli", *args], capture_output=True, check=False, timeout=300)


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A snapshot `genco train` wrote on the world of ``COMPONENTS``, a held-out uniform log, and the JSON of
    `genco report` on it."""
    root = tmp_path_factory.mktemp("report")
    world = World(WorldConfig(seed=3, n_ads=60, components=COMPONENTS, churn=0.0, context=0.0, synergy=0.0))
    log = world.uniform_log(TRAIN + HELD_OUT)
    train, held_out = write_jsonl(root / "train.jsonl", log[:TRAIN]), write_jsonl(root / "held.jsonl", log[TRAIN:])
    trained = genco("train", str(train), "--snapshot-dir", str(root / "snap"))
    assert trained.returncode == 0, trained.stderr.decode()
    result = genco("report", str(held_out), "--snapshot-dir", str(root / "snap"), "--out", str(root / "out"), "--json")
    assert result.returncode == 0, result.stderr.decode()
    return root, held_out, json.loads(result.stdout.decode().strip().splitlines()[-1])


def test_component_importance_ranks_components_in_the_order_of_their_true_effects(reported):
    _, _, summary = reported
    importance = summary["component_importance"]
    assert tuple(sorted(importance, key=importance.get, reverse=True)) == TRUE_ORDER, importance
    assert set(summary["mil_weights"]) == set(TRUE_ORDER)
    assert all(0 < w < 1 for w in summary["mil_weights"].values())


def test_report_writes_markdown_figures_and_the_json_the_contract_names(reported):
    root, _, summary = reported
    for key in ("component_importance", "mil_weights", "lift_by_candidates", "sctr", "serving", "policies"):
        assert key in summary, key
    policies = {policy["name"]: policy for policy in summary["policies"]}
    assert set(policies) == {"genco", "priors", "pooled"}  # every readout of the snapshot, each with its sCTR
    assert summary["serving"] == "genco" and [name for name, p in policies.items() if p["serves"]] == ["genco"]
    assert summary["sctr"]["policy"]["pooled"] == policies["genco"]["pooled"]
    assert summary["sctr"]["readouts"]["pooled"]["pooled"] == policies["pooled"]["pooled"]
    assert {b["component"] for b in summary["lift_by_candidates"]} == set(TRUE_ORDER)
    assert all(b["bags"] > 0 for b in summary["lift_by_candidates"])
    figures = [Path(f) for f in summary["figures"]]
    assert len(figures) == 4 and not summary["skipped"]  # genco train kept the learning curve
    assert all(f.suffix == ".png" and f.stat().st_size > 10_000 for f in figures)
    text = (root / "out" / "report.md").read_text()
    for figure in figures:
        assert f"]({figure.name})" in text
    assert "## Lift by number of candidates" in text and "highlight" in text


def test_a_snapshot_without_a_learning_curve_is_reported_without_its_figure(reported, tmp_path):
    root, held_out, _ = reported
    snap = tmp_path / "snap"
    shutil.copytree(root / "snap", snap)
    for manifest in snap.glob("v*/manifest.json"):  # as snapshots were written before they carried one
        fields = json.loads(manifest.read_text())
        del fields["progressive_logloss"]
        manifest.write_text(json.dumps(fields))
    result = genco("report", str(held_out), "--snapshot-dir", str(snap), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr.decode()
    assert "not drawn: progressive_logloss: the snapshot carries no learning curve" in result.stdout.decode()
    assert "No learning curve" in (tmp_path / "out" / "report.md").read_text()


def test_lift_by_candidates_uses_the_papers_brackets_where_they_hold_enough_bags():
    assert brackets("image", [1] * 300 + [4] * 300 + [7] * 300) == ((1, 2), (3, 5), (6, 1000))
    assert brackets("highlight", [2] * 300 + [5] * 300 + [9] * 300) == ((1, 3), (4, 8), (9, 1000))
    assert brackets("image", [2, 3, 4, 5, 6, 7]) == ((2, 3), (4, 5), (6, 7))  # too few: tertiles of the counts
    candidates = {"image": ["a", "b", "c"]}
    bags = [Bag.model_validate({"impression_id": f"i{i}", "ts": 0.0, "ad_id": "ad", "candidates": candidates,
                                "shown": {"image": "abc"[i % 3]}, "clicked": i % 3 == 0}) for i in range(30)]
    [bucket] = sctr_by_candidates(bags, [{"image": "a"}] * 30)
    assert bucket["candidates"] == "3" and bucket["bags"] == 30 and bucket["matched"] == 10
    assert bucket["policy"] == 1.0 and bucket["uniform"] == pytest.approx(1 / 3)


def test_the_learning_curve_stays_small_and_keeps_its_mean():
    import numpy as np

    loss = ProgressiveLogLoss()
    rng = np.random.default_rng(0)
    for _ in range(1000):
        clicked = (rng.random(100) < 0.1).astype(float)
        loss.update(clicked, np.full(100, 0.1))
    curve = loss.curve(points=64)
    assert len(curve["bags"]) <= 64 and curve["bags"][-1] == 100_000
    widths = np.diff([0, *curve["bags"]])
    assert np.average(curve["model"], weights=widths) == pytest.approx(loss.model.get(), abs=1e-5)
    resumed = ProgressiveLogLoss()
    resumed.update(np.zeros(10), np.full(10, 0.1))
    assert resumed.curve(curve, 100_000, points=64)["bags"][-1] == 100_010


def test_a_model_without_mil_is_reported_without_mil_weights(reported, tmp_path):
    from genco.report import build
    from learner.snapshots import SnapshotStore
    from learner.trainer import Learner, preset

    _, held_out, _ = reported
    bags = [Bag.model_validate_json(line) for line in held_out.read_text().splitlines()[:3000]]
    learner = Learner(preset("default", mil=False, prior=False))
    learner.learn(bags[:2048])
    SnapshotStore(tmp_path / "snap").save(learner.model, version=1, bags_seen=2048, steps=learner.steps,
                                          train_config=learner.preset.train.to_dict())
    summary = build(bags[2048:], str(tmp_path / "snap"), tmp_path / "out")
    assert summary["mil_weights"] is None and set(summary["component_importance"]) == set(TRUE_ORDER)
    assert len(summary["figures"]) == 3 and "progressive_logloss" in summary["skipped"]
    assert "| - | - |" in (tmp_path / "out" / "report.md").read_text()  # the MIL columns say there is nothing
