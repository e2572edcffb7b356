"""Drill 5, preemption: SIGTERM or SIGUSR1 at any moment finishes the step in flight, writes a
checkpoint and ends the run normally (exit 0); ``--init_from resume`` then gives the losses of an
uninterrupted run bit for bit (fp32). In a parallel run only one rank gets the signal and every
rank stops at the same iteration. A test hook sends the signal from inside a chosen step."""
import os
import signal

import pytest

from forge_dist.testing.data import corpus_dataset
from forge_dist.train import checkpoint as ckpt
from forge_dist.train.cli import main
from forge_dist.train.metrics import read_metrics

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "2", "--eval_interval", "5", "--log_interval", "1", "--device", "cpu",
        "--dtype", "float32", "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress",
        "--dropout", "0.1", "--lr_scheduler", "cosine", "--warmup_iters", "2", "--lr_decay_iters", "12"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return corpus_dataset(tmp_path_factory.mktemp("data"), 40_000)


def _signal_at(engine_cls, call: int, signum: int):
    """Patch ``engine_cls.forward_backward`` to send ``signum`` to this process inside call ``call``
    (1-based), i.e. in the middle of iteration ``call - 1``. Returns the undo function."""
    original, calls = engine_cls.forward_backward, []

    def hooked(self, micro_batches):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return original(self, micro_batches)

    engine_cls.forward_backward = hooked
    return lambda: setattr(engine_cls, "forward_backward", original)


def _losses(out_dir):
    records = read_metrics(str(out_dir))
    return ({r["iter"]: r["loss"] for r in records if "loss" in r},
            {r["iter"]: r["val_loss"] for r in records if "val_loss" in r})


def _train(dataset, out_dir, *args):
    try:
        return main(TINY + ["--dataset", dataset, "--out_dir", str(out_dir), *args])
    except SystemExit as e:
        return e.code


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_resumes_exactly(dataset, tmp_path, capsys):
    from forge_dist.train.engine import LocalEngine

    assert _train(dataset, tmp_path / "full", "--max_iters", "12") == 0
    undo = _signal_at(LocalEngine, 5, signal.SIGTERM)  # inside iteration 4, an evaluation is due at 5
    try:
        assert _train(dataset, tmp_path / "cut", "--max_iters", "12") == 0
    finally:
        undo()
    err = capsys.readouterr()
    assert "SIGTERM received" in err.err and "preempted (SIGTERM): stopped at iteration 5" in err.out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    root = tmp_path / "cut" / "checkpoints"
    assert ckpt.read_pointer(str(root)) == "iter_0000005"
    ckpt.verify_checkpoint(str(root / "iter_0000005"))
    state = ckpt.load_trainer_state(str(root / "iter_0000005"))
    assert state["eval_done"] is False
    assert sorted(_losses(tmp_path / "cut")[0]) == [0, 1, 2, 3, 4]  # iteration 4 finished, 5 never began
    assert _train(dataset, tmp_path / "cut", "--init_from", "resume") == 0
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [full[0][i] for i in range(12)] == [cut[0][i] for i in range(12)]  # bit for bit
    assert full[1] == cut[1] and sorted(cut[1]) == [0, 5, 10, 12]  # the evaluation at 5 ran after the resume


def _rank_runs(rank, world_size, dataset, out_dir):
    """Three runs in one world of 2 data-parallel ranks: uninterrupted; SIGUSR1 to rank 1 alone in
    iteration 3; the resume. Returns each run's (stop reason, iteration, signal)."""
    from forge_dist.testing.runs import fit, in_step, parallel_context

    ctx = parallel_context(rank, world_size)
    argv = TINY + ["--dataset", dataset, "--max_iters", "8"]
    full = fit(argv + ["--out_dir", os.path.join(out_dir, "full")], ctx)
    signal_rank_1 = in_step(4, lambda: os.kill(os.getpid(), signal.SIGUSR1)) if rank == 1 else None
    cut = fit(argv + ["--out_dir", os.path.join(out_dir, "cut")], ctx, signal_rank_1)
    resumed = fit(argv + ["--out_dir", os.path.join(out_dir, "cut"), "--init_from", "resume"], ctx)
    return [(r.stop_reason, r.iteration, r.stopped_by) for r in (full, cut, resumed)]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(240)
def test_one_rank_signalled_every_rank_stops_at_the_same_step(dataset, tmp_path):
    from forge_dist.testing.spawn import spawn

    results = spawn(_rank_runs, 2, dataset, str(tmp_path), timeout=200, return_all=True)
    assert [r[0][:2] for r in results] == [("max_iters", 8)] * 2
    assert [r[1] for r in results] == [("preempted", 4, "a signal on another rank"), ("preempted", 4, "SIGUSR1")]
    assert [r[2][:2] for r in results] == [("max_iters", 8)] * 2
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [full[0][i] for i in range(8)] == [cut[0][i] for i in range(8)]  # bit for bit
    assert full[1] == cut[1]
