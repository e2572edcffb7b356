"""torch.distributed.checkpoint (DCP) storage without pickle.

DCP's FileSystemWriter stores the global metadata (logical names, shapes, dtypes, which chunk of
which tensor lies at which byte range of which file) with ``pickle``, and its reader unpickles it.
Here the same Metadata is written as JSON (``.metadata.json``) and read back without executing
anything; the tensor data files are DCP's own (one ``__<rank>_<n>.distcp`` per writing rank, each
chunk a ``torch.save``'d tensor that DCP reads with ``torch.load(weights_only=True)``). Only tensor
entries are supported: everything else of a checkpoint is JSON/safetensors (train/statefile.py).

    dcp.save(state, storage_writer=JsonMetadataWriter(path), planner=ShardPlanner.save())
    dcp.load(state, storage_reader=JsonMetadataReader(path), planner=ShardPlanner.load())
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Dict, List

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                   TensorProperties, TensorStorageMetadata)

from forge_dist.errors import CheckpointError

METADATA_NAME = ".metadata.json"
FORMAT = "forge_dist.dcp"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in a sharded checkpoint's metadata")
    return value


def metadata_to_json(md: Metadata) -> dict:
    tensors = {}
    for fqn, entry in md.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{fqn}: only tensors go into a sharded checkpoint (not {type(entry).__name__})")
        tensors[fqn] = {"dtype": _dtype_name(entry.properties.dtype), "size": list(entry.size),
                        "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in entry.chunks]}
    storage = [{"fqn": idx.fqn, "offset": list(idx.offset or ()), "file": info.relative_path,
                "byte_offset": info.offset, "length": info.length}
               for idx, info in md.storage_data.items()]
    return {"format": FORMAT, "version": 1, "dcp_version": md.version, "tensors": tensors, "storage": storage}


def metadata_from_json(data: dict, source: str) -> Metadata:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a forge_dist sharded checkpoint index")
    try:
        tensors = {fqn: TensorStorageMetadata(
            properties=TensorProperties(dtype=_dtype(t["dtype"])), size=torch.Size(t["size"]),
            chunks=[ChunkStorageMetadata(torch.Size(c["offsets"]), torch.Size(c["sizes"])) for c in t["chunks"]])
            for fqn, t in data["tensors"].items()}
        storage = {MetadataIndex(s["fqn"], torch.Size(s["offset"])):
                   _StorageInfo(relative_path=s["file"], offset=int(s["byte_offset"]), length=int(s["length"]))
                   for s in data["storage"]}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source} is malformed: {e}") from None
    return Metadata(state_dict_metadata=tensors, storage_data=storage, version=data.get("dcp_version"))


class JsonMetadataWriter(FileSystemWriter):
    """DCP's file writer with the metadata as JSON (written by the coordinator, fsynced)."""

    def __init__(self, path: str, **kwargs):
        super().__init__(path, sync_files=True, **kwargs)
        self.files_written: List[str] = []  # this rank's data files, relative to path

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        self.files_written = sorted({r.storage_data.relative_path for r in future.wait()})
        return future

    def finish(self, metadata: Metadata, results) -> None:
        storage: Dict[MetadataIndex, _StorageInfo] = {}
        for per_rank in results:
            storage.update({r.index: r.storage_data for r in per_rank})
        metadata.storage_data = storage
        tmp = os.path.join(self.path, METADATA_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(metadata_to_json(metadata), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(self.path, METADATA_NAME))


class JsonMetadataReader(FileSystemReader):
    """DCP's file reader with the JSON metadata (no unpickling)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        file = os.path.join(self.path, METADATA_NAME)
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is not a sharded checkpoint: {METADATA_NAME} is missing") from None
        except ValueError as e:
            raise CheckpointError(f"{file} is not valid JSON: {e}") from None
        md = metadata_from_json(data, file)
        md.storage_meta = StorageMeta(load_id=self.load_id)
        return md


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns on every save/load of one process without torch.distributed that it assumes one
    process; that is the intent here (forge-sample, forge-convert, a one-process run)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_index(path: str) -> Metadata:
    """The metadata of a sharded checkpoint directory (logical names, shapes, chunks, files)."""
    return JsonMetadataReader(path).read_metadata()
