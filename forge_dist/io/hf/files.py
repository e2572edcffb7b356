"""A transformers model directory on disk: config.json, generation_config.json and the weights in
safetensors, one ``model.safetensors`` or, past ``max_shard_bytes``, shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` (transformers' names,
so ``from_pretrained`` reads either). Reading accepts only safetensors: a pickle checkpoint
(``pytorch_model.bin``) is refused, since unpickling can run arbitrary code.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Tuple, Union

import torch

from forge_dist.errors import CheckpointError
from forge_dist.atomic import atomic_directory

CONFIG_NAME = "config.json"
GENERATION_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
MAX_SHARD_BYTES = 5 * 1024 ** 3  # transformers' default max_shard_size ("5GB")


def is_hf_directory(path: str) -> bool:
    """A directory whose config.json has ``model_type`` and no forge_dist ``format``."""
    file = os.path.join(path, CONFIG_NAME)
    if not (os.path.isdir(path) and os.path.isfile(file)):
        return False
    try:
        with open(file, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "format" not in meta


def _json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _shards(sizes: Dict[str, int], max_bytes: int) -> List[List[str]]:
    """Names in order, a new shard whenever the next tensor's bytes would pass ``max_bytes``."""
    shards, size = [[]], 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _shard_name(i: int, n: int) -> str:
    return WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _write_rest(tmp: str, config: dict, generation: dict, sizes: Dict[str, int], shards: List[List[str]],
                extra_files: Dict[str, Union[str, bytes]]) -> None:
    """Everything but the weights: the shard index (several shards), config, generation, tokenizer."""
    if len(shards) > 1:
        weight_map = {k: _shard_name(i, len(shards)) for i, shard in enumerate(shards) for k in shard}
        _json(os.path.join(tmp, INDEX_NAME), {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    _json(os.path.join(tmp, CONFIG_NAME), config)
    _json(os.path.join(tmp, GENERATION_NAME), generation)
    for name, content in extra_files.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8"))


def write_directory(path: str, config: dict, generation: dict, tensors: Dict[str, torch.Tensor],
                    extra_files: Dict[str, Union[str, bytes]], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write the whole directory atomically (an earlier transformers directory there is replaced;
    anything else is refused). ``extra_files``: name -> text or bytes (the tokenizer's files)."""
    from safetensors.torch import save_file

    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    with atomic_directory(path, may_replace=is_hf_directory) as tmp:
        shards = _shards(sizes, max_shard_bytes)
        for i, shard in enumerate(shards):
            save_file({k: tensors[k] for k in shard}, os.path.join(tmp, _shard_name(i, len(shards))),
                      metadata={"format": "pt"})
        _write_rest(tmp, config, generation, sizes, shards, extra_files)


def write_directory_streamed(path: str, config: dict, generation: dict,
                             entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], value,
                             extra_files: Dict[str, Union[str, bytes]], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """write_directory with the tensors given as ``entries`` ({name: (dtype, shape)}, in order) and
    ``value(name)``, asked for one at a time while each shard is written header first
    (io/deepspeed_stream.py write_safetensors): the same files, never the whole model in memory."""
    from forge_dist.io.deepspeed_stream import write_safetensors

    sizes = {k: math.prod(shape) * torch.empty((), dtype=dtype).element_size() for k, (dtype, shape) in entries.items()}
    with atomic_directory(path, may_replace=is_hf_directory) as tmp:
        shards = _shards(sizes, max_shard_bytes)
        for i, shard in enumerate(shards):
            write_safetensors(os.path.join(tmp, _shard_name(i, len(shards))), {k: entries[k] for k in shard},
                              value, {"format": "pt"})
        _write_rest(tmp, config, generation, sizes, shards, extra_files)


def read_config(path: str) -> dict:
    from forge_dist.io.forge_format import read_json

    hf = read_json(path, CONFIG_NAME, "a transformers model directory")
    if not isinstance(hf, dict):
        raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)} is not a transformers config (expected a JSON object)")
    return hf


def weight_files(path: str) -> List[str]:
    """The directory's safetensors file(s); a pickle-only checkpoint is refused."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index, "r", encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index: {e}") from None
        files = [os.path.join(path, n) for n in sorted(set(weight_map.values()))]
        for f in files:
            if os.path.dirname(os.path.abspath(f)) != os.path.abspath(path):
                raise CheckpointError(f"{index} names a shard outside its directory: {f}")
    else:
        pickled = [n for n in PICKLE_NAMES if os.path.exists(os.path.join(path, n))]
        if pickled:
            raise CheckpointError(
                f"{path} holds its weights only as {pickled[0]}, a pickle checkpoint: forge_dist refuses it "
                f"because unpickling can run arbitrary code. In a trusted session convert it to safetensors "
                f"(transformers: model.save_pretrained(dir, safe_serialization=True)) and import that")
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME} or {INDEX_NAME}")
    return files


def open_tensors(path: str) -> Dict[str, object]:
    """{tensor name: its open safetensors file} (io/safetensors_file.py: the header only; a tensor
    or a block of it is read when asked for, io/hf/slices.py; close them after use)."""
    from forge_dist.io.safetensors_file import SafetensorsFile

    handles = {}
    for file in weight_files(path):
        try:
            f = SafetensorsFile(file)
        except (OSError, ValueError) as e:
            close_tensors(handles)
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
        handles.update({k: f for k in f.keys()})
    return handles


def close_tensors(handles: Dict[str, object]) -> None:
    """Close every file of an open_tensors answer."""
    for f in {id(f): f for f in handles.values()}.values():
        f.close()


def read_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors file(s), read whole."""
    handles = open_tensors(path)
    try:
        return {k: f.get_tensor(k) for k, f in handles.items()}
    finally:
        close_tensors(handles)


def read_directory(path: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    return read_config(path), read_tensors(path)
