"""forge_dist's checkpoint: a directory with ``model.safetensors`` and ``config.json``.

model.safetensors   the plain (unsharded) model's state dict under its logical names, every tensor
                    once; metadata ``forge_dist.aliases`` (JSON {alias: stored name}) lists the other
                    names of tied and cross-layer-shared tensors, re-tied on load.
(or dcp/)          a sharded training checkpoint's weights instead (io/sharded_read.py)
config.json         {"format": "forge_dist", "format_version": 1, "model_config": ModelConfig.to_dict(),
                     "training": {...}}; ``training`` (optional) keeps iter_num, best_val_loss and
                    an imported ReaLLM-Forge run's ``config``, so conversions round-trip them.

Safetensors holds tensors only, so loading runs no code. The directory is written atomically.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

from forge_dist.config.loading import model_config_from_dict
from forge_dist.config.model_config import ModelConfig
from forge_dist.errors import CheckpointError
from forge_dist.atomic import atomic_directory
from forge_dist.io.state import dedupe, expand_aliases, load_state

FORMAT = "forge_dist"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ALIASES_KEY = "forge_dist.aliases"


def is_forge_checkpoint(path: str) -> bool:
    config = os.path.join(path, CONFIG_NAME)
    if not (os.path.isdir(path) and os.path.isfile(config)):
        return False
    try:
        with open(config, "r", encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_pretrained(model, path: str, training: Optional[dict] = None) -> None:
    """Write ``model`` (a single-device GPT) to the directory ``path``, atomically.

    An existing forge_dist checkpoint at ``path`` is replaced; any other existing content is refused.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors, aliases = dedupe(model.state_dict())
    with atomic_directory(path, may_replace=is_forge_checkpoint) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME),
                  metadata={"format": "pt", ALIASES_KEY: json.dumps(aliases, sort_keys=True)})
        save_config(model.config, tmp, training)


def save_config(config: ModelConfig, path: str, training: Optional[dict] = None) -> None:
    """``path/config.json`` (also the config of a sharded checkpoint's model/, whose weights are
    in model/dcp: io/sharded_read.py)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": config.to_dict()}
    if training:
        meta["training"] = training
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str, name: str, what: str):
    """The JSON value of ``path/name``; CheckpointError saying ``path`` is not ``what`` when the
    file is missing, and naming the file when it is not JSON."""
    file = os.path.join(path, name)
    try:
        with open(file, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not {what}: {name} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def read_config(path: str) -> Tuple[ModelConfig, dict]:
    """(ModelConfig, training info) from a checkpoint directory's config.json."""
    file = os.path.join(path, CONFIG_NAME)
    meta = read_json(path, CONFIG_NAME, "a forge_dist checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model_config" not in meta:
        raise CheckpointError(f"{file} is not a forge_dist checkpoint config (expected \"format\": "
                              f"\"{FORMAT}\" and a \"model_config\" section)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{file} has format_version {version!r}; this forge_dist reads versions up "
                              f"to {FORMAT_VERSION}: upgrade forge_dist to load it")
    return model_config_from_dict(meta["model_config"], source=file), meta.get("training") or {}


def read_weights(path: str) -> dict:
    """The full state dict (aliases expanded) from a checkpoint directory."""
    from forge_dist.io.safetensors_file import SafetensorsFile

    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} is not a forge_dist checkpoint: {WEIGHTS_NAME} is missing")
    try:
        with SafetensorsFile(file) as f:  # read into fresh memory, no mapped pages left resident
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
    return expand_aliases(tensors, aliases, file)


def load_pretrained(path: str):
    """(GPT, training info) from our checkpoint directory; the model is in train mode."""
    from forge_dist.model.gpt import GPT

    from forge_dist.io.sharded_read import is_sharded_model_dir, load_sharded_weights

    path = os.fspath(path)
    cfg, training = read_config(path)
    if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)) and is_sharded_model_dir(path):
        model = GPT(cfg)  # a sharded training checkpoint's model/: streamed tensor by tensor
        load_sharded_weights(model, path)
        return model, training
    state = read_weights(path)
    model = GPT(cfg)
    load_state(model, state, os.path.join(path, WEIGHTS_NAME))
    return model, training
