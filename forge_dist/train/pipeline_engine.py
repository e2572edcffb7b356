"""PipelineEngine: forge-train with pipeline parallelism (composed with TP, SP and DP).

build_run hands over the plain GPT built on the meta device from the same seed on every rank; the
factory cuts it into this rank's stages (forge_dist.parallel.pipeline), shards them over TP and
gives values to this rank's parameters only (drawn, or read from a layout-free checkpoint tensor
by tensor); the other stages' layers never take memory here. Per optimizer step:

  schedule       the gradient_accumulation_steps micro-batches of this rank's data-parallel slice
                 through torch's schedule (gpipe, 1f1b, interleaved, zero-bubble, DualPipeV);
                 each stage's MoE auxiliary losses are in the objective
  scale          every distinct local gradient divided by the micro-batch count, once
  tp sync        partial gradients of replicated parameters summed over TP (tp_grad_sync)
  pipeline sync  copies of one logical parameter on several stages (tied table and head over the
                 ``embedding`` group, shared_* modules over the pipeline group) summed
  dp average     torch's DDP reducer wrapping each chunk (bucketed, during the last micro-batch's
                 backward); the shared parameters by grads.dp_average after the schedule; experts
                 placed over the expert-parallel group summed over expert_dp instead
  clip, step     the global norm over PP x TP (grads.grad_norm), AdamW on the local shards; with
                 --zero_stage 1 each data-parallel replica of a stage steps its part of the
                 stage's AdamW state and broadcasts the new values (forge_dist.parallel.zero)

Checkpoints: the sharded format (train/sharded_save.py) writes each stage rank's own tensors under
their one-process names (LocalStages.logical_tensors), read back at any pipeline, tensor or data-
parallel size; the gathered one (save_state) sends everything to rank 0 in the one-process layout.

The logged loss is the mean over micro-batches of cross-entropy plus every stage's auxiliary
losses, summed over the pipeline group, as one process logs it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from forge_dist.errors import ConfigError
from forge_dist.parallel.expert import split_expert_params
from forge_dist.parallel.expert.grads import reduce_expert_gradients
from forge_dist.parallel.pipeline.grads import (distinct_params, dp_average, grad_norm, reduced_by_hand,
                                                 scale_microbatches, sync_shared)
from forge_dist.parallel.pipeline.stage import LocalStages, merge_stage_parts
from forge_dist.train.engine import LocalEngine, clip_to_norm


class PipelineEngine(LocalEngine):
    name = "pipeline"
    forward_is_collective = True  # generation_model gathers the stages (every rank calls it)
    optimizer_grouping = (0.0, False)  # (weight_decay, weight_decay_split) the optimizer was built with

    def __init__(self, layout, runner, optimizer: torch.optim.Optimizer, device: str, dtype: str,
                 grad_clip: float, groups, parallel_config):
        if dtype == "float16":
            raise ConfigError("dtype=float16 with pipeline_parallel_size > 1: the loss scale cannot reach "
                              "the schedule's backward; use bfloat16 or float32")
        config = next(iter(layout.chunks.values())).config
        super().__init__(LocalStages(config, layout), optimizer, device, dtype, grad_clip, False)
        self.layout, self.runner, self.groups, self.parallel_config = layout, runner, groups, parallel_config
        self.tp, self.dp = groups.tp.size, groups.dp.size
        self.distinct = distinct_params(layout)
        # DDP wraps the chunks (runner.ddp) and averages all but the shared parameters over dp
        self.dp_by_hand = reduced_by_hand(layout) if any(runner.ddp.values()) else self._params

    # --- one step ---------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: Sequence) -> torch.Tensor:
        n = len(micro_batches)
        if n != self.runner.n:
            raise ValueError(f"{n} micro-batches, but the pipeline schedule was built for {self.runner.n} "
                             f"(gradient_accumulation_steps)")
        x = torch.cat([self.to_device(b[0]) for b in micro_batches])
        y = torch.cat([self.to_device(b[1]) for b in micro_batches])
        chunks = self.layout.chunks
        for c in chunks.values():
            c.aux_sum = torch.zeros((), dtype=torch.float64)
        with self.autocast():
            losses = self.runner.step(x, y)
        scale_microbatches(self.distinct, n)
        # the last stage's losses include its own aux losses; add the earlier stages' ones
        total = sum((loss.double().cpu() for loss in losses), torch.zeros((), dtype=torch.float64))
        total = total + sum((c.aux_sum for c in chunks.values() if not c.is_last),
                            torch.zeros((), dtype=torch.float64))
        return (self.groups.pp.all_reduce(total.reshape(1), phase="loss")[0] / n).float()

    def sync_gradients(self) -> None:
        if self.tp > 1:
            from forge_dist.parallel.tensor.metadata import tp_grad_sync

            tp_grad_sync(self.model, self.groups)
        sync_shared(self.layout, self.groups)
        if self.dp > 1:
            dense, _ = split_expert_params(self.dp_by_hand)  # DDP ignores experts; dp_average skips them
            dp_average(dense, self.groups.dp)
            experts = split_expert_params(self._params)[1]
            if experts:  # summed over expert_dp, divided by dp (parallel/expert/grads.py)
                reduce_expert_gradients(experts, self.groups)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = grad_norm(self.layout, self.groups)
        clip_to_norm(self.distinct, norm, max_norm)
        return norm

    def step(self, lr: float) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.sync_gradients()
        grad_norm_value: Optional[torch.Tensor] = None
        if self.grad_clip > 0:
            grad_norm_value = self.clip_grad_norm(self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm_value}

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.runner.forward_loss(self.to_device(x), self.to_device(y)).float()

    # --- weights ----------------------------------------------------------------------------------
    def full_state_dict(self, keep: bool = True) -> Optional[dict]:
        """The logical weights on global rank 0 (None elsewhere): each stage's TP-gathered state
        sent over the pipeline group of data-parallel replica 0, TP rank 0 (experts gathered over
        the expert-parallel group first)."""
        if self.groups.coord.edp != 0:
            return None
        from forge_dist.parallel.expert.state import gather_experts
        from forge_dist.parallel.tensor.metadata import gather_full_state_dict

        mine: dict = {}
        for chunk in self.layout.chunks.values():
            part = gather_full_state_dict(chunk, self.groups) if self.tp > 1 else chunk.state_dict()
            if self.groups.ep.size > 1:
                part = gather_experts(part, chunk, self.groups)
            mine.update({k: v.detach().cpu() for k, v in part.items()})
        if self.groups.tp.rank != 0 or self.groups.coord.dp != 0:
            return None
        pp = self.groups.pp
        parts = [None] * pp.size if pp.rank == 0 else None
        dist.gather_object(mine, parts, dst=pp.ranks[0], group=pp.handle)
        if pp.rank != 0:
            return None
        return merge_stage_parts(parts, self.model.config)

    def generation_model(self) -> Optional[nn.Module]:
        """A plain GPT with the trained weights on rank 0 (a collective; None elsewhere)."""
        full = self.full_state_dict()
        if full is None:
            return None
        from forge_dist.model.gpt import GPT

        model = GPT(self.model.config).to(self.device)
        model.load_state_dict(full)
        return model.eval()

    # --- optimizer state: the one-process layout (pipeline/optim_state.py) ------------------------
    def _order(self):
        return one_process_order(self.model.config, *self.optimizer_grouping)

    def optimizer_layout(self):
        """(every parameter's one-process name, param_groups with one-process indices): what a
        sharded checkpoint's optimizer.json records (train/sharded_save.py)."""
        from forge_dist.parallel.zero import group_layout

        order, out, start = self._order(), [], 0
        for g, names in zip(group_layout(self.optimizer), order):
            out.append({**g, "params": list(range(start, start + len(names)))})
            start += len(names)
        return [c for names in order for c in names], out

    def save_state(self, directory: str, ctx) -> None:
        from forge_dist.parallel.pipeline.optim_state import full_optimizer_state

        full = full_optimizer_state(self, self._order())
        self.save_gathered_state(directory, ctx, full)

    def load_state(self, directory: str) -> None:
        from forge_dist.io.statefile import load_state
        from forge_dist.parallel.pipeline.optim_state import load_optimizer_state
        from forge_dist.train.engine import require_optimizer_files
        from forge_dist.train.sharded_save import is_sharded_checkpoint

        if is_sharded_checkpoint(directory):  # weights and AdamW state: this rank's stages' pieces
            super().load_state(directory)
            return
        require_optimizer_files(directory)
        state = load_state(directory, "optimizer", map_location="cpu")
        load_optimizer_state(self, state["optimizer"], self._order(), directory)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def pipeline_engine_factory(model: nn.Module, train_cfg, values: dict, ctx):
    """The engine for pipeline_parallel_size > 1 (parallel_engine_factory hands over to it)."""
    from forge_dist.parallel.pipeline import build_pipeline
    from forge_dist.train.optim import build_optimizer

    device = train_cfg.resolved_device
    load = None
    weights = getattr(model, "pipeline_weights", None)  # set by build_model: (SliceReader, fresh_ok)
    if weights is not None:  # a gathered resume or prev_run: only this rank's stages' pieces are read
        from forge_dist.io.slice_read import load_slices

        def load(chunk):
            load_slices(chunk, weights[0], ctx.groups, partial=True, fresh_ok=weights[1])
    layout, runner = build_pipeline(model, ctx.groups, ctx.parallel_config, train_cfg.gradient_accumulation_steps,
                                    device, train_cfg.batch_size, load=load)
    if weights is not None:
        weights[0].close()  # this rank's stages are filled
    local = LocalStages(model.config, layout)
    zero_group = ctx.groups.dp if values.get("zero_stage", 0) == 1 else None  # ZeRO-1 over the stage's replicas
    optimizer = build_optimizer(local, train_cfg, torch.device(device).type, zero_group=zero_group)
    engine = PipelineEngine(layout, runner, optimizer, device, train_cfg.resolved_dtype, train_cfg.grad_clip,
                            ctx.groups, ctx.parallel_config)
    engine.optimizer_grouping = (train_cfg.adamw_weight_decay, train_cfg.weight_decay_split)
    return engine


def one_process_order(model_config, weight_decay: float, split: bool) -> List[List[str]]:
    """Per optimizer group, the canonical names of its parameters in the one-process order."""
    from forge_dist.model.gpt import GPT
    from forge_dist.train.optim import param_groups

    with torch.device("meta"):
        model = GPT(model_config)
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return [[names[id(p)] for p in g["params"]] for g in param_groups(model, weight_decay, split)]
