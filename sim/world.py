"""A creative-optimisation world with known true CTR.

Why: to say whether a policy learned anything we need the truth. The world is
shaped like the paper's Table 1 (six components, their coverage and pool
sizes) and its true click logit has the effects the paper claims GenCO can
exploit:

    logit = base + appeal[ad] + sum_j quality[e_j]                 (additive)
          + context * sum_j  <taste(user, query), style[e_j]>      (user context)
          + synergy * sum_{j<j'} <style[e_j], style[e_j']>         (cross-component)

Elements churn: each impression may retire one element of one ad and put a
fresh one (new id, new quality) in its place, as seasonal creatives do.
Elements recur across ads of a category (Table 1 has about one id per three
ad slots), so an element's raw click rate mixes in the appeal of the ads it
was shown with: the product-versus-creative confounding the paper names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sim.truth import KnownTruth, sigmoid

# (name, coverage, mean candidates, quality scale) after the paper's Table 1.
TABLE1_COMPONENTS: tuple[tuple[str, float, float, float], ...] = (
    ("title", 1.00, 6.3, 0.30),
    ("image", 1.00, 3.4, 0.45),
    ("marketing", 0.39, 2.2, 0.25),
    ("highlight", 0.956, 7.0, 0.20),
    ("attribute", 0.583, 2.3, 0.15),
    ("structure_attribute", 0.678, 8.1, 0.15),
)

SEGMENTS = ("red", "blue", "dress", "shoe", "cheap", "luxury", "kids", "sport", "summer", "winter",
            "gift", "phone", "case", "men", "women", "home")


@dataclass
class WorldConfig:
    n_ads: int = 500
    n_users: int = 5000
    n_queries: int = 300
    n_categories: int = 8
    style_dim: int = 4
    base_logit: float = -2.75  # overall CTR near the paper's 6.84 %
    appeal_scale: float = 0.5
    quality_scale: float = 0.6  # multiplies the per-component scales of Table 1
    context: float = 0.25  # strength of user/query taste x element style
    synergy: float = 0.08  # strength of style agreement between shown elements
    churn: float = 0.002  # chance per impression that one element is replaced
    reuse: float = 0.7  # chance a pool slot reuses an element of another ad of the same category:
    # Table 1 has ~1 id per 3 ad slots (e.g. 230M titles for 110M ads x 6.3), so elements recur across ads
    max_combinations: int = 20_000  # pools are trimmed so the oracle stays exact
    components: tuple[tuple[str, float, float, float], ...] = TABLE1_COMPONENTS
    seed: int = 0


@dataclass
class _Element:
    id: str
    quality: float
    style: np.ndarray


@dataclass
class _Ad:
    id: str
    category: int
    appeal: float
    pools: dict[str, list[_Element]] = field(default_factory=dict)


class World(KnownTruth):
    """Generates requests, logs uniform-random impressions and scores policies exactly."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or WorldConfig()
        self.rng = np.random.default_rng(cfg.seed)
        self._next_element = 0
        self.elements: dict[str, _Element] = {}
        self.clock = 1_763_900_000.0
        r = cfg.style_dim
        self.age_taste = self.rng.normal(0, 1, (7, r)) / np.sqrt(r)
        self.gender_taste = self.rng.normal(0, 1, (3, r)) / np.sqrt(r)
        self.segment_taste = {s: self.rng.normal(0, 1, r) / np.sqrt(r) for s in SEGMENTS}
        self.category_quality = self.rng.normal(1.0, 0.3, (cfg.n_categories, len(cfg.components))).clip(0.3)
        self.users = [
            (f"u-{i}", int(self.rng.integers(0, 7)), int(self.rng.integers(0, 3))) for i in range(cfg.n_users)
        ]
        self.queries = [
            (f"q-{i}", tuple(self.rng.choice(SEGMENTS, size=int(self.rng.integers(1, 4)), replace=False)))
            for i in range(cfg.n_queries)
        ]
        self.catalogue: dict[tuple[int, str], list[_Element]] = {}  # (category, component) -> elements
        self.ads = [self._new_ad(i) for i in range(cfg.n_ads)]

    # -- construction ---------------------------------------------------------------------------
    def _new_element(self, component: str, scale: float) -> _Element:
        self._next_element += 1
        style = self.rng.normal(0, 1, self.config.style_dim) / np.sqrt(self.config.style_dim)
        quality = float(self.rng.normal(0, scale * self.config.quality_scale))
        element = _Element(f"{component[:2]}-{self._next_element}", quality, style)
        self.elements[element.id] = element  # retired elements stay, so old requests can be scored
        return element

    def _scale(self, ad: _Ad, j: int) -> float:
        return self.config.components[j][3] * float(self.category_quality[ad.category, j])

    def _new_ad(self, i: int) -> _Ad:
        cfg = self.config
        ad = _Ad(f"ad-{i}", int(self.rng.integers(0, cfg.n_categories)), float(self.rng.normal(0, cfg.appeal_scale)))
        for j, (name, coverage, mean, _) in enumerate(cfg.components):
            if self.rng.random() >= coverage:
                continue
            n = int(min(15, 1 + self.rng.poisson(max(mean - 1, 0))))
            pool: list[_Element] = []
            for _ in range(n):
                pool.append(self._pool_element(ad, j, pool))
            ad.pools[name] = pool
        while np.prod([len(p) for p in ad.pools.values()]) > cfg.max_combinations:
            largest = max(ad.pools, key=lambda c: len(ad.pools[c]))
            ad.pools[largest].pop()
        return ad

    def _pool_element(self, ad: _Ad, j: int, pool: list[_Element]) -> _Element:
        """An element for one slot of an ad's pool: often one the category already uses, else a new one."""
        component = self.config.components[j][0]
        known = self.catalogue.setdefault((ad.category, component), [])
        if known and self.rng.random() < self.config.reuse:
            element = known[int(self.rng.integers(0, len(known)))]
            if element not in pool:
                return element
        element = self._new_element(component, self._scale(ad, j))
        known.append(element)
        return element

    def _churn(self) -> None:
        ad = self.ads[int(self.rng.integers(0, len(self.ads)))]
        component = list(ad.pools)[int(self.rng.integers(0, len(ad.pools)))]
        j = [c[0] for c in self.config.components].index(component)
        pool = ad.pools[component]
        pool[int(self.rng.integers(0, len(pool)))] = self._pool_element(ad, j, pool)

    # -- traffic ----------------------------------------------------------------------------------
    def request(self, request_id: str) -> dict:
        """A SelectionRequest for a random ad, user and query (advances the clock)."""
        self.clock += 0.01
        churn, a, u, q = self.rng.random(4)
        if churn < self.config.churn:
            self._churn()
        ad = self.ads[int(a * len(self.ads))]
        uid, age, gender = self.users[int(u * len(self.users))]
        qid, segments = self.queries[int(q * len(self.queries))]
        return {
            "request_id": request_id,
            "ad_id": ad.id,
            "ts": round(self.clock, 3),
            "user": {"id": uid, "age": age, "gender": gender},
            "query": {"id": qid, "segments": list(segments)},
            "candidates": {c: [e.id for e in pool] for c, pool in ad.pools.items()},
        }

    def uniform_log(self, n: int, start: int = 0) -> list[dict]:
        """Bags from a uniform-random serving policy, in chronological order."""
        bags = []
        for i in range(start, start + n):
            request = self.request(f"r-{i}")
            draws = self.rng.random(len(request["candidates"]) + 1)
            pools = request["candidates"].items()
            shown = {c: ids[int(d * len(ids))] for (c, ids), d in zip(pools, draws[:-1], strict=True)}
            clicked = bool(draws[-1] < self.click_probability(request, shown))
            bag = {**request, "impression_id": f"imp-{i}", "shown": shown, "policy": "explore",
                   "propensity": float(np.prod([1 / len(v) for v in request["candidates"].values()])),
                   "clicked": clicked}
            if clicked:
                bag["click_ts"] = bag["ts"] + 1.0
            bags.append(bag)
        return bags

    # -- truth ------------------------------------------------------------------------------------
    def _taste(self, request: dict) -> np.ndarray:
        user, segments = request["user"], request["query"]["segments"]
        taste = self.age_taste[user["age"]] + self.gender_taste[user["gender"]]
        return taste + sum(self.segment_taste[s] for s in segments) / max(len(segments), 1)

    def _appeal(self, request: dict) -> float:
        return self.ads[int(request["ad_id"].split("-")[1])].appeal

    def click_probability(self, request: dict, shown: dict[str, str]) -> float:
        cfg = self.config
        elements = [self.elements[e] for e in shown.values()]
        style = np.array([e.style for e in elements])
        total = style.sum(0)
        pairs = 0.5 * (total @ total - (style * style).sum())
        logit = (cfg.base_logit + self._appeal(request) + sum(e.quality for e in elements)
                 + cfg.context * float(total @ self._taste(request)) + cfg.synergy * pairs)
        return float(sigmoid(np.array(logit)))

    def values(self, request: dict) -> tuple[float, float, dict[str, str]]:
        """Exact (uniform-policy CTR, oracle CTR, oracle combination) for a request, by enumeration."""
        cfg = self.config
        comps = list(request["candidates"])
        taste = self._taste(request)
        m = len(comps)
        logit = np.full([1] * m, cfg.base_logit + self._appeal(request))
        total = np.zeros([1] * m + [cfg.style_dim])
        squares = np.zeros([1] * m)
        for j, c in enumerate(comps):
            elements = [self.elements[e] for e in request["candidates"][c]]
            shape = [1] * m
            shape[j] = len(elements)
            style = np.array([e.style for e in elements])
            logit = logit + np.array([e.quality for e in elements]).reshape(shape)
            logit = logit + cfg.context * (style @ taste).reshape(shape)
            total = total + style.reshape([*shape, cfg.style_dim])
            squares = squares + (style * style).sum(1).reshape(shape)
        ctr = sigmoid(logit + cfg.synergy * 0.5 * ((total * total).sum(-1) - squares))
        best = np.unravel_index(int(np.argmax(ctr)), ctr.shape)
        oracle = {c: request["candidates"][c][int(k)] for c, k in zip(comps, best, strict=True)}
        return float(ctr.mean()), float(ctr.max()), oracle
