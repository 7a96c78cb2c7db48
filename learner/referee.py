"""The referee: which of a snapshot's readouts serves, judged on data none of them chose (issue 31).

A snapshot can serve several policies (``serving.READOUTS``): the full model, the count priors alone, each
element's pooled effect. The simple ones win on some worlds (fast churn favours the pooled counter), so the
learner scores them all, continuously, on the uniform explore slice, and the snapshot names the one that
serves (docs/decisions.md, "Champion and challenger: readouts of one snapshot").

Judging: before the learner steps on a batch, each readout of the model as it stands picks a combination for
each of the batch's explore bags (``judge``): no readout is scored on a bag it has learned from. A bag r gives
policy p exposures x_rp = Σ_j n_rj over the components where p picks the element that was shown, and clicks
y_r x_rp: Algorithm 1 pooled over components (``evaluate.exposure``), whose ratio Σ c / Σ x estimates the CTR
of p's choice in each component, the others uniform. Not inverse propensity on whole combinations: a policy's
combination matches the shown one with probability Π_j 1/n_rj, about 1 in 2,000 on pools shaped like the
paper's Table 1 and 1 in 16 even on two pools of four, against 1 in n_rj per component; on the two-pool world
of tests/test_referee.py the combination estimate's standard error on 20,000 bags was 2.3 to 2.5 times the
pooled one's, readout for readout, and on Table-1 pools almost no bag matches at all.

Statistics: counts fade with a half-life in explore bags (recency first, as the paper trains), so a readout
that improves can take over. Kept are the faded sums m = Σ w v and M = Σ w² v vᵀ of v_r = (x_r1, c_r1, ...,
x_rP, c_rP); an estimate S_p = m_c / m_x has, by the delta method, variance gᵀ M g with g = (e_c − S_p e_x) /
m_x, and the difference of two readouts g_q − g_p: the same bags score every readout, so their common noise
(which ads, which users, which clicks) cancels in the paired difference.

Deciding: genco serves first; a challenger replaces the champion only when its estimate leads the champion's
by more than ``z`` standard errors of their paired difference, and that difference rests on at least
``min_clicks`` (faded) clicked bags where the two policies' exposures differ: the difference is made of those
alone, and with a handful the delta method is as unsure as the lead. Without that guard, on a mild world of
sim/flip.py, the pooled readout led genco by 2.27 standard errors after 1,024 explore bags with at most one such
click, and went on serving 15-25% below genco's true CTR from the 11th batch to the 30th, too small a lead in
sCTR for the noise to confirm. Genco takes back over the same way. Within ``z`` nothing changes (hysteresis:
a near tie never flaps). Where several lead, genco goes first, the readout the system is built around; else
the highest estimate.

``record`` is the decision on explicit numbers, testable alone; ``judge`` feeds it from a model and bags.
Its state (a few dozen floats and the champion) travels in each snapshot's manifest, so a learner restarted
from a checkpoint resumes judging where that checkpoint stood.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from learner.evaluate import exposure
from learner.features import Featurizer
from learner.model import GenCO
from learner.policy import answers, choose
from learner.serving import ServingModel

HALF_LIFE = 20_000.0  # explore bags: at the default 5% slice, 400k impressions
Z = 2.0  # standard errors of the paired difference a challenger must lead by
MIN_CLICKS = 30.0  # faded clicked bags where two policies' exposures differ, before one can replace the other
MAX_BAGS = 256  # explore bags judged per trained batch: bounds the referee's share of a step where all are explore


class Referee:
    """Faded calibrated-sCTR sums of each policy on explore bags, and the champion they choose."""

    def __init__(self, policies: Sequence[str], half_life: float = HALF_LIFE, z: float = Z,
                 min_clicks: float = MIN_CLICKS, max_bags: int = MAX_BAGS) -> None:
        self.policies = tuple(policies)
        self.half_life, self.z, self.min_clicks, self.max_bags = half_life, z, min_clicks, max_bags
        self.champion = self.policies[0]
        size = 2 * len(self.policies)
        self.first = np.zeros(size)  # Σ w v, v = (exposures, clicks) of each policy in turn
        self.second = np.zeros((size, size))  # Σ w² v vᵀ
        self.bags = 0.0  # Σ w: explore bags, faded
        self.discordant = np.zeros((len(self.policies),) * 2)  # Σ w, clicked bags where p's and q's exposures differ
        self._featurizer: Featurizer | None = None

    # -- the decision, on explicit numbers ------------------------------------------------------
    def record(self, exposures: np.ndarray, clicked: np.ndarray) -> str:
        """Count explore bags, oldest first: ``exposures`` (B, policies) as ``evaluate.exposure`` gives them,
        ``clicked`` (B,) 0 or 1; then decide. Returns the champion."""
        n = len(clicked)
        if not n:
            return self.champion
        fade = 2.0 ** (-1.0 / self.half_life)
        weight = fade ** np.arange(n - 1, -1, -1, dtype=np.float64)  # the newest bag weighs 1
        v = np.empty((n, len(self.first)))
        v[:, 0::2] = exposures
        v[:, 1::2] = exposures * np.asarray(clicked, dtype=np.float64)[:, None]
        self.first = fade**n * self.first + weight @ v
        self.second = fade ** (2 * n) * self.second + (v * (weight * weight)[:, None]).T @ v
        self.bags = fade**n * self.bags + float(weight.sum())
        differ = exposures[:, :, None] != exposures[:, None, :]
        self.discordant = fade**n * self.discordant + np.einsum("b,bpq->pq", weight * clicked, differ)
        self.champion = self.decide()
        return self.champion

    def decide(self) -> str:
        """The champion after the sums so far: a challenger ahead by more than ``z`` paired standard errors, on at
        least ``min_clicks`` clicked bags where the two differ (the difference is made of those alone, and with a
        handful of them the standard error is as unsure as the lead)."""
        ahead, champion = [], self.policies.index(self.champion)
        for p, policy in enumerate(self.policies):
            lead = self.lead(policy, self.champion) if p != champion else None
            if lead is not None and lead[0] > self.z * lead[1] and self.discordant[p, champion] >= self.min_clicks:
                ahead.append(policy)
        if not ahead:
            return self.champion
        return self.policies[0] if self.policies[0] in ahead else max(ahead, key=lambda p: self._sctr(p) or 0.0)

    def lead(self, challenger: str, champion: str) -> tuple[float, float] | None:
        """(challenger's estimate − champion's, its standard error), None while either has no exposure."""
        p, q = self.policies.index(challenger), self.policies.index(champion)
        gp, gq = self._gradient(p), self._gradient(q)
        if gp is None or gq is None:
            return None
        g = gp - gq
        return self._sctr(challenger) - self._sctr(champion), math.sqrt(max(float(g @ self.second @ g), 0.0))

    def _sctr(self, policy: str) -> float | None:
        p = self.policies.index(policy)
        exposures, clicks = self.first[2 * p], self.first[2 * p + 1]
        return clicks / exposures if exposures > 0 else None

    def _gradient(self, p: int) -> np.ndarray | None:
        """∂S_p/∂m: the delta method's weights on the sums, None while p has no exposure."""
        exposures, clicks = self.first[2 * p], self.first[2 * p + 1]
        if exposures <= 0:
            return None
        g = np.zeros(len(self.first))
        g[2 * p], g[2 * p + 1] = -clicks / exposures**2, 1.0 / exposures
        return g

    def estimates(self) -> dict[str, dict]:
        """{policy: {"sctr", "se", "bags"}}: each policy's calibrated sCTR on the faded explore bags (None
        before it has an exposure), its standard error and the faded bag count."""
        out = {}
        for p, policy in enumerate(self.policies):
            g = self._gradient(p)
            se = math.sqrt(max(float(g @ self.second @ g), 0.0)) if g is not None else None
            out[policy] = {"sctr": self._sctr(policy), "se": se, "bags": round(self.bags, 1)}
        return out

    # -- fed from a model -----------------------------------------------------------------------
    def judge(self, model: GenCO, bags: Sequence) -> str:
        """Score every policy, as ``model`` stands (before it learns ``bags``), on the explore bags among
        ``bags`` (those with a propensity; at most ``max_bags``, spread evenly), then decide."""
        explore = [bag for bag in bags if bag.policy == "explore" and bag.propensity is not None]
        if len(explore) > self.max_bags:
            explore = explore[:: math.ceil(len(explore) / self.max_bags)]
        if not explore:
            return self.champion
        if self._featurizer is None:
            self._featurizer = Featurizer(model.config.sizes, model.config.max_candidates)
        serving = ServingModel(model, frozen=False)  # done before the model learns again: no copy of its counts
        batch = self._featurizer.batch(explore)
        pools = serving.score_pools(batch)  # the readouts differ in how they read these, not in these
        exposures = np.empty((len(explore), len(self.policies)))
        for p, policy in enumerate(self.policies):
            picks = choose(serving.with_readout(policy), batch, pools=pools).tolist()
            for r, (bag, selection) in enumerate(zip(explore, answers(batch, picks), strict=True)):
                exposures[r, p] = exposure(bag, selection)
        return self.record(exposures, np.array([bag.clicked for bag in explore], dtype=np.float64))

    # -- persistence (JSON, in the snapshot's manifest) -----------------------------------------
    def state(self) -> dict:
        return {"policies": list(self.policies), "champion": self.champion, "bags": self.bags,
                "first": self.first.tolist(), "second": self.second.tolist(), "discordant": self.discordant.tolist()}

    @classmethod
    def restore(cls, state: dict | None, policies: Sequence[str], **settings) -> Referee:
        """A referee resuming ``state`` (``Referee.state``); a fresh one where there is none, or where it judged
        other policies than ``policies`` (a snapshot of another model)."""
        referee = cls(policies, **settings)
        if not state or tuple(state["policies"]) != referee.policies:
            return referee
        referee.champion, referee.bags = state["champion"], float(state["bags"])
        referee.first, referee.second = np.array(state["first"]), np.array(state["second"])
        referee.discordant = np.array(state["discordant"])
        return referee
