"""Training checkpoints: exact round trips, atomicity, and detection of corrupt or partial ones."""
import math
import os
import random

import numpy as np
import pytest
import torch

from forge_dist.errors import CheckpointError
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.context import RunContext
from forge_dist.train.engine import LocalEngine
from forge_dist.train.optim import build_optimizer
from forge_dist.train.options import TrainConfig
from forge_dist.io.statefile import load_state, save_state


def _trained(config, steps=2, seed=0):
    from forge_dist.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    engine = LocalEngine(model, build_optimizer(model, TrainConfig(device="cpu"), "cpu"), "cpu", "float32", 1.0)
    for i in range(steps):
        x = torch.randint(0, config.vocab_size, (2, config.block_size))
        engine.forward_backward([(x, x)])
        engine.step(1e-3)
    return model, engine


def _state(it):
    return {"iteration": it, "best_val_loss": math.inf, "loader": {"next_iteration": it}, "rng": ckpt.rng_state(),
            "config": {"n_layer": 2}}


def _save(root, it, model, engine, **kw):
    return ckpt.save_checkpoint(str(root), it, model, engine, _state(it), RunContext(), **kw)


def test_statefile_round_trip(tmp_path):
    obj = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3).bfloat16()}},
           "groups": [{"betas": (0.9, 0.99), "params": [0, 1]}], "best": math.inf, "none": None,
           "rng": ("MT19937", np.arange(5, dtype=np.uint32), 7, 0, 0.0), "py": random.getstate(),
           "__odd": "a key that looks like a marker"}
    save_state(obj, str(tmp_path), "s")
    back = load_state(str(tmp_path), "s")
    assert back["state"][0]["step"].item() == 3.0 and 0 in back["state"]
    assert torch.equal(back["state"][0]["exp_avg"], obj["state"][0]["exp_avg"])
    assert back["groups"][0]["betas"] == (0.9, 0.99)
    assert back["best"] == math.inf and back["none"] is None and back["__odd"] == obj["__odd"]
    assert back["rng"][1].dtype == np.uint32 and np.array_equal(back["rng"][1], obj["rng"][1])
    assert back["py"] == obj["py"]


def test_a_corrupt_statefile_is_refused_as_a_checkpoint_error(tmp_path):
    """A damaged safetensors header raises safetensors' own SafetensorError (neither an OSError nor
    a ValueError): load_state names the state and the directory instead."""
    save_state({"w": torch.ones(2)}, str(tmp_path), "s")
    with open(tmp_path / "s.safetensors", "r+b") as fh:
        fh.seek(8)
        fh.write(b"!")
    with pytest.raises(CheckpointError, match="cannot read s state"):
        load_state(str(tmp_path), "s")


def test_save_verify_load_round_trip(tmp_path, tiny_config):
    from forge_dist.model.gpt import GPT

    model, engine = _trained(tiny_config)
    path = _save(tmp_path, 5, model, engine)
    assert ckpt.resolve_checkpoint(str(tmp_path.parent / tmp_path.name)) == path
    manifest = ckpt.verify_checkpoint(path)
    assert manifest["iteration"] == 5 and "model/model.safetensors" in manifest["files"]

    fresh, fresh_engine = _trained(tiny_config, steps=0, seed=1)
    ckpt.load_weights(fresh, path)
    fresh_engine.load_state(path)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # ties survive
    s0, s1 = engine.optimizer.state_dict(), fresh_engine.optimizer.state_dict()
    assert s0["param_groups"] == s1["param_groups"]
    for k in s0["state"]:
        for name in s0["state"][k]:
            assert torch.equal(s0["state"][k][name], s1["state"][k][name])
    # the weights directory alone is a forge_dist model directory
    from forge_dist.io import from_pretrained

    assert isinstance(from_pretrained(os.path.join(path, ckpt.MODEL_DIR)), GPT)


def test_rng_state_round_trip(tmp_path):
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    save_state(state, str(tmp_path), "rng")
    ckpt.set_rng_state(load_state(str(tmp_path), "rng"))
    again = (random.random(), np.random.rand(), torch.rand(1))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_flipped_byte_is_reported(tmp_path, tiny_config):
    model, engine = _trained(tiny_config, steps=1)
    path = _save(tmp_path, 1, model, engine)
    target = os.path.join(path, "optimizer.safetensors")
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(target, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: optimizer.safetensors"):
        ckpt.verify_checkpoint(path)


def test_missing_file_and_missing_manifest_are_reported(tmp_path, tiny_config):
    model, engine = _trained(tiny_config, steps=1)
    path = _save(tmp_path, 1, model, engine)
    os.remove(os.path.join(path, "trainer_state.json"))
    with pytest.raises(CheckpointError, match="incomplete: trainer_state.json is missing"):
        ckpt.verify_checkpoint(path)
    os.remove(os.path.join(path, ckpt.MANIFEST))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.verify_checkpoint(path)


def test_partial_temp_dir_is_ignored(tmp_path, tiny_config):
    model, engine = _trained(tiny_config, steps=1)
    good = _save(tmp_path, 2, model, engine)
    partial = tmp_path / ".tmp-iter_0000004"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert ckpt.list_checkpoints(str(tmp_path)) == ["iter_0000002"]
    assert ckpt.resolve_checkpoint(str(tmp_path)) == good
    # the next save at that iteration replaces the leftover
    _save(tmp_path, 4, model, engine)
    assert not partial.exists() and ckpt.read_pointer(str(tmp_path)) == "iter_0000004"


def test_only_a_partial_checkpoint_is_reported(tmp_path):
    root = tmp_path / ckpt.ROOT
    (root / ".tmp-iter_0000003").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        ckpt.resolve_checkpoint(str(tmp_path))


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, tiny_config, monkeypatch):
    model, engine = _trained(tiny_config, steps=1)
    old = _save(tmp_path, 1, model, engine)
    old_manifest = ckpt.verify_checkpoint(old)
    engine.forward_backward([(torch.zeros(1, 16, dtype=torch.long),) * 2])
    engine.step(1e-3)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_state", crash)  # weights written, then the trainer state fails
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2, model, engine)
    monkeypatch.undo()
    assert ckpt.read_pointer(str(tmp_path)) == "iter_0000001"
    assert ckpt.list_checkpoints(str(tmp_path)) == ["iter_0000001"]
    assert ckpt.verify_checkpoint(old) == old_manifest
    assert ckpt.resolve_checkpoint(str(tmp_path)) == old


def test_keeps_the_last_checkpoints_and_the_best(tmp_path, tiny_config):
    model, engine = _trained(tiny_config, steps=1)
    _save(tmp_path, 1, model, engine, is_best=True)
    for it in (2, 3, 4):
        _save(tmp_path, it, model, engine, keep=2)
    assert ckpt.list_checkpoints(str(tmp_path)) == ["iter_0000001", "iter_0000003", "iter_0000004"]
    assert ckpt.read_pointer(str(tmp_path), "best") == "iter_0000001"
    assert ckpt.resolve_checkpoint(str(tmp_path), "best").endswith("iter_0000001")


def test_saving_the_same_iteration_again_replaces_it(tmp_path, tiny_config):
    model, engine = _trained(tiny_config, steps=1)
    _save(tmp_path, 3, model, engine)
    path = _save(tmp_path, 3, model, engine)
    ckpt.verify_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "latest"]


def test_dangling_pointer_is_reported(tmp_path, tiny_config):
    model, engine = _trained(tiny_config, steps=1)
    path = _save(tmp_path, 1, model, engine)
    import shutil

    shutil.rmtree(path)
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.resolve_checkpoint(str(tmp_path))
