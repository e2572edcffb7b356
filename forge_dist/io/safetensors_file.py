"""A safetensors file read block by block with ``os.preadv``, never memory-mapped.

safetensors' own ``safe_open(...).get_slice`` reads through an mmap of the whole file, and every
page it touches counts in the process's resident memory (file-backed) until the map goes: a
ZeRO-3 rank reading its partitions of a checkpoint kept about 66 MB of checkpoint pages resident
(docs/BENCHMARKS.md, prev_run). Here a block is copied straight from the file into a fresh tensor,
so resident memory grows by the block only. The format (https://github.com/huggingface/safetensors):
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__"},
then the data, row-major, little-endian, offsets relative to the end of the header.

    with SafetensorsFile(path) as f:      # the same calls as safe_open(path, "pt") uses here
        f.keys(); f.metadata()
        f.get_slice(name).get_shape(); f.get_slice(name)[0:4, 8:16]; f.get_tensor(name)

A block of rows is one contiguous byte range (one read); a column block is read row by row into
the result, or, when its rows are short, through a bounded scratch buffer of whole rows (CHUNK).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import struct
from typing import Dict, List, Optional, Tuple

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)

CHUNK = 4 << 20  # bytes of whole rows read at once for a block of short rows (the scratch's bound)
SHORT = 64 << 10  # a row piece below this many bytes is read through the scratch, not one call each
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class SafetensorsFile:
    """The header parsed at open; tensors and blocks read on demand into fresh memory. Raises
    ValueError on a malformed file (callers turn it into CheckpointError naming the file)."""

    _fd: Optional[int] = None  # set first thing: __del__ of a failed open finds it

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._parse_header()
        except BaseException:
            self.close()
            raise

    def _parse_header(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise ValueError("file shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise ValueError(f"header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(self._pread_exact(n, 8).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        self._metadata = header.pop("__metadata__", None)
        if self._metadata is not None and not (isinstance(self._metadata, dict) and all(
                isinstance(v, str) for v in self._metadata.values())):
            raise ValueError("__metadata__ is not a map of strings to strings")
        self._data_start = 8 + n
        self._entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...], int]] = {}
        for name, e in header.items():
            try:
                dtype, shape = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"tensor {name!r} has a bad header entry {e!r}") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if any(s < 0 for s in shape) or end - begin != nbytes or begin < 0 or self._data_start + end > size:
                raise ValueError(f"tensor {name!r}: data_offsets {[begin, end]} do not hold its {nbytes} "
                                 f"bytes inside the file")
            self._entries[name] = (dtype, shape, self._data_start + begin)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def keys(self) -> List[str]:
        return list(self._entries)

    def metadata(self) -> Optional[Dict[str, str]]:
        return self._metadata

    def get_slice(self, name: str) -> "TensorSlice":
        if name not in self._entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return TensorSlice(self, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_slice(name)[()]

    def _pread_exact(self, n: int, offset: int) -> bytes:
        out = bytearray(n)
        self._preadv_into(memoryview(out), offset)
        return bytes(out)

    def _preadv_into(self, buf: memoryview, offset: int) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [buf[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"{self.path} ends before byte {offset + len(buf)}")
            done += got

    def read_block(self, name: str, index) -> torch.Tensor:
        """Block ``index`` (slices with step 1, one per leading dimension) of tensor ``name``."""
        dtype, shape, base = self._entries[name]
        ranges = _ranges(index, shape, name)
        sizes = [b - a for a, b in ranges]
        es = dtype.itemsize
        out = torch.empty(math.prod(sizes) * es, dtype=torch.uint8)
        partial = [d for d, (a, b) in enumerate(ranges) if b - a != shape[d]]
        if not partial:  # the whole tensor: one range
            self._preadv_into(memoryview(out.numpy()), base)
        elif out.numel():
            d = partial[-1]  # dims after d are whole: each run spans them
            inner = math.prod(shape[d + 1:]) * es
            length, stride = sizes[d] * inner, shape[d] * inner  # a run's bytes; the step between runs
            row_dim = d - 1  # the runs of consecutive rows along it are read together
            count = sizes[row_dim] if d > 0 else 1
            runs = out.view(-1, count, length)
            strides = [math.prod(shape[i + 1:]) * es for i in range(len(shape))]
            outer = itertools.product(*(range(a, b) for a, b in ranges[:max(row_dim, 0)]))
            for k, pos in enumerate(outer):
                first = base + sum(p * s for p, s in zip(pos, strides)) + ranges[d][0] * inner
                if d > 0:
                    first += ranges[row_dim][0] * strides[row_dim]
                self._read_runs(runs[k], first, stride, length)
        return out.view(dtype).reshape(sizes)

    def _read_runs(self, rows: torch.Tensor, first: int, stride: int, length: int) -> None:
        """Fill ``rows`` (count, length bytes) from runs at ``first + i * stride``."""
        count = rows.shape[0]
        if count == 1 or length >= SHORT or stride > CHUNK:
            flat = rows.numpy()
            for i in range(count):
                self._preadv_into(memoryview(flat[i]), first + i * stride)
            return
        per = CHUNK // stride
        scratch = torch.empty(per * stride, dtype=torch.uint8)
        for i in range(0, count, per):
            k = min(per, count - i)
            self._preadv_into(memoryview(scratch.numpy())[:(k - 1) * stride + length], first + i * stride)
            rows[i:i + k].copy_(scratch.view(per, stride)[:k, :length])


class TensorSlice:
    """What ``get_slice`` returns: the shape from the header, and blocks read when indexed."""

    def __init__(self, file: SafetensorsFile, name: str):
        self._file, self._name = file, name

    def get_shape(self) -> List[int]:
        return list(self._file._entries[self._name][1])

    def get_dtype(self) -> torch.dtype:
        return self._file._entries[self._name][0]

    def __getitem__(self, index) -> torch.Tensor:
        return self._file.read_block(self._name, index)


def _ranges(index, shape: Tuple[int, ...], name: str) -> List[Tuple[int, int]]:
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape):
        raise IndexError(f"{len(index)} indices for {name!r} of shape {list(shape)}")
    out = []
    for d, n in enumerate(shape):
        s = index[d] if d < len(index) else slice(None)
        if not isinstance(s, slice):
            raise IndexError(f"{name!r}: only slices are read block by block, got {s!r}")
        a, b, step = s.indices(n)
        if step != 1:
            raise IndexError(f"{name!r}: slice step {step} (only contiguous blocks are read)")
        out.append((a, max(a, b)))
    return out
