"""A pipeline rank's weights without the whole model ever existing on it.

    model = GPT(config, defer_init=True)             # drawn weights on the meta device, every layer
    layout = build_stages(model, plan, pp_rank)      # this rank's chunks: still meta
    parallelize(LocalStages(...), groups, ...)       # TP plan applied to shapes only
    materialize_stages(model, layout, groups)        # only this rank's parameters get values
    # or, on resume: materialize_stages(..., load=reader) with reader(chunk) filling one chunk
    #   (train/pipeline_engine.py passes io.weights_reader.load_shards(chunk, dir, groups, partial=True))

Each local parameter gets its full value from its own seeded stream (forge_dist.model.init: the
stream is keyed by the parameter's first name in the GPT, ``layout.canonical``, so a tied head
or a shared module on a later stage draws exactly the one-process value), or tensor by tensor
from a layout-free checkpoint (io/weights_reader.py); this rank's TP shard is kept and the rest
freed before the next parameter. The layers of other stages stay on the meta device: they never
take memory. Single-process and pipelined builds are equal (tests/dist/test_pp_parity.py checks
every local value before the first step).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from forge_dist.model.deferred import drawn, logical_shape, replace_value
from forge_dist.parallel.materialize import shard_local
from forge_dist.parallel.pipeline.stage import StageLayout


def has_meta(layout: StageLayout) -> bool:
    return any(p.is_meta for ps in layout.local_params().values() for p in ps)


@torch.no_grad()
def materialize_stages(model, layout: StageLayout, groups, load: Optional[Callable] = None) -> int:
    """Give this rank's meta parameters their values (drawn, or ``load(chunk)`` for every local
    chunk); returns how many Parameters were filled."""
    if load is not None:
        for chunk in layout.chunks.values():
            load(chunk)
        left = [c for c, ps in layout.local_params().items() if any(p.is_meta for p in ps)]
        if left:
            raise RuntimeError(f"{left[:4]} are still on the meta device after loading this rank's stages")
        return sum(len(ps) for ps in layout.local_params().values())
    local = shard_local(groups)
    full_value = drawn(model.init_rules, model.config, model.init_seed)
    done = 0
    for name, ps in sorted(layout.local_params().items()):
        if not any(p.is_meta for p in ps):
            continue
        full = full_value(name, logical_shape(ps[0]))
        for p in ps:
            if p.is_meta:
                replace_value(p, local(name, p, full))
                done += 1
        del full
    left = [f"stage {s}: {n}" for s, c in layout.chunks.items() for n, b in c.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"buffers {left[:4]} are on the meta device after materialisation")
    return done
