"""Checkpoints under failure: falling back past a corrupt one on resume, and a save that fails.

``resume_checkpoint`` is what ``--init_from resume`` loads: the checkpoint ``latest`` names, after
verify_checkpoint (every file against the manifest's sha256, the manifest against its own). When
that one is corrupt, incomplete or missing and the user named none (--init_from_ckpt), the newest
older checkpoint that verifies is taken instead and a note says which and why; only when none
verifies is the resume refused. A checkpoint named explicitly is never replaced by another.

``save_failed`` turns the OSError of a save (the disk filled up, a quota, a read-only mount) into
a CheckpointError that names the checkpoint, the cause and the last good checkpoint, after
removing the partial ``.tmp-`` directory. The save is atomic (train/checkpoint.py), so the older
checkpoints and the ``latest``/``best`` pointers are untouched.

``clear_leftovers``: a resumed run removes what a crashed save left (``.tmp-``/``.trash-``
directories) and says so; a sealed checkpoint newer than ``latest`` is named, kept and not resumed.
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Callable, List, Optional

from forge_dist.errors import CheckpointError
from forge_dist.io.checkpoint_read import ROOT, checkpoint_name, list_checkpoints, read_pointer, verify_checkpoint


def resume_checkpoint(out_dir: str, resolve: Callable[[], str], explicit: bool, notes: List[str]) -> str:
    """The verified checkpoint to resume (``resolve()`` finds the one asked for)."""
    path = None
    try:
        path = resolve()
        verify_checkpoint(path, shards=False)  # a sharded one: each rank hashes what it reads
        return path
    except CheckpointError as e:
        if explicit:
            raise
        problem = str(e).split("; use ")[0]  # without the retry advice: we retry ourselves
    root = os.path.join(out_dir, ROOT)
    skip = None if path is None else os.path.abspath(path)
    names = [n for n in list_checkpoints(root) if os.path.abspath(os.path.join(root, n)) != skip]
    return _newest_verifying(root, names, problem, f"no other checkpoint in {root} verifies either", notes)


def fall_back_past(bad: str, out_dir: str, problem: str, notes: List[str]) -> str:
    """The newest checkpoint older than ``bad`` whose manifest, small files and shard sizes verify
    (a shard that failed its sha256 while loading, after the process group existed: every rank
    calls this alike and takes the same one); a note says why."""
    root = os.path.join(out_dir, ROOT)
    older = [n for n in list_checkpoints(root) if n < os.path.basename(os.path.normpath(bad))]
    return _newest_verifying(root, older, problem.split("; use ")[0], f"no older checkpoint in {root} verifies",
                            notes)


def _newest_verifying(root: str, names: List[str], problem: str, none_left: str, notes: List[str]) -> str:
    """The newest of ``names`` whose manifest, small files and shard sizes verify; a note says why."""
    for name in reversed(names):
        candidate = os.path.join(root, name)
        try:
            verify_checkpoint(candidate, shards=False)
        except CheckpointError:
            continue
        notes.append(f"{problem}; resuming from the previous good checkpoint {candidate} instead")
        return candidate
    raise CheckpointError(f"{problem}; {none_left}; start again with --init_from scratch")


def save_failed(error: OSError, root: str, iteration: int, last_good: Optional[str]) -> CheckpointError:
    """The error to stop with after a failed save; the partial directory is removed first."""
    shutil.rmtree(os.path.join(root, f".tmp-{checkpoint_name(iteration)}"), ignore_errors=True)
    cause = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else (error.strerror or str(error))
    kept = f"the last good checkpoint {last_good} is intact" if last_good else "no earlier checkpoint exists"
    return CheckpointError(f"saving checkpoint {checkpoint_name(iteration)} in {root} failed: {cause} ({error}); "
                           f"{kept}; free space (or fix the cause) and resume with --init_from resume")


def clear_leftovers(root: str) -> List[str]:
    """Rank 0, as a resumed run starts: what interrupted saves left in ``root``, one note each. A
    ``.tmp-iter_N`` (shards of a save that was never sealed: never a checkpoint) and a ``.trash-iter_N``
    (the older copy a re-save of N was replacing) are removed; a sealed ``iter_N`` newer than the one
    ``latest`` names (renamed into place, then the run died before ``latest`` moved) is kept, never
    resumed unless named (--init_from_ckpt), and replaced by this run's save of N."""
    notes: List[str] = []
    if not os.path.isdir(root):
        return notes
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not os.path.isdir(path) or not name.startswith((".tmp-", ".trash-")):
            continue
        kept = name.split("-", 1)[1]
        if name.startswith(".trash-") and not os.path.isdir(os.path.join(root, kept)):
            notes.append(f"{path} holds the only copy of {kept} (a re-save was interrupted); left in place")
            continue
        shutil.rmtree(path, ignore_errors=True)
        what = ("the unsealed files of an interrupted save, never a checkpoint" if name.startswith(".tmp-")
                else f"the older copy of {kept} an interrupted re-save was replacing")
        notes.append(f"removed {path}: {what}")
    latest = read_pointer(root, "latest")
    for name in list_checkpoints(root):
        if latest is not None and name > latest:
            notes.append(f"{os.path.join(root, name)} is sealed but was never published (the run stopped before "
                         f"latest moved to it from {latest}): not resumed unless named with --init_from_ckpt; this "
                         f"run's save of that iteration replaces it")
    return notes


VERIFY_LIMIT_BYTES = 1 << 30  # shards up to this size are hashed at start (about 1-2 s per GiB)


def verify_data(data_dirs: List[str]) -> List[str]:
    """Check every prepared shard of ``data_dirs`` against the sha256 its meta.json recorded, before
    any process group exists: a corrupted shard (a flipped bit, a bad copy) is refused with one line
    instead of training on garbage. Truncation is caught when the shard opens (the token count);
    shards above VERIFY_LIMIT_BYTES are only size-checked there (hashing them costs minutes).
    Returns the notes about shards not hashed."""
    from forge_dist.data.dataset import read_meta
    from forge_dist.data.shards import open_shard, tokens_sha256
    from forge_dist.errors import ConfigError

    notes = []
    for data_dir in data_dirs:
        meta = read_meta(data_dir)
        for split, entry in sorted(meta.splits.items()):
            digest, path = str(entry.get("digest") or ""), os.path.join(data_dir, entry["file"])
            if not digest.startswith("sha256:") or not entry.get("tokens"):
                continue
            if os.path.getsize(path) > VERIFY_LIMIT_BYTES:
                notes.append(f"{path} is over {VERIFY_LIMIT_BYTES >> 30} GiB: its checksum is not verified at start")
                continue
            if "sha256:" + tokens_sha256(open_shard(path)) != digest:
                raise ConfigError(f"dataset shard {path} ({split} split) is corrupt: its tokens do not match the "
                                  f"sha256 in meta.json; copy it again or prepare the dataset again")
    return notes
