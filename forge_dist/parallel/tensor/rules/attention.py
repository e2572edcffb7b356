"""Rules of the attention variants: heads split over the TP group.

q/k/v projections are column-parallel by heads, the output projection row-parallel; the module
is one TP region (entered once for q, k and v). Everything between works on the local heads
unchanged because the model reads head counts from tensor shapes: RoPE, QK-norm, window,
soft-capping, the softmax, dropout on attention probabilities (a sharded RNG region).
"""
from __future__ import annotations

from forge_dist.model.attention.causal import CausalSelfAttention
from forge_dist.parallel.tensor.plan import Column, Plan, Row, ShardContext
from forge_dist.parallel.tensor.rules.registry import TP_RULES, kv_shards, per_head_params

HEAD_PARAMS = ("qk_norm_factor", "flash_lobo_log_const")


@TP_RULES.register(CausalSelfAttention)
def causal(m: CausalSelfAttention, ctx: ShardContext) -> Plan:
    n_head = m.c_attn_q.out_features // m.qk_head_dim
    n_kv = m.c_attn_k.out_features // m.qk_head_dim
    kv = kv_shards(n_head, n_kv, ctx)
    return Plan(
        children={"c_attn_q": Column(), "c_attn_k": Column(num_shards=kv), "c_attn_v": Column(num_shards=kv),
                  "c_proj": Row()},
        params=per_head_params(m, n_head, HEAD_PARAMS),
        enter=True, rng="sharded", residual_dropout=("resid_dropout",), inner_sharded=True)
