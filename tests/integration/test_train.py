"""forge-train end to end, in-process through its ``main``: resume, stops, outputs, bad input."""
import os
import shutil

import pytest
import torch

from forge_dist.train import checkpoint as ckpt
from forge_dist.train.cli import main
from forge_dist.train.metrics import read_metrics
from forge_dist.testing.data import corpus_dataset
from forge_dist.testing.runs import logged_losses, train_exit_code

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
        "--eval_iters", "2", "--eval_interval", "5", "--log_interval", "1", "--device", "cpu",
        "--dtype", "float32", "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small char-level dataset cut from the bundled corpus."""
    return corpus_dataset(tmp_path_factory.mktemp("data"), 40_000)


def train(dataset, out_dir, *args):
    return train_exit_code(TINY, dataset, out_dir, *args)


losses = logged_losses


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A finished 10-iteration run (its checkpoint is reused by the bad-input tests)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    assert train(dataset, out, "--max_iters", "10") == 0
    return out


@pytest.mark.slow
def test_resume_is_bit_exact(dataset, tmp_path):
    common = ["--lr_scheduler", "cosine", "--warmup_iters", "3", "--lr_decay_iters", "20", "--dropout", "0.1",
              "--gradient_accumulation_steps", "2"]
    assert train(dataset, tmp_path / "full", *common, "--max_iters", "20") == 0
    assert train(dataset, tmp_path / "half", *common, "--max_iters", "10") == 0
    assert train(dataset, tmp_path / "half", "--init_from", "resume", "--max_iters", "20") == 0
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "half")
    assert [r["iter"] for r in read_metrics(str(tmp_path / "half")) if "loss" in r] == list(range(20))
    assert [full[i] for i in range(20)] == [resumed[i] for i in range(20)]  # bit for bit
    val = [r["val_loss"] for r in read_metrics(str(tmp_path / "full")) if "val_loss" in r]
    val_resumed = [r["val_loss"] for r in read_metrics(str(tmp_path / "half")) if "val_loss" in r]
    assert val == val_resumed
    saved = ckpt.read_config(ckpt.resolve_checkpoint(str(tmp_path / "half")))
    assert saved["dropout"] == 0.1 and saved["max_iters"] == 20  # kept, and the explicit override


def test_outputs_of_a_run(trained):
    records = read_metrics(str(trained))
    stepped = [r for r in records if "loss" in r]
    assert [r["iter"] for r in stepped] == list(range(10))
    for r in stepped:
        assert {"iter", "loss", "lr", "tokens_per_s", "mfu"} <= set(r) and r["mfu"] is None  # CPU: no peak
    assert [r["iter"] for r in records if "val_loss" in r] == [0, 5, 10]
    assert os.path.getsize(trained / "loss.png") > 1000
    assert ckpt.read_pointer(str(trained / "checkpoints")) == "iter_0000010"
    assert "n_layer: 2" in (trained / "config.yaml").read_text()


@pytest.mark.slow
def test_default_preset_smoke(tmp_path, monkeypatch, capsys):
    """The embedded preset on the bundled corpus (prepared into a private cache), a few iterations."""
    monkeypatch.setenv("FORGE_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert main(["--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1", "--max_sample_tokens", "20",
                 "--no-progress"]) == 0
    out = tmp_path / "out"
    assert [r["iter"] for r in read_metrics(str(out)) if "loss" in r] == [0, 3]  # log_interval 10, and the last
    assert (out / "loss.png").is_file()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(out / "tensorboard"))
    ckpt.verify_checkpoint(ckpt.resolve_checkpoint(str(out)))
    printed = capsys.readouterr().out
    assert "--- sample ---" in printed and "wrote out" in printed
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["n_layer"] == 4  # the preset's model


def test_nan_stop_keeps_last_good_checkpoint(dataset, tmp_path, monkeypatch):
    from forge_dist.train.engine import LocalEngine

    calls = {"n": 0}
    original = LocalEngine.forward_backward

    def poisoned(self, micro_batches):
        calls["n"] += 1
        if calls["n"] == 8:  # iteration 7: the weights go bad
            with torch.no_grad():
                self.model.transformer.wte.weight.fill_(float("nan"))
        return original(self, micro_batches)

    monkeypatch.setattr(LocalEngine, "forward_backward", poisoned)
    assert train(dataset, tmp_path, "--max_iters", "20", "--always_save_checkpoint", "--on_bad_step", "stop") == 1
    assert (tmp_path / "nan_iter_num.txt").read_text().strip() == "7"
    assert read_metrics(str(tmp_path))[-1] == {"iter": 7, "nan_stop": True}
    last = ckpt.resolve_checkpoint(str(tmp_path))
    assert last.endswith("iter_0000005")
    from forge_dist.io import from_pretrained

    weights = from_pretrained(os.path.join(last, ckpt.MODEL_DIR)).state_dict().values()
    assert all(torch.isfinite(t).all() for t in weights)


def _train_rank(rank, world_size, dataset, out_dir):
    """One rank of a 2-process run whose rank 1 alone sees a NaN at iteration 3."""
    from forge_dist.presets import read_preset
    from forge_dist.config.arguments import parse_options
    from forge_dist.train.build import build_run
    from forge_dist.train.cli import option_groups
    from forge_dist.train.context import RunContext
    from forge_dist.train.engine import LocalEngine
    from forge_dist.train.trainer import Trainer

    if rank == 1:
        original, calls = LocalEngine.forward_backward, []

        def poisoned(self, micro_batches):
            calls.append(1)
            loss = original(self, micro_batches)
            return loss * float("nan") if len(calls) == 4 else loss

        LocalEngine.forward_backward = poisoned
    groups = option_groups()
    parsed = parse_options(TINY + ["--dataset", dataset, "--out_dir", out_dir, "--max_iters", "10", "--on_bad_step",
                                   "stop"], "forge-train",
                           groups, read_preset())
    ctx = RunContext(rank=rank, world_size=world_size, dp_rank=rank, dp_size=world_size)
    result = Trainer(build_run(parsed, groups, ctx)).fit()
    return result.stop_reason, result.iteration, result.nan_iter


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(180)
def test_nan_on_one_rank_stops_every_rank(dataset, tmp_path):
    from forge_dist.testing.spawn import spawn

    results = spawn(_train_rank, 2, dataset, str(tmp_path), timeout=150, return_all=True)
    assert results == [("nan", 3, 3), ("nan", 3, 3)]  # no rank went on alone (it would hang in eval)
    assert (tmp_path / "nan_iter_num.txt").read_text().strip() == "3"
    assert [r["iter"] for r in read_metrics(str(tmp_path)) if "loss" in r] == [0, 1, 2]  # rank 0's log


def test_gradient_checkpointing_and_bfloat16(dataset, tmp_path):
    runs = {"base": [], "ckpt": ["--use_gradient_checkpointing"], "bf16": ["--dtype", "bfloat16"]}
    got = {}
    for name, extra in runs.items():
        assert train(dataset, tmp_path / name, "--max_iters", "3", "--eval_interval", "100", *extra) == 0
        got[name] = [losses(tmp_path / name)[i] for i in range(3)]
    assert got["ckpt"] == got["base"]  # recomputation changes nothing
    assert got["bf16"] != got["base"] and got["bf16"] == pytest.approx(got["base"], rel=2e-2)


def test_patience_stops_early(dataset, tmp_path):
    # learning rate 0: the val loss never improves after the first evaluation
    assert train(dataset, tmp_path, "--max_iters", "50", "--learning_rate", "0", "--patience", "0") == 0
    assert max(losses(tmp_path)) == 4  # stopped at the evaluation of iteration 5
    assert ckpt.read_pointer(str(tmp_path / "checkpoints")) == "iter_0000005"


def test_prev_run_starts_from_the_weights(dataset, trained, tmp_path):
    assert train(dataset, tmp_path, "--init_from", "prev_run", "--prev_run_ckpt", str(trained), "--max_iters", "1") == 0
    first = read_metrics(str(tmp_path))[0]
    final_val = [r["val_loss"] for r in read_metrics(str(trained)) if "val_loss" in r][-1]
    assert first["iter"] == 0 and first["val_loss"] == final_val  # same weights, same eval batches


def test_help_lists_every_option_with_its_default(capsys):
    from forge_dist import ModelConfig
    from forge_dist.train.options import TrainConfig

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ModelConfig.field_names() + TrainConfig.field_names():
        assert f"--{name}" in text, name
    assert "--use_pre_ln, --no-use_pre_ln" in text and "--config FILE" in text
    flat = " ".join(text.split())
    assert "--n_layer N_LAYER (default: 4)" in flat  # the embedded preset's value
    assert "--learning_rate LEARNING_RATE (default: 0.003)" in flat


def _bad(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("forge-train: error: "), err
    return err


def test_bad_input_exits_2_with_one_line(dataset, trained, tmp_path, capsys):
    out = ["--out_dir", str(tmp_path / "o"), "--dataset", dataset, "--device", "cpu"]
    assert "did you mean --n_layer?" in _bad(capsys, ["--n_layers", "3"])
    assert "invalid int value: 'three'" in _bad(capsys, ["--n_layer", "three"])
    assert "dataset 'nope' not found" in _bad(capsys, ["--dataset", "nope", "--out_dir", str(tmp_path)])
    assert "bfloat16" in _bad(capsys, out + ["--dtype", "float16"])
    assert "not divisible" in _bad(capsys, out + ["--n_embd", "30"])
    assert "vocab mismatch" in _bad(capsys, out + ["--vocab_size", "10"])
    assert "unknown option 'n_layerz'" in _bad(capsys, ["--config", _yaml(tmp_path, "n_layerz: 3")])
    assert "cannot read it" in _bad(capsys, ["--config", str(tmp_path / "missing.yaml")])
    assert "no checkpoint found" in _bad(capsys, out + ["--init_from", "resume"])
    assert "needs --prev_run_ckpt" in _bad(capsys, out + ["--init_from", "prev_run"])
    # a checkpoint from an incompatible model
    assert "incompatible model" in _bad(capsys, TINY + out + ["--init_from", "prev_run", "--prev_run_ckpt",
                                                              str(trained), "--n_embd", "64"])
    moved = tmp_path / "resume"
    shutil.copytree(trained, moved)
    assert "does not fit the model" in _bad(capsys, ["--out_dir", str(moved), "--init_from", "resume",
                                                     "--n_layer", "3"])


def test_vocab_mismatch_with_a_checkpoint(trained, tmp_path, capsys):
    from forge_dist.data.prepare import prepare_text

    text = tmp_path / "wide.txt"
    text.write_text("".join(chr(c) for c in range(0x3b1, 0x3b1 + 200)) * 20, encoding="utf-8")  # 200 letters
    prepare_text([text], tmp_path / "wide", tokenizer="char", val_fraction=0.1)
    err = _bad(capsys, TINY + ["--out_dir", str(tmp_path / "o"), "--dataset", str(tmp_path / "wide"),
                               "--init_from", "prev_run", "--prev_run_ckpt", str(trained)])
    assert "vocab mismatch" in err and "200 token ids" in err


def test_corrupt_checkpoint_is_refused_on_resume(trained, tmp_path, capsys):
    moved = tmp_path / "run"
    shutil.copytree(trained, moved)
    latest = ckpt.resolve_checkpoint(str(moved))
    weights = os.path.join(latest, ckpt.MODEL_DIR, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-5] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    before = sorted(os.listdir(moved / "checkpoints"))
    # named explicitly: refused (without a name, resume falls back to an older checkpoint: the drills)
    err = _bad(capsys, ["--out_dir", str(moved), "--init_from", "resume", "--init_from_ckpt", os.path.basename(latest),
                        "--max_iters", "20"])
    assert "corrupt" in err and "model/model.safetensors" in err
    assert sorted(os.listdir(moved / "checkpoints")) == before  # nothing overwritten


def _yaml(tmp_path, text):
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return str(path)


def test_config_file_and_command_line_override(dataset, tmp_path):
    preset = _yaml(tmp_path, "n_layer: 1\nlearning_rate: 2e-3\nmax_iters: 7\nbeta2: 0.95\n")
    assert train(dataset, tmp_path / "o", "--config", preset, "--max_iters", "2") == 0  # TINY says n_layer 2
    saved = ckpt.read_config(ckpt.resolve_checkpoint(str(tmp_path / "o")))
    assert saved["learning_rate"] == 2e-3 and saved["beta2"] == 0.95  # from the file ("2e-3" is a str to YAML)
    assert saved["n_layer"] == 2 and saved["max_iters"] == 2  # the command line wins
    assert saved["n_embd"] == 32 and saved["eval_interval"] == 5


def test_repository_presets_are_valid():
    """configs/model/*.yaml parse with the option groups and build valid configs; tiny.yaml is the
    embedded default."""
    from pathlib import Path

    from forge_dist import ModelConfig
    from forge_dist.presets import read_preset
    from forge_dist.config.arguments import load_yaml_options
    from forge_dist.train.cli import option_groups
    from forge_dist.train.options import TrainConfig

    groups = option_groups()
    folder = Path(__file__).resolve().parents[2] / "configs" / "model"
    files = sorted(folder.glob("*.yaml"))
    assert {"tiny.yaml", "small.yaml"} <= {f.name for f in files}
    for f in files:
        values = load_yaml_options(f.read_text(), groups, source=f.name)
        ModelConfig(**{k: v for k, v in values.items() if k in ModelConfig.field_names()})
        TrainConfig(**{k: v for k, v in values.items() if k in TrainConfig.field_names()})
    embedded = load_yaml_options(read_preset(), groups, source="embedded")
    assert load_yaml_options((folder / "tiny.yaml").read_text(), groups, source="tiny.yaml") == embedded


def test_option_types_from_the_command_line():
    from forge_dist.presets import read_preset
    from forge_dist.config.arguments import parse_options
    from forge_dist.train.cli import option_groups

    parsed = parse_options(["--n_kv_group", "2", "--n_kv_group", "none", "--patience", "3", "--no-bias",
                            "--use_pre_ln_attn", "--n_head_layerlist", "2", "4", "--gaussian_max_norm", "inf",
                            "--learning_rate", "1e-4", "--attention_variant_layerlist", "causal", "none"],
                           "forge-train", option_groups(), read_preset())
    e = parsed.explicit
    assert e["n_kv_group"] is None and e["patience"] == 3 and e["bias"] is False and e["use_pre_ln_attn"] is True
    assert e["n_head_layerlist"] == [2, 4] and e["gaussian_max_norm"] == float("inf")
    assert e["learning_rate"] == 1e-4 and e["attention_variant_layerlist"] == ["causal", "none"]
    assert "n_layer" not in e and parsed.values["n_layer"] == 4  # the preset is a default, not explicit
