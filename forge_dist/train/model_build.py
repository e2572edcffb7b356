"""The model of a run: built with the run's seed (the same initial weights on every rank), weights
copied from --prev_run_ckpt or loaded on resume, sharded over the tensor-parallel group; on a
tensor-parallel launch only this rank's shards are ever materialised, on a pipelined one only this
rank's stages (build_model), on an expert-parallel one only this rank's experts, and only their
pieces are read from the checkpoint (io/slice_read.py)."""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from forge_dist.config.model_config import ModelConfig
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.context import RunContext
from forge_dist.train.options import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prev_run_reader(prev_state):
    """--init_from prev_run's weights as a SliceReader (resolve.py opens one; a state dict is wrapped)."""
    from forge_dist.io.slice_read import SliceReader, StateDictSlices

    if prev_state is None or isinstance(prev_state, SliceReader):
        return prev_state
    return StateDictSlices(prev_state, "the --prev_run_ckpt weights")


def build_model(cfg: ModelConfig, train_cfg: TrainConfig, ctx: RunContext, prev_state=None,
                resume_path=None, notes: Optional[list] = None, on_meta: bool = False):
    """(this rank's model, FLOPs per token of the full model). Tensor- and expert-parallel ranks
    build on the meta device, place the experts and apply the plan, then materialise only their
    shards and experts (drawn, or read from the
    resumed checkpoint tensor by tensor: forge_dist.parallel.materialize); other runs build the
    full model. The weights are the same either way. ``on_meta``: the model is left on the meta
    device (the TP plan applied) for an engine that materialises it itself (ZeRO-3 partitions:
    train/deepspeed_init.py, reading prev_run's weights from ``model.prev_run_weights``), and a
    resume's weights come with that engine's state."""
    from forge_dist.model.gpt import GPT
    from forge_dist.train.metrics import flops_per_token

    seed_everything(train_cfg.seed)  # the same initial weights on every rank
    device = train_cfg.resolved_device
    if device.startswith("cuda"):
        if torch.device(device).index is not None:  # plain "cuda": the current device (a launch set it)
            torch.cuda.set_device(torch.device(device))
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if resume_path is not None:
        from forge_dist.train.sharded_save import is_sharded_checkpoint

        if is_sharded_checkpoint(resume_path):  # the engine loads this rank's shards with the optimizer's
            resume_path = None
    reader = _prev_run_reader(prev_state)
    pc = ctx.parallel_config if ctx.groups is not None else None
    # both pipeline engines (native, and DeepSpeed's under --deepspeed_config) materialise this
    # rank's stages only; tensor- and expert-parallel ranks their shards and their experts only
    pipelined = pc is not None and getattr(pc, "pipeline_parallel_size", 1) > 1
    expert_parallel = pc is not None and getattr(pc, "expert_parallel_size", 1) > 1
    deferred = pipelined or (pc is not None and (ctx.tp_size > 1 or expert_parallel))
    model = GPT(cfg, defer_init=deferred or on_meta)
    flops = flops_per_token(model)  # the full model's, before it is sharded
    if on_meta:  # ZeRO-3: the DeepSpeed engine draws it (or reads prev_run's) into partitions (train/deepspeed_init.py)
        if ctx.groups is not None:
            shard_model(model, ctx, train_cfg.seed)
        model.prev_run_weights = reader  # a SliceReader or None: deepspeed_engine.py reads its partitions
        return model, flops
    if resume_path is not None:  # a gathered checkpoint: its weights, strictly
        from forge_dist.io.slice_read import SafetensorsSlices

        weights = (SafetensorsSlices(os.path.join(resume_path, ckpt.MODEL_DIR)), False)
    else:  # prev_run: what the checkpoint lacks keeps its fresh value
        weights = (reader, True) if reader is not None else None
    if pipelined:  # the pipeline engine materialises this rank's stages only (parallel/pipeline/materialize.py)
        shard_model(model, ctx, train_cfg.seed)
        model.pipeline_weights = weights  # (SliceReader, fresh_ok) or None: pipeline_engine.py, deepspeed_pipeline.py
        return model, flops
    if deferred:  # only this rank's pieces are read (io/slice_read.py), the rest drawn
        from forge_dist.io.slice_read import load_slices
        from forge_dist.parallel.materialize import materialize_shards

        shard_model(model, ctx, train_cfg.seed)
        if weights is not None:  # the checkpoint also holds the experts other ranks place
            with weights[0]:
                load_slices(model, weights[0], ctx.groups, partial=weights[1] or expert_parallel, fresh_ok=weights[1])
        materialize_shards(model, ctx.groups)  # what no checkpoint gave
        return model.to(device), flops
    if reader is not None:  # a full model (one process, DP, DeepSpeed): every tensor whole
        from forge_dist.io.slice_read import load_slices

        load_slices(model, reader, None, partial=True, fresh_ok=True)
    if resume_path is not None:
        ckpt.load_weights(model, resume_path)
    if weights is not None:
        weights[0].close()  # its files are unmapped now, not when the reader is collected
    model = model.to(device)
    if ctx.groups is not None:
        shard_model(model, ctx, train_cfg.seed)
    return model, flops


def shard_model(model: torch.nn.Module, ctx: RunContext, seed: int) -> torch.nn.Module:
    """A launched run's model before any engine sees it: experts placed over ctx.groups.ep
    (forge_dist.parallel.expert), sharded over ctx.groups.tp when
    tensor_parallel_size > 1 (sliced from the full weights every rank built alike, or loaded from a
    checkpoint's logical weights, so any TP size starts from the same model), and the dropout
    streams seeded: equal on a TP group, different across data-parallel replicas."""
    from forge_dist.parallel.expert import apply_expert_parallel, declare_expert_params
    from forge_dist.parallel.parallelize import parallelize
    from forge_dist.parallel.tensor.random import seed_everything as seed_parallel

    apply_expert_parallel(model, ctx.groups, ctx.parallel_config)  # experts placed before TP splits them
    names = [n for n, _ in model.named_parameters()]
    if ctx.tp_size > 1 and ctx.parallel_config.pipeline_parallel_size == 1:  # else: each stage, by the pipeline engine
        parallelize(model, ctx.groups, ctx.parallel_config)
        after = [n for n, _ in model.named_parameters()]
        if after != names:  # optimizer state in checkpoints is stored in this order
            raise RuntimeError(f"parallelize changed the parameters' names or order: {names} -> {after}")
        declare_expert_params(model)  # the split expert parameters are new tensors
    seed_parallel(seed, ctx.groups)
    return model
