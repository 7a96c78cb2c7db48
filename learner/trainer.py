"""Incremental training: one constant-learning-rate step per chronological mini-batch.

The streaming learner and ``genco train`` both call :meth:`Learner.step` with bags
in arrival order: the paper's recency-first, single-pass schedule.

Losses (paper eq. 11, 12, 20, 22, 23), each averaged over its terms:
  L_comb  binary cross-entropy of the combination score s on the click label
  L_ele   binary cross-entropy of each shown element's score p_e on the same label
  L_RL    REINFORCE on the logged combination: -(r - r̂) · Σ_j log π(c_j), r = 1 if clicked else -0.1,
          r̂ the reward the combination head expected (a baseline the paper does not have; see losses)
  L = L_comb + L_ele + λ·L_RL
The paper writes L_comb and L_ele with only the y·log σ term; taken literally that
pushes every score to +∞, so we read them as the full cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from learner.features import Batch, Featurizer
from learner.model import Encoded, GenCO, ModelConfig

CLICK_REWARD, NO_CLICK_REWARD = 1.0, -0.1
BLEND_PARAMETERS = ("network_weight",)  # learned from L_serve alone


@dataclass
class TrainConfig:
    optimizer: str = "adam"  # dense layers: "adam" or "sgd"
    lr: float = 3e-3
    sparse_optimizer: str = "adam"  # hash tables, whose rows move only when their id appears: "adam",
    sparse_lr: float = 3e-3  # "adagrad" or "sgd"
    blend_lr: float = 3e-2  # the network's weights in serving, which must settle within ~100 steps
    batch_size: int = 1024
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Preset:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS: dict[str, Preset] = {
    "default": Preset(),
    # The paper's appendix exactly: plain SGD, lr 5e-3, embeddings of dimension 4, nothing added.
    "paper": Preset(ModelConfig(dim=4, prior=False), TrainConfig("sgd", 5e-3, "sgd", 5e-3)),
    # The default without the pair prior: faster batched selection, no gain where elements go together.
    "fast": Preset(ModelConfig(pair_prior=False)),
}


def preset(name: str, train: dict | None = None, **model_overrides) -> Preset:
    """A named preset with some model or training settings changed (ablations, sweeps)."""
    base = PRESETS[name]
    return Preset(ModelConfig(**{**asdict(base.model), "sizes": base.model.sizes, **model_overrides}),
                  TrainConfig(**{**asdict(base.train), **(train or {})}))


@dataclass
class StepResult:
    loss: float
    comb: float
    ele: float
    rl: float
    predicted: torch.Tensor  # (B,) click probability of the logged combination, before this step


def losses(model: GenCO, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, Encoded]:
    """The step's loss, its parts, the logged combinations' logits s and the batch's encoding.

    The network learns on top of the priors; the serving blend (``network_weight``) learns from ``L_serve``,
    the loss of the scores serving uses, with the network's scores held fixed."""
    enc, t = model.encode(batch), batch.tensors
    clicked, shown, request = t.requests.clicked, t.logged.element, t.logged.request
    pair_prior = None
    if model.priors is not None and model.config.pair_prior:
        pair_prior = torch.from_numpy(model.logged_pair_prior(batch, enc)).float()[None]
    network, prior = model.combination_parts(batch, enc, t.pools.shown.unsqueeze(0), pair_prior)
    s = network[0] if prior is None else network[0] + prior[0]
    element_logit = enc.element_logit(t.elements.request)
    label = clicked.index_select(0, request)
    parts = {"ele": F.binary_cross_entropy_with_logits(element_logit.index_select(0, shown), label)}
    parts["comb"] = F.binary_cross_entropy_with_logits(s, clicked) if model.config.mil else s.new_zeros(())
    if model.config.rl_weight:
        log_pi = pool_log_softmax(batch, element_logit)
        reward = torch.where(clicked > 0, CLICK_REWARD, NO_CLICK_REWARD)
        # The reward the combination head expected is the baseline: without it the mostly negative rewards
        # of a log make the loss unbounded below and the policy drifts (docs/decisions.md, "RL baseline").
        expected = NO_CLICK_REWARD + (CLICK_REWARD - NO_CLICK_REWARD) * torch.sigmoid(s.detach())
        advantage = (reward - expected).index_select(0, request)
        parts["rl"] = -(advantage * log_pi.index_select(0, shown)).sum() / batch.size
    else:
        parts["rl"] = s.new_zeros(())
    total = parts["comb"] + parts["ele"] + model.config.rl_weight * parts["rl"]
    if prior is not None:
        blend, fixed = model.network_weight, enc.element_network.detach()
        served = (blend[0] * fixed + enc.element_prior + enc.request_prior.index_select(0, t.elements.request)
                  ).index_select(0, shown)
        parts["serve"] = (F.binary_cross_entropy_with_logits(blend[1] * network[0].detach() + prior[0], clicked)
                          + F.binary_cross_entropy_with_logits(served, label))
        total = total + parts["serve"]
        s = blend[1] * network[0].detach() + prior[0]  # what serving would have predicted
    return total, parts, s, enc


def pool_log_softmax(batch: Batch, element_logit: torch.Tensor) -> torch.Tensor:
    """log π(e) within each (request, component) pool, for every element (L,).

    The grid holds one pool per column: torch's log_softmax along a short last axis (15 wide, one pool
    per row) is far slower, forward and backward, than along the first."""
    elements, pools = batch.tensors.elements, len(batch.pools.size)
    cell = elements.pos * pools + elements.pool
    grid = element_logit.new_full((batch.pool_width * pools,), float("-inf")).index_put((cell,), element_logit)
    return torch.log_softmax(grid.view(batch.pool_width, pools), 0).view(-1).index_select(0, cell)


class RowAdam(torch.optim.SparseAdam):
    """SparseAdam's update, bit for bit and with its state, made with row gathers and copies instead of
    sparse-tensor arithmetic, which costs more a step, the more so the more rows a batch touches. The rows
    are distinct (the gradient comes coalesced), so each write is a copy, not an accumulation."""

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                grad = param.grad.coalesce()
                rows, values = grad._indices()[0], grad._values()
                old_avg = state["exp_avg"].index_select(0, rows)
                old_sq = state["exp_avg_sq"].index_select(0, rows)
                avg = values.sub(old_avg).mul_(1 - beta1).add_(old_avg)
                sq = values.pow(2).sub_(old_sq).mul_(1 - beta2).add_(old_sq)
                state["exp_avg"].index_copy_(0, rows, avg)
                state["exp_avg_sq"].index_copy_(0, rows, sq)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                update = avg.div_(sq.sqrt_().add_(group["eps"])).mul_(-step_size)
                param.index_copy_(0, rows, param.index_select(0, rows).add_(update))


class Learner:
    """A GenCO model plus its optimisers; ``step`` is the one thing streaming needs."""

    def __init__(self, preset: Preset | None = None, model: GenCO | None = None) -> None:
        self.preset = preset or Preset()
        torch.manual_seed(self.preset.train.seed)
        self.model = model or GenCO(self.preset.model)
        self.featurizer = Featurizer(self.preset.model.sizes, self.preset.model.max_candidates)
        self.bags_seen = 0
        self.steps = 0
        self.optimizers = self._optimizers()

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        cfg = self.preset.train
        sparse_tables = {id(m.weight) for m in self.model.modules()
                         if isinstance(m, torch.nn.Embedding) and m.sparse}
        blend = {id(p) for name, p in self.model.named_parameters() if name in BLEND_PARAMETERS}
        sparse = [p for p in self.model.parameters() if id(p) in sparse_tables]
        dense = [p for p in self.model.parameters() if id(p) not in sparse_tables | blend]
        # fused Adam: one kernel a step instead of several small ops for each tensor
        dense_kinds = {"adam": partial(torch.optim.Adam, fused=True), "sgd": torch.optim.SGD}
        sparse_kinds = {"adam": RowAdam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
        optimizers = [dense_kinds[cfg.optimizer](dense, lr=cfg.lr),
                      sparse_kinds[cfg.sparse_optimizer](sparse, lr=cfg.sparse_lr)]
        if blend:
            optimizers.append(torch.optim.Adam([p for p in self.model.parameters() if id(p) in blend],
                                               lr=cfg.blend_lr))
        return optimizers

    def step(self, bags: list) -> StepResult:
        """One optimiser step on a chronological mini-batch of validated Bags."""
        return self.step_batch(self.featurizer.batch(bags, labelled=True))

    def step_batch(self, batch: Batch) -> StepResult:
        self.model.train()
        if batch.size < 2:  # BatchNorm cannot estimate statistics from one example
            self.model.encoder.eval()
        total, parts, s, enc = losses(self.model, batch)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        total.backward()
        for opt in self.optimizers:
            opt.step()
        self._keep_blend_nonnegative()
        self.model.observe(batch, enc)
        self.bags_seen += batch.size
        self.steps += 1
        return StepResult(total.item(), parts["comb"].item(), parts["ele"].item(), parts["rl"].item(),
                          torch.sigmoid(s.detach()))

    @torch.no_grad()
    def _keep_blend_nonnegative(self) -> None:
        """The network adds what the priors miss or nothing: a negative weight would serve the opposite of
        what it learned. Where creatives churn, its rows of retired elements fit the past and ``L_serve``
        drove the weights below zero, serving worse than the priors alone (docs/decisions.md)."""
        for name, param in self.model.named_parameters():
            if name in BLEND_PARAMETERS:
                param.clamp_(min=0.0)

    @classmethod
    def resume(cls, model: GenCO, train_config: dict, optimizer_state: dict[str, torch.Tensor] | None,
               bags_seen: int, steps: int) -> Learner:
        """Continue training a snapshot's model exactly where it stopped."""
        learner = cls(Preset(model.config, TrainConfig(**train_config)), model=model)
        if optimizer_state:
            learner.load_optimizer_state(optimizer_state)
        learner.bags_seen, learner.steps = bags_seen, steps
        return learner

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """Optimiser moments as flat named tensors, so a checkpoint needs no pickle."""
        flat = {}
        for i, opt in enumerate(self.optimizers):
            for param_index, state in opt.state_dict()["state"].items():
                for key, value in state.items():
                    flat[f"{i}.{param_index}.{key}"] = torch.as_tensor(value)
        return flat

    def load_optimizer_state(self, flat: dict[str, torch.Tensor]) -> None:
        for i, opt in enumerate(self.optimizers):
            saved = opt.state_dict()
            for name, value in flat.items():
                index, param_index, key = name.split(".", 2)
                if int(index) == i:
                    saved["state"].setdefault(int(param_index), {})[key] = value
            opt.load_state_dict(saved)

    def learn(self, bags: list) -> None:
        """Train on bags in order, one step per ``batch_size`` bags (the last batch may be partial)."""
        size = self.preset.train.batch_size
        for start in range(0, len(bags), size):
            self.step(bags[start : start + size])
