"""A transformers directory read piece by piece (``--init_from prev_run`` from a transformers model):
each rank reads only the blocks of the safetensors tensors its shards need.

Every one of our tensors comes from one transformers tensor through that tensor's ``from_hf``
(mapping.py). Where the transform says which block of theirs makes a block of ours (its
``slicer``: identity and elementwise maps, transposes, fused qkv splits, RoPE row permutations
over whole heads), only the block is read (io/safetensors_file.py, pread); otherwise the one
transformers tensor is read whole, converted, and the piece kept (``whole_reads`` names those),
so the peak is one tensor, never the model.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from forge_dist.io.hf import files
from forge_dist.io.slice_read import Piece, SliceReader, _index


class HfSlices(SliceReader):
    """Our logical tensors of a transformers directory (names and shapes from the meta-device GPT
    of its config, nothing read until ``read``)."""

    def __init__(self, path: str):
        from forge_dist.io.hf import DERIVED_SUFFIXES, placement, read_hf_config
        from forge_dist.model.gpt import GPT

        super().__init__()
        self.source = path = os.fspath(path)
        self.family, self.config = read_hf_config(path)
        self._files = files.open_tensors(path)
        self._where = placement(self.family, self.config, self._files, path)
        self._implied = self.family.implied(self.config)  # small fixed tensors (a bias-free router's zeros)
        with torch.device("meta"):
            own = GPT(self.config).state_dict(keep_vars=True)
        self._shapes = {n: tuple(t.shape) for n, t in own.items() if not n.endswith(DERIVED_SUFFIXES)}
        self.whole_reads: List[str] = []  # transformers tensors read whole (a block no slicer maps)

    def close(self) -> None:
        files.close_tensors(self._files)
        self._files = {}

    def stored_names(self) -> List[str]:
        return sorted(set(self._where) | set(self._implied))

    def _shape(self, stored: str) -> Tuple[int, ...]:
        return self._shapes[stored]

    def _block(self, name: str, index: tuple) -> Optional[torch.Tensor]:
        """Block ``index`` of our ``name``, made from only the block of the transformers tensor its
        transform's slicer names; None where no slicer maps it (or for a 0-d tensor)."""
        t, k = self._where[name]
        slicer = getattr(t.from_hf, "slicer", None)
        mapped = slicer(k, index) if slicer is not None and index else None
        if mapped is None:
            return None
        theirs_index, convert = mapped
        return convert(self._files[t.theirs].get_slice(t.theirs)[theirs_index])

    def full(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """SliceReader.full, returning the block the slicer makes (no second copy of the tensor)."""
        stored = self.stored(name)
        shape = self._shape(stored) if stored in self._where else ()
        block = self._block(stored, tuple(slice(0, n) for n in shape)) if shape else None
        if block is None:
            return super().full(name, dtype)
        self._record(name, (0,) * len(shape), shape, block.element_size())
        value = block.reshape(shape).to(dtype)
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()  # a view into more than the block (a convert's view): its own storage
        return value

    def _read(self, wanted: Dict[str, List[Piece]]) -> None:
        whole: Dict[str, list] = {}  # a transformers tensor read whole, converted, until its parts are done
        done: Dict[str, bool] = {}
        for name, pieces in wanted.items():
            if name in self._implied:
                for view, offsets in pieces:
                    view.copy_(self._implied[name][_index(view, offsets)])
                continue
            t, k = self._where[name]
            for view, offsets in pieces:
                index = _index(view, offsets)
                block = self._block(name, index)
                if block is not None:
                    view.copy_(block.reshape(view.shape))
                    continue
                if t.theirs not in whole:
                    self.whole_reads.append(t.theirs)
                    whole[t.theirs] = t.from_hf(self._files[t.theirs].get_tensor(t.theirs))
                view.copy_(whole[t.theirs][k][index] if view.dim() else whole[t.theirs][k].reshape(()))
            if t.theirs in whole and all(n not in wanted or n == name or done.get(n) for n in t.ours):
                del whole[t.theirs]  # every part asked for is filled: drop it before the next tensor
            done[name] = True
