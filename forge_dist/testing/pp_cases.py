"""Pipeline parity cases: the models and the schedule x layout runs (data, as tp_cases.py)."""
from __future__ import annotations

from typing import List

from forge_dist.parallel.pipeline.split import SCHEDULES

PP_BASE = dict(n_layer=8, n_head=4, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)

# tied embeddings (the default) with what pipelining must carry across stages: a shared attention
# module whose group (layers 0-2, 3-5, 6-7) spans stage boundaries, MoE layers with load-balancing
# and z losses on several stages, RoPE with GQA, SwiGLU, embedding scale, logit soft-capping, a
# steering vector recorded mid-model
VARIANT_MIX = {**PP_BASE, "use_rotary_embeddings": True, "use_abs_pos_embeddings": False, "n_kv_group": 2,
               "mlp_variant": "swiglu", "use_moe": True, "n_experts": 4, "moe_top_k": 2, "moe_layer_freq": 2,
               "moe_aux_loss_coef": 0.01, "moe_z_loss_coef": 0.001, "shared_attn_size": 3,
               "use_embedding_scale": True, "final_logit_softcapping": 3.0, "obtain_vector_at_layer_idx": 5}
MODELS = {"default": PP_BASE, "variant_mix": VARIANT_MIX}


def micro_batches(schedule: str, pp: int) -> int:
    """The fewest micro-batches each schedule accepts, at least 2 x pp (so 1F1B has a steady state)."""
    return 2 * pp


# one schedule of each kind for the variant mix: plain, interleaved zero-bubble, V-shaped
MIX_SCHEDULES = ("1f1b", "interleaved_zero_bubble", "dualpipev")


def schedule_runs(layouts, models=tuple(MODELS)) -> List[tuple]:
    """(pp, tp) layouts x schedules x models, as run_pp_matrix takes them: every schedule on the
    default model, MIX_SCHEDULES on the variant mix."""
    return [(pp, tp, s, None, m, MODELS[m], micro_batches(s, pp))
            for pp, tp in layouts for s in SCHEDULES for m in models
            if m == "default" or s in MIX_SCHEDULES]


# tp_cases configurations (2 layers: one per stage at PP=2) whose modules or options cross the
# stage boundary or live on one end: embeddings tied or not, factorised and quantized tables,
# per-layer lists, shared modules and FIRE, steering, LSV, MoE losses, attention/MLP variants.
# Not exact pipelined (each stage's process draws its own random numbers in the forward, so the
# single process's stream cannot be replayed): norm=krmsnorm with random feature selection,
# router=noisy_top_k, stochastic quantizers.
PP_VARIANT_CASES = (
    "default", "untied", "factorised", "factorised_untied", "embedding_scale", "softcap", "layerlist_heads",
    "gradient_checkpointing", "fire", "fire_shared", "shared_attn_mlp", "steering_obtain", "mla_fire_consmax_v2",
    "option=lsv_at_embedding", "option=moe_swiglu_capacity_losses", "option=quantize_wte", "quantized_wpe",
    "attention=mla", "attention=ssm", "mlp=kan", "linear=quantized_linear",
)


def variant_runs() -> List[tuple]:
    """PP_VARIANT_CASES at PP=2 with 1F1B and 2 micro-batches."""
    from forge_dist.testing.tp_cases import all_cases

    cases = dict(all_cases())
    return [(2, 1, "1f1b", None, name, cases[name], 2) for name in PP_VARIANT_CASES]


def zero_runs() -> List[tuple]:
    """ZeRO-1 (--zero_stage 1) over each stage's data-parallel replicas at PP=2 x DP=2 (a world of
    4): a plain, an interleaved zero-bubble and a V-shaped schedule."""
    return [(2, 1, s, None, m, MODELS[m], micro_batches(s, 2), {"zero": True})
            for s, m in (("1f1b", "default"), ("interleaved_zero_bubble", "variant_mix"), ("zbv", "variant_mix"))]


# activation recomputation (torch.utils.checkpoint, non-reentrant, per block) under the schedules that
# split the backward into input and weight passes, with DDP per stage: the recomputed graph must
# serve both passes, and DDP's hooks must fire at the last weight pass (schedule.ForgeStage)
CHECKPOINTED = {**PP_BASE, "use_gradient_checkpointing": True}
SPLIT_BACKWARD = ("interleaved_zero_bubble", "zbv", "dualpipev")


def checkpointing_runs() -> List[tuple]:
    """--use_gradient_checkpointing with each split-backward schedule at PP=2 x DP=2 (a world of 4),
    on the default model: case ``checkpointed``."""
    return [(2, 1, s, None, "checkpointed", CHECKPOINTED, micro_batches(s, 2)) for s in SPLIT_BACKWARD]


def world8_runs() -> List[tuple]:
    """PP=2 x TP=2 x DP=2 in one world of 8: all three dimensions at once (a world of 4 holds at
    most two). A plain, an interleaved, a split-backward V-shaped schedule, ZeRO-1 and sequence
    parallelism, on the default model and the variant mix; and expert parallelism inside the stages
    (EP=2 carved out of DP=2, ep_parity's MoE model) with the experts whole on each TP rank and
    TP-split."""
    return [(2, 2, s, None, m, MODELS[m], micro_batches(s, 2), opts)
            for s, m, opts in (("1f1b", "default", {}), ("interleaved_1f1b", "variant_mix", {}),
                               ("zbv", "variant_mix", {}), ("1f1b", "variant_mix", {"zero": True}),
                               ("dualpipev", "default", {"zero": True, "sequence_parallel": True}))] + expert_runs()


def expert_runs() -> List[tuple]:
    """EP=2 inside PP=2 x TP=2 (world of 8): top-2 dropless with the experts whole on each TP rank
    (expert_tensor_parallel_size 1, the TP ranks splitting the tokens) and TP-split; top-1 with
    capacity (counted per TP rank's token share) with the experts whole; and, with sequence
    parallelism on 4 layers (one per chunk), the split-backward schedules: dualpipev with the
    experts TP-split, interleaved zero-bubble with them whole. (ZeRO-1 with expert parallelism is
    refused before launch: launch.py.)"""
    from forge_dist.testing.ep_parity import N_MICRO, ep_model_kwargs

    plain = [(2, 2, "1f1b", None, f"moe_{router}_etp{etp}", ep_model_kwargs(router), N_MICRO, {"ep": 2, "etp": etp})
             for router, etp in (("top2", 1), ("top2", 2), ("top1_capacity", 1))]
    return plain + [(2, 2, s, None, f"moe_top2_etp{etp}", {**ep_model_kwargs("top2"), "n_layer": 4},
                     micro_batches(s, 2), {"ep": 2, "etp": etp, "sequence_parallel": True})
                    for s, etp in (("dualpipev", 2), ("interleaved_zero_bubble", 1))]
