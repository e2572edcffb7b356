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

import hashlib
import json
import math
import os
import random
import shutil
from typing import List, Optional

import numpy as np
import torch

from forge_dist.errors import CheckpointError
from forge_dist.train.statefile import load_state, save_state

ROOT = "checkpoints"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
FORMAT = "forge_dist.train_checkpoint"
POINTERS = ("latest", "best")


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# --- weights (the only use of forge_dist.io here) -----------------------------------------------
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


def load_weights(model, directory: str) -> None:
    """Strict: every tensor present with its shape, or a CheckpointError naming the mismatch."""
    from forge_dist.io.forge_format import WEIGHTS_NAME, read_weights
    from forge_dist.io.state import load_state as load_model_state

    path = os.path.join(directory, MODEL_DIR)
    load_model_state(model, read_weights(path), os.path.join(path, WEIGHTS_NAME))


# --- files ----------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def read_pointer(root: str, pointer: str = "latest") -> Optional[str]:
    try:
        with open(os.path.join(root, pointer), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except FileNotFoundError:
        return None


def list_checkpoints(root: str) -> List[str]:
    """Complete checkpoint directories (temporary ones excluded), oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith("iter_") and os.path.isdir(os.path.join(root, n)))


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
    full = engine.full_state_dict() if hasattr(engine, "full_state_dict") else None  # collective
    if ctx.is_main:
        best = trainer_state.get("best_val_loss")
        save_weights(model, tmp, {"iter_num": iteration,
                                  "best_val_loss": best if best is not None and math.isfinite(best) else None},
                     state=full)
        save_state(trainer_state, tmp, "trainer_state")
    ctx.barrier()
    if ctx.is_main:
        _commit(root, tmp, final, name, iteration, is_best, keep)
    ctx.barrier()
    return final


def _commit(root, tmp, final, name, iteration, is_best, keep) -> None:
    files = _files(tmp)
    for f in files:
        _fsync(os.path.join(tmp, f))
    manifest = {"format": FORMAT, "version": 1, "iteration": iteration,
                "files": {f: _sha256(os.path.join(tmp, f)) for f in files}}
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


# --- locate and verify ----------------------------------------------------------------------------
def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def resolve_checkpoint(path: str, which: str = "latest") -> str:
    """A checkpoint directory from itself, a checkpoints root, or an out_dir holding one."""
    if is_checkpoint(path):
        return path
    for root in (path, os.path.join(path, ROOT)):
        name = read_pointer(root, which) if os.path.isdir(root) else None
        if name is None and which != "latest":
            name = read_pointer(root, "latest") if os.path.isdir(root) else None
        if name is not None:
            found = os.path.join(root, name)
            if not os.path.isdir(found):
                raise CheckpointError(f"{os.path.join(root, which)} points to {name}, which is missing; "
                                      f"pick another with --init_from_ckpt NAME")
            return found
        if os.path.isdir(root) and os.path.basename(os.path.normpath(root)) == ROOT:
            partial = [n for n in os.listdir(root) if n.startswith(".tmp-")]
            if partial:
                raise CheckpointError(f"{root} holds only an incomplete checkpoint ({partial[0]}, from an "
                                      f"interrupted save); start with --init_from scratch")
    raise CheckpointError(f"no checkpoint found in {path}; train one first (forge-train --out_dir {path})")


def find_training_checkpoint(path: str, which: str = "latest") -> Optional[str]:
    """The training checkpoint ``path`` names, or None when ``path`` is not one of ours (a model
    directory or a ckpt.pt); a broken one of ours raises instead of passing as something else."""
    try:
        return resolve_checkpoint(path, which)
    except CheckpointError:
        if is_checkpoint(path) or os.path.isdir(os.path.join(path, ROOT)):
            raise
        return None


def verify_checkpoint(path: str) -> dict:
    """The manifest, after checking that every listed file exists with its recorded sha256."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}); "
                              f"use another checkpoint or --init_from scratch") from None
    except ValueError:
        raise CheckpointError(f"{path}/{MANIFEST} is corrupt; use another checkpoint or --init_from scratch") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a forge_dist training checkpoint (format {manifest.get('format')!r})")
    for rel, digest in manifest["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"checkpoint {path} is incomplete: {rel} is missing; "
                                  f"use an earlier checkpoint (--init_from_ckpt) or --init_from scratch")
        if _sha256(full) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} does not match its sha256; "
                                  f"use an earlier checkpoint (--init_from_ckpt) or --init_from scratch")
    return manifest


def load_trainer_state(path: str) -> dict:
    return load_state(path, "trainer_state")


def read_config(path: str) -> dict:
    """The resolved options the checkpointed run used (flat names)."""
    return load_trainer_state(path)["config"]


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
