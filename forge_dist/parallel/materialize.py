"""A tensor-parallel rank's model without the whole model ever existing on it.

    model = GPT(config, defer_init=True)           # drawn weights on the meta device
    parallelize(model, groups, parallel_config)    # the plan applied to shapes only
    materialize_shards(model, groups)              # one full parameter at a time, this rank's shard kept
    # or, on resume: load_shards(model, checkpoint_model_dir, groups)

Each parameter's full value is drawn from its own seeded stream (forge_dist.model.init) or read
from the checkpoint tensor by tensor, sliced with the parameter's ShardInfo (the same
``shard_tensor`` a full build's parallelize uses), and the rest freed before the next one, so the
kept shards equal those of a single-process build sliced afterwards and the peak is the shards
plus one full parameter.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from forge_dist.errors import CheckpointError
from forge_dist.model.deferred import Local, logical_shape, replace_value
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


@torch.no_grad()
def load_shards(model: nn.Module, directory: str, groups: ProcessGroups) -> None:
    """Load a forge_dist model directory (logical, unsharded names and shapes) into a deferred,
    parallelized model, tensor by tensor: meta parameters get their shard, the others (constructor
    valued parameters, persistent buffers) are overwritten with theirs. Strict like io.state."""
    from forge_dist.io.weights_reader import WeightsReader

    local = shard_local(groups)
    own = model.state_dict(keep_vars=True)
    with WeightsReader(directory) as weights:
        missing = sorted(set(own) - set(weights.names()))
        unexpected = sorted(set(weights.names()) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{weights.file} does not fit the model built from its config: missing "
                                  f"{missing[:8] or 'none'}; unexpected {unexpected[:8] or 'none'}")
        for name, t in own.items():
            want = logical_shape(t)
            if weights.shape(name) != want:
                raise CheckpointError(f"{weights.file}: {name} has shape {weights.shape(name)}, the model "
                                      f"expects {want}")

        seen = set()
        for name, t in own.items():  # one full tensor at a time
            if id(t) in seen:  # a tied tensor, loaded under its first name
                continue
            seen.add(id(t))
            value = local(name, t, weights.get(name)).to(t.dtype)
            if isinstance(t, nn.Parameter) and t.is_meta:
                replace_value(t, value)
            elif tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(f"{weights.file}: {name} slices to {tuple(value.shape)}, this rank "
                                      f"holds {tuple(t.shape)}")
            else:
                t.copy_(value)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise RuntimeError(f"{left[:4]} are still on the meta device after loading {directory}")
