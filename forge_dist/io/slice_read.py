"""Reading only the pieces of a checkpoint's logical tensors that this rank holds.

A rank of a tensor-parallel or pipelined run starting from a checkpoint's weights (resume of a
gathered checkpoint, ``--init_from prev_run``) needs, per tensor, the pieces its shards hold
(parallel/sharded_state.py ``shard_pieces``: views of the local tensor with their offsets in the
logical one). A ``SliceReader`` fills such views from the checkpoint without reading the rest:

    reader = open_slices(model_dir)   # model.safetensors: each piece pread (io/safetensors_file.py)
                                      # model/dcp (sharded): DCP reads the saved chunks overlapping a piece
    reader.read({name: [(view, offsets), ...], ...})
    load_slices(model, reader, groups)  # a deferred, parallelized model (or a pipeline stage) filled
    load_shards(model, model_dir, groups)   # the same from a model.safetensors, strictly

``StateDictSlices`` gives the same interface to a state dict (a ReaLLM-Forge ckpt.pt memory-mapped
and mapped to our names: io/reallm_forge.py ``open_slices``); a transformers directory is read
block by block through its architecture's transforms (io/hf/slices.py). Every reader records what it was asked
for (``requests``, ``bytes_read``) so a test can prove a rank never read what it does not own.
A DCP checkpoint written by fewer ranks stores bigger chunks; DCP reads a whole stored chunk and
keeps the overlap, so there the peak is one stored chunk (at most one full tensor).
"""
from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from forge_dist.errors import CheckpointError
from forge_dist.model.deferred import logical_shape, replace_value
from forge_dist.parallel.groups import ProcessGroups

Piece = Tuple[torch.Tensor, Tuple[int, ...]]  # (view to fill, offsets in the logical tensor)


class SliceReader(ABC):
    """names(), shape(name), read({name: pieces}); ``aliases`` maps a tied name to the stored one."""

    source: str = ""

    def __init__(self) -> None:
        self.aliases: Dict[str, str] = {}
        self.requests: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = []  # (name, offsets, sizes)
        self.bytes_read = 0

    @abstractmethod
    def stored_names(self) -> List[str]:
        """The names the checkpoint stores (tied aliases not included)."""

    @abstractmethod
    def _shape(self, stored: str) -> Tuple[int, ...]:
        """The logical shape of a stored tensor, from the index (nothing read)."""

    @abstractmethod
    def _read(self, wanted: Dict[str, List[Piece]]) -> None:
        """Fill the views of ``wanted`` (stored name -> pieces)."""

    def close(self) -> None:
        """Release the open files (a reader is also a context manager)."""

    def __enter__(self) -> "SliceReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _record(self, name: str, offsets, shape, element_size: int) -> None:
        self.requests.append((name, tuple(offsets), tuple(shape)))
        self.bytes_read += math.prod(shape) * element_size

    def full(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """One whole logical tensor in ``dtype`` (a one-piece read: forge-convert's streamed source)."""
        out = torch.empty(self.shape(name), dtype=dtype)
        self.read({name: [(out, (0,) * out.dim())]})
        return out

    def stored(self, name: str) -> Optional[str]:
        name = self.aliases.get(name, name)
        return name if name in self._names() else None

    def _names(self) -> set:
        if not hasattr(self, "_name_set"):
            self._name_set = set(self.stored_names())
        return self._name_set

    def names(self) -> List[str]:
        return sorted(self._names() | {a for a, n in self.aliases.items() if n in self._names()})

    def shape(self, name: str) -> Tuple[int, ...]:
        stored = self.stored(name)
        if stored is None:
            raise CheckpointError(f"{self.source} has no tensor {name!r}")
        return self._shape(stored)

    @torch.no_grad()
    def read(self, wanted: Dict[str, List[Piece]]) -> None:
        """Fill every view of ``wanted`` (logical name -> pieces) from the checkpoint."""
        by_stored: Dict[str, List[Piece]] = {}
        for name, pieces in wanted.items():
            stored = self.stored(name)
            if stored is None:
                raise CheckpointError(f"{self.source} has no tensor {name!r}")
            by_stored.setdefault(stored, []).extend(pieces)
            for view, offsets in pieces:
                self._record(name, offsets, view.shape, view.element_size())
        if by_stored:
            self._read(by_stored)


def _index(view: torch.Tensor, offsets) -> tuple:
    return tuple(slice(o, o + s) for o, s in zip(offsets, view.shape))


class SafetensorsSlices(SliceReader):
    """A forge_dist ``model.safetensors`` (io/weights_reader.py), each piece read alone (pread)."""

    def __init__(self, directory: str):
        from forge_dist.io.weights_reader import WeightsReader

        super().__init__()
        self._weights = WeightsReader(directory)
        self.source = self._weights.file
        self.aliases.update(self._weights._aliases)

    def close(self) -> None:
        self._weights.close()

    def stored_names(self) -> List[str]:
        return sorted(self._weights._stored)

    def _shape(self, stored: str) -> Tuple[int, ...]:
        return self._weights.shape(stored)

    def _read(self, wanted: Dict[str, List[Piece]]) -> None:
        _read_safetensors(self._weights._f, wanted)


def _read_safetensors(f, wanted: Dict[str, List[Piece]], key: Callable[[str], str] = str) -> None:
    """Fill each piece from an open io/safetensors_file.SafetensorsFile (``key``: the stored name's
    key in it): only the piece's bytes are read, into fresh memory (no mapped file pages)."""
    for name, pieces in wanted.items():
        part = f.get_slice(key(name))
        for view, offsets in pieces:
            value = part[_index(view, offsets)] if view.dim() else f.get_tensor(key(name))
            view.copy_(value.reshape(view.shape))


class StateFileSlices(SliceReader):
    """A state file (io/statefile.py: ``name.json`` + ``name.safetensors``) read lazily: its tensors
    under their paths in the structure (``params/<name>/fp32``), each piece read alone, so a
    rank reads only its pieces of, say, a gathered checkpoint's logical optimizer copy."""

    def __init__(self, directory: str, name: str):
        import json

        from forge_dist.io.safetensors_file import SafetensorsFile

        super().__init__()
        self._f = None
        self.source = os.path.join(directory, f"{name}.safetensors")
        try:
            with open(os.path.join(directory, f"{name}.json"), encoding="utf-8") as fh:
                self.structure = json.load(fh)
            self._f = SafetensorsFile(self.source)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {name} state in {directory}: {e}") from None
        self._keys: Dict[str, str] = {}
        self._walk(self.structure, "")

    def _walk(self, obj, path: str) -> None:
        """Name every tensor by its path (an int-keyed dict's keys too: ``optimizer/state/0/exp_avg``)."""
        if not isinstance(obj, dict):
            return
        if "__tensor__" in obj:
            self._keys[path] = obj["__tensor__"]
            return
        items = obj["__items__"] if "__items__" in obj else obj.items()
        if "__items__" in obj or not any(k.startswith("__") for k in obj):
            for k, v in items:
                if isinstance(k, (str, int)):
                    self._walk(v, f"{path}/{k}" if path else str(k))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def stored_names(self) -> List[str]:
        return sorted(self._keys)

    def _shape(self, stored: str) -> Tuple[int, ...]:
        return tuple(self._f.get_slice(self._keys[stored]).get_shape())

    def _read(self, wanted: Dict[str, List[Piece]]) -> None:
        _read_safetensors(self._f, wanted, self._keys.__getitem__)


class DcpSlices(SliceReader):
    """A sharded training checkpoint's ``model/dcp`` (io/sharded_read.py): one DCP load of every
    piece, which reads only the saved chunks that overlap them. ``verify(files)`` checks the data
    files those pieces come from before they are read (their sha256)."""

    def __init__(self, model_dir: str, verify: Optional[Callable[[List[str]], None]] = None):
        from forge_dist.io.sharded_read import MODEL_PREFIX, ShardedWeights

        super().__init__()
        self._weights = ShardedWeights(model_dir)
        self.source, self.verify, self._prefix = self._weights.directory, verify, MODEL_PREFIX

    def stored_names(self) -> List[str]:
        return self._weights.names()

    def _shape(self, stored: str) -> Tuple[int, ...]:
        return self._weights.shape(stored)

    def _read(self, wanted: Dict[str, List[Piece]]) -> None:
        import torch.distributed.checkpoint as dcp

        from forge_dist.io.dcp_storage import single_process_quiet
        from forge_dist.io.sharded_read import _CachedReader, files_to_read
        from forge_dist.parallel.sharded_state import LocalShards, ShardLoadPlanner

        state = {self._prefix + n: LocalShards(pieces, self._shape(n)) for n, pieces in wanted.items()}
        if self.verify is not None:
            self.verify(files_to_read(self._weights.metadata, {
                k: [(tuple(o), tuple(v.shape)) for v, o in s.pieces] for k, s in state.items()}))
        with single_process_quiet():
            dcp.load(state, storage_reader=_CachedReader(self._weights.directory, self._weights.metadata),
                     planner=ShardLoadPlanner(), no_dist=True)


class StateDictSlices(SliceReader):
    """A state dict (a memory-mapped ckpt.pt mapped to our names: only the pieces read are paged in)."""

    def __init__(self, state: Dict[str, torch.Tensor], source: str):
        super().__init__()
        self._state, self.source = state, source

    def stored_names(self) -> List[str]:
        return sorted(self._state)

    def _shape(self, stored: str) -> Tuple[int, ...]:
        return tuple(self._state[stored].shape)

    def _read(self, wanted: Dict[str, List[Piece]]) -> None:
        for name, pieces in wanted.items():
            full = self._state[name]
            for view, offsets in pieces:
                view.copy_(full[_index(view, offsets)] if view.dim() else full.reshape(()))


def tied_aliases(state: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """{later name: first name} of the tensors a state dict (keep_vars) holds under several names."""
    first: Dict[int, str] = {}
    out = {}
    for name, t in state.items():
        if first.setdefault(id(t), name) != name:
            out[name] = first[id(t)]
    return out


def open_slices(model_dir: str, verify: Optional[Callable[[List[str]], None]] = None) -> SliceReader:
    """The reader of a forge_dist model directory: model.safetensors, or a sharded checkpoint's dcp/."""
    from forge_dist.io.forge_format import WEIGHTS_NAME
    from forge_dist.io.sharded_read import is_sharded_model_dir

    if not os.path.isfile(os.path.join(model_dir, WEIGHTS_NAME)) and is_sharded_model_dir(model_dir):
        return DcpSlices(model_dir, verify)
    return SafetensorsSlices(model_dir)


@torch.no_grad()
def load_slices(model: nn.Module, reader, groups: Optional[ProcessGroups], partial: bool = False,
                fresh_ok: bool = False, meta: bool = True) -> List[str]:
    """Fill ``model`` (logical names; a deferred, parallelized model, a pipeline stage under the
    GPT's names, or a plain one with ``groups`` None) from ``reader`` (io/slice_read.py), reading
    only the pieces this rank's tensors hold (parallel/sharded_state.py shard_pieces): meta
    parameters get a new local tensor, the others are written in place. Strict like io.state,
    unless ``partial`` (the checkpoint may hold tensors the model lacks) or ``fresh_ok`` (tensors
    the checkpoint lacks keep their value, or stay on meta to be drawn: prev_run). ``meta`` False:
    meta tensors are only checked and stay on meta (ZeRO-3 reads its partitions of them itself:
    ``read_kept``). Returns the names the checkpoint lacked."""
    from forge_dist.parallel.sharded_state import shard_pieces
    from forge_dist.parallel.tensor.metadata import shard_info

    own = model.state_dict(keep_vars=True)
    reader.aliases.update({a: n for a, n in tied_aliases(own).items() if reader.stored(a) is None})
    stored = set(reader.names())
    missing = sorted(set(own) - stored)
    unexpected = [] if partial else sorted(stored - set(own))
    if (missing and not fresh_ok) or unexpected:
        raise CheckpointError(f"{reader.source} does not fit the model built from its config: missing "
                              f"{missing[:8] or 'none'}; unexpected {unexpected[:8] or 'none'}")
    wanted, fills, seen = {}, [], set()
    for name, t in own.items():
        if id(t) in seen or name not in stored:  # a tied tensor is read under its first name
            continue
        seen.add(id(t))
        if reader.shape(name) != logical_shape(t):
            raise CheckpointError(f"{reader.source}: {name} has shape {reader.shape(name)}, the model "
                                  f"expects {logical_shape(t)}")
        if t.is_meta and not meta:
            continue
        local = torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t  # zeros: a padded shard's tail
        info = shard_info(t)
        pieces = shard_pieces(local, info, groups) if groups is not None else [(local, (0,) * local.dim())]
        wanted[name] = pieces
        if t.is_meta:
            fills.append((t, local))
    reader.read(wanted)
    for t, local in fills:
        replace_value(t, local)
    return missing


def read_kept(reader: SliceReader, name: str, kept, dtype: torch.dtype,
              groups: Optional[ProcessGroups]) -> torch.Tensor:
    """The part ``kept`` (forge_dist.parallel.kept.Kept: a tensor-parallel shard's flat range, a
    ZeRO-3 partition) of the logical tensor ``name``, in a shard-shaped tensor of which only that
    range is written, so the rest is never resident (as ``Kept.take`` draws it); only the range's
    boxes are read (parallel/sharded_state.py fragment_pieces), padding rows left as zeros."""
    from forge_dist.parallel.sharded_state import fragment_pieces

    out = torch.empty(kept.shape, dtype=dtype)
    flat = out.view(-1)
    start, stop = kept.start, flat.numel() if kept.stop is None else kept.stop
    if start < stop:
        fragment = flat[start:stop].zero_()
        reader.read({name: fragment_pieces(fragment, start, tuple(kept.shape), kept.info, groups)})
    return out


def load_shards(model: nn.Module, directory: str, groups: ProcessGroups, partial: bool = False) -> None:
    """Load a forge_dist model directory (logical, unsharded names and shapes) into a deferred,
    parallelized model, reading only this rank's pieces of each tensor (load_slices). Strict like
    io.state; ``partial``: ``model`` holds part of the checkpoint's model (a pipeline stage under
    the GPT's names), so tensors it does not hold are not an error."""
    with SafetensorsSlices(directory) as reader:
        load_slices(model, reader, groups, partial=partial)
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise RuntimeError(f"{left[:4]} are still on the meta device after loading {directory}")
