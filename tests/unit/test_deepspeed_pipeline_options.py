"""forge-train with --deepspeed_config and --pipeline_parallel_size > 1: what DeepSpeed's pipeline
path does not run is refused with one line (exit 2) before any process group exists."""
import os

import pytest
import torch.distributed as dist

from forge_dist.testing.data import corpus_dataset
from forge_dist.train.cli import main

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "deepspeed")
TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size", "2",
        "--max_iters", "1", "--eval_iters", "1", "--device", "cpu", "--dtype", "float32", "--max_sample_tokens",
        "none", "--no-tensorboard_log", "--no-progress", "--pipeline_parallel_size", "2",
        "--gradient_accumulation_steps", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return corpus_dataset(tmp_path_factory.mktemp("data"), 20_000)


def torchrun_env(monkeypatch, world: int) -> None:
    for k in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in {"RANK": 0, "WORLD_SIZE": world, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": world,
                 "TORCHELASTIC_RUN_ID": "test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, str(v))
    import forge_dist.dist.init

    def forbidden(*args, **kwargs):
        raise AssertionError("a process group was requested before the bad input was refused")

    monkeypatch.setattr(forge_dist.dist.init, "init_distributed", forbidden)
    monkeypatch.setattr(dist, "init_process_group", forbidden)


@pytest.mark.parametrize("world,config,args,message", [
    (2, "zero2_fp32.json", [], "zero_optimization.stage=2 with pipeline_parallel_size=2: DeepSpeed's pipeline "
                               "engine supports ZeRO stage 0 or 1 only"),
    (2, "zero3_bf16.json", ["--dtype", "bfloat16"], "zero_optimization.stage=3 with pipeline_parallel_size=2"),
    (2, "zero0_fp32.json", ["--pipeline_schedule", "gpipe"], "pipeline_schedule=gpipe / virtual_pipeline_size=None "
                                                             "with --deepspeed_config"),
    (2, "zero1_fp32.json", ["--shared_mlp_size", "2"], "are shared by layers on different stages"),
    (4, "zero1_fp32.json", ["--use_moe", "--n_experts", "2", "--expert_parallel_size", "2"],
     "expert_parallel_size=2 with --deepspeed_config with pipeline_parallel_size=2"),
])
def test_deepspeed_pipeline_refusals(monkeypatch, capsys, dataset, tmp_path, world, config, args, message):
    torchrun_env(monkeypatch, world)
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--dataset", dataset, "--out_dir", str(tmp_path / "out"),
                     "--deepspeed_config", os.path.join(CONFIGS, config), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    assert len(lines) == 1 and lines[0].startswith("forge-train: error: ") and message in lines[0], lines
    assert not dist.is_initialized()


def test_sequence_parallel_turns_off_deepspeeds_split_sends():
    """Under SP each TP rank holds its own sequence shard: DeepSpeed's pipe_partitioned /
    grad_partitioned (split a replicated activation over TP before sending) are set false, and a
    config asking for them is refused by key."""
    from types import SimpleNamespace

    from forge_dist.config.parallel import ParallelConfig
    from forge_dist.errors import ConfigError
    from forge_dist.train.deepspeed_pipeline import _pipeline_section

    groups = SimpleNamespace(tp=SimpleNamespace(size=2))
    sp = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2, sequence_parallel=True)
    resolved = SimpleNamespace(config={"train_batch_size": 8}, source="cfg.json")
    assert _pipeline_section(resolved, groups, sp)["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    no_sp = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2)
    assert "pipeline" not in _pipeline_section(resolved, groups, no_sp)  # replicated activations: DeepSpeed's default
    resolved.config["pipeline"] = {"pipe_partitioned": True}
    with pytest.raises(ConfigError, match="cfg.json: pipeline.pipe_partitioned=true with --sequence_parallel"):
        _pipeline_section(resolved, groups, sp)
