"""Snapshots: versioned, atomic, checksummed, loadable without pickle, and resumable."""

from __future__ import annotations

import json

import pytest
import torch

from contract.window import JoinWindow
from learner.features import HashSizes
from learner.model import GenCO, ModelConfig
from learner.snapshots import SnapshotError, SnapshotStore
from learner.trainer import Learner, Preset, TrainConfig

SMALL = ModelConfig(sizes=HashSizes(user=256, ad=256, query=256, segment=64, element=512, other_element=256))


def learner_with_steps(small_world, steps: int = 3) -> Learner:
    _, bags = small_world
    learner = Learner(Preset(SMALL, TrainConfig(batch_size=256)))
    learner.learn(bags[: 256 * steps])
    return learner


def test_roundtrip_gives_identical_scores(tmp_path, small_world):
    learner = learner_with_steps(small_world)
    store = SnapshotStore(tmp_path)
    manifest = store.save(learner.model, version=1, bags_seen=learner.bags_seen, steps=learner.steps,
                          train_config=learner.preset.train.to_dict())
    loaded = store.load()
    assert loaded.manifest == manifest and manifest.bags_seen == 768 and manifest.steps == 3
    batch = learner.featurizer.batch(small_world[1][:64])
    learner.model.eval()
    with torch.no_grad():
        ours, theirs = learner.model, loaded.model
        assert torch.equal(ours.element_logit(batch, ours.encode(batch)),
                           theirs.element_logit(batch, theirs.encode(batch)))
    assert (tmp_path / "v00000001" / "model.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_latest_moves_forward_and_old_versions_are_pruned(tmp_path):
    store = SnapshotStore(tmp_path, keep=2)
    model = GenCO(SMALL)
    for version in (1, 2, 3):
        store.save(model, version=version, bags_seen=version, steps=version, train_config={})
    assert store.latest_version() == 3
    assert sorted(p.name for p in tmp_path.glob("v*")) == ["v00000002", "v00000003"]
    assert not list(tmp_path.glob(".staging-*"))


def test_tampered_weights_are_refused(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save(GenCO(SMALL), version=1, bags_seen=0, steps=0, train_config={})
    weights = tmp_path / "v00000001" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum"):
        store.load()


def test_empty_directory_has_no_snapshot(tmp_path):
    assert SnapshotStore(tmp_path).latest_version() == 0
    with pytest.raises(SnapshotError, match="no snapshot"):
        SnapshotStore(tmp_path).load()


def test_resume_continues_exactly_like_uninterrupted_training(tmp_path, small_world):
    _, bags = small_world
    straight = learner_with_steps(small_world, steps=2)
    straight.learn(bags[512:768])

    first = learner_with_steps(small_world, steps=2)
    store = SnapshotStore(tmp_path)
    store.save(first.model, version=1, bags_seen=first.bags_seen, steps=first.steps,
               train_config=first.preset.train.to_dict(), optimizer_state=first.optimizer_state())
    snap = store.load(with_optimizer=True)
    manifest = json.loads((tmp_path / "v00000001" / "manifest.json").read_text())
    resumed = Learner.resume(snap.model, manifest["train_config"], snap.optimizer_state,
                             manifest["bags_seen"], manifest["steps"])
    resumed.learn(bags[512:768])
    ours, theirs = straight.model.weights(), resumed.model.weights()
    assert ours.keys() == theirs.keys() and any(name.startswith("priors.") for name in ours)
    for name, a in ours.items():
        assert torch.allclose(a, theirs[name], atol=1e-6), name
    assert resumed.steps == 3 and resumed.bags_seen == 768


def test_a_checkpoint_damaged_on_disk_resumes_the_learner_from_the_one_before(tmp_path, small_world):
    """The learner restarts from the newest checkpoint that loads, counting the one that does not, instead of
    crash-looping on it; with none left it stops with an error that names each."""
    from stream.kafka import Connection, Topics
    from stream.metrics import SNAPSHOT_LOAD_FAILURES
    from stream.training import TrainingAgent

    _, bags = small_world

    def agent() -> TrainingAgent:
        return TrainingAgent(Connection(("127.0.0.1:1",)), Topics("s."), tmp_path, JoinWindow(60.0))

    first = agent()
    first.train(bags[:1024])
    first.publish(checkpoint=True)  # v1
    first.train(bags[1024:2048])
    first.publish(checkpoint=True)  # v2, the one recorded
    first.store.close()
    (tmp_path / "snapshots" / "v00000002" / "optimizer.safetensors").write_bytes(b"\x00" * 64)
    failures = SNAPSHOT_LOAD_FAILURES._value.get()

    second = agent()
    assert (second.learner.bags_seen, second.learner.steps) == (1024, 1), "resumed from v1"
    assert SNAPSHOT_LOAD_FAILURES._value.get() - failures == 1
    assert second.version == 2, "new snapshots still count up from the newest"
    second.store.close()

    weights = tmp_path / "snapshots" / "v00000001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short: its checksum no longer matches
    with pytest.raises(SnapshotError, match=r"v2: .*; v1: .*checksum"):
        agent()
