"""Baseline policies: every one in learner/baselines/ is found by itself and checked alike (the serving
contract, learning on a simulated world, its docstring's example), then the arithmetic of particular ones."""

from __future__ import annotations

import copy
import doctest
import importlib
import inspect
import pkgutil
from types import ModuleType

import numpy as np
import pytest

import learner.baselines as package
from contract.events import MAX_COMPONENTS, Bag, SelectionRequest
from learner.baselines import DCO, ClickCounter, Policy, Uniform
from learner.baselines._shared import Candidates
from sim.world import World, WorldConfig

LEARN = 4096  # bags each policy learns in the learning check


def _modules() -> list[ModuleType]:
    """Every module of the package, private ones included (their doctests run too)."""
    return [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]


def _policies_in(module: ModuleType) -> list[type]:
    """The public classes ``module`` defines that have the Policy protocol's methods (the protocol itself not)."""
    return [cls for name, cls in vars(module).items()
            if inspect.isclass(cls) and cls.__module__ == module.__name__ and not name.startswith("_")
            and issubclass(cls, Policy) and not getattr(cls, "_is_protocol", False)]


def _variants(cls: type) -> list[tuple[str, dict]]:
    """A policy with its defaults, and with ``thompson=True`` too where it can serve either way."""
    both = "thompson" in inspect.signature(cls).parameters
    return [(cls.__name__, {}), *([(f"{cls.__name__}(thompson)", {"thompson": True})] if both else [])]


MODULES = _modules()
POLICIES = sorted((cls for module in MODULES for cls in _policies_in(module)), key=lambda cls: cls.__name__)
VARIANTS = [pytest.param(cls, kwargs, id=name) for cls in POLICIES for name, kwargs in _variants(cls)]


def _bag(i: int, shown: dict[str, str], clicked: bool, ad: str = "a", candidates=None) -> Bag:
    return Bag.model_validate(
        {
            "impression_id": f"i{i}",
            "ts": float(i),
            "ad_id": ad,
            "clicked": clicked,
            "shown": shown,
            "candidates": candidates or {c: sorted({e, f"{c}-other"}) for c, e in shown.items()},
        }
    )


@pytest.fixture(scope="module")
def world_log() -> tuple[World, list[Bag], list[dict], list[SelectionRequest]]:
    """A 2-ad world with strong element effects, its uniform log and 300 fresh requests, built once: on it even
    DCO's Hoeffding bounds separate the arms within a few thousand bags."""
    world = World(WorldConfig(n_ads=2, seed=3, quality_scale=3.0, base_logit=-1.0, churn=0.0))
    bags = [Bag.model_validate(b) for b in world.uniform_log(LEARN)]
    raw = [world.request(f"eval-{i}") for i in range(300)]
    return world, bags, raw, [SelectionRequest.model_validate(r) for r in raw]


def _trained(policy: Policy, bags: list[Bag], chunk: int = 1024) -> Policy:
    for i in range(0, len(bags), chunk):
        policy.learn(bags[i : i + chunk])
    return policy


def test_the_package_is_searched():
    """Every module holds one policy, exported by the package; the protocol's module holds none."""
    assert {m.__name__.rsplit(".", 1)[1] for m in MODULES} >= {"base", "_shared", "uniform", "dco"}
    for module in MODULES:
        found = _policies_in(module)
        if module.__name__.rsplit(".", 1)[1] in ("base", "_shared"):
            assert found == [], module.__name__
            continue
        assert len(found) == 1, (module.__name__, found)
        assert getattr(package, found[0].__name__) is found[0] and found[0].__name__ in package.__all__
    assert len(POLICIES) >= 9


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_docstring_examples(module):
    """Each module's examples run as written, and each policy's docstring has one."""
    for cls in _policies_in(module):
        assert ">>>" in (cls.__doc__ or ""), f"{cls.__name__} has no example"
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {module.__name__} failed"


@pytest.mark.parametrize(("cls", "kwargs"), VARIANTS)
def test_serves_one_candidate_per_component(world_log, cls, kwargs):
    """Untrained and trained, for a never-seen ad with never-seen components, a request with the most
    components allowed, and a bag served as a request; ``learn([])`` changes nothing."""
    _, bags, _, requests = world_log
    odd = SelectionRequest.model_validate(
        {
            "request_id": "odd",
            "ad_id": "never-seen",
            "candidates": {
                "sticker": ["s1", "s2", "s3"],
                "title": ["t-new", "t-newer"],
                **{f"badge{j}": [f"b{j}-{k}" for k in range(5)] for j in range(4)},
            },  # 1250 combos
        }
    )
    wide = SelectionRequest.model_validate(
        {"request_id": "wide", "ad_id": bags[0].ad_id,
         "candidates": {**bags[0].candidates, **{f"c{j}": [f"e{j}-{k}" for k in range(3)]
                                                  for j in range(MAX_COMPONENTS - len(bags[0].candidates))}}}
    )
    policy = cls(**kwargs)
    assert isinstance(policy, Policy)
    for learned in (0, 2048):  # untrained, then after two mini-batches
        _trained(policy, bags[:learned])
        batch = [*requests[:20], odd, wide, bags[0]]  # a Bag is a valid request too
        before = copy.deepcopy(policy)
        policy.learn([])
        picks = policy.select(batch)
        assert picks == before.select(batch)  # learning nothing changed nothing, random draws included
        assert len(picks) == len(batch)
        for request, pick in zip(batch, picks, strict=True):
            assert pick.keys() == request.candidates.keys()
            assert all(pick[c] in ids for c, ids in request.candidates.items())
    assert policy.select([]) == []


@pytest.mark.parametrize(("cls", "kwargs"), VARIANTS)
def test_learns_beyond_uniform(world_log, cls, kwargs):
    """After a few thousand uniform bags every learner serves well above the uniform policy's true CTR."""
    world, bags, raw, requests = world_log
    score = world.score(raw, _trained(cls(**kwargs), bags).select(requests))
    if cls is Uniform:
        assert abs(score["captured"]) < 0.1, score  # the yardstick itself: nothing learned, nothing captured
    else:
        assert score["captured"] > 0.2, score
        assert score["ctr"] > score["uniform_ctr"], score


def test_best_candidate_of_each_slot_ties_to_the_first():
    request = SelectionRequest.model_validate(
        {"request_id": "r", "ad_id": "a", "candidates": {"title": ["t1", "t2", "t3"], "image": ["i1", "i2"]}}
    )
    rows = Candidates.of([request, request])
    assert rows.elements == ["t1", "t2", "t3", "i1", "i2"] * 2 and rows.sizes.tolist() == [3, 2, 3, 2]
    scores = np.array([0.1, 0.3, 0.3, 0.0, 0.0, 0.5, 0.2, 0.1, 0.0, 0.4])
    assert rows.best([request, request], scores) == [{"title": "t2", "image": "i1"}, {"title": "t1", "image": "i2"}]


def test_counter_score_matches_hand_computation():
    bags = [
        _bag(0, {"title": "t1", "image": "i1"}, True),
        _bag(1, {"title": "t1", "image": "i2"}, False),
        _bag(2, {"title": "t2", "image": "i1"}, False),
        _bag(3, {"title": "t1", "image": "i1"}, False),
    ]
    counter = ClickCounter(strength=2.0)
    counter.learn(bags[:1])
    counter.learn(bags[1:])  # state carries over between calls
    assert counter.p0 == pytest.approx(0.25)
    assert counter.score("title", "t1") == pytest.approx((1 + 2 * 0.25) / (3 + 2))
    assert counter.score("title", "t2") == pytest.approx((0 + 2 * 0.25) / (1 + 2))
    assert counter.score("image", "i2") == pytest.approx((0 + 2 * 0.25) / (1 + 2))
    assert counter.score("title", "unseen") == pytest.approx(0.25)
    assert counter.score("image", "t1") == pytest.approx(0.25)  # counts are per (component, element)
    request = SelectionRequest.model_validate(
        {
            "request_id": "r",
            "ad_id": "x",
            "candidates": {"title": ["t2", "t3", "t1"], "image": ["i2", "i1"], "sticker": ["s2", "s1"]},
        }
    )
    assert counter.select([request]) == [{"title": "t1", "image": "i1", "sticker": "s2"}]  # tie -> first


def test_dco_eliminates_clearly_worse_arms_per_ad():
    rng = np.random.default_rng(0)
    arms = {"t0": 0.02, "t1": 0.05, "t2": 0.6}
    pool = {"title": list(arms)}
    bags = [
        _bag(i, {"title": e}, bool(rng.random() < arms[e]), candidates=pool)
        for i, e in enumerate(rng.choice(list(arms), 3000))
    ]
    dco = DCO(delta=0.05, seed=1)
    dco.learn(bags[:20])
    assert dco.survivors("a", "title", list(arms)) == list(arms)  # too little evidence to drop anything
    for i in range(20, len(bags), 500):
        dco.learn(bags[i : i + 500])
    assert dco.survivors("a", "title", list(arms)) == ["t2"]
    assert dco.survivors("a", "title", ["t0", "t2", "t-new"]) == ["t2", "t-new"]  # unpulled arms stay
    assert dco.survivors("b", "title", list(arms)) == list(arms)  # statistics are per ad
    request = SelectionRequest.model_validate({"request_id": "r", "ad_id": "a", "candidates": pool})
    assert {p["title"] for p in dco.select([request] * 50)} == {"t2"}
    other = SelectionRequest.model_validate({"request_id": "r", "ad_id": "b", "candidates": pool})
    assert {p["title"] for p in dco.select([other] * 50)} == set(arms)  # exploring: uniform over all
