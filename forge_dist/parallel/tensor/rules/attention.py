"""Rules of the dot-product attention variants: heads split over the TP group.

q/k/v projections are column-parallel by heads, the output projection row-parallel; the module
is one TP region (entered once for q, k and v). Everything between works on the local heads
unchanged because the model reads head counts from tensor shapes: RoPE, QK-norm, window,
soft-capping, the softmax and its per-head parameters (rules/softmax.py), FIRE's per-head bias,
dropout on attention probabilities (a sharded RNG region).

  causal     GQA: KV heads split, or when n_kv_group < tp each rank holds the KV head its query
             heads use (gradients summed over the ranks sharing it)
  infinite   (iqa) concatenated heads: as causal. Summed heads: each rank sums its local heads, a
             partial sum of (B, T, n_v_head_dim); c_proj (or each of the n_cproj projections) is
             kept whole and all-reduces that sum at its input, once per projection, and computes
             the full update on every rank (split into sequence shards under sequence parallelism)
  mla        query projections column by head; the shared latent (kv_down_proj) and the shared
             rotary key (k_rope_proj) whole on every rank, with partial gradients (each rank's
             heads use them); per-head up-projections column; out_proj row; lobo_log per head
  identity   no parameters and no region: the residual input comes back as it is
"""
from __future__ import annotations

import torch.nn as nn

from forge_dist.model.attention.causal import CausalSelfAttention
from forge_dist.model.attention.identity import AttnIdentity
from forge_dist.model.attention.infinite import InfiniteHeadAttention
from forge_dist.model.attention.mla import MultiHeadLatentAttention
from forge_dist.model.position import FIRE
from forge_dist.parallel.tensor.plan import Column, Plan, Replicate, ReplicateAfterSum, Row, ShardContext
from forge_dist.parallel.tensor.rules.linear import refuse_stochastic
from forge_dist.parallel.tensor.rules.quantize import act_quant_styles
from forge_dist.parallel.tensor.rules.registry import TP_RULES, heads_divisible, kv_shards, per_head_params

HEAD_PARAMS = ("qk_norm_factor", "flash_lobo_log_const")


def region(m: nn.Module, ctx: ShardContext, children, params=None, dropout=("resid_dropout",), **kwargs) -> Plan:
    """The Plan of an attention module that is one TP region over its heads."""
    children = {**children, **act_quant_styles(m, ctx, region=True)}
    return Plan(children=children, params=params or {}, enter=True, rng="sharded", residual_dropout=dropout,
                inner_sharded=True, **kwargs)


def qkv(m: CausalSelfAttention, ctx: ShardContext):
    """Column styles of q, k, v and the query head count."""
    n_head = m.c_attn_q.out_features // m.qk_head_dim
    kv = kv_shards(n_head, m.c_attn_k.out_features // m.qk_head_dim, ctx)
    return {"c_attn_q": Column(), "c_attn_k": Column(num_shards=kv), "c_attn_v": Column(num_shards=kv)}, n_head


@TP_RULES.register(CausalSelfAttention)
def causal(m: CausalSelfAttention, ctx: ShardContext) -> Plan:
    children, n_head = qkv(m, ctx)
    return region(m, ctx, {**children, "c_proj": Row()}, per_head_params(m, n_head, HEAD_PARAMS))


@TP_RULES.register(InfiniteHeadAttention)
def infinite(m: InfiniteHeadAttention, ctx: ShardContext) -> Plan:
    children, n_head = qkv(m, ctx)
    params = per_head_params(m, n_head, HEAD_PARAMS)
    if m.use_concat_heads:
        return region(m, ctx, {**children, "c_proj": Row()}, params)
    projections = [f"c_proj_list.{i}" for i in range(len(m.c_proj_list))] if hasattr(m, "c_proj_list") else ["c_proj"]
    for p in projections:
        refuse_stochastic(m.get_submodule(p), ctx.at(ctx.name(p), True))
    children.update({p: ReplicateAfterSum() for p in projections})
    return region(m, ctx, children, params, exit_at="resid_dropout", exit_partial=False)


@TP_RULES.register(MultiHeadLatentAttention)
def mla(m: MultiHeadLatentAttention, ctx: ShardContext) -> Plan:
    n_head = m.q_proj.out_features // m.d_head
    heads_divisible(n_head, ctx)
    shared = Replicate(partial=True)  # one latent and one rotary key serve all heads
    for p in ("k_rope_proj", "kv_down_proj"):
        refuse_stochastic(getattr(m, p), ctx.at(ctx.name(p), True))
    children = {"q_proj": Column(), "q_rope_proj": Column(), "k_rope_proj": shared, "kv_down_proj": shared,
                "k_up_proj": Column(), "v_up_proj": Column(), "out_proj": Row()}
    return region(m, ctx, children, per_head_params(m, n_head, HEAD_PARAMS + ("lobo_log",)))


@TP_RULES.register(AttnIdentity)
def identity(m: AttnIdentity, ctx: ShardContext) -> Plan:
    return Plan(children=act_quant_styles(m, ctx, region=False))


@TP_RULES.register(FIRE)
def fire(m: FIRE, ctx: ShardContext) -> Plan:
    """FIRE's MLP over the relative distance: hidden layers whole with partial gradients (every
    rank's heads use them); the last layer's output rows are the heads, split with them (its
    input is the distance feature, not a TP-region input: no entry mapping). A FIRE shared by
    every layer is one module, planned once."""
    linears = [i for i, layer in enumerate(m.mlp) if isinstance(layer, nn.Linear)]
    heads_divisible(m.mlp[linears[-1]].out_features, ctx, "FIRE heads (n_head)")
    shared = Replicate(partial=ctx.sharded_data)
    children = {f"mlp.{i}": shared for i in linears[:-1]}
    children[f"mlp.{linears[-1]}"] = Column(input="none")
    return Plan(children=children, params={"c": shared, "L_multiplier": shared, "init_L": Replicate()})
