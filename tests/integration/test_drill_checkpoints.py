"""Drills 2, 3 and 6 on forge-train's checkpoints (one process, in-process runs; the crashes in a
forked child, so nothing after the kill point runs, as with SIGKILL):

  2. killed at several points of writing checkpoint 4: ``latest`` names a complete, verified
     checkpoint and resuming from it gives the losses of an uninterrupted run;
  3. a flipped byte in the weights, the optimizer state and the manifest: each detected and named;
     ``--init_from resume`` falls back to the previous good checkpoint and says so, a checkpoint
     named with --init_from_ckpt is refused with one line;
  6. the disk fills up during a save: one-line error, exit 1, the older checkpoint and the pointers
     intact, no partial directory left.
"""
import errno
import os
import shutil

import pytest

from forge_dist.errors import CheckpointError
from forge_dist.testing.data import corpus_dataset
from forge_dist.testing.runs import logged_losses, train_exit_code
from forge_dist.train import checkpoint as ckpt

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "1", "--eval_interval", "2", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress", "--always_save_checkpoint",
        "--dropout", "0.1", "--keep_checkpoints", "3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return corpus_dataset(tmp_path_factory.mktemp("data"), 40_000)


def _train(dataset, out, *args):
    return train_exit_code(TINY, dataset, out, *args)


_losses = logged_losses


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted 6-iteration run (checkpoints at 2, 4 and 6)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert _train(dataset, out, "--max_iters", "6") == 0
    return out


def _killed_in_child(dataset, out, target: str, when) -> None:
    """Train 4 iterations in a forked child that dies (os._exit, no cleanup) when
    ``forge_dist.train.checkpoint.<target>`` is called with arguments ``when(*args)`` accepts."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            original = getattr(ckpt, target)

            def dying(*args, **kwargs):
                if when(*args):
                    os._exit(137)
                return original(*args, **kwargs)

            setattr(ckpt, target, dying)
            code = _train(dataset, out, "--max_iters", "4")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 137, f"the child was not killed at {target}"


KILL_POINTS = {  # the second save (iteration 4) dies ...
    "writing_files": ("save_state", lambda state, directory, name: "iter_0000004" in directory, "iter_0000002"),
    "hashing_for_manifest": ("_sha256", lambda path: "iter_0000004" in path, "iter_0000002"),
    "renamed_before_pointer": ("_write_pointer", lambda root, pointer, name: name == "iter_0000004", "iter_0000002"),
    "pointer_moved_before_prune": ("_prune", lambda root, keep: ckpt.read_pointer(root) == "iter_0000004",
                                   "iter_0000004"),
}


@pytest.mark.slow
def test_killed_while_saving_keeps_a_verified_latest_and_resumes_exactly(dataset, reference, tmp_path):
    full = _losses(reference)
    for point, (target, when, expected) in KILL_POINTS.items():
        out = tmp_path / point
        _killed_in_child(dataset, out, target, when)
        latest = ckpt.resolve_checkpoint(str(out))
        assert os.path.basename(latest) == expected, point
        ckpt.verify_checkpoint(latest)
        assert _train(dataset, out, "--init_from", "resume", "--max_iters", "6") == 0, point
        assert _losses(out) == full, point  # bit for bit, dropout included
        assert not [n for n in os.listdir(out / "checkpoints") if n.startswith(".tmp-")], point


def _flip(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", ["model/model.safetensors", "optimizer.safetensors", "manifest.json"])
def test_flipped_byte_is_named_refused_and_resume_falls_back(dataset, reference, tmp_path, rel, capsys):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    _flip(out / "checkpoints" / "iter_0000006" / rel)
    with pytest.raises(CheckpointError, match=f"corrupt: {rel} does not match its (own )?sha256"):
        ckpt.verify_checkpoint(str(out / "checkpoints" / "iter_0000006"))
    capsys.readouterr()
    assert _train(dataset, out, "--init_from", "resume", "--init_from_ckpt", "iter_0000006", "--max_iters", "7") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "iter_0000006 is corrupt" in err[0] and rel in err[0], err
    assert _train(dataset, out, "--init_from", "resume", "--max_iters", "6") == 0
    printed = capsys.readouterr().out
    assert f"iter_0000006 is corrupt: {rel}" in printed
    assert "resuming from the previous good checkpoint" in printed and "iter_0000004 instead" in printed
    assert _losses(out) == _losses(reference)  # iterations 4 and 5 replayed from the good checkpoint


def test_disk_full_during_save_stops_with_one_line_and_keeps_older_checkpoints(dataset, tmp_path, monkeypatch,
                                                                                capsys):
    original = ckpt.save_state

    def full_disk(state, directory, name):
        if "iter_0000004" in directory:
            raise OSError(errno.ENOSPC, "No space left on device", os.path.join(directory, name + ".safetensors"))
        return original(state, directory, name)

    monkeypatch.setattr(ckpt, "save_state", full_disk)
    assert _train(dataset, tmp_path, "--max_iters", "6") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saving checkpoint iter_0000004" in err[0] and "the disk is full" in err[0], err
    assert "iter_0000002 is intact" in err[0]
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["best", "iter_0000002", "latest"]  # no .tmp- left behind
    assert ckpt.read_pointer(str(root)) == "iter_0000002"
    ckpt.verify_checkpoint(str(root / "iter_0000002"))
