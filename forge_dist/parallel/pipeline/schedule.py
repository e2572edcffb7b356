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

import contextlib
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


class ForgeStage(pipelining.PipelineStage):
    """torch's PipelineStage, with two changes to the split backward (zero-bubble schedules and
    DualPipeV: an input pass, stage_backward_input, then a deferred weight pass).

    DDP: torch 2.13 arms DDP's reducer (prepare_for_backward) at the stage's last weight pass,
    after the input pass has detached the stage's outputs (so the reducer's search for used
    parameters from them finds none and marks every parameter ready at once), and its weight pass,
    stage_backward_weight, takes the gradients with torch.autograd.grad, which never runs the
    AccumulateGrad nodes where DDP's hooks sit, so the buckets are not all-reduced. Here the reducer
    is armed at the stage's last backward to start (the n-th input or full pass), on its intact
    graph; when weight passes still follow, that pass runs as input then weight pass without
    hooks, and the schedule's last weight pass accumulates through autograd itself
    (weight_pass_through_hooks), so DDP's hooks fire then, once every gradient is complete. Every
    other pass runs under no_sync, as torch runs it. The first stage is torch's: its weight pass
    is a full backward on its intact graph.

    Modules reused across the chunk's layers (shared_* sharing, shared FIRE): torch's weight pass
    differentiates the parameter groups one autograd call at a time; a parameter used by two
    layers joins their weight paths into groups that share autograd nodes, so without
    ``retain_graph`` the first call frees buffers the next one reads ("Trying to backward through
    the graph a second time"). ``retain_graph`` is set for such chunks; the graph is freed when the
    stage drops the micro-batch's backward state right after."""

    retain_graph = False
    n_microbatches = 0
    started = 0  # backward passes begun (input or full) in this step

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        from torch.distributed.pipelining._backward import stage_backward_weight
        from torch.nn.parallel import DistributedDataParallel

        ddp = isinstance(self.submod, DistributedDataParallel)
        if ddp and not self.is_first and backward_type in ("input", "full"):
            self.started += 1
            if self.started == self.n_microbatches and not last_backward:  # weight passes still follow
                return self._armed_backward(bwd_kwargs, weight_too=backward_type == "full")
        if backward_type != "weight" or not (self.retain_graph or (ddp and last_backward)):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        if ddp and last_backward and not self.is_first:
            return weight_pass_through_hooks(self.submod.parameters(), bwd_kwargs["param_groups"],
                                             self.retain_graph), None
        with self.submod.no_sync() if ddp else contextlib.nullcontext():
            return stage_backward_weight(self.submod.parameters(), bwd_kwargs["param_groups"], retain_graph=True), None

    def _armed_backward(self, bwd_kwargs: dict, weight_too: bool):
        """DDP's reducer armed on this micro-batch's graph, then its input pass (and, for a full
        backward, its weight pass, through torch.autograd.grad: no hook fires yet)."""
        from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

        outputs = bwd_kwargs["stage_output"]
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        self.submod.reducer.prepare_for_backward(list(torch.nn.parallel.distributed._find_tensors(outputs)))
        grads, groups = stage_backward_input(outputs, bwd_kwargs["output_grads"], bwd_kwargs["input_values"],
                                             self.submod.parameters())
        if not weight_too:
            return grads, groups
        stage_backward_weight(self.submod.parameters(), groups, retain_graph=self.retain_graph)
        return grads, None


def weight_pass_through_hooks(weights, param_groups, retain_graph: bool = False) -> tuple:
    """torch's weight pass (pipelining/_backward.py stage_backward_weight), with
    torch.autograd.backward(inputs=the weights) in place of torch.autograd.grad: the same
    gradients, accumulated into ``.grad`` by autograd's AccumulateGrad nodes, whose hooks (DDP's
    reducer) fire. Each group's saved output gradients are pinned on its intermediate nodes (as
    torch does) so that no gradient is counted twice through a descendant intermediate."""
    from torch.autograd.graph import GradientEdge
    from torch.distributed.pipelining._backward import _get_grad_fn_or_grad_acc

    weight_of = {_get_grad_fn_or_grad_acc(w): w for w in weights}
    for group in param_groups:
        edges, grads = [], []
        for saved, node in zip(group["grads"], group["intermediates"]):
            for i, g in enumerate(saved):
                if g is not None:
                    edges.append(GradientEdge(node, i))
                    grads.append(g)
        pinned = zip(group["grads"], group["intermediates"]) if len(group["intermediates"]) > 1 else ()
        handles = [node.register_prehook(lambda _, saved=saved: saved) for saved, node in pinned]
        del group["intermediates"]  # the hook -> group -> intermediates cycle
        try:
            if edges:
                torch.autograd.backward(edges, grads, retain_graph=retain_graph,
                                        inputs=[weight_of[a] for a in group["params"]])
        finally:
            for h in handles:
                h.remove()
        del group["grads"]
    return tuple(w.grad for w in weight_of.values())


def _data_parallel(chunk, stage: int, layout: StageLayout, groups, device):
    """The chunk in torch's DDP over the stage's data-parallel group (None for one replica, or when
    every parameter is shared). torch's PipelineStage drives DDP itself: every micro-batch's
    forward and backward under no_sync, and the reducer armed for the schedule's last backward of
    the chunk, whose buckets are all-reduced while it runs (split backward: ForgeStage). Shared
    logical parameters are left to grads.dp_average (shared_canonical says why)."""
    if groups.dp.size == 1:
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
            stage = ForgeStage(self.ddp[s] or chunk, s, plan.n_stages, torch.device(device), input_args=inputs,
                               output_args=outputs, group=groups.pp.handle)
            stage.retain_graph, stage.n_microbatches = reuses_modules(chunk), n_microbatches
            self.stages.append(stage)
        cls = getattr(pipelining, SCHEDULES[plan.schedule][0])
        target = self.stages if plan.schedule in MULTI else self.stages[0]
        self.schedule = cls(target, n_microbatches=n_microbatches, loss_fn=_stage_loss, scale_grads=False)
        self.has_first = 0 in layout.chunks
        self.has_last = plan.n_stages - 1 in layout.chunks

    def step(self, x: torch.Tensor, y: torch.Tensor) -> List[torch.Tensor]:
        args = (x,) if self.has_first else ()
        kwargs = dict(target=y, targets=y) if self.has_last else {}
        losses: list = []
        for stage in self.stages:
            stage.started = 0
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
