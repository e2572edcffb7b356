"""Per-rank peak resident memory of an MoE GPT under expert parallelism, through forge-train's own
path (build_model, the native engine, the sharded checkpoint), for bench/memory.py --ep and
tests/dist/test_memory.py. Run ``measure_ep`` on every rank of a spawned world of EP ranks (EP
over data parallelism: dense parameters replicated, experts split), or in a world of 1 for the
one-process figures (GPT(cfg) whole, LocalEngine).

Phases, each the peak RSS above the idle baseline (torch, forge_dist, the process groups, a first
meta op) once it is done: ``built`` (build_model: on the meta device, only this rank's experts
drawn), ``init`` (the engine: DDP's buckets, the optimizer), ``first_step``, ``step`` (through all
steps: AdamW's moments held from the second on), ``save`` (forge-train's sharded checkpoint), and
in a fresh world ``resume`` (build_model and the engine loading that checkpoint, this rank's pieces).

What 1/N + 15% means here: the dense parameters (embeddings, attention, norms, routers) are
replicated on every EP rank, only the experts are split, so the model-state share of a rank is
``expected_share`` = (dense + experts / EP) / (dense + experts) of one process's (ZeRO-1: the
dense AdamW moments also / DP), and the target is that share + 0.15.
"""
from __future__ import annotations

import torch

from forge_dist.dist.malloc import pin_mmap_threshold
from forge_dist.testing.memory import _peak_mb


def moe_config(n_layer: int = 4, n_embd: int = 384, n_experts: int = 8, vocab_size: int = 8192,
               block: int = 32) -> dict:
    """An MoE GPT whose experts hold most of the parameters (every layer an MoE layer, top-2)."""
    return dict(n_layer=n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64), vocab_size=vocab_size, block_size=block,
                dropout=0.0, bias=False, use_moe=True, n_experts=n_experts, moe_layer_freq=1, moe_top_k=2)


def parameter_split(cfg_kwargs: dict) -> tuple:
    """(dense, expert) parameter counts of the one-process model (on the meta device: nothing drawn)."""
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.model.gpt import GPT

    model = GPT(ModelConfig(**cfg_kwargs), defer_init=True)
    dense = expert = 0
    for name, p in {id(p): (n, p) for n, p in model.named_parameters()}.values():
        if ".experts." in name:
            expert += p.numel()
        else:
            dense += p.numel()
    return dense, expert


def expected_share(cfg_kwargs: dict, ep: int, dp: int = None, zero_stage: int = 0) -> float:
    """A rank's model state (fp32 weights, gradients, AdamW's two moments: 16 bytes a parameter)
    relative to one process's, with the experts split over ``ep`` and the dense part replicated
    (under ZeRO-1 the dense moments split over ``dp``, the experts' over expert_dp = dp / ep)."""
    dense, expert = parameter_split(cfg_kwargs)
    dp = dp or ep
    dense_moments = 8 / dp if zero_stage else 8
    expert_moments = 8 / (dp // ep) if zero_stage else 8
    return (dense * (8 + dense_moments) + expert / ep * (8 + expert_moments)) / (16 * (dense + expert))


def measure_ep(rank: int, world_size: int, cfg_kwargs: dict, steps: int, block: int, ep: int = None,
               save_dir: str = None, resume_from: str = None, zero_stage: int = 0, tp: int = 1) -> dict:
    """Peaks above the idle baseline of this rank (MB) by phase; ``ep`` defaults to the world size
    over ``tp`` (1: one process). ``save_dir``: also the sharded save (its path in ``path``); ``resume_from``:
    the model and optimizer state come from that checkpoint (``resume``) before the steps. ``tp``: a
    dense GPT at TP=tp through the same path (bench/memory.py's TP save and resume rows; ``ep=1``)."""
    from forge_dist.config.model_config import ModelConfig
    from forge_dist.testing.runs import parallel_context
    from forge_dist.train.context import RunContext
    from forge_dist.train.model_build import build_model
    from forge_dist.train.options import TrainConfig
    from forge_dist.train.parallel_engine import parallel_engine_factory
    from forge_dist.train.sharded_save import ShardedCheckpointer

    pin_mmap_threshold()  # as train/launch.py does in every run
    cfg = ModelConfig(**cfg_kwargs)
    ctx = parallel_context(rank, world_size, tp=tp, ep=ep or world_size // tp) if world_size > 1 else RunContext()
    train_cfg = TrainConfig(batch_size=1, gradient_accumulation_steps=1, device="cpu", dtype="float32",
                            learning_rate=1e-4, grad_clip=1.0, seed=0)
    torch.empty(2, device="meta").normal_()  # meta ops import torch._dynamo once: library, not model, memory
    base = _peak_mb()
    model, _ = build_model(cfg, train_cfg, ctx, resume_path=resume_from)
    out = {"built": _peak_mb() - base,
           "local_params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())}
    engine = parallel_engine_factory(model, train_cfg, {"zero_stage": zero_stage}, ctx)
    out["init"] = _peak_mb() - base
    if resume_from is not None:  # what forge-train's resume of a sharded checkpoint does: the engine reads
        engine.load_state(resume_from)
        out["resume"] = _peak_mb() - base
    g = torch.Generator().manual_seed(1 + ctx.dp_rank)
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab_size, (1, block), generator=g)
        engine.forward_backward([(x, x)])
        engine.step(1e-4)
        out.setdefault("first_step", _peak_mb() - base)
    out["step"] = _peak_mb() - base
    if save_dir is not None:
        out["path"] = ShardedCheckpointer(ctx).save(save_dir, steps, engine.model, engine, {"iter_num": steps})
        out["save"] = _peak_mb() - base
    return out
