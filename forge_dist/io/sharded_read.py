"""Reading a sharded (DCP) training checkpoint without its world: one logical tensor at a time.

A sharded checkpoint (train/sharded_save.py writes it) keeps its tensors in ``model/dcp/``: a
torch.distributed.checkpoint directory whose JSON index (io/dcp_storage.py) names every logical
tensor (``model/<name>``, ``optim/<name>/<moment>``), its shape and the chunks each rank wrote.
``model/config.json`` is the usual forge_dist config, so ``from_pretrained(ckpt/model)``,
forge-sample, forge-eval and forge-convert read it like a consolidated one:

    with ShardedWeights(model_dir) as weights:
        weights.names(); weights.shape(name); weights.get(name)   # one full tensor, read from its chunks

No process group and not the original world size: DCP's planner assembles each requested tensor
from whichever chunks overlap it, so the peak is one logical tensor above the model.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch

from forge_dist.errors import CheckpointError
from forge_dist.io.dcp_storage import METADATA_NAME, JsonMetadataReader, read_index, single_process_quiet

DCP_DIR = "dcp"  # inside model/
MODEL_PREFIX, OPTIM_PREFIX = "model/", "optim/"


def dcp_directory(model_dir: str) -> str:
    return os.path.join(model_dir, DCP_DIR)


def is_sharded_model_dir(model_dir: str) -> bool:
    return os.path.isfile(os.path.join(dcp_directory(model_dir), METADATA_NAME))


class ShardedWeights:
    """The logical tensors of a sharded checkpoint's DCP directory, read one at a time."""

    def __init__(self, model_dir: str, prefix: str = MODEL_PREFIX):
        self.directory, self.prefix = dcp_directory(model_dir), prefix
        self.metadata = read_index(self.directory)
        self._entries = {k[len(prefix):]: v for k, v in self.metadata.state_dict_metadata.items()
                         if k.startswith(prefix)}

    def __enter__(self) -> "ShardedWeights":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def names(self) -> List[str]:
        return sorted(self._entries)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._entry(name).size)

    def _entry(self, name: str):
        if name not in self._entries:
            raise CheckpointError(f"{self.directory} has no tensor {self.prefix}{name}")
        return self._entries[name]

    def get(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        entry = self._entry(name)
        out = torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        state = {self.prefix + name: out}
        with single_process_quiet():
            dcp.load(state, storage_reader=_CachedReader(self.directory, self.metadata), no_dist=True)
        return state[self.prefix + name]


class _CachedReader(JsonMetadataReader):
    """A JsonMetadataReader that does not parse the index again for every tensor."""

    def __init__(self, path: str, metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs):
        return self._metadata


def files_to_read(metadata, wanted: Dict[str, List[Tuple[Tuple[int, ...], Tuple[int, ...]]]]) -> List[str]:
    """The data files (relative) holding any saved chunk that overlaps a wanted piece: ``wanted``
    maps a logical name to its pieces (offsets, sizes). What one rank verifies before it loads."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    files = set()
    for fqn, pieces in wanted.items():
        entry = metadata.state_dict_metadata.get(fqn)
        if entry is None:
            continue
        for chunk in entry.chunks:
            if any(_overlaps(chunk.offsets, chunk.sizes, o, s) for o, s in pieces):
                files.add(metadata.storage_data[MetadataIndex(fqn, chunk.offsets)].relative_path)
    return sorted(files)


def _overlaps(o1, s1, o2, s2) -> bool:
    return all(a < c + d and c < a + b for a, b, c, d in zip(o1, s1, o2, s2))


@torch.no_grad()
def load_sharded_weights(model, model_dir: str) -> None:
    """Fill a plain (unsharded) model from a sharded checkpoint, tensor by tensor, strictly: every
    tensor of the model present with its shape (tied tensors are stored once, under their first name)."""
    own = model.state_dict(keep_vars=True)
    with ShardedWeights(model_dir) as weights:
        stored = set(weights.names())
        first: Dict[int, str] = {}
        for name, t in own.items():
            first.setdefault(id(t), name)
        wanted = set(first.values())
        missing, unexpected = sorted(wanted - stored), sorted(stored - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{weights.directory} does not fit the model built from its config: missing "
                                  f"{missing[:8] or 'none'}; unexpected {unexpected[:8] or 'none'}")
        for name in sorted(wanted):
            t = own[name]
            if weights.shape(name) != tuple(t.shape):
                raise CheckpointError(f"{weights.directory}: {name} has shape {weights.shape(name)}, the model "
                                      f"expects {tuple(t.shape)}")
            t.copy_(weights.get(name).to(t.dtype))


def one_process_optimizer_state(model_dir: str, extra: dict) -> dict:
    """The AdamW state dict one process would have (``extra``: optimizer.json's ``param_names`` and
    ``param_groups``), each moment read whole from the sharded checkpoint: for inspection and tests."""
    names, groups = extra["param_names"], extra["param_groups"]
    state = {}
    with ShardedWeights(model_dir, prefix=OPTIM_PREFIX) as optim:
        stored = set(optim.names())
        for i, name in enumerate(names):
            if f"{name}/step" in stored:
                state[i] = {"step": optim.get(f"{name}/step").reshape(()),
                            **{k: optim.get(f"{name}/{k}") for k in ("exp_avg", "exp_avg_sq")}}
    return {"state": state, "param_groups": groups}


def checkpoint_optimizer_state(path: str) -> dict:
    """The one-process AdamW state dict of a training checkpoint of forge_dist's own engines, either
    format (a sharded one's moments read whole from model/dcp)."""
    from forge_dist.io.statefile import load_state

    saved = load_state(path, "optimizer", map_location="cpu")
    if saved.get("format") == "sharded":
        return one_process_optimizer_state(os.path.join(path, "model"), saved)
    return saved["optimizer"]
