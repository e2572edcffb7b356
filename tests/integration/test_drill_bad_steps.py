"""Drill 4: NaN/inf in the loss or the gradients and a loss spike, injected by a test hook at chosen
iterations, under --on_bad_step skip (default), rollback and stop; every event logged with its step."""
import json

import pytest
import torch

from forge_dist.testing.data import corpus_dataset
from forge_dist.testing.runs import logged_losses, train_exit_code
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.statefile import load_state
from forge_dist.train.trainer import Trainer

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "2", "--eval_interval", "5", "--log_interval", "1", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress", "--dropout", "0.0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return corpus_dataset(tmp_path_factory.mktemp("data"), 40_000)


def _poison(engine, kind):
    """The engine's forward-backward for one iteration, with ``kind`` injected."""
    original = engine.forward_backward

    def forward_backward(micro_batches):
        loss = original(micro_batches)
        if kind == "nan_loss":
            return loss * float("nan")
        if kind == "inf_grad":
            next(p for p in engine.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
            return loss
        assert kind == "spike"
        return loss * 100  # the reported loss only: the gradients are the step's own
    return forward_backward


@pytest.fixture
def inject(monkeypatch):
    """inject({iteration: kind}) for the runs of this test (kinds: nan_loss, inf_grad, spike)."""
    faults = {}
    original = Trainer._step

    def step(self, it):
        if it not in faults:
            return original(self, it)
        self.engine.forward_backward = _poison(self.engine, faults[it])
        try:
            return original(self, it)
        finally:
            del self.engine.forward_backward

    monkeypatch.setattr(Trainer, "_step", step)
    return faults.update


def _train(dataset, out, *args):
    return train_exit_code(TINY, dataset, out, *args)


def _events(out):
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


_losses = logged_losses


def test_skip_drops_the_update_and_the_batch(dataset, tmp_path, inject, capsys):
    inject({3: "nan_loss", 5: "inf_grad", 6: "spike"})
    assert _train(dataset, tmp_path, "--max_iters", "9", "--loss_spike_factor", "3") == 0
    events = _events(tmp_path)
    assert [(e["iter"], e["action"]) for e in events] == [(3, "skip"), (5, "skip"), (6, "skip")]
    assert [e["reason"].split(" (")[0] for e in events] == ["nonfinite loss", "nonfinite gradient", "loss spike"]
    assert sorted(_losses(tmp_path)) == [0, 1, 2, 4, 7, 8]
    assert "bad step at iter 5: nonfinite gradient: skipped" in capsys.readouterr().out
    last = ckpt.resolve_checkpoint(str(tmp_path))
    optimizer = load_state(last, "optimizer")["optimizer"]
    assert {int(s["step"]) for s in optimizer["state"].values()} == {6}  # 9 iterations, 3 updates dropped
    from forge_dist.io import from_pretrained

    assert all(torch.isfinite(t).all() for t in from_pretrained(f"{last}/model").state_dict().values())


def test_too_many_bad_steps_in_a_row_stop(dataset, tmp_path, inject, capsys):
    inject({i: "nan_loss" for i in range(2, 20)})
    assert _train(dataset, tmp_path, "--max_iters", "12", "--max_bad_steps", "2") == 1
    assert [(e["iter"], e["action"]) for e in _events(tmp_path)] == [(2, "skip"), (3, "skip"), (4, "stop")]
    assert (tmp_path / "nan_iter_num.txt").read_text().strip() == "4"
    out = capsys.readouterr().out
    assert "stopped: bad step at iteration 4: nonfinite loss (3 bad steps in a row, more than --max_bad_steps 2)" in out


def test_rollback_replays_from_the_checkpoint_and_skips_the_batch(dataset, tmp_path, inject, capsys):
    inject({7: "nan_loss"})
    common = ["--max_iters", "10", "--always_save_checkpoint"]
    assert _train(dataset, tmp_path / "skip", *common) == 0
    assert _train(dataset, tmp_path / "rollback", *common, "--on_bad_step", "rollback") == 0
    assert [(e["iter"], e["action"]) for e in _events(tmp_path / "rollback")] == [(7, "rollback"), (7, "skipped")]
    assert "rolled back to" in capsys.readouterr().err
    skip, rolled = _losses(tmp_path / "skip"), _losses(tmp_path / "rollback")
    assert sorted(rolled) == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert rolled == skip  # the replay of 5 and 6 is exact, so dropping batch 7 equals skipping it
    state = ckpt.load_trainer_state(ckpt.resolve_checkpoint(str(tmp_path / "rollback")))
    assert state["bad_steps"] == {"skip_iters": [7]}
