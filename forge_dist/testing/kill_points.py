"""The points of a checkpoint save where the failure drills stop a rank (tests only).

A save of iteration N goes through these points, in this order (train/sharded_save.py,
train/checkpoint.py):

  ``write``      this rank is about to write its shards (DCP's write_data; any rank; with
                 --async_checkpoint in the background thread while training goes on)
  ``save``       this rank's shards are written, not yet hashed or sent to rank 0 (any rank)
  ``seal``       rank 0 holds every rank's digests (every shard is written), before the manifest
                 and the rename (train.checkpoint._commit); the gathered format's rank 0 too
  ``publish``    rank 0 renamed the sealed checkpoint into place; ``latest`` not yet moved
  ``published``  rank 0 moved ``latest`` to it; ``best`` and the pruning not yet done

``arm(point, N, action)`` makes ``action()`` run on this process at that point of the save of
iteration N: forge_dist.testing.drill sends a signal there (a real crash of a launched rank);
tests/dist/test_drill_kill_points.py copies the checkpoints as they stand (what a crash there
leaves on disk) and resumes from each copy in the same spawned world. The returned function
undoes the patch.
"""
from __future__ import annotations

from typing import Callable

POINTS = ("write", "save", "seal", "publish", "published")


def arm(point: str, iteration: int, action: Callable[[], None]) -> Callable[[], None]:
    """Run ``action()`` at ``point`` of the save of ``iteration`` on this process; the undo."""
    from forge_dist.io.checkpoint_read import checkpoint_name
    from forge_dist.io.dcp_storage import JsonMetadataWriter
    from forge_dist.train import checkpoint
    from forge_dist.train.sharded_save import ShardedCheckpointer

    name = checkpoint_name(iteration)
    if point == "write":
        owner, attr = JsonMetadataWriter, "write_data"
        original = owner.write_data

        def patched(self, plan, planner):
            if f".tmp-{name}" in str(self.path):
                action()
            return original(self, plan, planner)
    elif point == "save":
        owner, attr = ShardedCheckpointer, "_publish"
        original = owner._publish

        def patched(self, files, group, info):
            if info["iteration"] == iteration:
                action()
            return original(self, files, group, info)
    elif point == "seal":
        owner, attr = checkpoint, "_commit"
        original = owner._commit

        def patched(root, tmp, final, name_, *args, **kwargs):
            if name_ == name:
                action()
            return original(root, tmp, final, name_, *args, **kwargs)
    elif point in ("publish", "published"):
        owner, attr = checkpoint, "_write_pointer"
        original = owner._write_pointer

        def patched(root, pointer, name_):
            hit = pointer == "latest" and name_ == name
            if hit and point == "publish":
                action()
            out = original(root, pointer, name_)
            if hit and point == "published":
                action()
            return out
    else:
        raise ValueError(f"kill point {point!r}: one of {', '.join(POINTS)}")
    setattr(owner, attr, patched)
    return lambda: setattr(owner, attr, original)
