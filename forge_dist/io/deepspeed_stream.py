"""DeepSpeed checkpoints converted one logical tensor at a time.

``consolidate`` (deepspeed_ckpt.py) hands the whole model to the caller; a model larger than the
converting machine's memory needs the opposite: every ``*.pt`` file is opened memory-mapped
(``torch.load(mmap=True, weights_only=True)`` through the allow-list of deepspeed_safe.py), and a
tensor is assembled only when it is asked for, from

- ZeRO-1/2: ``single_partition_of_fp32_groups``, one flat fp32 partition per data-parallel rank
  and parameter group; the group's parameters lie back to back (``param_shapes`` order) in the
  concatenation of the ranks' partitions, with ``param_alignment_paddings`` between them when the
  file has them;
- ZeRO-3: ``fp32_flat_groups``, where each parameter owns ceil(numel / dp) elements of every
  rank's flat groups (their concatenation), the last rank's share zero-padded;
- stage 0 and pipeline layer files: the saved module's tensors;

then its tensor-parallel shards are joined (``unshard``). ``DeepSpeedReader.tensor(name)`` returns
a fresh fp32 tensor the caller drops before asking for the next, so the peak is one logical tensor
(and its pieces) plus page cache. io/stream_export.py writes every target that way (``deepspeed_source``;
--to forge through ``write_safetensors``, in the exact bytes safetensors' ``save_file`` gives).
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from forge_dist.errors import CheckpointError
from forge_dist.io import deepspeed_ckpt as ds
from forge_dist.io.deepspeed_safe import safe_load


def _mmap(file: str):
    try:
        return safe_load(file, mmap=True)
    except CheckpointError:
        raise  # refused: it holds code
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {file}: {' '.join(str(e).split())}") from None


def _span(flats: List[torch.Tensor], start: int, length: int) -> List[torch.Tensor]:
    """Views covering elements [start, start + length) of the concatenation of ``flats``."""
    pieces, base = [], 0
    for flat in flats:
        n = flat.numel()
        lo, hi = max(start, base), min(start + length, base + n)
        if lo < hi:
            pieces.append(flat.narrow(0, lo - base, hi - lo))
        base += n
    if sum(p.numel() for p in pieces) != length:
        raise CheckpointError(f"ZeRO partitions end before element {start + length}: a partition file is "
                              f"truncated or from another run")
    return pieces


class ZeroPartitions:
    """One model-parallel rank's fp32 master weights in its ZeRO-1/2/3 partition files, mapped."""

    def __init__(self, tag_dir: str, mp_rank: int):
        mine = f"mp_rank_{mp_rank:02d}"
        files = glob.glob(os.path.join(tag_dir, f"*zero_pp_rank_*_{mine}_optim_states.pt"))
        files.sort(key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1)))
        if not files:
            raise CheckpointError(f"{tag_dir} has no *_{mine}_optim_states.pt (ZeRO partitions of "
                                  f"model-parallel rank {mp_rank})")
        states = [_mmap(f)["optimizer_state_dict"] for f in files]
        first = states[0]
        self.stage = int(first["zero_stage"])
        count = first["partition_count"]
        world = max(count) if isinstance(count, (list, tuple)) else int(count)
        if world != len(files):
            raise CheckpointError(f"{tag_dir}: the partitions say {world} data-parallel ranks, but "
                                  f"{len(files)} *_{mine}_optim_states.pt files are there")
        key = "single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"
        self.flats = [list(s[key]) for s in states]  # [dp rank][param group]: 1-D fp32, mapped
        self.world = world
        model_file = os.path.join(tag_dir, f"{mine}_model_states.pt" if self.stage <= 2
                                  else f"zero_pp_rank_0_{mine}_model_states.pt")
        model = _mmap(model_file)
        if model.get("frozen_param_shapes"):
            raise CheckpointError(f"{model_file} has frozen parameters, which forge-train never saves; "
                                  f"convert it with DeepSpeed's zero_to_fp32")
        self.buffers = OrderedDict((k, v) for k, v in model["module"].items() if k in model["buffer_names"])
        self.shared = dict(model.get("shared_params") or {})
        self.where: "OrderedDict[str, Tuple[torch.Size, Optional[int], int]]" = OrderedDict()
        if self.stage <= 2:
            self._index_zero12(model["param_shapes"], first.get("param_alignment_paddings"))
        else:
            self._index_zero3(model["param_shapes"])

    def _index_zero12(self, param_shapes, paddings) -> None:
        for g, shapes in enumerate(param_shapes):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                self.where[name] = (torch.Size(shape), g, offset)
                offset += math.prod(shape) + (paddings[g][i] if paddings is not None else 0)
            if offset > sum(f[g].numel() for f in self.flats):
                raise CheckpointError(f"parameter group {g} needs {offset} elements, more than its partitions hold")

    def _index_zero3(self, param_shapes) -> None:
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                self.where[name] = (torch.Size(shape), None, offset)
                offset += math.ceil(math.prod(shape) / self.world)
        if offset != sum(f.numel() for f in self.flats[0]):
            raise CheckpointError(f"the ZeRO-3 partitions hold {sum(f.numel() for f in self.flats[0])} elements "
                                  f"per rank, the parameters need {offset}")

    def keys(self) -> List[str]:
        return [*self.buffers, *self.where, *self.shared]

    def __contains__(self, name: str) -> bool:
        return name in self.buffers or name in self.where or name in self.shared

    def __getitem__(self, name: str) -> torch.Tensor:
        name = self.shared.get(name, name)
        if name in self.buffers:
            return self.buffers[name].clone()
        shape, group, offset = self.where[name]
        n = shape.numel()
        if group is not None:  # ZeRO-1/2: back to back in the concatenated partitions of the group
            pieces = _span([ranks[group] for ranks in self.flats], offset, n)
        else:  # ZeRO-3: ceil(n / dp) elements of every rank's flat groups
            share = math.ceil(n / self.world)
            pieces = [p for ranks in self.flats for p in _span(ranks, offset, share)]
        full = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        return full[:n].view(shape)


class _Mapped:
    """Stage 0 / pipeline: the saved module's tensors (mapped), copied when asked for."""

    def __init__(self, state):
        self.state = state

    def keys(self):
        return list(self.state.keys())

    def __contains__(self, name):
        return name in self.state

    def __getitem__(self, name):
        return self.state[name].clone()


class DeepSpeedReader:
    """The logical fp32 tensors of a DeepSpeed checkpoint, one at a time: ``names`` (tied
    names once, in consolidate's order), ``aliases``, ``config``, ``meta``, ``tensor(name)``."""

    def __init__(self, path: str, tag: Optional[str] = None):
        ds_dir, tag_dir, self.meta = ds.resolve(path, tag)
        layout = self.meta["layout"]
        tp, n_ranks = layout["tp_size"], layout["tp_size"] * layout["pp_size"]
        zero, self.pipeline = layout["zero_stage"] > 0, layout.get("pp_size", 1) > 1
        if self.pipeline:
            self.ranks = [_Mapped(ds.pipeline_states(tag_dir, tp, mmap=True))]
        elif zero:
            self.ranks = [ZeroPartitions(tag_dir, t) for t in range(n_ranks)]
        else:
            self.ranks = [_Mapped(s) for s in ds.module_states(tag_dir, n_ranks, mmap=True)]
        self.tag_dir = tag_dir
        # stage 0 in bf16, pipeline under TP: the (small) logical copy of the fp32 masters, as consolidate
        self.masters: Dict[str, torch.Tensor] = {}
        if (self.pipeline or not zero) and (layout["precision"] != "fp32" or (self.pipeline and tp > 1)):
            self.masters = ds.logical_masters(ds_dir, layout["precision"])
        self.aliases: Dict[str, str] = self.meta.get("aliases", {})
        names = [n for n in self.ranks[0].keys() if n not in self.aliases]
        self.names = names + [n for n in self.masters if n not in names]
        self.config = ds.model_config(self.meta, ds_dir)

    def tensor(self, name: str) -> torch.Tensor:
        """The logical fp32 value of ``name`` (an alias reads its stored name), freshly allocated."""
        from forge_dist.parallel.tensor.metadata import unshard

        name = self.aliases.get(name, name)
        if name in self.masters:
            return self.masters[name].clone()
        missing = [i for i, r in enumerate(self.ranks) if name not in r]
        if missing:
            raise CheckpointError(f"{self.tag_dir}: model-parallel rank {missing[0]} has no {name}")
        info = ds.shard_info(self.meta["shards"].get(name))
        if info is None or info.dim is None or self.pipeline:
            return self.ranks[0][name]
        return unshard([r[name] for r in self.ranks], info)

    def items(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.tensor(name)


# --- a safetensors file written tensor by tensor ----------------------------------------------------
# safetensors' own order: dtypes by their rank in its Dtype enum, largest first, then names
_ST_DTYPES = OrderedDict([(torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"),
                          (torch.float8_e5m2, "F8_E5M2"), (torch.float8_e4m3fn, "F8_E4M3"),
                          (torch.int16, "I16"), (torch.float16, "F16"), (torch.bfloat16, "BF16"),
                          (torch.int32, "I32"), (torch.float32, "F32"), (torch.complex64, "C64"),
                          (torch.float64, "F64"), (torch.int64, "I64")])
_ST_RANK = {d: i for i, d in enumerate(_ST_DTYPES)}


def write_safetensors(file: str, entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]],
                      value: Callable[[str], torch.Tensor], metadata: Dict[str, str]) -> None:
    """A safetensors file of ``entries`` ({name: (dtype, shape)}): the header first, then each
    tensor's bytes from ``value(name)``, which is dropped before the next one is asked for."""
    unknown = sorted({str(d) for d, _ in entries.values() if d not in _ST_RANK})
    if unknown:
        raise CheckpointError(f"{file}: safetensors cannot hold dtype(s) {unknown}; "
                              f"valid: {[str(d) for d in _ST_DTYPES]}")
    order = sorted(entries, key=lambda n: (-_ST_RANK[entries[n][0]], n))
    header: "OrderedDict[str, object]" = OrderedDict([("__metadata__", dict(sorted(metadata.items())))])
    offset = 0
    for name in order:
        dtype, shape = entries[name]
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            t = value(name)
            if t.dtype != entries[name][0] or tuple(t.shape) != tuple(entries[name][1]):
                raise CheckpointError(f"{name}: got {t.dtype} {tuple(t.shape)}, expected {entries[name]}")
            fh.write(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))  # no copy of the bytes
            del t


def iter_num(reader: "DeepSpeedReader", tag: Optional[str] = None):
    """The iteration of the checkpoint ``reader`` reads: its global_stepN tag, as load_deepspeed."""
    steps = re.fullmatch(r"global_step(\d+)", tag or reader.meta["tag"])
    return int(steps.group(1)) if steps else reader.meta.get("global_steps")
