"""Atomic, verified training checkpoints.

Layout under ``out_dir/checkpoints/``::

    iter_0000020/   model/                            weights: model.safetensors + config.json
                                                      (forge_dist.io format; from_pretrained reads it)
                    optimizer.json/.safetensors       engine state (optimizer, grad scaler)
                    trainer_state.json/.safetensors   iteration, best val loss, loader, RNG, config
                    manifest.json                     sha256 of every file above, written last
    latest          name of the newest complete checkpoint (updated after the rename)
    best            name of the checkpoint with the best validation loss

A checkpoint is written into ``.tmp-<name>``, every file fsynced, then renamed into place; only
then do the pointers move. A crash at any point leaves the previous checkpoint and pointers as
they were; a leftover ``.tmp-*`` directory is ignored and replaced by the next save. Loading
verifies every checksum first, so a corrupt or truncated checkpoint is reported, never loaded.
All ranks call ``save_checkpoint`` together: each may write its own engine files (e.g. ZeRO
shards) into the temporary directory; ``engine.full_state_dict()`` (a collective) gives the
logical full weights, which rank 0 writes as model/ whatever the parallel layout (so any layout
loads any other); rank 0 writes the rest, the manifest and the pointers.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
from typing import List, Optional

import numpy as np
import torch

from forge_dist.io.checkpoint_read import (  # noqa: F401  (the reading half, re-exported)
    FORMAT, MANIFEST, MODEL_DIR, POINTERS, ROOT, _sha256, checkpoint_name, find_training_checkpoint, is_checkpoint,
    list_checkpoints, load_trainer_state, load_weights, read_config, read_pointer, resolve_checkpoint, seal,
    verify_checkpoint)
from forge_dist.io.statefile import save_state


# --- weights --------------------------------------------------------------------------------------
class _LogicalWeights:
    """What save_pretrained reads from a model (config and state_dict), for weights gathered from
    a sharded model: the file is the one a single process writes, whatever the layout."""

    def __init__(self, config, state: dict):
        self.config, self._state = config, state

    def state_dict(self) -> dict:
        return self._state


def save_weights(model, directory: str, training: Optional[dict] = None, state: Optional[dict] = None) -> None:
    """``directory/model``: a forge_dist checkpoint directory that from_pretrained reads as is.
    ``state``: the logical full state dict to write instead of ``model.state_dict()`` (a sharded
    model's gathered weights)."""
    from forge_dist.io import save_pretrained

    source = model if state is None else _LogicalWeights(model.config, state)
    save_pretrained(source, os.path.join(directory, MODEL_DIR), training=training)


# --- files ----------------------------------------------------------------------------------------
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: str) -> List[str]:
    out = []
    for base, _, names in os.walk(directory):
        out += [os.path.relpath(os.path.join(base, n), directory) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def _write_pointer(root: str, pointer: str, name: str) -> None:
    tmp = os.path.join(root, f".{pointer}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(root, pointer))


# --- save -----------------------------------------------------------------------------------------
def save_checkpoint(root: str, iteration: int, model, engine, trainer_state: dict, ctx,
                    keep: int = 2, is_best: bool = False) -> str:
    name = checkpoint_name(iteration)
    tmp, final = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    ctx.barrier()
    engine.save_state(tmp, ctx)
    full = gathered_weights(engine, ctx)  # collective
    if ctx.is_main:
        save_weights(model, tmp, weights_training_info(iteration, trainer_state), state=full)
        save_state(trainer_state, tmp, "trainer_state")
    ctx.barrier()
    if ctx.is_main:
        _commit(root, tmp, final, name, iteration, is_best, keep)
    ctx.barrier()
    return final


def gathered_weights(engine, ctx) -> Optional[dict]:
    """The logical full weights for rank 0 to write (collective). ``keep`` is rank 0's only:
    DeepSpeed's engines gather tensor by tensor, so the other ranks hold one full parameter at a
    time, never the model (the native engines ignore it)."""
    return engine.full_state_dict(keep=ctx.is_main) if hasattr(engine, "full_state_dict") else None


def weights_training_info(iteration: int, trainer_state: dict) -> dict:
    """What model/config.json carries about the run (so model/ samples and evaluates on its own)."""
    best = trainer_state.get("best_val_loss")
    return {"iter_num": iteration, "best_val_loss": best if best is not None and math.isfinite(best) else None,
            "tokenizer": trainer_state.get("tokenizer"), "data_dir": trainer_state.get("data_dir")}


def _commit(root, tmp, final, name, iteration, is_best, keep, known: Optional[dict] = None,
            extra: Optional[dict] = None) -> None:
    """Seal and publish ``tmp`` (rank 0). ``known``: sha256 of files other ranks wrote, hashed and
    fsynced by them (a sharded checkpoint's shards); the rest are fsynced and hashed here."""
    known = known or {}
    files = sorted(set(_files(tmp)) | set(known))
    for f in files:
        if f not in known:
            _fsync(os.path.join(tmp, f))
    manifest = seal({"format": FORMAT, "version": 1, "iteration": iteration, **(extra or {}),
                     "files": {f: known.get(f) or _sha256(os.path.join(tmp, f)) for f in files}})
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    trash = os.path.join(root, f".trash-{name}")
    if os.path.exists(final):  # the same iteration saved again (e.g. after a resume)
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
    os.rename(tmp, final)
    _fsync(root)
    _write_pointer(root, "latest", name)
    if is_best:
        _write_pointer(root, "best", name)
    _fsync(root)
    shutil.rmtree(trash, ignore_errors=True)
    _prune(root, keep)


def _prune(root: str, keep: int) -> None:
    protected = {read_pointer(root, p) for p in POINTERS}
    names = list_checkpoints(root)
    for name in names[:-keep] if keep > 0 else names:
        if name not in protected:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# --- RNG ------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
