"""Featurisation: stable hashing, open component names, the 15-candidate cap."""

from __future__ import annotations

import subprocess
import sys

from learner.features import Featurizer
from stream.events import Bag, SelectionRequest


def test_hash_rows_are_stable_across_processes():
    code = "from learner.features import Featurizer; f = Featurizer(); print(f.element_row('title', 't-42'))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert runs == {f"{Featurizer().element_row('title', 't-42')}\n"}


def test_id_kinds_use_separate_rows():
    f = Featurizer()
    assert f.element_row("title", "x") != f.element_row("image", "x")
    assert f.context_row("user", "7") != f.context_row("ad", "7")
    assert f.element_row("sticker", "x") != f.element_row("badge", "x")  # unseen components stay apart


def test_unseen_component_is_featurized():
    request = SelectionRequest.model_validate(
        {"request_id": "r", "ad_id": "a", "candidates": {"sticker": ["s1", "s2"], "title": ["t1"]}})
    batch = Featurizer().batch([request])
    assert batch.group_names == ["sticker", "title"] and batch.arrays["group_size"].tolist() == [2, 1]


def test_pools_are_capped_but_the_shown_element_stays_trainable():
    candidates = [f"t{i}" for i in range(40)]
    bag = Bag.model_validate({"impression_id": "i", "ts": 0, "ad_id": "a", "candidates": {"title": candidates},
                              "shown": {"title": "t33"}, "clicked": True})
    f = Featurizer(max_candidates=15)
    labelled = f.batch([bag], labelled=True)
    assert labelled.arrays["group_size"].tolist() == [15]
    assert labelled.candidate_ids[0][int(labelled.arrays["element_pos"][labelled.arrays["shown"][0]])] == "t33"
    assert f.batch([bag]).candidate_ids[0] == candidates[:15]  # serving never looks at what was shown
