"""Drill 7 and hostile input: each is refused by forge-train with exit 2 and one line, before any
process group or output exists (out_dir is never created); files crafted to run code when loaded
(a pickle ``__reduce__`` payload in ckpt.pt or meta.pkl, a YAML ``!!python`` tag) never run it."""
import json
import os
import pickle
import shutil

import pytest
import torch

from forge_dist.errors import CheckpointError
from forge_dist.testing.data import corpus_dataset
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.cli import main

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "2",
        "--max_iters", "1", "--eval_iters", "1", "--device", "cpu", "--max_sample_tokens", "none", "--no-progress",
        "--no-tensorboard_log"]


class Payload:
    """Unpickling this creates ``path`` (what an attacker's file would do, harmlessly)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return corpus_dataset(tmp_path_factory.mktemp("data"), 20_000)


def _refused(capsys, tmp_path, *args) -> str:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--out_dir", str(out), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("forge-train: error: "), err
    assert not out.exists()  # nothing started
    return err[0]


def _copy(dataset, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(dataset, target)
    return target


def test_truncated_and_corrupted_shards(dataset, tmp_path, capsys):
    data = _copy(dataset, tmp_path)
    shard = data / "train.arrow"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) - 400] ^= 0x01  # inside the token buffer: the Arrow file still opens
    shard.write_bytes(bytes(flipped))
    line = _refused(capsys, tmp_path, "--dataset", str(data))
    assert f"dataset shard {shard} (train split) is corrupt" in line
    shard.write_bytes(original[: len(original) // 2])
    assert str(shard) in _refused(capsys, tmp_path, "--dataset", str(data))


def test_missing_tokenizer_file(dataset, tmp_path, capsys):
    data = _copy(dataset, tmp_path)
    os.remove(data / "tokenizer.json")
    assert f"cannot read tokenizer file {data / 'tokenizer.json'}" in _refused(capsys, tmp_path, "--dataset", str(data))


def test_yaml_typo_syntax_error_and_python_tag(dataset, tmp_path, capsys):
    typo, broken, tagged = tmp_path / "typo.yaml", tmp_path / "broken.yaml", tmp_path / "tagged.yaml"
    typo.write_text("n_layr: 2\n")
    broken.write_text("n_layer: 2\n  n_head: [4\n")
    victim = tmp_path / "created_by_yaml"
    tagged.write_text(f"n_layer: !!python/object/apply:builtins.open ['{victim}', 'w']\n")
    assert "unknown option 'n_layr'; did you mean --n_layer?" in _refused(capsys, tmp_path, "--dataset", dataset,
                                                                         "--config", str(typo))
    assert "is not valid YAML" in _refused(capsys, tmp_path, "--dataset", dataset, "--config", str(broken))
    assert "python/object/apply" in _refused(capsys, tmp_path, "--dataset", dataset, "--config", str(tagged))
    assert not victim.exists()


def test_pickle_payloads_are_refused_without_running(dataset, tmp_path, capsys):
    evil_data = tmp_path / "evil_data"
    evil_data.mkdir()
    victim_meta, victim_ckpt = tmp_path / "created_by_meta", tmp_path / "created_by_ckpt"
    with open(evil_data / "meta.pkl", "wb") as fh:
        pickle.dump({"vocab_size": 65, "stoi": Payload(victim_meta)}, fh)
    for split in ("train", "val"):
        (evil_data / f"{split}.bin").write_bytes(bytes(2000))
    assert "meta.pkl" in _refused(capsys, tmp_path, "--dataset", str(evil_data))
    evil_ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "model_args": Payload(victim_ckpt)}, evil_ckpt)
    line = _refused(capsys, tmp_path, "--dataset", dataset, "--init_from", "prev_run", "--prev_run_ckpt", str(evil_ckpt))
    assert "ckpt.pt" in line and "pickle" in line
    assert not victim_meta.exists() and not victim_ckpt.exists()


def test_paths_escaping_their_folder_are_refused(dataset, tmp_path, capsys):
    data = _copy(dataset, tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["train"]["file"] = "../../outside.arrow"
    (data / "meta.json").write_text(json.dumps(meta))
    assert "'../../outside.arrow', a path outside the dataset folder" in _refused(capsys, tmp_path, "--dataset",
                                                                                  str(data))
    from forge_dist.data.errors import DataError
    from forge_dist.data.tokenizers import tokenizer_from_spec

    for spec in ({"kind": "char", "file": "../tokenizer.json"}, {"kind": "sentencepiece", "model_file": "/etc/hostname"}):
        with pytest.raises(DataError, match="a path outside the dataset folder"):
            tokenizer_from_spec(spec, str(data))
    fake = tmp_path / "checkpoints" / "iter_0000001"
    fake.mkdir(parents=True)
    (fake / "manifest.json").write_text(json.dumps({"format": ckpt.FORMAT, "version": 1, "iteration": 1,
                                                    "files": {"../../../etc/hostname": "0" * 64}}))
    with pytest.raises(CheckpointError, match="'../../../etc/hostname', a path outside the checkpoint directory"):
        ckpt.verify_checkpoint(str(fake))
