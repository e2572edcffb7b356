"""Pipeline stages cut out of the plain GPT, from outside: the model code is not changed.

A ``GPTChunk`` holds the modules of one stage under the GPT's own attribute names
(``transformer.wte``, ``transformer.h.{i}`` for the stage's global layer indices i,
``transformer.ln_f``, ``lm_head``, ...), so its parameter names are the GPT's state-dict names and
a checkpoint stays layout-free. It runs the GPT's own forward pieces (``GPT.embed``, the steering
points, the blocks, ``GPT.head``), so every variant layer runs unchanged.

Parameters held by several stages (the tied token table and LM head, modules shared across layers
by ``shared_*``, shared FIRE) are one *logical* parameter: ``StageLayout.canonical`` names it by
its first name in the GPT, and ``holders`` lists the pipeline ranks that hold a copy; their
gradients are summed over those ranks (pipeline/grads.py), so the copies never drift.

MoE: each stage's auxiliary losses (load balancing, z-loss) belong to the objective. The last
stage adds its own to the loss; earlier stages attach theirs to the activation they send on with
``AuxLossGrad`` (Megatron's MoEAuxLossAutoScaler): identity forward, and in backward a gradient
of 1 for the auxiliary loss, exactly the gradient it gets inside one process's summed loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Set

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from forge_dist.errors import CheckpointError
from forge_dist.model.gpt import GPT
from forge_dist.model.moe import collect_moe_aux_loss, reset_moe_state
from forge_dist.model.steering import steer
from forge_dist.parallel.pipeline.split import PipelinePlan

FIRST_STAGE = ("wte", "drop", "wpe", "scale_up")  # transformer.* modules of the first stage
LAST_STAGE = ("ln_f", "scale_down")


class AuxLossGrad(torch.autograd.Function):
    """y = x in forward; backward also sends d(aux)/d(aux) = 1 into the auxiliary loss's graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return x.clone()  # not a view: the schedule detaches stage outputs in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


class GPTChunk(nn.Module):
    """Layers [start, stop) of a GPT, plus the embeddings on the first stage and the final norm,
    head and loss on the last. forward(x, targets): token ids -> activations on the first stage,
    activations -> activations in between, activations -> the mean loss (shape (1,)) on the last."""

    aux_grad_scale = 1.0  # d(objective)/d(aux loss) sent back by AuxLossGrad (DeepSpeed: 1 / micro-batches)

    def __init__(self, model: GPT, start: int, stop: int, is_first: bool, is_last: bool, lsv: bool):
        super().__init__()
        self.config = model.config
        self.start, self.stop, self.is_first, self.is_last = start, stop, is_first, is_last
        t = model.transformer
        keep = {name: t[name] for name in t.keys()
                if (is_first and name in FIRST_STAGE) or (is_last and name in LAST_STAGE)}
        keep["h"] = nn.ModuleDict({str(i): t.h[i] for i in range(start, stop)})
        self.transformer = nn.ModuleDict(keep)
        if is_first and hasattr(model, "embedding_scale"):
            self.embedding_scale = model.embedding_scale
        self.steering = model.steering  # buffers only; acts at the points this stage runs
        if lsv:
            self.lsv_matrix = model.lsv_matrix
        self.lm_head = model.lm_head if is_last else None
        self.aux_sum = torch.zeros((), dtype=torch.float64)  # detached auxiliary losses since reset

    def points(self) -> List[int]:
        """The steering points this stage runs: 0 (the embeddings) on the first, k after block k-1."""
        return ([0] if self.is_first else []) + list(range(self.start + 1, self.stop + 1))

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.config
        if cfg.use_moe:
            reset_moe_state(self)
        if self.is_first:
            x = steer(self, GPT.embed(self, x), 0)
        for i, block in self.transformer.h.items():
            if cfg.use_gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, None, use_reentrant=False)
            else:
                x = block(x)
            x = steer(self, x, int(i) + 1)
        aux = collect_moe_aux_loss(self) if cfg.use_moe and self.training else None
        if aux is not None:
            self.aux_sum = self.aux_sum + aux.detach().double().cpu()
        if not self.is_last:
            if aux is None or not torch.is_grad_enabled():
                return x
            return AuxLossGrad.apply(x, aux if self.aux_grad_scale == 1.0 else aux * self.aux_grad_scale)
        _, loss = GPT.head(self, x, targets)
        return torch.stack([loss if aux is None else loss + aux])  # (1,), not a view


def _module_sets(model: GPT, plan: PipelinePlan) -> List[Dict[str, bool]]:
    n = plan.n_stages
    lsv_point = model.config.apply_lsv_at_layer_idx if model.config.use_lsv else None
    owner = 0
    if lsv_point is not None and 0 < lsv_point <= model.config.n_layer:
        owner = plan.stage_of_layer(lsv_point - 1)
    return [dict(first=s == 0, last=s == n - 1, lsv=model.config.use_lsv and s == owner) for s in range(n)]


def build_chunk(model: GPT, plan: PipelinePlan, stage: int) -> GPTChunk:
    flags = _module_sets(model, plan)[stage]
    a, b = plan.layers[stage]
    return GPTChunk(model, a, b, flags["first"], flags["last"], flags["lsv"])


@dataclass
class StageLayout:
    """This rank's chunks and the logical identity of their parameters.

    ``chunks``: stage index -> GPTChunk; ``canonical``: (stage, parameter name in the chunk) ->
    the parameter's first name in the GPT; ``holders``: canonical name -> sorted pipeline ranks
    holding it, for every parameter held by more than one rank."""

    plan: PipelinePlan
    pp_rank: int
    chunks: Dict[int, GPTChunk]
    canonical: Dict[tuple, str]
    holders: Dict[str, tuple]

    def local_params(self) -> Dict[str, List[nn.Parameter]]:
        """canonical name -> this rank's distinct Parameter objects for it (several only when two
        local chunks hold separately sharded copies, e.g. the tied table on a V-shape's rank 0)."""
        out: Dict[str, List[nn.Parameter]] = {}
        for s, chunk in self.chunks.items():
            for name, p in chunk.named_parameters(remove_duplicate=False):
                same = out.setdefault(self.canonical[(s, name)], [])
                if all(q is not p for q in same):
                    same.append(p)
        return out


def build_stages(model: GPT, plan: PipelinePlan, pp_rank: int) -> StageLayout:
    """Cut ``model`` (the full plain GPT, the same on every rank) into this rank's chunks. The
    modules are the model's own objects (no copy); ``model`` keeps references to all of them, so
    drop it (or prune it with ``release_unused``) once the chunks are built."""
    ids = {}
    for name, p in model.named_parameters():  # first name of each distinct parameter
        ids.setdefault(id(p), name)
    holders: Dict[str, Set[int]] = {}
    canonical: Dict[tuple, str] = {}
    chunks: Dict[int, GPTChunk] = {}
    for s in range(plan.n_stages):
        chunk = build_chunk(model, plan, s)
        for name, p in chunk.named_parameters(remove_duplicate=False):
            holders.setdefault(ids[id(p)], set()).add(plan.ranks[s])
            if plan.ranks[s] == pp_rank:
                canonical[(s, name)] = ids[id(p)]
        if plan.ranks[s] == pp_rank:
            chunks[s] = chunk
    missing = set(ids.values()) - set(holders)
    if missing:  # a module a GPTChunk does not know: it would silently never train
        raise ValueError(f"parameters held by no pipeline stage: {sorted(missing)}; teach "
                         f"forge_dist.parallel.pipeline.stage.GPTChunk where they belong")
    shared = {c: tuple(sorted(r)) for c, r in holders.items() if len(r) > 1}
    return StageLayout(plan, pp_rank, chunks, canonical, shared)


class LocalStages(nn.Module):
    """This rank's chunks in one module (``stages.stage{s}``), so that modules shared between two
    local chunks are sharded once by parallelize; it holds no parameters of its own."""

    def __init__(self, config, layout: "StageLayout"):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleDict({f"stage{s}": c for s, c in sorted(layout.chunks.items())})
        self.layout = layout

    def logical_tensors(self, writing: bool = False) -> List[tuple]:
        """(one-process GPT name, tensor) of this rank's parameters and persistent buffers, each
        logical tensor once: what a sharded checkpoint holds (train/sharded_checkpoint.py). Writing,
        a parameter held by several pipeline ranks (tied table and head, shared_* modules) is left to
        its first holder, so it is written once; reading, every holder fills its copy. A tensor with
        several local copies (``local_copies``) is named by its first."""
        layout, out, seen = self.layout, [], set()
        for name, ps in layout.local_params().items():
            if not (writing and layout.holders.get(name, (layout.pp_rank,))[0] != layout.pp_rank):
                out.append((name, ps[0]))
            seen.add(name)
        for _, chunk in sorted(layout.chunks.items()):
            params = {id(p) for p in chunk.parameters()}
            for name, t in chunk.state_dict(keep_vars=True).items():
                if id(t) not in params and name not in seen:  # persistent buffers: the GPT's names already
                    seen.add(name)
                    out.append((name, t))
        return out

    def local_copies(self, name: str) -> List[nn.Parameter]:
        """This rank's distinct Parameters of the logical parameter ``name``: several only where two
        local chunks hold separately sharded copies (the tied table and head on a V-shape's rank 0
        with TP), which are sharded alike and stay equal (their gradients summed: grads.sync_shared),
        so a checkpoint writes the first and a resume copies it, and its AdamW state, into the rest."""
        copies = self.__dict__.get("_copies")
        if copies is None:
            copies = self.__dict__["_copies"] = self.layout.local_params()
        return copies.get(name, [])


def release_unused(model: GPT, layout: StageLayout) -> None:
    """Drop the blocks this rank does not run from the full model, so their memory is freed once
    nothing else holds them (the model object itself stays, for features that walk it)."""
    local = {i for c in layout.chunks.values() for i in range(c.start, c.stop)}
    for i in range(len(model.transformer.h)):
        if i not in local:
            model.transformer.h[i] = nn.Identity()


def merge_stage_parts(parts: List[dict], config, who: str = "pipeline") -> Dict[str, torch.Tensor]:
    """The gathered tensors of every stage in one process's state-dict order, so a pipeline
    checkpoint is the one-process checkpoint; refuses one no stage held."""
    with torch.device("meta"):
        order = list(GPT(config).state_dict())
    merged = {k: v for part in parts for k, v in part.items()}
    missing = [k for k in order if k not in merged]
    if missing:
        raise CheckpointError(f"the {who} stages hold no value for {missing[:5]}")
    return {k: merged[k] for k in order}
