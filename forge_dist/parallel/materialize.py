"""A tensor-parallel rank's model without the whole model ever existing on it.

    model = GPT(config, defer_init=True)           # drawn weights on the meta device
    parallelize(model, groups, parallel_config)    # the plan applied to shapes only
    materialize_shards(model, groups)              # only this rank's shards drawn
    # or, on resume: forge_dist.io.slice_read.load_shards(model, checkpoint_model_dir, groups)

Each parameter's shard (its ShardInfo on this rank: ``shard_keep``) is drawn from the parameter's
own seeded stream (forge_dist.model.init) piece by piece, only the shard's elements kept
(forge_dist.parallel.kept), or read from the checkpoint tensor by tensor, so the kept shards equal
those of a single-process build sliced afterwards (the same ``shard_tensor`` a full build's
parallelize uses) and the peak is the shards plus one piece of a parameter.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from forge_dist.model.deferred import Keep, logical_shape
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.kept import Kept
from forge_dist.parallel.tensor.metadata import shard_info


def shard_keep(groups: Optional[ProcessGroups]) -> Keep:
    """``keep`` for materialize: this rank's shard of each parameter by its ShardInfo (all of a
    replicated one)."""
    def keep(name: str, p: torch.Tensor) -> Kept:
        info = shard_info(p)
        if info is None or info.dim is None or groups is None:
            return Kept.of(p, logical_shape(p))
        group = groups.get(info.group)
        return Kept.of(p, logical_shape(p), info, group.rank, group.size)
    return keep


def materialize_shards(model: nn.Module, groups: ProcessGroups) -> int:
    """Draw a deferred, parallelized GPT's weights, keeping this rank's shards."""
    return model.materialize(keep=shard_keep(groups))
