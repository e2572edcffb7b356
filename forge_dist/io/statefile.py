"""Nested training state (optimizer, scaler, RNG, loader) stored without pickle.

``save_state(obj, dir, name)`` writes ``name.json`` (the structure, numbers, strings) and
``name.safetensors`` (every tensor and numpy array, by reference), so loading a checkpoint never
executes code. Tuples, dicts with non-string keys (the optimizer's ``state`` is keyed by int),
numpy arrays and infinities survive the round trip exactly.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from forge_dist.errors import CheckpointError


def _encode(obj, tensors: Dict[str, torch.Tensor]):
    if torch.is_tensor(obj):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        stored = obj.astype(np.int64) if obj.dtype.kind in "iu" else obj  # e.g. numpy's uint32 RNG key
        tensors[key] = torch.from_numpy(np.ascontiguousarray(stored))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _decode(obj, tensors: Dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(obj: Any, directory: str, name: str) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors)
    save_file(tensors, os.path.join(directory, f"{name}.safetensors"))
    with open(os.path.join(directory, f"{name}.json"), "w", encoding="utf-8") as fh:
        json.dump(structure, fh)


def load_state(directory: str, name: str, map_location: str = "cpu") -> Any:
    from safetensors import SafetensorError  # a corrupt header: not an OSError or ValueError

    try:
        tensors = load_file(os.path.join(directory, f"{name}.safetensors"), device=map_location)
        with open(os.path.join(directory, f"{name}.json"), encoding="utf-8") as fh:
            structure = json.load(fh)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {name} state in {directory}: {e}") from None
    return _decode(structure, tensors)
