"""The contract's messages: good ones parse, bad ones are rejected with the field at fault named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from contract.events import Bag, Impression, SelectionRequest, describe_error

IMPRESSION = {
    "impression_id": "imp-5", "ts": 1763900001.0, "ad_id": "ad-7",
    "user": {"id": "u-3", "age": 2, "gender": 1}, "query": {"id": "q-9", "segments": ["red", "dress"]},
    "candidates": {"title": ["t1", "t2"], "image": ["i1", "i2", "i3"], "highlight": ["h4"]},
    "shown": {"title": "t2", "image": "i1", "highlight": "h4"},
    "request_id": "r-81", "policy": "genco", "propensity": None,
}


def error_of(model, value: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(value)
    return describe_error(caught.value)


def test_contract_examples_parse_and_unknown_fields_are_ignored():
    imp = Impression.model_validate({**IMPRESSION, "brand_new_field": [1, 2]})
    assert imp.shown["image"] == "i1"
    bag = Bag.model_validate({**IMPRESSION, "clicked": True, "click_ts": 1763900003.5})
    assert bag.clicked and bag.click_ts == 1763900003.5
    req = SelectionRequest.model_validate({"request_id": "r-1", "ad_id": "a", "candidates": {"x": ["e"]}})
    assert req.user is None and req.candidates == {"x": ["e"]}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"shown": {"title": "t2", "image": "i9", "highlight": "h4"}},
         "shown.image 'i9' is not among candidates.image"),
        ({"shown": {"nope": "t2"}}, "shown.nope is not a component of candidates"),
        ({"candidates": {}}, "candidates"),
        ({"candidates": {"title": []}, "shown": {}}, "candidates.title"),
        ({"candidates": {"title": ["t1", "t1"]}, "shown": {"title": "t1"}}, "candidates.title has repeated"),
        ({"candidates": {"title": [f"t{i}" for i in range(1001)]}, "shown": {"title": "t1"}}, "candidates.title"),
        ({"ad_id": "a" * 257}, "ad_id"),
        ({"ts": "yesterday"}, "ts"),
        ({"ts": float("nan")}, "ts: Input should be a finite number"),
        ({"ts": float("inf")}, "ts: Input should be a finite number"),
        ({"user": {"age": "old"}}, "user.age"),
    ],
)
def test_bad_impressions_name_the_field(change, named):
    assert named in error_of(Impression, {**IMPRESSION, **change})


def test_missing_fields_are_each_named():
    message = error_of(Bag, {"impression_id": "i"})
    for missing in ("ts", "ad_id", "candidates", "shown", "clicked"):
        assert f"{missing}: Field required" in message


def test_request_with_empty_id_is_rejected():
    assert "request_id" in error_of(SelectionRequest, {"request_id": "", "ad_id": "a", "candidates": {"x": ["e"]}})
