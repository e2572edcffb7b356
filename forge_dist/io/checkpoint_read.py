"""Reading forge-train checkpoints: their layout, finding one, verifying it, loading its parts.

Below both the trainer (train/checkpoint.py writes them) and inference (forge-sample, forge-eval,
forge-convert read them), so reading a checkpoint never imports the trainer. The layout is
described in train/checkpoint.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional

from forge_dist.atomic import stays_inside
from forge_dist.errors import CheckpointError
from forge_dist.io.statefile import load_state

ROOT = "checkpoints"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
FORMAT = "forge_dist.train_checkpoint"
POINTERS = ("latest", "best")
# what to do instead, in the options of the command that reads the checkpoint (``retry=``)
TRAIN_RETRY = "use an earlier checkpoint (--init_from_ckpt NAME) or --init_from scratch"
INFERENCE_RETRY = "pick the other one with --ckpt best|latest, or pass an earlier checkpoint directory " \
                  "(OUT/checkpoints/iter_N) as --out_dir"
CONVERT_RETRY = "convert an earlier checkpoint: pass its directory (OUT/checkpoints/iter_N)"


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# --- files ----------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# --- weights ----------------------------------------------------------------------------------------
def load_weights(model, directory: str) -> None:
    """Strict: every tensor present with its shape, or a CheckpointError naming the mismatch."""
    from forge_dist.io.forge_format import WEIGHTS_NAME, read_weights
    from forge_dist.io.state import load_state as load_model_state

    path = os.path.join(directory, MODEL_DIR)
    load_model_state(model, read_weights(path), os.path.join(path, WEIGHTS_NAME))


# --- locate and verify ----------------------------------------------------------------------------
def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def resolve_checkpoint(path: str, which: str = "latest", retry: str = TRAIN_RETRY) -> str:
    """A checkpoint directory from itself, a checkpoints root, or an out_dir holding one; errors
    end with ``retry``."""
    if is_checkpoint(path):
        return path
    for root in (path, os.path.join(path, ROOT)):
        name = read_pointer(root, which) if os.path.isdir(root) else None
        if name is None and which != "latest":
            name = read_pointer(root, "latest") if os.path.isdir(root) else None
        if name is not None:
            found = os.path.join(root, name)
            if not os.path.isdir(found):
                raise CheckpointError(f"{os.path.join(root, which)} points to {name}, which is missing; {retry}")
            return found
        if os.path.isdir(root) and os.path.basename(os.path.normpath(root)) == ROOT:
            partial = [n for n in os.listdir(root) if n.startswith(".tmp-")]
            if partial:
                raise CheckpointError(f"{root} holds only an incomplete checkpoint ({partial[0]}, from an "
                                      f"interrupted save); {retry}")
    raise CheckpointError(f"no checkpoint found in {path}; train one first (forge-train --out_dir {path})")


def find_training_checkpoint(path: str, which: str = "latest", retry: str = TRAIN_RETRY) -> Optional[str]:
    """The training checkpoint ``path`` names, or None when ``path`` is not one of ours (a model
    directory or a ckpt.pt); a broken one of ours raises instead of passing as something else."""
    try:
        return resolve_checkpoint(path, which, retry)
    except CheckpointError:
        if is_checkpoint(path) or os.path.isdir(os.path.join(path, ROOT)):
            raise
        return None


SELF_DIGEST = "manifest_sha256"


def _canonical_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SELF_DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def seal(manifest: dict) -> dict:
    """The manifest with its own sha256, so a flipped byte in it is detected, not blamed on a file."""
    return {**manifest, SELF_DIGEST: _canonical_digest(manifest)}


def verify_checkpoint(path: str, retry: str = TRAIN_RETRY, shards: bool = True) -> dict:
    """The manifest, after checking its own sha256 (manifests written since it exists) and that
    every listed file lies inside ``path`` and exists with its recorded sha256. ``shards=False``
    (a training resume, before any process group): the data files of a sharded checkpoint are only
    checked to exist with their recorded size; each rank hashes the ones it reads when it loads
    (verify_files), so no rank hashes every rank's shards."""
    manifest = _read_manifest(path, retry)
    files = manifest["files"]
    sizes = manifest.get("sizes") if not shards and manifest.get("sharded") else None
    for rel in files:
        if sizes is not None and rel in sizes:
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                raise CheckpointError(f"checkpoint {path} is incomplete: {rel} is missing; {retry}")
            if os.path.getsize(full) != sizes[rel]:
                raise CheckpointError(f"checkpoint {path} is corrupt: {rel} has {os.path.getsize(full)} bytes, "
                                      f"{sizes[rel]} were written; {retry}")
        else:
            _verify_file(path, rel, files[rel], retry)
    return manifest


def verify_files(path: str, rels: List[str], retry: str = TRAIN_RETRY) -> None:
    """The files ``rels`` of the checkpoint at ``path`` against its manifest's sha256."""
    files = _read_manifest(path, retry)["files"]
    for rel in rels:
        if rel not in files:
            raise CheckpointError(f"checkpoint {path} is corrupt: {rel} is not in its {MANIFEST}; {retry}")
        _verify_file(path, rel, files[rel], retry)


def _verify_file(path: str, rel: str, digest: str, retry: str) -> None:
    full = os.path.join(path, rel)
    if not os.path.isfile(full):
        raise CheckpointError(f"checkpoint {path} is incomplete: {rel} is missing; {retry}")
    if _sha256(full) != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: {rel} does not match its sha256; {retry}")


def _read_manifest(path: str, retry: str) -> dict:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}); {retry}") from None
    except ValueError:
        raise CheckpointError(f"{path}/{MANIFEST} is corrupt; {retry}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a forge_dist training checkpoint (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if SELF_DIGEST in manifest and manifest[SELF_DIGEST] != _canonical_digest(manifest):
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} does not match its own sha256; {retry}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}/{MANIFEST} is corrupt (no file list); {retry}")
    for rel in files:
        if not stays_inside(rel):
            raise CheckpointError(f"checkpoint {path} is refused: its {MANIFEST} names {rel!r}, a path outside "
                                  f"the checkpoint directory")
    return manifest


def load_trainer_state(path: str) -> dict:
    return load_state(path, "trainer_state")


def read_config(path: str) -> dict:
    """The resolved options the checkpointed run used (flat names)."""
    return load_trainer_state(path)["config"]
