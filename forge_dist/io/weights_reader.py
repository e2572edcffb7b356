"""Tensor-by-tensor reading of a forge_dist ``model.safetensors``: a sharded build takes one full
tensor at a time and keeps its slice, so no rank ever holds the whole model while loading.

    with WeightsReader(directory) as weights:
        weights.names()            # every logical name, tied aliases included
        weights.shape(name)        # from the header, nothing read
        weights.get(name)          # one tensor (an alias reads its stored name)

io/slice_read.py reads only a rank's pieces of each tensor through it (``load_shards``,
``load_slices``): io/safetensors_file.py reads each piece with pread into fresh memory, never
mapping the file, so a rank's resident memory holds its pieces, not the checkpoint's pages.
"""
from __future__ import annotations

import json
import os
from typing import List, Tuple

import torch

from forge_dist.errors import CheckpointError
from forge_dist.io.forge_format import ALIASES_KEY, WEIGHTS_NAME


class WeightsReader:
    def __init__(self, directory: str):
        from forge_dist.io.safetensors_file import SafetensorsFile

        self._f = None
        self.file = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(self.file):
            raise CheckpointError(f"{directory} is not a forge_dist checkpoint: {WEIGHTS_NAME} is missing")
        try:
            self._f = SafetensorsFile(self.file)
            self._stored = set(self._f.keys())
            self._aliases = json.loads((self._f.metadata() or {}).get(ALIASES_KEY, "{}"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self.file} is not a readable safetensors file: {e}") from None
        bad = {a: n for a, n in self._aliases.items() if n not in self._stored}
        if bad:
            raise CheckpointError(f"{self.file}: aliases {sorted(bad)[:4]} point to tensors that are not stored")

    def __enter__(self) -> "WeightsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the file now, not when the handle is collected."""
        if self._f is not None:
            self._f.close()
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
