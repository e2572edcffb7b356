"""Failure drill 1 at every kill point of a multi-rank save: forge-train's native sharded engine
(TP=2) and DeepSpeed ZeRO-2 (DP=2), each with sync and async (--async_checkpoint) checkpoints, in
one spawned world of 2 ranks (forge_dist.testing.runs: the runs forge-train builds under a launcher).

Each engine and mode trains 5 iterations uninterrupted (checkpoints at 2, 4, 5) with every kill
point of the save of iteration 4 armed (forge_dist.testing.kill_points): there, instead of dying,
the rank copies the checkpoints directory as it stands, which is what a crash at that instant
leaves on disk (rank 0 publishes, so nothing after its death touches the directory; a dead rank
1's peers only add files to ``.tmp-iter_0000004``):

  write0     rank 0 (the publisher) about to write its shards (before any rank finished)
  write1     rank 1 about to write its shards
  seal       every rank's shards written and hashed, before the manifest and the rename
  publish    renamed into place, ``latest`` not moved
  published  ``latest`` moved to iteration 4, ``best`` and pruning not done

Every copy is then resumed (--init_from resume) in the same world. Each time ``latest`` names a
complete checkpoint that verifies (iteration 2, or 4 once it moved); no ``.tmp-`` directory or
unpublished checkpoint is taken for one: the resumed run removes the leftovers and says so in a
note (a sealed but unpublished iter_4 is named and kept until the save of 4 replaces it); and the
resumed losses equal the uninterrupted run's bit for bit (fp32, same layout). The real crashes
(SIGKILL of a launched rank, survivors naming it) are tests/integration/test_drill_lost_rank.py's.
"""
import os
import shutil

import pytest

from forge_dist.testing.data import corpus_dataset
from forge_dist.testing.spawn import spawn

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ARGS = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "2",
        "--eval_iters", "1", "--eval_interval", "2", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress", "--always_save_checkpoint",
        "--dropout", "0.0", "--learning_rate", "1e-2", "--keep_checkpoints", "3", "--max_iters", "5",
        "--checkpoint_format", "sharded"]
DS_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "deepspeed",
                         "zero2_fp32.json")
ENGINES = {"native_tp2": ([], 2), "deepspeed_z2": (["--deepspeed_config", DS_CONFIG], 1)}
MODES = {"sync": [], "async": ["--async_checkpoint"]}
POINTS = {"write0": ("write", 0), "write1": ("write", 1), "seal": ("seal", 0), "publish": ("publish", 0),
          "published": ("published", 0)}
KILLED_AT = 4


def _copy_checkpoints(src, dst):
    """The checkpoints directory as it stands (files another rank is writing copied as far as written)."""
    def copy(s, d):
        try:
            shutil.copy2(s, d)
        except FileNotFoundError:  # replaced while we copied: a crash would have left the other one
            pass
    shutil.copytree(src, dst, copy_function=copy)


def _state(root):
    """What a resume finds in ``root``: the pointer, the directories."""
    from forge_dist.train import checkpoint as ckpt

    return {"latest": ckpt.read_pointer(root), "dirs": sorted(os.listdir(root))}


def _world(rank, world_size, dataset, work):
    import torch.distributed as dist

    from forge_dist.testing.kill_points import arm
    from forge_dist.testing.runs import fit, logged_losses, parallel_context
    from forge_dist.train import checkpoint as ckpt

    out = {}
    for engine, (engine_args, tp) in ENGINES.items():
        for mode, mode_args in MODES.items():
            case = os.path.join(work, engine, mode)
            ref = os.path.join(case, "reference")
            undo = []
            for label, (point, killed) in POINTS.items():
                if rank == killed:
                    snap = os.path.join(case, label, "checkpoints")
                    undo.append(arm(point, KILLED_AT, lambda snap=snap: _copy_checkpoints(
                        os.path.join(ref, "checkpoints"), snap)))
            args = [*ARGS, *engine_args, *mode_args, "--dataset", dataset]
            try:
                fit([*args, "--out_dir", ref], parallel_context(rank, world_size, tp=tp))
            finally:
                for u in reversed(undo):
                    u()
            dist.barrier()
            results = {"reference": logged_losses(ref)}
            for label in POINTS:
                resumed = os.path.join(case, label)
                before = _state(os.path.join(resumed, "checkpoints"))
                found = ckpt.resolve_checkpoint(resumed)
                ckpt.verify_checkpoint(found)
                dist.barrier()  # every rank looked before rank 0 clears the leftovers
                runs = []
                fit([*args, "--out_dir", resumed, "--init_from", "resume"], parallel_context(rank, world_size, tp=tp),
                    hook=runs.append)
                results[label] = {"before": before, "found": os.path.basename(found), "start": runs[0].start_iter,
                                  "notes": list(runs[0].notes), "losses": logged_losses(resumed),
                                  "after": _state(os.path.join(resumed, "checkpoints"))}
                ckpt.verify_checkpoint(ckpt.resolve_checkpoint(resumed))
            out[(engine, mode)] = results
    return out


@pytest.mark.timeout(300)
def test_every_kill_point_leaves_a_complete_latest_and_resumes_exactly(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    dataset = corpus_dataset(data, 20_000)
    results = spawn(_world, 2, dataset, str(tmp_path / "work"), timeout=280)
    for (engine, mode), res in results.items():
        ref = res["reference"]
        assert sorted(ref) == list(range(5)), (engine, mode, ref)
        for label, r in ((k, v) for k, v in res.items() if k != "reference"):
            where = (engine, mode, label)
            published = label == "published"
            want = f"iter_000000{KILLED_AT if published else 2}"
            assert r["before"]["latest"] == want and r["found"] == want, (where, r["before"])
            assert r["start"] == int(want[-1]), where
            partial = ".tmp-iter_0000004" in r["before"]["dirs"]
            assert partial == (label in ("write0", "write1", "seal")), (where, r["before"])
            assert ("iter_0000004" in r["before"]["dirs"]) == (label in ("publish", "published")), where
            notes = " | ".join(r["notes"])
            if partial:
                assert "removed" in notes and ".tmp-iter_0000004: the unsealed files of an interrupted save" in notes, \
                    (where, notes)
            if label == "publish":
                assert "iter_0000004 is sealed but was never published" in notes, (where, notes)
            # the leftovers are gone, the resumed run published 4 and 5
            assert r["after"]["latest"] == "iter_0000005", (where, r["after"])
            assert not [d for d in r["after"]["dirs"] if d.startswith((".tmp-", ".trash-"))], (where, r["after"])
            got, start = r["losses"], r["start"]
            assert sorted(got) == list(range(start, 5)), (where, sorted(got))
            assert [got[i] for i in range(start, 5)] == [ref[i] for i in range(start, 5)], where  # bit for bit
