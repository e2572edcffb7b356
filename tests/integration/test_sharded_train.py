"""forge-train's sharded checkpoint (--checkpoint_format sharded) in one process: async saves that
crash before they are published, the readers (from_pretrained, forge-sample/eval's loader,
forge-convert) and corrupt shards refused by name. Resharding across layouts is
tests/dist/test_sharded_resume.py's.

The crashes run in a forked child that dies with os._exit (nothing after the kill point runs, as
with SIGKILL), in the background thread that writes the async checkpoint of iteration 4.
"""
import os
import shutil

import pytest
import torch

from forge_dist.testing.data import corpus_dataset
from forge_dist.testing.runs import logged_losses, train_exit_code
from forge_dist.train import checkpoint as ckpt

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "1", "--eval_interval", "2", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress", "--always_save_checkpoint",
        "--dropout", "0.1", "--keep_checkpoints", "3"]
SHARDED = ["--checkpoint_format", "sharded", "--async_checkpoint"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return corpus_dataset(tmp_path_factory.mktemp("data"), 40_000)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted 6-iteration run, async sharded checkpoints at 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert train_exit_code(TINY, dataset, out, *SHARDED, "--max_iters", "6") == 0
    return out


def _die_in(target, attr: str, when) -> None:
    original = getattr(target, attr)

    def dying(*args, **kwargs):
        if when(*args, **kwargs):
            os._exit(137)
        return original(*args, **kwargs)

    setattr(target, attr, dying)


def _shards_written(writer, metadata, results):  # JsonMetadataWriter.finish: every shard written, no index yet
    return "iter_0000004" in str(writer.path)


def _sealed(root, tmp, final, name, *args, **kwargs):  # train.checkpoint._commit: rank 0 about to publish
    return name == "iter_0000004"


KILL_POINTS = {"shards_written_index_not": ("forge_dist.io.dcp_storage.JsonMetadataWriter", "finish", _shards_written),
               "before_publish": ("forge_dist.train.checkpoint", "_commit", _sealed)}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_crash_during_async_save_keeps_the_previous_latest(dataset, reference, tmp_path, point):
    import importlib

    path, attr, when = KILL_POINTS[point]
    module, _, cls = path.rpartition(".") if path.endswith("Writer") else (path, "", "")
    target = getattr(importlib.import_module(module), cls) if cls else importlib.import_module(module)
    out = tmp_path / "out"
    pid = os.fork()
    if pid == 0:  # the child: trains 4 iterations and dies inside the async save of iteration 4
        code = 1
        try:
            _die_in(target, attr, when)
            code = train_exit_code(TINY, dataset, out, *SHARDED, "--max_iters", "4")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 137, f"the child was not killed at {point}"
    root = out / "checkpoints"
    assert ckpt.read_pointer(str(root)) == "iter_0000002"
    assert (root / ".tmp-iter_0000004").is_dir() and not (root / "iter_0000004").exists()
    assert train_exit_code(TINY, dataset, out, *SHARDED, "--max_iters", "6", "--init_from", "resume") == 0
    want, got = logged_losses(reference), logged_losses(out)
    assert [got[i] for i in range(2, 6)] == [want[i] for i in range(2, 6)]  # same layout: bit for bit


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_readers_take_the_sharded_checkpoint(dataset, reference, tmp_path):
    """from_pretrained, forge-sample/eval's loader and forge-convert (--to reallm-forge, --to forge)
    read the sharded checkpoint as the gathered one of the same run, tensor by tensor; the moments
    read back whole equal the gathered checkpoint's AdamW state."""
    from forge_dist.inference.loading import load_for_inference
    from forge_dist.io import from_pretrained, load_any
    from forge_dist.io.convert import convert
    from forge_dist.io.sharded_read import one_process_optimizer_state
    from forge_dist.io.statefile import load_state

    gathered = tmp_path / "gathered"
    assert train_exit_code(TINY, dataset, gathered, "--checkpoint_format", "gathered", "--max_iters", "6") == 0
    assert not (gathered / "checkpoints" / "iter_0000006" / "model" / "dcp").exists()
    sharded_ckpt = reference / "checkpoints" / "iter_0000006"
    want = from_pretrained(str(gathered / "checkpoints" / "iter_0000006" / "model")).state_dict()
    models = {"from_pretrained": from_pretrained(str(sharded_ckpt / "model")),
              "load_for_inference": load_for_inference(str(reference)).model,
              "reallm-forge": load_any(convert(str(reference), str(tmp_path / "ckpt.pt"), "reallm-forge"))[0],
              "forge": from_pretrained(convert(str(sharded_ckpt), str(tmp_path / "consolidated"), "forge"))}
    for name, model in models.items():
        got = model.state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert load_for_inference(str(reference)).tokenizer is not None
    ref_opt = load_state(str(gathered / "checkpoints" / "iter_0000006"), "optimizer")["optimizer"]
    opt = one_process_optimizer_state(str(sharded_ckpt / "model"), load_state(str(sharded_ckpt), "optimizer"))
    assert opt["state"].keys() == ref_opt["state"].keys()
    for i, moments in ref_opt["state"].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt["state"][i][k], moments[k]), (i, k)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_corrupt_or_truncated_shard_is_refused_by_name(dataset, reference, tmp_path, capsys):
    from forge_dist.errors import CheckpointError
    from forge_dist.inference.loading import load_for_inference

    for damage in ("flip", "truncate"):
        out = tmp_path / damage
        shutil.copytree(reference / "checkpoints" / "iter_0000004", out / "checkpoints" / "iter_0000004")
        shard = out / "checkpoints" / "iter_0000004" / "model" / "dcp" / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[-16:]
        shard.write_bytes(bytes(data))
        capsys.readouterr()
        code = train_exit_code(TINY, dataset, out, *SHARDED, "--max_iters", "6", "--init_from", "resume",
                               "--init_from_ckpt", "iter_0000004")
        err = capsys.readouterr().err
        assert code not in (0, None) and "model/dcp/__0_0.distcp" in err, (damage, code, err[-2000:])
        with pytest.raises(CheckpointError, match="model/dcp/__0_0.distcp"):
            load_for_inference(str(out / "checkpoints" / "iter_0000004"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_plain_resume_falls_back_past_a_corrupt_shard(dataset, reference, tmp_path, capsys):
    """A shard that fails its sha256 when the ranks read it: with plain --init_from resume every
    rank falls back to the newest older checkpoint that verifies, says so, and continues exactly."""
    out = tmp_path / "out"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    shard = out / "checkpoints" / "iter_0000006" / "model" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert train_exit_code(TINY, dataset, out, *SHARDED, "--max_iters", "6", "--init_from", "resume") == 0
    text = capsys.readouterr()
    assert "model/dcp/__0_0.distcp does not match its sha256; resuming from the previous good checkpoint" in \
        text.out + text.err and "iter_0000004" in text.out + text.err
    want, got = logged_losses(reference), logged_losses(out)
    assert [got[i] for i in (4, 5)] == [want[i] for i in (4, 5)]
