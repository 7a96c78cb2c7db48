"""The learner's marks of trained impressions: kept in its store, swept by event time, carried in checkpoints."""

from __future__ import annotations

import time

from state.kv import Store, encode_time
from stream.trained_ids import TrainedIds

HORIZON = 3600.0


def test_marks_are_recorded_with_the_checkpoint_and_travel_to_another_store(tmp_path):
    now = time.time()
    ids = TrainedIds(Store(tmp_path / "first"), HORIZON)
    for i in range(100):
        ids.add(f"imp-{i}", now + i)
    assert "imp-7" in ids and "imp-100" not in ids, "unrecorded marks count at once"
    tx = ids.store.transaction()
    ids.record(tx)
    tx.commit()
    assert "imp-7" in ids and not ids.unrecorded and len(ids) == 100
    other = TrainedIds(Store(tmp_path / "second"), HORIZON)
    tx = other.store.transaction()
    assert other.restore(tx, {**ids.tensors(), "element_table.weight": None}) == 100
    tx.commit()
    assert all(f"imp-{i}" in other for i in range(100)) and "imp-100" not in other
    tx = other.store.transaction()
    assert other.restore(tx, ids.tensors()) == 0, "marks it has already are not added twice"


def test_marks_expire_a_horizon_after_the_newest_bag_and_a_future_ts_expires_none(tmp_path):
    ids = TrainedIds(Store(tmp_path), HORIZON)
    now = time.time()
    ids.add("old", now - 3 * HORIZON)
    ids.add("recent", now - HORIZON / 2)
    tx = ids.store.transaction()
    ids.record(tx)
    tx.commit()
    ids.add("new", now)
    ids.add("forged", 1e300)  # held to now + FUTURE_GRACE_S
    tx = ids.store.transaction()
    ids.record(tx)
    tx.commit()
    assert "old" not in ids and all(name in ids for name in ("recent", "new", "forged"))
    assert sorted(len(marks) for marks in ids.tensors().values()) == [1, 1, 1], "one mark per minute left"


def test_a_store_written_before_the_marks_were_hashes_is_rewritten_once(tmp_path):
    store = Store(tmp_path)
    tx = store.transaction()
    for impression_id in ("imp-1234", "an-id-of-any-length"):  # 8 bytes long, like a hash, and not
        tx.put(b"t" + impression_id.encode(), b"")
        tx.put(b"x" + encode_time(time.time() + HORIZON) + impression_id.encode(), b"")
    tx.commit()
    ids = TrainedIds(store, HORIZON)
    assert "imp-1234" in ids and "an-id-of-any-length" in ids and len(ids) == 2
    assert sum(len(marks) for marks in ids.tensors().values()) == 2
    assert "imp-1234" in TrainedIds(store, HORIZON), "the rewritten store is read as it is"


def test_a_bag_a_horizon_older_than_the_newest_trained_is_stale_whatever_its_mark(tmp_path):
    """A joiner taking over on a fresh host re-sends bags from the start of the retained input: those whose
    marks are long swept must not be trained again. A forged future ts moves the newest only to the grace."""
    now = time.time()
    ids = TrainedIds(Store(tmp_path / "first"), HORIZON)
    ids.add("now", now)
    ids.add("forged", 1e300)
    assert not ids.stale(now - HORIZON / 2) and not ids.stale(now) and ids.stale(now - 2 * HORIZON)
    tx = ids.store.transaction()
    ids.record(tx)
    tx.commit()
    assert ids.stale(now - 2 * HORIZON) and not ids.stale(now), "the newest survives a restart of the store"
    reopened = TrainedIds(ids.store, HORIZON)
    assert reopened.stale(now - 2 * HORIZON) and not reopened.stale(now)
    other = TrainedIds(Store(tmp_path / "second"), HORIZON)
    tx = other.store.transaction()
    other.restore(tx, ids.tensors())
    tx.commit()
    assert other.stale(now - 2 * HORIZON) and not other.stale(now - HORIZON / 2), "and travels in checkpoints"
