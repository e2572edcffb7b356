"""Mixture of experts (use_moe): a router sends each token to moe_top_k of n_experts MLPs.

One MoE layer runs four separate steps, so expert parallelism can replace the two in the middle
(local grouping) by all-to-all exchanges without touching the others:

    route     logits = W_r x + b (N, E); chosen = top-k over the expert axis;
              gate weights w = softmax over the chosen logits (sum to 1 per token)
    dispatch  sort the (token, slot) assignments by expert, first choices before second ones;
              an expert takes at most `capacity` of them, the rest are dropped
    experts   expert e runs once on its contiguous slice of tokens (no loop over tokens)
    combine   y_n = sum_j w_nj expert_{e_nj}(x_n), scattered back into token order

Beyond upstream: a load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4-6:
n_experts * sum_e f_e P_e), the router z-loss (ST-MoE, Zoph et al. 2022, eq. 5:
mean_n logsumexp(logits_n)^2), a capacity factor (GShard, Lepikhin et al. 2020:
capacity = ceil(factor * N * k / E); None = dropless) and per-expert token counts as a metric.
Names follow upstream's state dict: ``mlp.router.route_linear.*`` (+ ``noise_linear`` for
noisy_top_k) and ``mlp.experts.{e}.*``, each expert a full MLP of ``mlp_variant``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist.config.validate import register_rule
from forge_dist.errors import ConfigError
from forge_dist.model.mlp import build_mlp
from forge_dist.variants import ROUTER


@dataclass
class Routing:
    logits: torch.Tensor  # (N, E) the router's clean logits (z-loss)
    probs: torch.Tensor  # (N, E) softmax over all experts of the selection logits (load balance P_e)
    experts: torch.Tensor  # (N, k) chosen expert ids, best first
    weights: torch.Tensor  # (N, k) gate weights, renormalised over the chosen experts


@ROUTER.register("softmax")
class TopKRouter(nn.Module):
    """Keep the top-k logits, set the others to -inf, softmax: renormalised weights (upstream's
    TopKRouter). With k = 1 every weight is 1, so the router learns only from the auxiliary loss."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.moe_top_k
        self.route_linear = nn.Linear(config.n_embd, config.n_experts, bias=True)

    def selection_logits(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def forward(self, x: torch.Tensor) -> Routing:  # x (N, C)
        logits = self.route_linear(x)  # (N, E)
        sel = self.selection_logits(x, logits)
        top, experts = sel.topk(self.top_k, dim=-1)  # over the expert axis
        return Routing(logits, F.softmax(sel, dim=-1), experts, F.softmax(top, dim=-1))


@ROUTER.register("noisy_top_k")
class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5): during training the selection logits are
    H = W_r x + b + eps * softplus(W_n x + b_n) * moe_noise_std, eps ~ N(0, 1), and the top-k and
    the gate softmax use H; in eval the clean logits. Upstream took the top-k over the sequence
    axis and never used the noise (docs/divergences.md)."""

    def __init__(self, config):
        super().__init__(config)
        self.noise_linear = nn.Linear(config.n_embd, config.n_experts, bias=True)
        self.noise_std = config.moe_noise_std

    def selection_logits(self, x, logits):
        if not self.training:
            return logits
        return logits + torch.randn_like(logits) * F.softplus(self.noise_linear(x)) * self.noise_std


@dataclass
class DispatchPlan:
    tokens: torch.Tensor  # (M,) token of each kept assignment, grouped by expert
    slots: torch.Tensor  # (M,) flat index j * N + n of each kept assignment into routing.weights.T
    counts: torch.Tensor  # (E,) kept assignments per expert
    routed: torch.Tensor  # (E,) assignments per expert before the capacity cut
    dropped: torch.Tensor  # () assignments dropped by the capacity


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, factor: Optional[float]) -> Optional[int]:
    """ceil(factor * N * k / E) assignments per expert; None (dropless) without a factor."""
    return None if factor is None else math.ceil(factor * n_tokens * top_k / n_experts)


def plan_dispatch(experts: torch.Tensor, n_experts: int, capacity: Optional[int],
                  capacity_groups: int = 1) -> DispatchPlan:
    """Group the (N, k) assignments by expert. Priority inside an expert: every token's first
    choice before any second choice, then token order; beyond ``capacity`` they are dropped.
    With ``capacity_groups`` g the N tokens are g equal contiguous groups and ``capacity`` is
    counted per expert in each group: what g data-parallel ranks holding one group each do."""
    N, k = experts.shape
    flat = experts.t().reshape(-1)  # (k*N,) slot-major: index j * N + n
    routed = torch.bincount(flat, minlength=n_experts)
    if capacity is None:
        order = torch.argsort(flat, stable=True)  # by expert, priority preserved inside each
        return DispatchPlan(order % N, order, routed, routed, routed.sum() * 0)
    if N % capacity_groups:
        raise ValueError(f"{N} tokens do not split into capacity_groups={capacity_groups}")
    # bucket = (expert, group); rank inside a bucket in priority order, cut at capacity
    bucket = flat * capacity_groups + (torch.arange(k * N, device=flat.device) % N) // (N // capacity_groups)
    order = torch.argsort(bucket, stable=True)
    sizes = torch.bincount(bucket, minlength=n_experts * capacity_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(order.numel(), device=order.device) - starts[bucket[order]]
    order = order[rank < capacity]  # still sorted by expert (the bucket's major key)
    counts = torch.bincount(flat[order], minlength=n_experts)
    return DispatchPlan(order % N, order, counts, routed, routed.sum() - counts.sum())


def run_grouped(experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(M, C) tokens grouped by expert, ``counts[i]`` of them for ``experts[i]``, -> (M, C). Every
    expert runs, even on no tokens, so all parameters stay in the graph (DDP, ZeRO)."""
    chunks = torch.split(x, counts.tolist())
    return torch.cat([e(c.unsqueeze(0)).squeeze(0) for e, c in zip(experts, chunks)])


class ExpertList(nn.ModuleList):
    """The n_experts MLPs (state-dict names ``experts.{e}.*``); called on tokens grouped by expert.
    Expert parallelism (forge_dist.parallel.expert) replaces it by its local experts plus the
    all-to-all token exchange, with the same call signature."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # (M, C), (E,) -> (M, C)
        return run_grouped(self, x, counts)


class MoELayer(nn.Module):
    """Drop-in for the MLP of a block: (B, T, C) -> (B, T, C)."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.n_experts = config.n_experts
        self.top_k = config.moe_top_k
        self.capacity_factor = config.moe_capacity_factor
        self.aux_loss_coef = config.moe_aux_loss_coef
        self.z_loss_coef = config.moe_z_loss_coef
        self.router = ROUTER.build(config.moe_router_scheme, config, option="moe_router_scheme")
        self.experts = ExpertList(build_mlp(config, layer_idx) for _ in range(config.n_experts))
        # Set from outside by a parallel run (never by the model): the (E,) routed counts of the
        # whole data-parallel batch from this process's counts, so the load-balancing loss is the
        # one of the global batch; and how many equal token groups capacity is counted in (a
        # one-process reference of a run with that many data-parallel ranks).
        self.batch_counts: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.capacity_groups = 1
        # Also from outside, when each of ``token_splits`` ranks routes its own share of this
        # forward's tokens (tensor-parallel ranks with whole experts): the sum of a per-rank
        # statistic over them, its gradient passed through unchanged (None: one rank, all tokens).
        self.split_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.token_splits = 1
        # Per-forward records; a module shared by several layers records every use (reset_moe_state
        # clears them at the start of each model forward).
        self.aux_losses: list = []  # with grad; collect_moe_aux_loss sums them
        self.last_tokens_per_expert: Optional[torch.Tensor] = None  # (E,) kept assignments, metric
        self.last_dropped_tokens: Optional[torch.Tensor] = None  # () assignments over capacity
        self.health: list = []  # per use: router entropy, z loss, load-balance loss (detached, metrics)

    def reset_state(self) -> None:
        self.aux_losses = []
        self.health = []
        self.last_tokens_per_expert = self.last_dropped_tokens = None

    # --- the four steps -------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, routing: Routing):  # x (N, C) -> (M, C) grouped by expert
        n = x.shape[0] // self.capacity_groups
        cap = expert_capacity(n, self.top_k, self.n_experts, self.capacity_factor)
        plan = plan_dispatch(routing.experts, self.n_experts, cap, self.capacity_groups)
        return x[plan.tokens], plan

    def run_experts(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # (M, C) -> (M, C)
        return self.experts(x, counts)

    def combine(self, y: torch.Tensor, routing: Routing, plan: DispatchPlan, n_tokens: int) -> torch.Tensor:
        w = routing.weights.t().reshape(-1)[plan.slots].unsqueeze(-1)  # (M, 1)
        out = y.new_zeros(n_tokens, y.shape[-1])
        return out.index_add(0, plan.tokens, y * w.to(y.dtype))  # (N, C)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        flat = x.reshape(-1, x.shape[-1])
        routing = self.router(flat)
        grouped, plan = self.dispatch(flat, routing)
        y = self.combine(self.run_experts(grouped, plan.counts), routing, plan, flat.shape[0])
        self._record(routing, plan)
        return y.view_as(x)

    # --- auxiliary losses and metrics ----------------------------------------------------------
    def load_balance_loss(self, routing: Routing, plan: DispatchPlan,
                          routed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """E * sum_e f_e P_e: f_e = share of the N*k assignments routed to e (before the capacity
        cut), P_e = mean router probability of e. 1 for a perfectly uniform router.

        Under data parallelism f_e counts the whole data-parallel batch (``batch_counts``) and
        P_e is this rank's mean: every rank holds as many tokens, so the mean over ranks of this
        loss is exactly the global batch's E sum f_e P_e, and so is its averaged gradient.
        ``routed``: the counts to use instead of plan.routed (summed over a token split)."""
        routed = plan.routed if routed is None else routed
        routed = routed if self.batch_counts is None else self.batch_counts(routed)
        f = routed.to(routing.probs.dtype) / routed.sum()
        return self.n_experts * torch.sum(f * routing.probs.mean(0))

    @staticmethod
    def z_loss(routing: Routing) -> torch.Tensor:
        return torch.logsumexp(routing.logits, dim=-1).pow(2).mean()

    def _split_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over a token split of each rank's mean over its (equally many) tokens."""
        return t if self.split_sum is None else self.split_sum(t / self.token_splits)

    def _record(self, routing: Routing, plan: DispatchPlan) -> None:
        counts, dropped, routed = plan.counts.detach(), plan.dropped.detach(), plan.routed
        if self.split_sum is not None:  # every rank of the split routed its own tokens: their sums
            n = self.n_experts
            total = self.split_sum(torch.cat([counts, routed, dropped.reshape(1)]))
            counts, routed, dropped = total[:n], total[n:2 * n], total[2 * n]
        if self.last_tokens_per_expert is not None:  # a shared module: sum over its uses
            counts, dropped = counts + self.last_tokens_per_expert, dropped + self.last_dropped_tokens
        self.last_tokens_per_expert, self.last_dropped_tokens = counts, dropped
        aux = None
        z = self._split_mean(self.z_loss(routing))
        health = {"router_entropy": self._split_mean(router_entropy(routing.probs.detach())), "z_loss": z.detach()}
        if self.aux_loss_coef > 0:
            balance = self._split_mean(self.load_balance_loss(routing, plan, routed))
            health["load_balance_loss"] = balance.detach()
            aux = self.aux_loss_coef * balance
        if self.z_loss_coef > 0:
            aux = self.z_loss_coef * z if aux is None else aux + self.z_loss_coef * z
        if aux is not None:
            self.aux_losses.append(aux)
        self.health.append(health)


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of -sum_e p_e ln p_e: ln(E) for a router that cannot decide, 0 for one
    that is certain (a collapsing router drifts to 0 early in training)."""
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1).mean()


def build_ffn(config, layer_idx: int) -> nn.Module:
    """The feed-forward module of layer ``layer_idx``: an MoE layer when use_moe and
    layer_idx % moe_layer_freq == 0 (layers 0, 2, 4, ... by default, as upstream), else the MLP."""
    if config.use_moe and layer_idx % config.moe_layer_freq == 0:
        return MoELayer(config, layer_idx)
    return build_mlp(config, layer_idx)


def collect_moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the auxiliary losses of the last forward of every MoE layer and every use of a
    shared one (0 when none); add it to the training loss."""
    losses = [a for m in model.modules() if isinstance(m, MoELayer) for a in m.aux_losses]
    if losses:
        return torch.stack(losses).sum()
    p = next(model.parameters(), None)
    return torch.zeros((), device=p.device if p is not None else None)


def reset_moe_state(model: nn.Module) -> None:
    """Forget the previous forward's records (called at the start of every model forward)."""
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.reset_state()


def collect_tokens_per_expert(model: nn.Module) -> Dict[str, torch.Tensor]:
    """{MoE layer name: (E,) tokens each expert processed in the last forward} for logging."""
    return {name: m.last_tokens_per_expert for name, m in model.named_modules()
            if isinstance(m, MoELayer) and m.last_tokens_per_expert is not None}


@register_rule
def rule_moe_extras(cfg):
    for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_noise_std"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be >= 0")
