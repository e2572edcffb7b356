"""The README's resume command (`--init_from resume --max_iters 1200` after an 800-iteration cosine
run), in small: the resumed run keeps the saved schedule and equals the uninterrupted run."""
import pytest

from forge_dist.train.cli import main
from forge_dist.train.metrics import read_metrics
from forge_dist.train.resume_options import resume_overrides
from forge_dist.testing.data import corpus_dataset

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "2",
        "--eval_iters", "1", "--eval_interval", "4", "--log_interval", "1", "--device", "cpu",
        "--dtype", "float32", "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress",
        "--lr_scheduler", "cosine", "--warmup_iters", "2", "--learning_rate", "3e-3", "--min_lr", "3e-4"]


def _run(dataset, out_dir, *args):
    return main(TINY + ["--dataset", dataset, "--out_dir", str(out_dir), *args])


def _steps(out_dir):
    return [(r["iter"], r["lr"], r["loss"]) for r in read_metrics(str(out_dir)) if "loss" in r]


@pytest.mark.slow
def test_resume_with_more_iterations_keeps_the_schedule(tmp_path, capsys):
    dataset = corpus_dataset(tmp_path, 20_000)
    assert _run(dataset, tmp_path / "full", "--max_iters", "12", "--lr_decay_iters", "8") == 0
    assert _run(dataset, tmp_path / "half", "--max_iters", "8") == 0  # the horizon follows max_iters
    capsys.readouterr()
    assert _run(dataset, tmp_path / "half", "--init_from", "resume", "--max_iters", "12") == 0
    said = capsys.readouterr()
    text = said.out + said.err
    assert "resume: max_iters 8 -> 12" in text and "lr_decay_iters stays 8" in text
    full, resumed = _steps(tmp_path / "full"), _steps(tmp_path / "half")
    assert [s[0] for s in resumed] == list(range(12))
    assert resumed == full  # same iterations, learning rates and losses, bit for bit
    assert [lr for _, lr, _ in resumed[8:]] == [3e-4] * 4  # past the horizon: min_lr, no jump back up


def test_an_explicit_horizon_or_an_unchanged_one_is_left_alone():
    saved = {"max_iters": 800, "lr_decay_iters": None, "dropout": 0.1}
    assert resume_overrides(saved, {"max_iters": 1200, "lr_decay_iters": 1200}) == (
        {}, ["resume: lr_decay_iters None -> 1200 (given on the command line)",
             "resume: max_iters 800 -> 1200 (given on the command line)"])
    assert resume_overrides(saved, {"init_from": "resume", "max_iters": 800}) == ({}, [])
    pinned, notes = resume_overrides(saved, {"max_iters": 1200})
    assert pinned == {"lr_decay_iters": 800} and len(notes) == 2
    assert resume_overrides({**saved, "lr_decay_iters": 900}, {"max_iters": 1200})[0] == {}  # already fixed
