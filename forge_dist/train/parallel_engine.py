"""ParallelEngine: forge-train under a launcher, with tensor parallelism and data parallelism.

The factory receives the model that build_run built from the same seed on every rank and then
sharded (``parallelize``, when tensor_parallel_size > 1), with the dropout streams seeded (equal
on a TP group, different across data-parallel replicas). Per optimizer step:

  forward/backward   every micro-batch of this rank's data-parallel slice (LocalEngine's code;
                     TP ranks of one replica see the same rows and compute the same loss), the
                     training forward through torch's DistributedDataParallel on the DP group
                     (forge_dist.parallel.data_parallel): the non-final micro-batches under
                     ``no_sync`` (gradients accumulate locally), the final one's backward
                     all-reducing bucket after bucket while it computes the earlier layers
                     (average over dp: every replica then holds the gradient of the mean loss
                     over the global batch, exactly as one process with dp times the batch)
  tp_grad_sync       partial gradients of replicated parameters summed over their TP ranks (one
                     flattened all-reduce per group; summing over TP and averaging over DP
                     commute, so it runs once, after DDP)
  unscale, clip      the global norm from tp_grad_norm (TP shards and replicated values counted
                     once; after the average every replica holds the same gradient, so the norm is
                     already the whole data-parallel batch's), clip coefficient as torch's
                     clip_grad_norm_
  step               AdamW on the local shards (elementwise, so sharded AdamW is exact)

``engine.model`` stays the plain (sharded) module: DDP wraps it without changing its parameters,
so checkpoints, evaluation and sampling use it as they would in one process. Parameters without a
gradient on every replica stay without one (DDP's unused-parameter map), so the optimizer skips
exactly what a single process would skip. Why DDP rather than FSDP2: see data_parallel.py.

Checkpoints are layout-free. By default (sharded, train/sharded_save.py) each rank writes its own
pieces of the weights and moments through torch.distributed.checkpoint and reads the pieces of its
current layout. The gathered format (``--checkpoint_format gathered``): ``full_state_dict`` gathers
the logical weights (the checkpoint's model/ is what one process writes), and the optimizer state
is written as the single process's AdamW state dict, each moment tensor gathered to its logical
shape with the parameter's shard metadata; loading slices it again for this rank. Either way any
TP size (and the one-process LocalEngine) resumes from any other.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from forge_dist.errors import CheckpointError
from forge_dist.parallel.data_parallel import data_parallel
from forge_dist.train.engine import LocalEngine, clip_to_norm, compiled
from forge_dist.train.optim import build_optimizer


class ParallelEngine(LocalEngine):
    name = "parallel"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: str, dtype: str,
                 grad_clip: float, compile: bool, groups, parallel_config):
        super().__init__(model, optimizer, device, dtype, grad_clip, compile)
        self.groups, self.parallel_config = groups, parallel_config
        self.tp, self.dp, self.ep = groups.tp.size, groups.dp.size, groups.ep.size
        self.sequence_parallel = bool(parallel_config.sequence_parallel) and self.tp > 1
        # sampling: every rank runs the forward under TP, and under EP (the all-to-all needs every
        # rank of the group; the generator is seeded alike, so all draw the same tokens)
        self.forward_is_collective = self.tp > 1 or self.ep > 1
        names = {id(p): n for n, p in model.named_parameters()}
        self._names = [names.get(id(p), f"#{i}") for i, p in enumerate(self._params)]
        self.ddp = data_parallel(model, groups, self.device)  # None for one replica
        if self.ddp is not None:  # the training forward runs through DDP (compiled whole, if asked)
            self.module = compiled(self.ddp, compile)

    def micro_batch_context(self, last: bool):
        """DDP's no_sync on every micro-batch but the last: one reduction per optimizer step."""
        if self.ddp is None or last:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    # --- gradients ------------------------------------------------------------------------------
    def sync_gradients(self) -> None:
        """The TP sums of partial gradients (DDP averaged over DP during the last backward), and
        the expert gradients over expert_dp under expert parallelism."""
        if self.tp > 1:
            from forge_dist.parallel.tensor.metadata import tp_grad_sync

            tp_grad_sync(self.model, self.groups)
        if self.ep > 1:  # expert gradients: summed over expert_dp, outside DDP (placement.py)
            from forge_dist.parallel.expert.grads import reduce_expert_gradients

            reduce_expert_gradients(self._params, self.groups)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to the norm of the whole model's gradient; returns that norm."""
        if self.tp == 1 and self.ep == 1:
            return torch.nn.utils.clip_grad_norm_(self._params, max_norm)
        if self.ep > 1:
            from forge_dist.parallel.expert.grads import grad_norm

            norm = grad_norm(self._params, self.groups)
        else:
            from forge_dist.parallel.tensor.metadata import tp_grad_norm

            norm = tp_grad_norm(self.model, self.groups)
        clip_to_norm(self._params, norm, max_norm)
        return norm

    def _agree_on_overflow(self) -> None:
        """float16: skip the step on every rank if any rank's (shard of the) gradient overflowed,
        so replicas never diverge. Reads the scaler's per-device flags (torch's private dict)."""
        if not self.scaler.is_enabled():
            return
        from forge_dist.parallel.flight import recorded

        for found in self.scaler._found_inf_per_device(self.optimizer).values():
            with recorded(self.groups.recorder, "all_reduce_max", "world", range(dist.get_world_size()), [found]):
                dist.all_reduce(found, op=dist.ReduceOp.MAX)

    def step(self, lr: float) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.sync_gradients()
        self.scaler.unscale_(self.optimizer)
        self._agree_on_overflow()
        grad_norm: Optional[torch.Tensor] = None
        if self.grad_clip > 0:
            grad_norm = self.clip_grad_norm(self.grad_clip)
        self.scaler.step(self.optimizer)
        scaler_stats = self._update_scaler()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": grad_norm, **scaler_stats}

    # --- weights and sampling -------------------------------------------------------------------
    def full_state_dict(self, keep: bool = True) -> Optional[dict]:
        """Logical names -> full tensors on data-parallel replica 0 (its TP ranks gather together);
        None on the other replicas, which hold the same values. Under expert parallelism the
        replicas of the first expert-parallel group gather the experts (global expert index)."""
        if self.ep > 1:
            from forge_dist.parallel.expert.state import full_expert_state_dict

            return full_expert_state_dict(self.model, self.groups)
        if self.groups.coord.dp != 0:
            return None
        if self.tp == 1:
            return self.model.state_dict()
        from forge_dist.parallel.tensor.metadata import gather_full_state_dict

        return gather_full_state_dict(self.model, self.groups)

    def generation_model(self) -> nn.Module:
        """The trained model for sampling (a collective under TP: every rank runs the forward). KV-
        cached decoding cannot split one token over sequence shards, so a sequence-parallel model
        is rebuilt from its gathered weights as a plain TP model."""
        if not self.sequence_parallel:
            return self.model
        from forge_dist.model.gpt import GPT
        from forge_dist.parallel.parallelize import parallelize
        from forge_dist.parallel.tensor.metadata import gather_full_state_dict

        full = gather_full_state_dict(self.model, self.groups)
        plain = GPT(self.model.config).to(self.device)
        plain.load_state_dict(full)
        return parallelize(plain, self.groups, dataclasses.replace(self.parallel_config, sequence_parallel=False))

    # --- optimizer state ------------------------------------------------------------------------
    def full_optimizer_state(self) -> dict:
        """The optimizer state dict a single process would have: every moment tensor gathered to
        its parameter's logical shape (collective over the TP group)."""
        from forge_dist.parallel.tensor.metadata import full_tensor, shard_info

        sd = self.optimizer.state_dict()
        for i in sorted(sd["state"]):
            p = self._params[i]
            info = shard_info(p)
            sd["state"][i] = {k: (full_tensor(v, info, self.groups) if _param_shaped(v, p) else v)
                              for k, v in sd["state"][i].items()}
        return sd

    def save_state(self, directory: str, ctx) -> None:
        if self.ep > 1:  # one process's state dict: every expert's moments under its global index
            from forge_dist.parallel.expert.state import global_optimizer_state

            from forge_dist.parallel.zero import consolidate

            consolidate(self.optimizer)  # ZeRO-1: dense parts on dp rank 0, experts' on expert_dp rank 0
            full = None
            if self.groups.coord.edp == 0:
                full = global_optimizer_state(self.full_optimizer_state(), self._names, self.model, self.groups)
        else:
            from forge_dist.parallel.zero import consolidate

            consolidate(self.optimizer)  # ZeRO-1: every replica's part on data-parallel rank 0
            full = self.full_optimizer_state() if self.groups.coord.dp == 0 else None
        self.save_gathered_state(directory, ctx, full)

    def load_state(self, directory: str) -> None:
        from forge_dist.parallel.tensor.metadata import ShardInfo, shard_info, shard_tensor

        from forge_dist.train.optimizer_state import read_optimizer_state  # also DeepSpeed's logical copy
        from forge_dist.train.sharded_save import is_sharded_checkpoint

        if is_sharded_checkpoint(directory):
            super().load_state(directory)
            return
        state = read_optimizer_state(directory, self.optimizer, self.model)
        sd = state["optimizer"]
        if self.ep > 1:  # this rank's experts out of one process's state dict
            from forge_dist.parallel.expert.state import local_optimizer_state

            sd = state["optimizer"] = local_optimizer_state(sd, self._names, self.optimizer.state_dict()["param_groups"],
                                                            self.model)
        for i, entry in sd["state"].items():
            if not 0 <= i < len(self._params):
                raise CheckpointError(f"the optimizer state in {directory} has more parameters than this model "
                                      f"({len(self._params)}); it is from another model")
            p = self._params[i]
            info = shard_info(p) or ShardInfo.replicated(p)
            for k, v in entry.items():
                if not (torch.is_tensor(v) and v.dim() > 0):
                    continue
                if tuple(v.shape) != tuple(info.full_shape):
                    raise CheckpointError(f"the optimizer state {k} of {self._names[i]} in {directory} has shape "
                                          f"{tuple(v.shape)}, the parameter's logical shape is {info.full_shape}; "
                                          f"the checkpoint is from another model")
                entry[k] = shard_tensor(v, info, self.groups.tp.rank, self.tp)
        self.load_state_dict(state)


def _param_shaped(v, p: torch.Tensor) -> bool:
    return torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape


def parallel_engine_factory(model: nn.Module, train_cfg, values: dict, ctx):
    """forge-train's default engine factory: LocalEngine for one process, ParallelEngine when the
    run was launched on several (ctx.groups and ctx.parallel_config set by the launch; build_run
    has already sharded the model over ctx.groups.tp)."""
    if ctx.groups is None or not ctx.distributed:
        from forge_dist.train.build import local_engine

        return local_engine(model, train_cfg, values, ctx)
    if ctx.parallel_config.pipeline_parallel_size > 1:
        from forge_dist.train.pipeline_engine import pipeline_engine_factory

        return pipeline_engine_factory(model, train_cfg, values, ctx)
    from forge_dist.parallel.tensor.metadata import shard_info

    if ctx.tp_size > 1 and any(shard_info(p) is None for p in model.parameters()):
        raise RuntimeError("tensor_parallel_size > 1 but the model is not sharded: build_run shards it "
                           "(forge_dist.train.build.shard_model) before calling the engine factory")
    device = train_cfg.resolved_device
    zero_group = ctx.groups.dp if values.get("zero_stage", 0) == 1 else None  # ZeRO-1 over the replicas
    optimizer = build_optimizer(model, train_cfg, torch.device(device).type, zero_group=zero_group,
                                process_groups=ctx.groups)  # experts: ZeRO-1 over expert_dp (parallel/expert/zero.py)
    return ParallelEngine(model, optimizer, device, train_cfg.resolved_dtype, train_cfg.grad_clip,
                          train_cfg.compile, ctx.groups, ctx.parallel_config)
