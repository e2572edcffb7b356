"""A ``torch.save`` file written one tensor at a time (``forge-convert --to reallm-forge`` streaming).

torch.save pickles the whole object first (``data.pkl``: every tensor as a reference to a storage
record) and then writes each storage as its own zip record (``data/0``, ``data/1``, ...), in the
order the pickle first met them (torch/serialization.py ``_save``). Only the second part needs the
bytes, so we hand ``_save`` an object whose tensors are *planned*: meta-device tensors that pickle
exactly as the CPU tensors they stand for (same rebuild function, storage reference, offset, size
and stride), under torch's own ``skip_data`` switch, which makes ``_save`` ask for each storage
record by name and size instead of reading it. The record is written then, from ``fill(tensor)``,
and dropped before the next one: the peak is one output tensor, the file is torch.save's.

Same file as ``torch.save(real_object, file)``: every zip record is byte-identical except
``.data/serialization_id``, which torch draws anew for every save; the archive's folder name is
the file's stem, as torch.save names it. Loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict
from typing import Callable, Dict, List

import torch

from forge_dist.errors import CheckpointError

_CPU = "cpu"  # one object: pickled once and referenced after, as torch's own location tag


class _CpuTag:
    """torch.save reads a planned storage's location as ``str(storage._fake_device)``."""

    def __str__(self) -> str:
        return _CPU


class _Planned:
    """Pickles as the CPU tensor ``meta`` stands for (torch/_tensor.py ``_reduce_ex_internal``)."""

    def __init__(self, meta: torch.Tensor, seen: List[torch.Tensor], keys: Dict[int, int]):
        self.meta, self.seen, self.keys = meta, seen, keys

    def __reduce_ex__(self, protocol):
        t = self.meta
        untyped = t.untyped_storage()
        if untyped._cdata not in self.keys:  # torch numbers storages in this same order
            self.keys[untyped._cdata] = len(self.seen)
            self.seen.append(t)
        storage = torch.storage.TypedStorage(wrap_storage=untyped, dtype=t.dtype, _internal=True)
        storage._fake_device = _CpuTag()
        return (torch._utils._rebuild_tensor_v2,
                (storage, t.storage_offset(), tuple(t.size()), t.stride(), False, OrderedDict()))


class _Records:
    """The zip writer _save talks to: each skipped storage record is written from ``fill``."""

    def __init__(self, writer, seen: List[torch.Tensor], fill: Callable[[torch.Tensor], torch.Tensor]):
        self.writer, self.seen, self.fill = writer, seen, fill

    def write_record(self, name, data, size):
        self.writer.write_record(name, data, size)

    def write_record_metadata(self, name: str, size: int) -> None:
        planned = self.seen[int(name.rsplit("/", 1)[1])]
        tls = torch.serialization._serialization_tls
        tls.skip_data = False  # skip_data also empties torch.load's tensors (a DCP read inside fill)
        try:
            value = self.fill(planned)
        finally:
            tls.skip_data = True
        storage = value.untyped_storage()
        if (storage.nbytes() != size or value.dtype != planned.dtype or value.shape != planned.shape
                or value.stride() != planned.stride() or value.storage_offset() != planned.storage_offset()):
            raise CheckpointError(f"{name}: the value computed ({value.dtype} {tuple(value.shape)}, storage "
                                  f"{storage.nbytes()} bytes) is not the tensor planned ({planned.dtype} "
                                  f"{tuple(planned.shape)}, {size} bytes)")
        self.writer.write_record(name, storage, size)


def plannable(t: torch.Tensor) -> bool:
    """Tensors torch pickles through ``_rebuild_tensor_v2`` (the others: uint16..., float8, bits)."""
    return t.dtype not in torch.storage._new_dtypes()


def save_streamed(obj, file: str, fill: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """torch.save ``obj`` (plain containers of meta tensors and plain values) to ``file``; each
    storage's bytes come from ``fill(meta tensor)``, a real CPU tensor with that tensor's dtype,
    shape, stride and offset whose storage holds the whole record, asked for once per storage in
    the order torch writes them."""
    seen: List[torch.Tensor] = []
    keys: Dict[int, int] = {}

    def plan(x):
        """x with its meta tensors planned; every object kept once (the pickle's memo sees the
        same sharing as in ``obj``), a container holding no tensor kept as it is."""
        if id(x) in memo:
            return memo[id(x)]
        if isinstance(x, torch.Tensor):
            if not x.is_meta or not plannable(x):
                raise CheckpointError(f"save_streamed plans meta tensors of torch's v2 dtypes; got {x.dtype} "
                                      f"on {x.device}")
            out = _Planned(x, seen, keys)
        elif isinstance(x, dict):
            items = [(k, plan(v)) for k, v in x.items()]
            out = x if all(v is x[k] for k, v in items) else type(x)(items)
        elif isinstance(x, (list, tuple)):
            items = [plan(v) for v in x]
            out = x if all(a is b for a, b in zip(items, x)) else type(x)(items)
        else:
            out = x
        memo[id(x)] = out
        keep.append(x)  # ids stay unique while the plan is made
        return out

    memo: Dict[int, object] = {}
    keep: list = []
    planned = plan(obj)
    with torch.serialization.skip_data(), torch.serialization._open_zipfile_writer(file) as writer:
        torch.serialization._save(planned, _Records(writer, seen, fill), pickle, torch.serialization.DEFAULT_PROTOCOL,
                                  False)
