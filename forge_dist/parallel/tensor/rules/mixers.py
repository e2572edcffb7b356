"""Rules of the attention variants that are not dot-product attention over heads of q, k, v.

  linear  one fused c_attn [q | k | v] with bias: each third split by head (segments=3); the
          per-feature formula (cumulative sums over time, a per-head denominator) runs on local
          heads; c_proj row; the scalar ``scale`` whole with a partial gradient
  ssm     channels E split: in_proj [x | z] each half by channel; the depthwise conv, dt_bias,
          A_log and D per channel; x_proj reads every channel to make dt, B, C (shared by all
          channels), so it is row-parallel with an all-reduce whose result feeds the local
          channels again (the backward all-reduces their partial gradients: output "sharded");
          dt_proj column from that replicated dt; out_proj row
  co4     every step of the triadic modulation is per channel (elementwise, means over time or
          over latents), so channels split by head: k_proj, v_proj column, the latent queries'
          channels (dim 1) split; q_proj mixes every channel into each head, so its input's
          channel shards are all-gathered (backward reduce-scattered) for a column-parallel
          q_proj; attention per local head; out_proj row
"""
from __future__ import annotations

from forge_dist.model.attention.co4 import Co4Attention
from forge_dist.model.attention.linear import LinearAttention
from forge_dist.model.attention.ssm import SelectiveSSM
from forge_dist.parallel.tensor.plan import Column, Plan, Replicate, Row, ShardChannels, ShardContext, Shard
from forge_dist.parallel.tensor.rules.attention import region
from forge_dist.parallel.tensor.rules.registry import TP_RULES, divisible, heads_divisible


@TP_RULES.register(LinearAttention)
def linear(m: LinearAttention, ctx: ShardContext) -> Plan:
    heads_divisible(m.c_attn.out_features // 3 // m.head_dim, ctx)
    return region(m, ctx, {"c_attn": Column(segments=3), "c_proj": Row()}, {"scale": Replicate(partial=True)},
                  dropout=())


@TP_RULES.register(SelectiveSSM)
def ssm(m: SelectiveSSM, ctx: ShardContext) -> Plan:
    divisible(m.D.shape[0], ctx, "SSM channels (ssm_mamba_expand x n_embd)")
    children = {"in_proj": Column(segments=2), "conv1d": ShardChannels(), "x_proj": Row(output="sharded"),
                "dt_proj": Column(input="none"), "out_proj": Row()}
    return region(m, ctx, children, {name: Shard(dim=0) for name in ("dt_bias", "A_log", "D")})


@TP_RULES.register(Co4Attention)
def co4(m: Co4Attention, ctx: ShardContext) -> Plan:
    heads_divisible(m.latent.shape[1] // m.head_dim, ctx)
    children = {"k_proj": Column(), "v_proj": Column(), "q_proj": Column(input="features"), "out_proj": Row()}
    return region(m, ctx, children, {"latent": Shard(dim=1)})
