"""Tensor-by-tensor reading of a forge_dist ``model.safetensors``: a sharded build takes one full
tensor at a time and keeps its slice, so no rank ever holds the whole model while loading.

    with WeightsReader(directory) as weights:
        weights.names()            # every logical name, tied aliases included
        weights.shape(name)        # from the header, nothing read
        weights.get(name)          # one tensor (an alias reads its stored name)

``load_shards(model, directory, groups)`` fills a deferred, parallelized model this way
(forge_dist.parallel.materialize).
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple

import torch
import torch.nn as nn

from forge_dist.errors import CheckpointError
from forge_dist.io.forge_format import ALIASES_KEY, WEIGHTS_NAME
from forge_dist.model.deferred import logical_shape, replace_value
from forge_dist.parallel.groups import ProcessGroups
from forge_dist.parallel.materialize import shard_local


class WeightsReader:
    def __init__(self, directory: str):
        from safetensors import SafetensorError, safe_open

        self.file = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(self.file):
            raise CheckpointError(f"{directory} is not a forge_dist checkpoint: {WEIGHTS_NAME} is missing")
        try:
            self._f = safe_open(self.file, framework="pt", device="cpu")
            self._stored = set(self._f.keys())
            self._aliases = json.loads((self._f.metadata() or {}).get(ALIASES_KEY, "{}"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.file} is not a readable safetensors file: {e}") from None
        bad = {a: n for a, n in self._aliases.items() if n not in self._stored}
        if bad:
            raise CheckpointError(f"{self.file}: aliases {sorted(bad)[:4]} point to tensors that are not stored")

    def __enter__(self) -> "WeightsReader":
        return self

    def __exit__(self, *exc) -> None:
        self._f = None

    def names(self) -> List[str]:
        return sorted(self._stored | set(self._aliases))

    def _stored_name(self, name: str) -> str:
        stored = self._aliases.get(name, name)
        if stored not in self._stored:
            raise CheckpointError(f"{self.file} has no tensor {name!r}")
        return stored

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._f.get_slice(self._stored_name(name)).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._f.get_tensor(self._stored_name(name))


@torch.no_grad()
def load_shards(model: nn.Module, directory: str, groups: ProcessGroups, partial: bool = False) -> None:
    """Load a forge_dist model directory (logical, unsharded names and shapes) into a deferred,
    parallelized model, tensor by tensor: meta parameters get their shard, the others (constructor
    valued parameters, persistent buffers) are overwritten with theirs. Strict like io.state;
    ``partial``: ``model`` holds part of the checkpoint's model (a pipeline stage under the GPT's
    names), so tensors it does not hold are not an error."""
    local = shard_local(groups)
    own = model.state_dict(keep_vars=True)
    with WeightsReader(directory) as weights:
        missing = sorted(set(own) - set(weights.names()))
        unexpected = [] if partial else sorted(set(weights.names()) - set(own))
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
