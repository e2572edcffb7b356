"""A tensor-parallel rank's model without the whole model ever existing on it.

    model = GPT(config, defer_init=True)           # drawn weights on the meta device
    parallelize(model, groups, parallel_config)    # the plan applied to shapes only
    materialize_shards(model, groups)              # one full parameter at a time, this rank's shard kept
    # or, on resume: forge_dist.io.slice_read.load_shards(model, checkpoint_model_dir, groups)

Each parameter's full value is drawn from its own seeded stream (forge_dist.model.init) or read
from the checkpoint tensor by tensor, sliced with the parameter's ShardInfo (the same
``shard_tensor`` a full build's parallelize uses), and the rest freed before the next one, so the
kept shards equal those of a single-process build sliced afterwards and the peak is the shards
plus one full parameter.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from forge_dist.model.deferred import Local
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.tensor.metadata import shard_info, shard_tensor


def shard_local(groups: ProcessGroups) -> Local:
    """``local`` for materialize: this rank's shard of a full tensor by its ShardInfo."""
    def local(name: str, p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        info = shard_info(p)
        if info is None or info.dim is None:
            return full
        group = groups.get(info.group)
        return shard_tensor(full, info, group.rank, group.size)
    return local


def materialize_shards(model: nn.Module, groups: ProcessGroups) -> int:
    """Draw a deferred, parallelized GPT's weights, keeping this rank's shards."""
    return model.materialize(local=shard_local(groups))
