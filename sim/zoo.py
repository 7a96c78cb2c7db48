"""A zoo of creative-optimisation worlds: families of worlds with knobs drawn per seed, each with exact truth.

Why: a learner tuned on one simulator (sim/world.py) learns that simulator. To judge it we need worlds
it was not tuned on, drawn from *families* that mirror kinds of traffic real ad platforms have, with
every knob drawn from the seed so that no single setting can be overfitted:

- ``paper``: shaped like the paper's Table 1, element quality by ad category, moderate context and
  synergy, mild churn;
- ``synergy``: strong pairwise synergy between components (pairs of different strengths, some none);
- ``context``: strong user context: who the user is and what they searched change which elements work;
- ``churn``: creatives churn fast, new ads keep arriving and CTRs drift;
- ``mixed``: everything at moderate strength;
- ``catalogue``, ``catalogue-synergy``, ``catalogue-context``, ``catalogue-churn``: worlds of another make
  (``CATALOGUE_LAYOUT``): faint element effects beside strong ad appeal, a shared vocabulary whose effect is
  the same on every ad, taste by demographic segment and query rather than by user, synergy through the
  same latent styles, churn of the ads' own elements only, and no drift.

A family is a set of knob ranges (``FAMILIES``); ``draw_world(family, seed)`` draws the knobs from the
seed (``ZooConfig``), then the world. Tune on ``TUNING_SEEDS``; report on ``HELD_OUT_SEEDS`` only.

Every world's true click logit for ad ``a`` (category ``c``) showing elements ``e_j``, at time ``t``::

    logit = base + appeal[a](t)
          + sum_j importance[c, j] * (quality[e_j | c](t) + context * <taste(request), style[e_j]>)
                                   / sqrt(1 + context^2)
          + sum_{j<j'} pair_weight[j, j'] * <look[e_j], look[e_j']>

- ``importance[c, j]``: how much component j matters in category c (the paper's Figure 3: image leads
  everywhere, specs matter more for "spec" categories such as phones);
- ``quality``: an ad-specific element (title, image: ids unique to the ad) has its own quality; a
  *templated* element (ids shared across the ads of a catalogue, per category or global) has a global
  quality, drifting slowly, plus a deviation per category. Which components are templated varies by seed;
- ``taste(request)``: built from the demographics (age, gender), the query's segments and a per-user
  taste, mixed in proportions drawn per seed; ``style``/``look`` are low-rank element vectors. Quality and
  taste x style each have unit sd, so ``context`` sets their ratio and ``importance`` the overall scale;
- ``pair_weight``: one signed weight per component pair, some pairs zero;
- churn: every ``churn_every`` impressions a fraction of each ad's elements is replaced (new ids, new
  effects; retired ones keep theirs so old requests stay scorable), new templates and new ads arrive;
  ad appeal and template quality drift as mean-reverting random walks, one step every ``DRIFT_EVERY``
  impressions, so that CTRs wander but stay in range however long a world runs.

``base`` is calibrated so that the uniform policy's CTR lands on a drawn target in [2.5%, 8%].
Time is the impression count: every ``request`` (and every bag of ``uniform_log``) advances it by one.
The interface is sim/world.py's ``World``: ``request``, ``click_probability``, ``values``,
``uniform_log``, ``score``, ``config``; so benchmarks and the simulated ad server drive either.
"""

from __future__ import annotations

import gc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from sim.truth import KnownTruth, sigmoid

# (name, id prefix, coverage, mean candidates, effect scale) after the paper's Table 1.
COMPONENTS: tuple[tuple[str, str, float, float, float], ...] = (
    ("title", "ti", 1.00, 6.3, 0.30),
    ("image", "im", 1.00, 3.4, 0.45),
    ("marketing", "mk", 0.39, 2.2, 0.25),
    ("highlight", "hl", 0.956, 7.0, 0.20),
    ("attribute", "at", 0.583, 2.3, 0.15),
    ("structure_attribute", "sa", 0.678, 8.1, 0.15),
)
NAMES = tuple(c[0] for c in COMPONENTS)
COMPONENT_INDEX = {name: j for j, name in enumerate(NAMES)}
MAX_POOL = 15
# Chance per seed that a component's elements come from a shared template catalogue; titles and images
# are always the ad's own (Table 1's id counts: marketing lines are the most shared, ~6 ads per id).
TEMPLATE_ODDS = {"marketing": 0.85, "highlight": 0.5, "attribute": 0.6, "structure_attribute": 0.5}
# Category kinds of Figure 3: "visual" ones (clothing, bedding) weigh the image more, "spec" ones
# (phone, computer, wine) the highlight, attribute and structure_attribute.
KIND_BOOST = {"visual": {"image": 1.5}, "spec": {"highlight": 1.6, "attribute": 1.6, "structure_attribute": 1.6}}
SEGMENT_WORDS = (
    "red", "blue", "black", "white", "dress", "shoe", "bag", "watch", "cheap", "luxury", "kids", "baby",
    "sport", "outdoor", "summer", "winter", "gift", "phone", "case", "laptop", "men", "women", "home",
    "kitchen", "bed", "sofa", "wine", "tea", "coffee", "snack", "beauty", "perfume", "skincare", "camera",
    "game", "book", "toy", "pet", "garden", "tool", "car", "bike", "travel", "office", "wedding", "festival",
    "organic", "discount",
)
T0 = 1_763_900_000.0  # the ts of tick 0
SECONDS_PER_TICK = 0.01
DRIFT_EVERY = 2_000  # impressions between two steps of the appeal and template-quality random walks
DRIFT_MEMORY = 200_000  # impressions over which a walk reverts (by 1/e) to its mean, 0
CALIBRATION_DRAWS = 20_000
TRAFFIC_BLOCK = 4_096  # ticks whose draws (ad, user, query, picks, click) come from one generator

TUNING_SEEDS = range(0, 100)
"""Seeds for tuning anything judged on the zoo (defaults, hyper-parameters, design choices)."""
HELD_OUT_SEEDS = range(1000, 1100)
"""Seeds for reported figures only: defaults and published numbers must come from these, never tuned on."""


@dataclass(frozen=True)
class Knob:
    """A knob's range; ``log`` draws log-uniformly, ``integer`` rounds."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def draw(self, rng: np.random.Generator) -> float | int:
        if self.log:
            value = float(np.exp(rng.uniform(np.log(self.low), np.log(self.high))))
        else:
            value = float(rng.uniform(self.low, self.high))
        return round(value) if self.integer else value


BASE_KNOBS: dict[str, Knob] = {
    "n_ads": Knob(200, 5000, log=True, integer=True),
    "n_categories": Knob(5, 20, integer=True),
    "n_users": Knob(2000, 20000, log=True, integer=True),
    "n_queries": Knob(100, 800, log=True, integer=True),
    "n_segments": Knob(24, len(SEGMENT_WORDS), integer=True),
    "ad_zipf": Knob(1.0, 1.3),  # traffic over ads: weight of the r-th most popular ~ r^-ad_zipf
    "user_zipf": Knob(0.5, 1.0),  # ... over users and queries
    "appeal_spread": Knob(0.3, 0.8),  # sd of the ad-level logit offset
    "target_ctr": Knob(0.025, 0.08, log=True),  # the uniform policy's CTR that base is calibrated to
    "quality_scale": Knob(0.6, 0.9),  # multiplies every element effect
    "category_spread": Knob(0.2, 0.5),  # sd of log importance of a component across categories
    "template_deviation": Knob(0.3, 0.7),  # share (in sd) of a template's quality that is per category
    "template_reuse": Knob(3.0, 12.0),  # catalogue size per category, in units of a pool's mean size
    "pool_scale": Knob(0.8, 1.25),  # multiplies Table 1's mean candidates
    "style_dim": Knob(2, 6, integer=True),
    "look_dim": Knob(2, 4, integer=True),
    "context": Knob(0.2, 0.4),  # sd of taste x style against that of quality (their sum keeps its sd)
    "synergy": Knob(0.05, 0.15),  # typical |pair weight|, in units of an element's quality sd
    "pair_sparsity": Knob(0.2, 0.6),  # share of component pairs with no synergy
    "churn_every": Knob(50_000, 200_000, log=True, integer=True),
    "churn_fraction": Knob(0.02, 0.08),  # share of each ad's elements replaced at each churn
    "new_ads": Knob(0.005, 0.02),  # new ads per churn, as a share of the ads at the start
    "template_growth": Knob(0.0, 0.05),  # new templates per churn, as a share of the catalogue
    "appeal_drift": Knob(0.02, 0.06),  # sd of an ad's appeal change over 100k impressions (and of its drift)
    "template_drift": Knob(0.02, 0.06),  # ... of a template's quality
}


@dataclass(frozen=True)
class Layout:
    """Structure a family fixes rather than drawing per seed (``draw_config`` draws it for the others)."""

    templated: tuple[str, ...]  # components whose elements come from a shared catalogue
    template_scope: str  # "category" or "global"
    context_mix: tuple[float, float, float]  # shares of taste variance: demographics, query, user
    synergy_by_style: bool = False  # pairs interact through the styles that taste acts on, not looks of their own
    churn_templates: bool = True  # churn swaps templated elements in pools too, not only the ads' own


@dataclass(frozen=True)
class Family:
    """A family of worlds: what it stands for, the range of every knob, and the structure it fixes if any."""

    description: str
    knobs: dict[str, Knob]
    layout: Layout | None = None


def _family(description: str, layout: Layout | None = None, **overrides: Knob) -> Family:
    return Family(description, {**BASE_KNOBS, **overrides}, layout)


# The catalogue families: worlds built apart from the first five, of the kind an independent check found genco
# losing on (issue 31). Element effects are faint (sd 0.05-0.15 in log-odds) beside the ads' appeal (sd ~0.6);
# marketing lines, attributes and structure attributes come from one shared vocabulary whose effect is the same
# on every ad (weighted by its category's importance), beside each ad's own titles, images and highlights; tens
# of thousands of users and thousands of queries, Zipf above 1; context acts through the demographic segment's
# (age x gender, not additive) and the query's taste for the elements' latent styles, never through the user
# id; synergy acts through the same styles between a few component pairs; churn replaces a quarter of the ads'
# own elements while the vocabulary stays, and nothing drifts.
CATALOGUE_LAYOUT = Layout(templated=("marketing", "attribute", "structure_attribute"), template_scope="global",
                          context_mix=(0.7, 0.3, 0.0), synergy_by_style=True, churn_templates=False)
CATALOGUE_KNOBS: dict[str, Knob] = {
    "n_ads": Knob(2000, 4000, log=True, integer=True),
    "n_users": Knob(10_000, 50_000, log=True, integer=True),
    "n_queries": Knob(1000, 5000, log=True, integer=True),
    "user_zipf": Knob(1.05, 1.4),
    "appeal_spread": Knob(0.5, 0.7),
    "quality_scale": Knob(0.2, 0.5),
    "template_deviation": Knob(0.0, 0.1),
    "context": Knob(0.3, 0.6),
    "synergy": Knob(0.08, 0.2),
    "pair_sparsity": Knob(0.6, 0.85),
    "demo_interaction": Knob(0.5, 1.0),
    "look_dim": BASE_KNOBS["style_dim"],  # the looks are the styles (Layout.synergy_by_style): one range for both
    "churn_every": Knob(10**9, 10**9, integer=True),  # never, in any run
    "churn_fraction": Knob(0.0, 0.0),
    "new_ads": Knob(0.0, 0.0),
    "template_growth": Knob(0.0, 0.0),
    "appeal_drift": Knob(0.0, 0.0),
    "template_drift": Knob(0.0, 0.0),
}


def _catalogue_family(description: str, **overrides: Knob) -> Family:
    return _family(description, CATALOGUE_LAYOUT, **{**CATALOGUE_KNOBS, **overrides})


FAMILIES: dict[str, Family] = {
    "paper": _family("Table 1 pools exactly, quality by category, moderate context and synergy, mild churn",
                     pool_scale=Knob(1.0, 1.0), context=Knob(0.3, 0.6), synergy=Knob(0.08, 0.2)),
    "synergy": _family("strong pairwise synergy between components, pairs of different strengths, some none",
                       synergy=Knob(0.35, 0.7), context=Knob(0.0, 0.15)),
    "context": _family("strong user context: demographics, query and the user's own taste pick the elements",
                       context=Knob(1.0, 2.0), synergy=Knob(0.0, 0.05)),
    "churn": _family("fast creative churn, new ads arriving, CTRs drifting",
                     churn_every=Knob(20_000, 80_000, log=True, integer=True), churn_fraction=Knob(0.1, 0.4),
                     new_ads=Knob(0.02, 0.06), template_growth=Knob(0.05, 0.2), appeal_drift=Knob(0.1, 0.3),
                     template_drift=Knob(0.15, 0.4)),
    "mixed": _family("every effect at moderate strength",
                     context=Knob(0.4, 1.0), synergy=Knob(0.15, 0.4),
                     churn_every=Knob(30_000, 120_000, log=True, integer=True), churn_fraction=Knob(0.05, 0.2),
                     new_ads=Knob(0.01, 0.05), appeal_drift=Knob(0.05, 0.15), template_drift=Knob(0.05, 0.2)),
    "catalogue": _catalogue_family("faint effects, a shared vocabulary, segment taste, a static world"),
    "catalogue-synergy": _catalogue_family("the catalogue world with strong synergy through styles",
                                           synergy=Knob(0.35, 0.7)),
    "catalogue-context": _catalogue_family("the catalogue world whose context outweighs quality",
                                           context=Knob(1.0, 2.0), synergy=Knob(0.0, 0.05)),
    "catalogue-churn": _catalogue_family("the catalogue world replacing a quarter of the ads' own elements",
                                         churn_every=Knob(40_000, 120_000, log=True, integer=True),
                                         churn_fraction=Knob(0.2, 0.3)),
}


@dataclass(frozen=True)
class ZooConfig:
    """The knobs of one world, as drawn for (family, seed); see BASE_KNOBS for what each means."""

    family: str
    seed: int
    n_ads: int  # at the start; churn adds more
    n_categories: int
    n_users: int
    n_queries: int
    n_segments: int
    ad_zipf: float
    user_zipf: float
    appeal_spread: float
    target_ctr: float
    quality_scale: float
    category_spread: float
    template_deviation: float
    template_reuse: float
    pool_scale: float
    style_dim: int
    look_dim: int
    context: float
    synergy: float
    pair_sparsity: float
    churn_every: int
    churn_fraction: float
    new_ads: float
    template_growth: float
    appeal_drift: float
    template_drift: float
    templated: tuple[str, ...]  # components whose elements come from a shared catalogue
    template_scope: str  # "category": one catalogue per category; "global": one for all
    context_mix: tuple[float, float, float]  # shares of taste variance: demographics, query, user
    demo_interaction: float = 0.0  # share of the demographic taste that is the (age, gender) segment's own
    synergy_by_style: bool = False  # see Layout
    churn_templates: bool = True  # see Layout
    max_combinations: int = 20_000  # pools are trimmed so the oracle stays exact


def _seed_sequence(family: str, seed: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([zlib.crc32(family.encode()), seed])


def draw_config(family: str, seed: int) -> ZooConfig:
    """The knobs of (family, seed): each numeric knob within the family's range, plus the seed's choice of
    templated components, catalogue scope and context mix where the family does not fix them (its layout)."""
    rng = np.random.default_rng(_seed_sequence(family, seed).spawn(2)[0])
    spec = FAMILIES[family]
    knobs = {name: knob.draw(rng) for name, knob in spec.knobs.items()}
    if spec.layout is None:
        templated = tuple(name for name, odds in TEMPLATE_ODDS.items() if rng.random() < odds)
        scope = "category" if rng.random() < 0.6 else "global"
        mix = tuple(round(float(x), 3) for x in rng.dirichlet([2.0, 2.0, 2.0]))
        return ZooConfig(family=family, seed=seed, templated=templated, template_scope=scope, context_mix=mix,
                         **knobs)
    layout = spec.layout
    if layout.synergy_by_style:
        knobs["look_dim"] = knobs["style_dim"]  # the looks are the styles
    return ZooConfig(family=family, seed=seed, templated=layout.templated, template_scope=layout.template_scope,
                     context_mix=layout.context_mix, synergy_by_style=layout.synergy_by_style,
                     churn_templates=layout.churn_templates, **knobs)


def draw_world(family: str, seed: int) -> ZooWorld:
    """The world of (family, seed): the same knobs and the same world every time."""
    return ZooWorld(draw_config(family, seed))


class _Elements:
    """Every element ever created, retired ones too (old requests stay scorable), as column arrays.

    ``template`` is the element's row in the template tables, 0 (a row of zeros) for an ad's own element.
    """

    def __init__(self, style_dim: int, look_dim: int) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self.component = np.zeros(0, dtype=np.int64)
        self.template = np.zeros(0, dtype=np.int64)
        self.quality = np.zeros(0)
        self.style = np.zeros((0, style_dim))
        self.look = np.zeros((0, look_dim))

    def add(self, ids: list[str], component: np.ndarray, template: np.ndarray, quality: np.ndarray,
            style: np.ndarray, look: np.ndarray) -> np.ndarray:
        """Appends elements; returns their indices."""
        first = len(self.ids)
        self.index.update(zip(ids, range(first, first + len(ids)), strict=True))
        self.ids.extend(ids)
        self.component = np.concatenate([self.component, component])
        self.template = np.concatenate([self.template, template])
        self.quality = np.concatenate([self.quality, quality])
        self.style = np.concatenate([self.style, style])
        self.look = np.concatenate([self.look, look])
        return np.arange(first, len(self.ids))


class ZooWorld(KnownTruth):
    """One drawn world: generates requests, logs uniform-random impressions and scores policies exactly."""

    def __init__(self, config: ZooConfig) -> None:
        super().__init__()
        self.config = cfg = config
        world_seed, calibration_seed, self._traffic_seed = _seed_sequence(cfg.family, cfg.seed).spawn(2)[1].spawn(3)
        self.rng = np.random.default_rng(world_seed)  # the world's own draws: construction, churn, drift
        self._block: tuple[int, np.ndarray] = (-1, np.zeros((0, 0)))  # the traffic block last drawn
        self.tick = 0  # impressions so far
        self._ticks: dict[str, int] = {}  # request_id -> tick of its latest request
        self._next_churn = cfg.churn_every
        self._next_drift = DRIFT_EVERY
        self._draw_people()
        self._draw_effects()
        self._empty_tables()
        for j, unit in self._catalogue_keys():
            self._add_templates(j, unit, self._catalogue_size(j))
        self._add_ads(cfg.n_ads)
        self.base_logit = 0.0  # until calibrated: _calibrate reads the logits without it
        self.base_logit = self._calibrate(np.random.default_rng(calibration_seed))

    def describe(self) -> str:
        cfg = self.config
        mix = "/".join(f"{x:.2f}" for x in cfg.context_mix)
        templated = ",".join(cfg.templated) or "none"
        return (f"{cfg.family} seed {cfg.seed}: {cfg.n_ads} ads in {cfg.n_categories} categories, zipf "
                f"{cfg.ad_zipf:.2f}, appeal sd {cfg.appeal_spread:.2f}, target ctr {cfg.target_ctr:.3f}, quality "
                f"x{cfg.quality_scale:.2f}, templated {templated} ({cfg.template_scope}), context "
                f"{cfg.context:.2f} (demo/query/user {mix}), synergy {cfg.synergy:.2f} ({cfg.pair_sparsity:.0%} "
                f"pairs none), churn {cfg.churn_fraction:.0%} every {cfg.churn_every} (+{cfg.new_ads:.1%} ads), "
                f"drift {cfg.appeal_drift:.2f}/{cfg.template_drift:.2f} per 100k")

    # -- construction -------------------------------------------------------------------------------
    def _draw_people(self) -> None:
        """Users (id, age, gender, own taste) and queries (id, segments), and each one's taste vector."""
        cfg, rng = self.config, self.rng
        r = cfg.style_dim
        demo_share, query_share, user_share = cfg.context_mix
        age_taste, gender_taste = rng.normal(0, 1, (7, r)), rng.normal(0, 1, (3, r))
        self._demo_taste = np.sqrt(demo_share / 2) * (age_taste[:, None] + gender_taste[None, :])  # [age, gender]
        if cfg.demo_interaction > 0:  # a segment's own taste, which no sum of an age's and a gender's makes
            own = np.sqrt(demo_share) * rng.normal(0, 1, (7, 3, r))
            i = cfg.demo_interaction
            self._demo_taste = np.sqrt(1 - i) * self._demo_taste + np.sqrt(i) * own
        self._segment_taste = np.sqrt(query_share) * rng.normal(0, 1, (cfg.n_segments, r))
        self._segment_index = {w: i for i, w in enumerate(SEGMENT_WORDS[: cfg.n_segments])}
        self.users = [(f"u-{i}", int(rng.integers(0, 7)), int(rng.integers(0, 3))) for i in range(cfg.n_users)]
        self._user_index = {u[0]: i for i, u in enumerate(self.users)}
        self._user_taste = np.sqrt(user_share) * rng.normal(0, 1, (cfg.n_users, r))
        self.queries = []
        for i in range(cfg.n_queries):
            n = int(rng.integers(1, 4))
            segments = rng.choice(SEGMENT_WORDS[: cfg.n_segments], n, replace=False)
            self.queries.append((f"q-{i}", tuple(str(s) for s in segments)))
        self._user_cdf = _zipf_cdf(rng.permutation(cfg.n_users) + 1, cfg.user_zipf)
        self._query_cdf = _zipf_cdf(rng.permutation(cfg.n_queries) + 1, cfg.user_zipf)
        ages = np.array([u[1] for u in self.users])
        genders = np.array([u[2] for u in self.users])
        self._user_part = self._demo_taste[ages, genders] + self._user_taste
        self._query_part = np.array([self._query_taste(segments) for _, segments in self.queries])

    def _query_taste(self, segments: list[str] | tuple[str, ...]) -> np.ndarray:
        rows = [self._segment_index[s] for s in segments]
        return self._segment_taste[rows].sum(0) / np.sqrt(max(len(rows), 1))

    def _draw_effects(self) -> None:
        """Component importance per category (Figure 3) and the synergy weight of each component pair."""
        cfg, rng = self.config, self.rng
        m = len(COMPONENTS)
        scale = np.array([c[4] for c in COMPONENTS]) * cfg.quality_scale
        importance = scale * np.exp(rng.normal(0, cfg.category_spread, (cfg.n_categories, m)))
        for c, kind in enumerate(rng.choice(["visual", "spec", "plain"], cfg.n_categories)):
            for name, boost in KIND_BOOST.get(str(kind), {}).items():
                importance[c, COMPONENT_INDEX[name]] *= boost
        self._importance = importance
        pairs = np.zeros((m, m))
        for j in range(m):
            for k in range(j + 1, m):
                if rng.random() >= cfg.pair_sparsity:
                    sign = rng.choice([-1.0, 1.0])
                    pairs[j, k] = pairs[k, j] = sign * cfg.synergy * scale.mean() * np.exp(rng.normal(0, 0.5))
        self._pair_weight = pairs

    def _empty_tables(self) -> None:
        """Elements, templates and ads, none yet; row 0 of the template tables stands for "no template"."""
        cfg = self.config
        self.elements = _Elements(cfg.style_dim, cfg.look_dim)
        self._templated = np.array([name in cfg.templated for name in NAMES])
        self._catalogues: dict[tuple[int, int], np.ndarray] = {}  # (component, category or 0) -> elements
        self._template_deviation = np.zeros((1, cfg.n_categories))  # template x category
        self._template_walk = [np.zeros(1)]  # per drift step: each template's quality drift
        self._appeal = np.zeros(0)  # each ad's appeal, before drift
        self._appeal_walk = [np.zeros(0)]  # per drift step: each ad's appeal drift
        self._ad_category = np.zeros(0, dtype=np.int64)
        self._ad_weight = np.zeros(0)
        self._pools = np.zeros((0, len(COMPONENTS), MAX_POOL), dtype=np.int64)  # element indices, -1 padded
        self._sizes = np.zeros((0, len(COMPONENTS)), dtype=np.int64)
        self._listings: dict[int, dict[str, list[str]]] = {}  # ad -> its candidates as a request lists them

    def _catalogue_keys(self) -> list[tuple[int, int]]:
        units = range(self.config.n_categories) if self.config.template_scope == "category" else [0]
        return [(j, u) for j in range(len(COMPONENTS)) if self._templated[j] for u in units]

    def _catalogue_size(self, j: int) -> int:
        """A catalogue's first size: ``template_reuse`` pools' worth per category (a global one serves
        sqrt(categories) times as many), and always more than a pool can hold."""
        cfg = self.config
        breadth = np.sqrt(cfg.n_categories) if cfg.template_scope == "global" else 1.0
        return max(MAX_POOL + 1, round(COMPONENTS[j][3] * cfg.pool_scale * cfg.template_reuse * breadth))

    def _catalogue(self, j: int, category: int) -> np.ndarray:
        return self._catalogues[(j, category if self.config.template_scope == "category" else 0)]

    def _add_templates(self, j: int, unit: int, count: int) -> None:
        """``count`` new templates in catalogue (j, unit): a global quality plus a deviation per category."""
        cfg, rng = self.config, self.rng
        first = len(self._template_deviation)
        rows = np.arange(first, first + count)
        d = cfg.template_deviation
        quality = np.sqrt(1 - d * d) * rng.normal(0, 1, count)
        deviation = d * rng.normal(0, 1, (count, cfg.n_categories))
        self._template_deviation = np.vstack([self._template_deviation, deviation])
        self._template_walk[-1] = np.concatenate([self._template_walk[-1], np.zeros(count)])
        ids = [f"{COMPONENTS[j][1]}-tpl-{row}" for row in rows]
        added = self._new_elements(ids, np.full(count, j), rows, quality)
        self._catalogues[(j, unit)] = np.concatenate([self._catalogues.get((j, unit), np.zeros(0, dtype=np.int64)),
                                                      added])

    def _new_elements(self, ids: list[str], component: np.ndarray, template: np.ndarray,
                      quality: np.ndarray) -> np.ndarray:
        cfg, rng = self.config, self.rng
        n = len(ids)
        style = rng.normal(0, 1, (n, cfg.style_dim)) / np.sqrt(cfg.style_dim)  # <taste, style> has unit sd
        if cfg.synergy_by_style:
            look = style * cfg.style_dim**0.25  # <look, look'> has unit sd
        else:
            look = rng.normal(0, 1, (n, cfg.look_dim)) / cfg.look_dim**0.25  # <look, look'> has unit sd
        return self.elements.add(ids, component, template, quality, style, look)

    def _new_own_elements(self, ads: np.ndarray, components: np.ndarray) -> np.ndarray:
        """New ad-specific elements, one for each (ad, component) given: ids like ``ti-ad12-3456``."""
        first = len(self.elements.ids)
        pairs = zip(ads.tolist(), components.tolist(), strict=True)
        ids = [f"{COMPONENTS[j][1]}-ad{a}-{first + i}" for i, (a, j) in enumerate(pairs)]
        return self._new_elements(ids, components, np.zeros(len(ids), dtype=np.int64),
                                  self.rng.normal(0, 1, len(ids)))

    def _draw_sizes(self, count: int) -> np.ndarray:
        """Pool sizes shaped like Table 1 (coverage, mean, at most 15), trimmed to max_combinations."""
        cfg, rng = self.config, self.rng
        coverage = np.array([c[2] for c in COMPONENTS])
        mean = np.array([c[3] for c in COMPONENTS]) * cfg.pool_scale
        sizes = np.minimum(MAX_POOL, 1 + rng.poisson(np.maximum(mean - 1, 0), (count, len(COMPONENTS))))
        sizes = np.where(rng.random((count, len(COMPONENTS))) < coverage, sizes, 0)
        while True:
            over = np.flatnonzero(np.prod(np.maximum(sizes, 1), axis=1) > cfg.max_combinations)
            if not len(over):
                return sizes
            sizes[over, np.argmax(sizes[over], axis=1)] -= 1

    def _add_ads(self, count: int) -> None:
        """``count`` new ads: a category, an appeal, a traffic weight (a random Zipf rank among the ads there
        are, so new ads get traffic too) and pools of templates and new own elements."""
        cfg, rng = self.config, self.rng
        first = len(self._ad_category)
        categories = rng.integers(0, cfg.n_categories, count)
        ranks = rng.permutation(count) + 1 if first == 0 else rng.integers(1, first + count + 1, count)
        sizes = self._draw_sizes(count)
        pools = np.full((count, len(COMPONENTS), MAX_POOL), -1, dtype=np.int64)
        for a, j in zip(*np.nonzero(sizes * self._templated), strict=True):
            catalogue = self._catalogue(j, categories[a])
            pools[a, j, : sizes[a, j]] = rng.choice(catalogue, sizes[a, j], replace=False)
        own = (np.arange(MAX_POOL) < sizes[..., None]) & ~self._templated[None, :, None]
        a, j, _ = np.nonzero(own)
        pools[own] = self._new_own_elements(a + first, j)
        self._ad_category = np.concatenate([self._ad_category, categories])
        self._ad_weight = np.concatenate([self._ad_weight, ranks.astype(float) ** -cfg.ad_zipf])
        self._ad_cdf = np.cumsum(self._ad_weight) / self._ad_weight.sum()
        self._pools = np.concatenate([self._pools, pools])
        self._sizes = np.concatenate([self._sizes, sizes])
        self._appeal = np.concatenate([self._appeal, rng.normal(0, cfg.appeal_spread, count)])
        self._appeal_walk[-1] = np.concatenate([self._appeal_walk[-1], np.zeros(count)])

    def _listing(self, ad: int) -> dict[str, list[str]]:
        """The ad's candidates as a request lists them, built on the ad's first request since the last churn."""
        if ad not in self._listings:
            ids, pools, sizes = self.elements.ids, self._pools[ad].tolist(), self._sizes[ad].tolist()
            self._listings[ad] = {NAMES[j]: [ids[e] for e in pools[j][: sizes[j]]]
                                  for j in range(len(COMPONENTS)) if sizes[j]}
        return self._listings[ad]

    # -- time -------------------------------------------------------------------------------------
    def _advance_to(self, tick: int) -> None:
        """Applies every churn and drift step due at or before ``tick``, in order (churn first on a tie)."""
        while min(self._next_churn, self._next_drift) <= tick:
            if self._next_churn <= self._next_drift:
                self._churn()
                self._next_churn += self.config.churn_every
            else:
                self._drift()
                self._next_drift += DRIFT_EVERY

    def _drift(self) -> None:
        """One step of the walks of ad appeal and template quality (row 0, no template, stays 0): each
        reverts towards 0 by exp(-DRIFT_EVERY / DRIFT_MEMORY), so its sd settles near its change per 100k."""
        self._appeal_walk.append(self._walk_step(self._appeal_walk[-1], self.config.appeal_drift))
        walk = self._walk_step(self._template_walk[-1], self.config.template_drift)
        walk[0] = 0.0
        self._template_walk.append(walk)

    def _walk_step(self, walk: np.ndarray, per_100k: float) -> np.ndarray:
        keep = np.exp(-DRIFT_EVERY / DRIFT_MEMORY)
        return keep * walk + self.rng.normal(0, per_100k * np.sqrt(DRIFT_EVERY / 100_000), len(walk))

    def _churn(self) -> None:
        """New templates, then a fraction of every ad's elements replaced, then new ads."""
        cfg, rng = self.config, self.rng
        for key, catalogue in list(self._catalogues.items()):
            self._add_templates(*key, round(len(catalogue) * cfg.template_growth))
        replaced = (np.arange(MAX_POOL) < self._sizes[..., None]) & (rng.random(self._pools.shape) < cfg.churn_fraction)
        own = replaced & ~self._templated[None, :, None]
        a, j, _ = np.nonzero(own)
        self._pools[own] = self._new_own_elements(a, j)
        swapped = replaced & self._templated[None, :, None] if cfg.churn_templates else np.zeros_like(replaced)
        for a, j, k in zip(*np.nonzero(swapped), strict=True):
            catalogue = self._catalogue(j, self._ad_category[a])
            element = catalogue[rng.integers(0, len(catalogue))]
            if element not in self._pools[a, j]:
                self._pools[a, j, k] = element
        self._listings.clear()
        self._add_ads(round(cfg.n_ads * cfg.new_ads))

    # -- traffic ----------------------------------------------------------------------------------
    def _draw_traffic(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ads, users and queries of ``n`` impressions, each Zipf-distributed."""
        return self._place_traffic(rng.random((3, n)))

    def _place_traffic(self, draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ads, users and queries from uniform ``draws`` (3, n)."""
        ads = np.minimum(np.searchsorted(self._ad_cdf, draws[0]), len(self._ad_cdf) - 1)
        users = np.minimum(np.searchsorted(self._user_cdf, draws[1]), len(self._user_cdf) - 1)
        queries = np.minimum(np.searchsorted(self._query_cdf, draws[2]), len(self._query_cdf) - 1)
        return ads, users, queries

    def _shown(self, ads: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """A uniform-random combination for each ad from uniform ``draws`` (n, components): one element index per
        component, -1 where it has none."""
        sizes = self._sizes[ads]
        picks = (draws * sizes).astype(np.int64)
        shown = np.take_along_axis(self._pools[ads], np.minimum(picks, MAX_POOL - 1)[..., None], 2)[..., 0]
        return np.where(sizes > 0, shown, -1)

    def _tick_draws(self, ticks: np.ndarray) -> np.ndarray:
        """(len(ticks), 4 + components) uniform draws of each of the contiguous ``ticks``: its ad, user, query,
        a pick per component and its click. A function of the world's seed and the tick alone, so the log is
        the same however a caller cuts it into requests (checkpoints, --sizes)."""
        rows = []
        for block in range(int(ticks[0]) // TRAFFIC_BLOCK, int(ticks[-1]) // TRAFFIC_BLOCK + 1):
            if self._block[0] != block:
                parent = self._traffic_seed
                seed = np.random.SeedSequence(parent.entropy, spawn_key=(*parent.spawn_key, block))
                self._block = (block, np.random.default_rng(seed).random((TRAFFIC_BLOCK, 4 + len(COMPONENTS))))
            start = block * TRAFFIC_BLOCK
            low, high = max(int(ticks[0]), start), min(int(ticks[-1]) + 1, start + TRAFFIC_BLOCK)
            rows.append(self._block[1][low - start : high - start])
        return np.concatenate(rows)

    def _traffic(self, n: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """``n`` impressions as (ticks, ads, users, queries, the rest of their ``_tick_draws``: a pick per
        component and the click), in chunks over which the world stands still: the caller must use a chunk
        before asking for the next (churn and drift happen in between)."""
        while n > 0:
            self._advance_to(self.tick + 1)
            count = min(n, min(self._next_churn, self._next_drift) - self.tick - 1)
            ticks = np.arange(self.tick + 1, self.tick + count + 1)
            self.tick += count
            n -= count
            draws = self._tick_draws(ticks)
            yield (ticks, *self._place_traffic(draws[:, :3].T), draws[:, 3:])

    def _request(self, request_id: str, tick: int, ad: int, user: int, query: int) -> dict:
        """The SelectionRequest of one impression, remembered by id so that it can be scored later."""
        self._ticks[request_id] = tick
        self._value_cache.pop(request_id, None)
        uid, age, gender = self.users[user]
        qid, segments = self.queries[query]
        return {
            "request_id": request_id,
            "ad_id": f"ad-{ad}",
            "ts": round(T0 + tick * SECONDS_PER_TICK, 3),
            "user": {"id": uid, "age": age, "gender": gender},
            "query": {"id": qid, "segments": list(segments)},
            "candidates": {c: list(ids) for c, ids in self._listing(ad).items()},
        }

    def request(self, request_id: str) -> dict:
        """A SelectionRequest for a random ad, user and query (advances the world by one impression)."""
        [(ticks, ads, users, queries, _)] = list(self._traffic(1))
        return self._request(request_id, int(ticks[0]), int(ads[0]), int(users[0]), int(queries[0]))

    def requests_now(self, n: int, prefix: str) -> list[dict]:
        """``n`` SelectionRequests (ids ``{prefix}-0``...) of the world as it stands, which does not move: an
        evaluation set that no churn or drift step splits, drawn from a generator of its own so that the log
        goes on as if it had not been drawn."""
        rng = np.random.default_rng([self.config.seed, self.tick, zlib.crc32(prefix.encode())])
        ads, users, queries = self._draw_traffic(rng, n)
        return [self._request(f"{prefix}-{i}", self.tick, ad, user, query)
                for i, (ad, user, query) in enumerate(zip(ads.tolist(), users.tolist(), queries.tolist(), strict=True))]

    def uniform_log(self, n: int, start: int = 0) -> list[dict]:
        """Bags from a uniform-random serving policy, in chronological order."""
        bags = []
        i = start
        with _collector_paused():
            for ticks, ads, users, queries, draws in self._traffic(n):
                i = self._log_chunk(bags, i, ticks, ads, users, queries, draws)
        return bags

    def _log_chunk(self, bags: list[dict], i: int, ticks: np.ndarray, ads: np.ndarray, users: np.ndarray,
                   queries: np.ndarray, draws: np.ndarray) -> int:
        """Appends the bags of one chunk of traffic, numbered from ``i``; returns the next number. ``draws``:
        a uniform draw per component for the picks, then one for the click."""
        shown = self._shown(ads, draws[:, :-1])
        taste = self._user_part[users] + self._query_part[queries]
        clicked = draws[:, -1] < sigmoid(self._logits(ads, taste, shown, int(ticks[0]) // DRIFT_EVERY))
        propensity = 1.0 / np.prod(np.maximum(self._sizes[ads], 1), axis=1)
        ids = self.elements.ids
        for tick, ad, user, query, row, click, prop in zip(ticks.tolist(), ads.tolist(), users.tolist(),
                                                            queries.tolist(), shown.tolist(), clicked.tolist(),
                                                            propensity.tolist(), strict=True):
            request = self._request(f"r-{i}", tick, ad, user, query)
            bag = {**request, "impression_id": f"imp-{i}",
                   "shown": {NAMES[j]: ids[e] for j, e in enumerate(row) if e >= 0},
                   "policy": "explore", "propensity": prop, "clicked": click}
            if click:
                bag["click_ts"] = bag["ts"] + 1.0
            bags.append(bag)
            i += 1
        return i

    # -- truth ------------------------------------------------------------------------------------
    def _step(self, request: dict) -> int:
        """The drift step the request was made in: by its id, else (a copy under another id) by its ts."""
        tick = self._ticks.get(request["request_id"])
        if tick is None:
            tick = min(max(round((request["ts"] - T0) / SECONDS_PER_TICK), 0), self.tick)
        return tick // DRIFT_EVERY

    def _taste(self, request: dict) -> np.ndarray:
        """The request's taste, from its demographics, its user's own taste and its query's segments."""
        user = request["user"]
        return (self._demo_taste[user["age"], user["gender"]] + self._user_taste[self._user_index[user["id"]]]
                + self._query_taste(request["query"]["segments"]))

    def _unary(self, elements: np.ndarray, categories: np.ndarray, taste: np.ndarray, step: int) -> np.ndarray:
        """Each element's own effect (quality and context), shape of ``elements`` (n, k); 0 where it is -1."""
        el = self.elements
        present = elements >= 0
        e = np.where(present, elements, 0)
        template = el.template[e]
        cats = categories[:, None]
        quality = el.quality[e] + self._template_deviation[template, cats] + self._template_walk[step][template]
        context = np.einsum("nr,nkr->nk", taste, el.style[e])
        mixed = (quality + self.config.context * context) / np.sqrt(1 + self.config.context**2)
        return np.where(present, self._importance[cats, el.component[e]] * mixed, 0.0)

    def _logits(self, ads: np.ndarray, taste: np.ndarray, shown: np.ndarray, step: int) -> np.ndarray:
        """True click logits of impressions; ``shown`` has one column per component (-1: none)."""
        unary = self._unary(shown, self._ad_category[ads], taste, step).sum(1)
        looks = np.where((shown >= 0)[..., None], self.elements.look[np.maximum(shown, 0)], 0.0)
        pairs = 0.5 * (looks * np.einsum("jk,nkr->njr", self._pair_weight, looks)).sum((1, 2))
        return self.base_logit + self._appeal[ads] + self._appeal_walk[step][ads] + unary + pairs

    def _calibrate(self, rng: np.random.Generator) -> float:
        """The base logit at which the uniform policy's CTR (at the start) is the drawn target."""
        ads, users, queries = self._draw_traffic(rng, CALIBRATION_DRAWS)
        shown = self._shown(ads, rng.random((len(ads), len(COMPONENTS))))
        logits = self._logits(ads, self._user_part[users] + self._query_part[queries], shown, 0)
        low, high = -15.0, 5.0
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if sigmoid(logits + mid).mean() < self.config.target_ctr else (low, mid)
        return (low + high) / 2

    def structure(self, ads: np.ndarray, elements: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What the world knows of (ad, element) index pairs beyond their effects: the element's scale in its
        ad (sd of its effect in log-odds, context aside), the ad's category, and whether it is a template
        (the same quality in every ad, up to a deviation per category). For ``sim.bound``."""
        category = self._ad_category[ads]
        component = self.elements.component[elements]
        scale = self._importance[category, component] / np.sqrt(1 + self.config.context**2)
        return scale, category, self.elements.template[elements] > 0

    def click_probability(self, request: dict, shown: dict[str, str]) -> float:
        """True CTR of showing ``shown`` for ``request``, as the world was when the request was made."""
        row = np.full((1, len(COMPONENTS)), -1, dtype=np.int64)
        for element in shown.values():
            e = self.elements.index[element]
            row[0, self.elements.component[e]] = e
        ad = np.array([int(request["ad_id"].removeprefix("ad-"))])
        return float(sigmoid(self._logits(ad, self._taste(request)[None], row, self._step(request)))[0])

    def values(self, request: dict) -> tuple[float, float, dict[str, str]]:
        """Exact (uniform-policy CTR, oracle CTR, oracle combination) for a request, by enumeration."""
        ctr = self.ctr_grid(request)
        best = np.unravel_index(int(np.argmax(ctr)), ctr.shape)
        oracle = {c: ids[int(i)] for (c, ids), i in zip(request["candidates"].items(), best, strict=True)}
        return float(ctr.mean()), float(ctr.max()), oracle

    def ctr_grid(self, request: dict) -> np.ndarray:
        """The true CTR of every combination of the request's candidates, one axis per component."""
        ad = int(request["ad_id"].removeprefix("ad-"))
        step = self._step(request)
        comps = list(request["candidates"])
        pools = [np.array([self.elements.index[e] for e in request["candidates"][c]]) for c in comps]
        unary = self._unary(np.concatenate(pools)[None], self._ad_category[[ad]], self._taste(request)[None], step)[0]
        logit = np.full([1] * len(comps), self.base_logit + self._appeal[ad] + self._appeal_walk[step][ad])
        offsets = np.cumsum([0] + [len(p) for p in pools])
        for j, pool in enumerate(pools):
            logit = logit + _along(unary[offsets[j] : offsets[j + 1]], j, len(comps))
            for k in range(j):
                weight = self._pair_weight[self.elements.component[pool[0]], self.elements.component[pools[k][0]]]
                if weight:
                    pair = weight * self.elements.look[pools[k]] @ self.elements.look[pool].T  # (n_k, n_j)
                    logit = logit + _along(pair, k, len(comps), j)
        return sigmoid(logit)

    def best_fixed_ctr(self, requests: list[dict]) -> np.ndarray:
        """Each request's true CTR under the one combination that does best for its ad (and listing) over
        all of ``requests``: what a policy that ignores who is asking gets, knowing everything else exactly."""
        grids = [self.ctr_grid(r) for r in requests]
        for request, grid in zip(requests, grids, strict=True):  # what ``summarise`` would enumerate again
            self._value_cache.setdefault(request["request_id"], (float(grid.mean()), float(grid.max())))
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            listing = tuple(tuple(ids) for ids in r["candidates"].values())
            groups.setdefault((r["ad_id"], listing), []).append(i)
        out = np.empty(len(requests))
        for members in groups.values():
            stacked = np.stack([grids[i] for i in members])
            best = np.unravel_index(int(stacked.sum(0).argmax()), stacked.shape[1:])
            out[members] = stacked[(slice(None), *best)]
        return out

    def advance(self, n: int) -> None:
        """Moves the world on by ``n`` impressions without logging them (the log goes on after them): every
        churn and drift step due by the last of them happens, as in ``_traffic``, whose draws depend on the
        tick alone and are not needed."""
        self._advance_to(self.tick + n)
        self.tick += n


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pauses the cyclic garbage collector: bags hold no cycles, and its passes over the growing log (one
    per ~700 new containers, each walking every bag made so far) cost more the longer the log grows."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _zipf_cdf(ranks: np.ndarray, exponent: float) -> np.ndarray:
    weight = ranks.astype(float) ** -exponent
    return np.cumsum(weight) / weight.sum()


def _along(values: np.ndarray, axis: int, ndim: int, second_axis: int | None = None) -> np.ndarray:
    """``values`` reshaped to broadcast along ``axis`` (and ``second_axis``, for a matrix) of an ndim grid."""
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    if second_axis is not None:
        shape[second_axis] = values.shape[1]
    return values.reshape(shape)

