"""A transformers directory read piece by piece (``--init_from prev_run`` from a transformers model):
each rank reads only the blocks of the safetensors tensors its shards need.

Every one of our tensors comes from one transformers tensor through that tensor's ``from_hf``
(mapping.py). Where the transform says which block of theirs makes a block of ours (its
``slicer``: identity and elementwise maps, transposes, fused qkv splits, RoPE row permutations
over whole heads), the block is read through safetensors' lazy ``get_slice``; otherwise the one
transformers tensor is read whole, converted, and the piece kept (``whole_reads`` names those),
so the peak is one tensor, never the model.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch

from forge_dist.io.slice_read import Piece, SliceReader, _index


class HfSlices(SliceReader):
    """Our logical tensors of a transformers directory (names and shapes from the meta-device GPT
    of its config, nothing read until ``read``)."""

    def __init__(self, path: str):
        from forge_dist.io.hf import DERIVED_SUFFIXES, files, placement, read_hf_config
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
        for handle in {id(f): f for f in self._files.values()}.values():
            handle.__exit__(None, None, None)  # safe_open's exit unmaps its file
        self._files = {}

    def stored_names(self) -> List[str]:
        return sorted(set(self._where) | set(self._implied))

    def _shape(self, stored: str) -> Tuple[int, ...]:
        return self._shapes[stored]

    def _read(self, wanted: Dict[str, List[Piece]]) -> None:
        whole: Dict[str, list] = {}  # a transformers tensor read whole, converted, until its parts are done
        done: Dict[str, bool] = {}
        for name, pieces in wanted.items():
            if name in self._implied:
                for view, offsets in pieces:
                    view.copy_(self._implied[name][_index(view, offsets)])
                continue
            t, k = self._where[name]
            f, slicer = self._files[t.theirs], getattr(t.from_hf, "slicer", None)
            for view, offsets in pieces:
                index = _index(view, offsets)
                mapped = slicer(k, index) if slicer is not None and view.dim() else None
                if mapped is not None:
                    theirs_index, convert = mapped
                    view.copy_(convert(f.get_slice(t.theirs)[theirs_index]).reshape(view.shape))
                    continue
                if t.theirs not in whole:
                    self.whole_reads.append(t.theirs)
                    whole[t.theirs] = t.from_hf(f.get_tensor(t.theirs))
                view.copy_(whole[t.theirs][k][index] if view.dim() else whole[t.theirs][k].reshape(()))
            if t.theirs in whole and all(n not in wanted or n == name or done.get(n) for n in t.ours):
                del whole[t.theirs]  # every part asked for is filled: drop it before the next tensor
            done[name] = True
