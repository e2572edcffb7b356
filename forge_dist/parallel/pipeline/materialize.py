"""A pipeline rank's weights without the whole model ever existing on it.

    model = GPT(config, defer_init=True)             # drawn weights on the meta device, every layer
    layout = build_stages(model, plan, pp_rank)      # this rank's chunks: still meta
    parallelize(LocalStages(...), groups, ...)       # TP plan applied to shapes only
    materialize_stages(model, layout, groups)        # only this rank's parameters get values
    # or from a checkpoint: materialize_stages(..., load=reader) with reader(chunk) filling one chunk
    #   (train/pipeline_engine.py: io.slice_read.load_slices(chunk, reader, groups, partial=True),
    #   only this rank's pieces read; what a --init_from prev_run checkpoint lacks is then drawn)

Each local parameter's TP shard is drawn from its own seeded stream (forge_dist.model.init: the
stream is keyed by the parameter's first name in the GPT, ``layout.canonical``, so a tied head
or a shared module on a later stage draws exactly the one-process value), piece by piece with only
the shard kept (forge_dist.parallel.kept); or only this rank's pieces are read from a
layout-free checkpoint (io/slice_read.py). The layers of other stages stay on the meta device:
they never take memory. Single-process and pipelined builds are equal (tests/dist/test_pp_parity.py
checks every local value before the first step). DeepSpeed's PipelineModule builds only its
stage's layers from the same meta GPT and fills them with ``materialize_chunks``.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from forge_dist.model.deferred import drawn, logical_shape, replace_value
from forge_dist.parallel.materialize import shard_keep
from forge_dist.parallel.pipeline.stage import StageLayout


def has_meta(layout: StageLayout) -> bool:
    return any(p.is_meta for ps in layout.local_params().values() for p in ps)


@torch.no_grad()
def materialize_stages(model, layout: StageLayout, groups, load: Optional[Callable] = None) -> int:
    """Give this rank's meta parameters their values (``load(chunk)`` for every local chunk, then
    drawn for what it left on meta: a --init_from prev_run checkpoint without some tensors);
    returns how many Parameters were filled."""
    return _fill(model, list(layout.chunks.values()), layout.local_params(), groups, load)


@torch.no_grad()
def materialize_chunks(model, chunks: List[nn.Module], canonical: Dict[str, str], groups,
                       load: Optional[Callable] = None) -> int:
    """materialize_stages for pieces that are not a StageLayout (DeepSpeed's PipelineModule layers:
    train/deepspeed_pipe_module.py); ``canonical`` maps a piece's parameter name (the GPT's) to its
    first name in the GPT, whose stream draws it."""
    local: Dict[str, List[nn.Parameter]] = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters(remove_duplicate=False):
            same = local.setdefault(canonical[name], [])
            if all(q is not p for q in same):
                same.append(p)
    return _fill(model, chunks, local, groups, load)


def _fill(model, chunks, local_params: Dict[str, List[nn.Parameter]], groups, load) -> int:
    done = 0
    if load is not None:
        before = sum(p.is_meta for ps in local_params.values() for p in ps)
        for chunk in chunks:
            load(chunk)
        done = before - sum(p.is_meta for ps in local_params.values() for p in ps)
    keep = shard_keep(groups)
    value = drawn(model.init_rules, model.config, model.init_seed)
    for name, ps in sorted(local_params.items()):
        for p in ps:  # a tied pair on one rank draws its stream twice: twice the time, never a full tensor
            if p.is_meta:
                replace_value(p, value(name, logical_shape(p), keep(name, p), p.dtype))
                done += 1
    left = [n for c in chunks for n, b in c.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers {left[:4]} are on the meta device after materialisation")
    return done
