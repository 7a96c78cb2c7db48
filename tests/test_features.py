"""Featurisation: stable hashing, open component names, the 15-candidate cap, the parser process."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import numpy as np
import torch

from contract.events import Bag, SelectionRequest
from contract.jsonl import BadLines
from learner.features import Featurizer
from learner.offline import SLOTS, bag_batches, file_batches
from learner.ops import mix64, pair_key
from learner.priors import CountTable
from learner.trainer import Learner
from tests.conftest import make_log


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
    assert batch.component_names == ["sticker", "title"] and batch.pools.size.tolist() == [2, 1]


def test_pools_are_capped_but_the_shown_element_stays_trainable():
    candidates = [f"t{i}" for i in range(40)]
    bag = Bag.model_validate({"impression_id": "i", "ts": 0, "ad_id": "a", "candidates": {"title": candidates},
                              "shown": {"title": "t33"}, "clicked": True})
    f = Featurizer(max_candidates=15)
    labelled = f.batch([bag], labelled=True)
    assert labelled.pools.size.tolist() == [15]
    assert labelled.candidate_ids[0][int(labelled.elements.pos[labelled.pools.shown[0]])] == "t33"
    assert f.batch([bag]).candidate_ids[0] == candidates[:15]  # serving never looks at what was shown
    within = bag.model_copy(update={"shown": {"title": "t3"}})  # the same ad's pools, listed once a batch
    both = f.batch([within, bag, within], labelled=True)
    assert both.candidate_ids == [candidates[:15], [*candidates[:14], "t33"], candidates[:15]]
    assert both.elements.pos[both.pools.shown].tolist() == [3, 14, 3]


def test_the_logged_combination_is_laid_out_for_training():
    bags = [Bag.model_validate(b) for b in make_log(seed=5, n_ads=10, bags=200)[1]]
    batch = Featurizer().batch(bags, labelled=True)
    logged, pools = batch.logged, batch.pools
    shown = [[int(pools.shown[g]) for g in group if pools.shown[g] >= 0] for group in batch.request_pools()]
    assert [len(s) for s in shown] == [len(bag.shown) for bag in bags]
    assert logged.element.tolist() == [e for s in shown for e in s]
    assert logged.request.tolist() == [r for r, s in enumerate(shown) for _ in s]
    pairs = [(s[x], s[y]) for s in shown for x in range(len(s)) for y in range(x + 1, len(s))]
    assert list(zip(logged.pair_first.tolist(), logged.pair_second.tolist(), strict=True)) == pairs
    crosses = np.flatnonzero(np.isin(batch.crosses.element, logged.element))
    assert logged.cross.tolist() == crosses.tolist() and len(crosses) >= 2 * len(logged.element)
    assert np.array_equal(logged.cross_request, batch.elements.request[batch.crosses.element[crosses]])


def test_parsing_good_and_bad_lines_leaves_no_reference_cycles():
    """genco train's parser process runs without the cycle collector; garbage in cycles would pile up."""
    _, log = make_log(seed=3, n_ads=10, bags=3000)
    lines = [json.dumps(b).encode() + b"\n" for b in log]
    lines[10:3000:50] = [b"{not json\n", b'{"clicked": true}\n', b"\xff\xfe\n"] * 20  # 60 bad lines
    featurizer = Featurizer()  # made (and its own cycles collected) before the count starts
    gc.collect()
    gc.disable()
    try:
        bad = BadLines(report_limit=0)
        batches = list(bag_batches(iter(lines), featurizer, 512, bad))
        assert bad.count == 60 and sum(b.size for b in batches) == 3000 - 60
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cycles = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cycles == []


def test_the_parser_process_sends_what_parsing_in_process_gives(tmp_path):
    """Batches come through shared slots while the caller drops them, and pickled once it holds them all."""
    _, log = make_log(seed=4, n_ads=10, bags=4000)
    lines = [json.dumps(b).encode() + b"\n" for b in log]
    lines[7] = b'{"clicked": true}\n'
    path = tmp_path / "bags.jsonl"
    path.write_bytes(b"".join(lines))
    expected = list(bag_batches(iter(lines), Featurizer(), 256, BadLines(report_limit=0)))

    def arrays(batch) -> list[np.ndarray]:
        found = []
        batch.map_arrays(lambda array: found.append(array) or array)
        return found

    def same(got, want) -> bool:
        got_arrays, want_arrays = arrays(got), arrays(want)
        return (got.attention.blocks == want.attention.blocks and len(got_arrays) == len(want_arrays)
                and (got.pool_width, got.combination_width) == (want.pool_width, want.combination_width)
                and all(a.dtype == b.dtype and np.array_equal(a, b)
                        for a, b in zip(got_arrays, want_arrays, strict=True)))

    bad = BadLines(report_limit=0)
    assert all(same(got, want) for got, want in zip(file_batches(str(path), Featurizer(), 256, bad), expected,
                                                    strict=True))  # each dropped before the next: slots reused
    assert bad.count == 1 and len(expected) > 2 * SLOTS
    held = list(file_batches(str(path), Featurizer(), 256, BadLines(report_limit=0)))  # slots run out
    assert all(same(got, want) for got, want in zip(held, expected, strict=True))


def test_pair_keys_ignore_order_and_hashed_tables_spread_them_evenly():
    rng = np.random.default_rng(0)
    a, b = rng.integers(-(1 << 63), 1 << 63, 200_000), rng.integers(-(1 << 63), 1 << 63, 200_000)
    assert np.array_equal(pair_key(a, b), pair_key(b, a))
    # snapshots hold tables hashed by these keys: the hash must never change
    assert mix64(np.array([0, 1, -1, 123456789])).tolist() == [0, -2152535657050944081, 3703370420611038912,
                                                               -7201185058992827804]
    assert all(np.array_equal(mix64(a[i : i + 5]), mix64(a)[i : i + 5]) for i in range(0, 500, 5))  # short: ints
    rows = CountTable(cells=1 << 10).rows(pair_key(a, b))
    counts = np.bincount(rows, minlength=1 << 10)  # ~195 a cell; Poisson spread ~14
    assert rows.min() >= 0 and counts.min() > 130 and counts.max() < 260
    x = np.arange(1, 1001)  # pairs of one key sum land apart (a linear hash would put them in one cell)
    assert len(np.unique(CountTable(cells=1 << 10).rows(pair_key(x, 5000 - x)))) > 550  # ~640 when random


def test_requests_with_the_same_pools_are_attended_once_with_the_outputs_and_gradients_of_each_alone():
    """Impressions of one ad share its pools; attention reads only pools, so repeats reuse one request's."""
    _, log = make_log(seed=6, n_ads=5, bags=60)
    bags = [Bag.model_validate(b) for b in log]
    bags[3] = bags[3].model_copy(update={"candidates": {**bags[3].candidates, "title": ["t-only-here"]}})
    featurizer = Featurizer()
    batch = featurizer.batch(bags, labelled=True)
    pools = {json.dumps(bag.candidates, sort_keys=True) for bag in bags}
    attended_requests = np.unique(batch.elements.request[batch.attention.attended])
    assert len(attended_requests) == len(pools) < len(bags) // 4

    torch.manual_seed(0)
    model = Learner().model
    weight = torch.randn(len(batch.elements.row), model.config.attention_hidden)
    emb = model.element_table.weight.index_select(0, torch.from_numpy(batch.elements.row))
    z = model._cross_component_attention(batch, emb)
    (z * weight).sum().backward()
    together = model.element_table.weight.grad.to_dense().clone()
    model.zero_grad()
    alone, start = [], 0
    for bag in bags:  # the same requests, one batch each: nothing to share
        one = featurizer.batch([bag], labelled=True)
        emb = model.element_table.weight.index_select(0, torch.from_numpy(one.elements.row))
        alone.append(model._cross_component_attention(one, emb))
        (alone[-1] * weight[start : start + len(alone[-1])]).sum().backward()
        start += len(alone[-1])
    torch.testing.assert_close(z, torch.cat(alone))
    torch.testing.assert_close(together, model.element_table.weight.grad.to_dense())
    assert together.abs().sum() > 0
