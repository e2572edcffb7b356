"""What a new user meets with the README alone: converting a run, sampling and evaluating what was
converted, the hints printed on mistakes, and a quiet install."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from forge_dist.config.arguments import runnable
from forge_dist.data.dataset import resolve_dataset
from forge_dist.data.errors import DataError
from forge_dist.inference import evaluate as eval_cli
from forge_dist.inference import sample as sample_cli
from forge_dist.io.convert import main as convert_main
from forge_dist.io.reallm_forge import TOKENIZER_KEY
from forge_dist.testing.data import corpus_dataset
from forge_dist.train.cli import main as train_main
from forge_dist.config.device import quiet_libraries
from forge_dist.train.progress import fmt_mfu

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ["--start", "The fox", "--max_new_tokens", "12", "--temperature", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-iteration run whose dataset is moved away afterwards: what it saved must do."""
    root = tmp_path_factory.mktemp("first_use")
    data = corpus_dataset(root, 20_000)
    out = root / "out"
    assert train_main(["--dataset", data, "--out_dir", str(out), "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
                       "--block_size", "16", "--batch_size", "2", "--max_iters", "4", "--eval_interval", "4",
                       "--eval_iters", "1", "--device", "cpu", "--dtype", "float32", "--max_sample_tokens", "none",
                       "--no-tensorboard_log", "--no-progress"]) == 0
    return out


def _text(cli, argv, capsys):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def test_convert_takes_an_out_dir_and_a_checkpoint_and_the_tokenizer_travels(run, tmp_path, capsys):
    want = _text(sample_cli, ["--out_dir", str(run), *SAMPLE], capsys)
    iter_dir = run / "checkpoints" / "iter_0000004"
    assert convert_main([str(run), str(tmp_path / "model"), "--to", "forge"]) == 0
    assert convert_main([str(iter_dir), str(tmp_path / "ckpt.pt"), "--to", "reallm-forge"]) == 0
    assert TOKENIZER_KEY in torch.load(tmp_path / "ckpt.pt", weights_only=True)
    capsys.readouterr()
    # no --dataset anywhere: the converted model, the ckpt.pt and the checkpoint's own model/ sample alike
    for src in (tmp_path / "model", tmp_path / "ckpt.pt", iter_dir / "model"):
        assert _text(sample_cli, ["--out_dir", str(src), *SAMPLE], capsys) == want, src
    evals = [json.loads(_text(eval_cli, ["--out_dir", str(src), "--eval_iters", "2", "--batch_size", "2", "--seed",
                                         "1", "--json", "--device", "cpu"], capsys)) for src in (run, tmp_path / "ckpt.pt")]
    assert evals[0]["dataset"] == evals[1]["dataset"] and evals[0]["loss"] == pytest.approx(evals[1]["loss"], 1e-6)


def test_a_flipped_byte_is_refused_with_each_tools_own_option(run, tmp_path, capsys):
    bad = tmp_path / "out"
    shutil.copytree(run, bad)
    weights = bad / "checkpoints" / "iter_0000004" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert convert_main([str(bad), str(tmp_path / "m"), "--to", "forge"]) == 2
    err = capsys.readouterr().err
    assert "does not match its sha256" in err and "checkpoints/iter_N" in err and not (tmp_path / "m").exists()
    for cli in (sample_cli, eval_cli):
        with pytest.raises(SystemExit) as e:
            cli.main(["--out_dir", str(bad), "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "does not match its sha256" in err
        assert "--ckpt" in err and "--init_from" not in err, err


def test_missing_dataset_hint_names_the_folder_once(tmp_path):
    with pytest.raises(DataError, match=r"--out_dir data/mine`"):
        resolve_dataset("data/mine", data_root=tmp_path / "data")
    with pytest.raises(DataError, match=r"--out_dir " + str(tmp_path / "data" / "mine") + "`"):
        resolve_dataset("mine", data_root=tmp_path / "data")


def test_printed_commands_run_as_typed(monkeypatch, tmp_path):
    beside = Path(sys.executable).parent / "forge-sample"
    assert beside.is_file()
    monkeypatch.setenv("PATH", str(tmp_path))  # not activated: the path next to this Python
    cmd = runnable("forge-sample")
    assert cmd != "forge-sample" and os.path.samefile(cmd, beside)
    monkeypatch.setenv("PATH", str(beside.parent))  # activated: the bare name
    assert runnable("forge-sample") == "forge-sample"


def test_mfu_is_shown_only_when_known():
    assert fmt_mfu(None) == "" and fmt_mfu(0.125) == ", MFU 12.5%"


def test_library_noise_is_quieted(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("a warning of ours", FutureWarning)
    assert [str(w.message) for w in seen] == ["a warning of ours"]
    if not torch.cuda.is_available():  # DeepSpeed is told instead of guessing (and warning) on every import
        assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_install_prints_no_missing_package_warnings(tmp_path):
    shutil.copytree(ROOT / "forge_dist", tmp_path / "forge_dist", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "is absent from the `packages`" not in r.stdout + r.stderr
    assert (tmp_path / "build" / "lib" / "forge_dist" / "data" / "corpus" / "fables.txt").is_file()
