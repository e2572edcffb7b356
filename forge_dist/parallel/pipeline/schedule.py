"""Run a PipelinePlan with torch.distributed.pipelining: a PipelineStage per local chunk and the
schedule the plan names (GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, ZBVZeroBubble,
DualPipeV). The schedules are torch's own; this file only feeds them.

The last stage computes the loss with the model's own head (a vocab-parallel one under TP), so the
schedule's loss_fn returns the stage's output as is; targets reach that stage as a keyword
argument (each rank passes the keyword arguments of its own stages). Gradients are not scaled by
the schedule (scale_grads=False; pipeline/grads.py divides each distinct parameter once).
Evaluation runs the stages in order with point-to-point sends, without a schedule. With data
parallelism each chunk runs inside torch's DDP over its data-parallel group (_data_parallel).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch.distributed import pipelining

from forge_dist.parallel.pipeline.split import MULTI, SCHEDULES
from forge_dist.parallel.pipeline.stage import StageLayout

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _stage_loss(output: torch.Tensor, target) -> torch.Tensor:
    """The last stage's output is already the micro-batch's mean loss."""
    return output.sum()  # one element; a new tensor, not a view (the schedule detaches it in place)


def _stage_shapes(chunk, micro_batch: int, seq_shards: int):
    """(input, output) of a stage as meta tensors: token ids (B, T) into the first stage, the
    residual stream (B, T / seq_shards, n_embd) between stages (sequence shards under sequence
    parallelism), the loss (1,) out of the last. Given to PipelineStage, so the schedule never
    runs the runtime shape inference, whose forward on uninitialised tensors would route MoE
    tokens differently on each TP rank and record steering statistics of garbage."""
    cfg = chunk.config
    dtype = next(chunk.parameters()).dtype
    act = torch.empty(micro_batch, cfg.block_size // seq_shards, cfg.n_embd, dtype=dtype, device="meta",
                      requires_grad=True)  # the receiving stage sends its input gradient back
    ids = torch.empty(micro_batch, cfg.block_size, dtype=torch.long, device="meta")
    loss = torch.empty(1, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device="meta",
                       requires_grad=True)
    return (ids if chunk.is_first else act), (loss if chunk.is_last else act)


def reuses_modules(chunk) -> bool:
    """A parameter used by two blocks of the chunk (shared_* sharing, shared FIRE)."""
    seen, again = set(), False
    for block in chunk.transformer.h.values():
        ids = {id(p) for p in block.parameters()}
        again = again or bool(ids & seen)
        seen |= ids
    return again


class ReusingStage(pipelining.PipelineStage):
    """The PipelineStage of a chunk that reuses modules across its layers (shared_* sharing,
    shared FIRE), for the zero-bubble schedules' split backward. torch's weight pass
    (``stage_backward_weight``) differentiates the parameter groups that ``get_param_groups``
    built one ``torch.autograd.grad`` call at a time; a parameter used by two layers joins their
    weight paths into groups that share autograd nodes, so without ``retain_graph`` the first call
    frees buffers the next one reads ("Trying to backward through the graph a second time").
    This stage runs the same function with ``retain_graph=True`` (its own parameter); the graph
    is freed when the stage drops the micro-batch's backward state right after. Split-backward
    schedules run without DDP (SPLIT_BACKWARD), so the weight pass needs no reducer here."""

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if backward_type != "weight":
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        from torch.distributed.pipelining._backward import stage_backward_weight

        return stage_backward_weight(self.submod.parameters(), bwd_kwargs["param_groups"], retain_graph=True), None


# Schedules whose backward is split into an input pass and a deferred weight pass (torch's
# stage_backward_input / stage_backward_weight). torch 2.13's PipelineStage arms DDP's reducer
# (prepare_for_backward) for the last *input* pass, before any weight gradient of that micro-batch
# exists, and the weight pass runs outside the reducer's autograd hooks: the buckets would be
# reduced incomplete (measured: every gradient off by ~100% at PP=2 x DP=2). These schedules keep
# the hand-written bucketed all-reduce after the schedule (grads.dp_average).
SPLIT_BACKWARD = {"interleaved_zero_bubble", "zbv", "dualpipev"}


def _data_parallel(chunk, stage: int, layout: StageLayout, groups, device):
    """The chunk in torch's DDP over the stage's data-parallel group (None for one replica, a
    split-backward schedule, or when every parameter is shared). torch's PipelineStage drives DDP
    itself: every micro-batch's forward and backward under no_sync, and the reducer armed for the
    schedule's last backward of the chunk, whose buckets are all-reduced while it runs. Shared
    logical parameters are left to grads.dp_average (shared_canonical says why)."""
    if groups.dp.size == 1 or layout.plan.schedule in SPLIT_BACKWARD:
        return None
    from forge_dist.parallel.data_parallel import data_parallel
    from forge_dist.parallel.pipeline.grads import shared_canonical

    shared = shared_canonical(layout)
    names = [n for n, _ in chunk.named_parameters(remove_duplicate=False) if layout.canonical[(stage, n)] in shared]
    if all(layout.canonical[(stage, n)] in shared for n, _ in chunk.named_parameters()):
        return None
    return data_parallel(chunk, groups, torch.device(device), ignore=names)


class PipelineRunner:
    """One schedule over this rank's chunks. ``step(x, y)`` runs forward and backward of the
    ``n_microbatches`` micro-batches stacked in x, y and returns this rank's micro-batch losses
    (the last stage's; empty elsewhere)."""

    def __init__(self, layout: StageLayout, groups, n_microbatches: int, device, micro_batch_size: int,
                 sequence_parallel: bool = False):
        self.layout, self.groups, self.n = layout, groups, n_microbatches
        plan = layout.plan
        self.stages, self.ddp = [], {}
        for s, chunk in sorted(layout.chunks.items()):
            inputs, outputs = _stage_shapes(chunk, micro_batch_size, groups.tp.size if sequence_parallel else 1)
            self.ddp[s] = _data_parallel(chunk, s, layout, groups, device)
            stage_class = ReusingStage if reuses_modules(chunk) else pipelining.PipelineStage
            self.stages.append(stage_class(self.ddp[s] or chunk, s, plan.n_stages, torch.device(device),
                                           input_args=inputs, output_args=outputs, group=groups.pp.handle))
        cls = getattr(pipelining, SCHEDULES[plan.schedule][0])
        target = self.stages if plan.schedule in MULTI else self.stages[0]
        self.schedule = cls(target, n_microbatches=n_microbatches, loss_fn=_stage_loss, scale_grads=False)
        self.has_first = 0 in layout.chunks
        self.has_last = plan.n_stages - 1 in layout.chunks

    def step(self, x: torch.Tensor, y: torch.Tensor) -> List[torch.Tensor]:
        args = (x,) if self.has_first else ()
        kwargs = dict(target=y, targets=y) if self.has_last else {}
        losses: list = []
        self.schedule.step(*args, losses=losses, return_outputs=False, **kwargs)
        return [loss.detach() for loss in losses]

    # --- evaluation: the stages in order, activations sent point to point ------------------------
    def _peer(self, stage: int) -> int:
        return self.groups.pp.ranks[self.layout.plan.ranks[stage]]

    @torch.no_grad()
    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of one batch through every stage, on every pipeline rank."""
        plan, me = self.layout.plan, self.layout.pp_rank
        h: Optional[torch.Tensor] = None
        loss = torch.zeros(1, dtype=torch.float64)
        for s in range(plan.n_stages):
            if plan.ranks[s] != me:
                continue
            if s > 0 and plan.ranks[s - 1] != me:
                h = self._recv(self._peer(s - 1))
            out = self.layout.chunks[s](x if s == 0 else h, targets=y if s == plan.n_stages - 1 else None)
            if s == plan.n_stages - 1:
                loss = out.detach().double().reshape(1)
            elif plan.ranks[s + 1] != me:
                self._send(out, self._peer(s + 1))
            h = out
        # only the last stage's rank holds the loss: a sum over the pipeline group gives it to all
        return self.groups.pp.all_reduce(loss, phase="eval")[0]

    def _send(self, t: torch.Tensor, dst: int) -> None:
        header = torch.tensor([t.dim(), _DTYPES.index(t.dtype), *t.shape], dtype=torch.int64)
        dist.send(torch.tensor([header.numel()], dtype=torch.int64), dst)
        dist.send(header, dst)
        dist.send(t.contiguous(), dst)

    def _recv(self, src: int) -> torch.Tensor:
        n = torch.zeros(1, dtype=torch.int64)
        dist.recv(n, src)
        header = torch.zeros(int(n.item()), dtype=torch.int64)
        dist.recv(header, src)
        t = torch.empty([int(v) for v in header[2:]], dtype=_DTYPES[int(header[1])])
        dist.recv(t, src)
        return t
