"""forge-train's launch decisions, in-process with faked launcher environments: every bad parallel
option is refused with one line (exit 2) before any process group exists; the engine is chosen
by the options (DeepSpeed only when asked for); launch options never come from a checkpoint."""
import subprocess
import sys
import types

import pytest
import torch.distributed as dist

from forge_dist.errors import ConfigError
from forge_dist.train import launch
from forge_dist.train.build import _known
from forge_dist.train.cli import main, option_groups
from forge_dist.train.options import TrainConfig
from forge_dist.testing.data import corpus_dataset

TINY = ["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--batch_size", "2",
        "--max_iters", "1", "--eval_iters", "1", "--eval_interval", "5", "--device", "cpu", "--dtype", "float32",
        "--max_sample_tokens", "none", "--no-tensorboard_log", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return corpus_dataset(tmp_path_factory.mktemp("data"), 20_000)


@pytest.fixture
def no_process_group(monkeypatch):
    """Any attempt to create a process group fails the test (instead of hanging on a rendezvous)."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a process group was requested before the bad input was refused")

    import forge_dist.dist.init

    monkeypatch.setattr(forge_dist.dist.init, "init_distributed", forbidden)
    monkeypatch.setattr(dist, "init_process_group", forbidden)
    yield
    assert not dist.is_initialized()


def fake_launch(monkeypatch, launcher="torchrun", rank=0, world=2):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK",
              "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_PROCID",
              "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    if launcher == "torchrun":
        env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world,
               "TORCHELASTIC_RUN_ID": "test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    elif launcher == "mpirun":
        env = {"OMPI_COMM_WORLD_RANK": rank, "OMPI_COMM_WORLD_SIZE": world, "OMPI_COMM_WORLD_LOCAL_RANK": rank,
               "OMPI_COMM_WORLD_LOCAL_SIZE": world}
    else:
        env = {}
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def refused(capsys, dataset, tmp_path, *args):
    """(exit status, stderr lines) of an in-process forge-train that must stop before training."""
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--dataset", dataset, "--out_dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started
    return e.value.code, err.strip().splitlines()


@pytest.mark.parametrize("launcher,world,args,message", [
    ("torchrun", 3, ["--tensor_parallel_size", "2"],
     "world size 3 is not a product of tensor_parallel_size=2 x pipeline_parallel_size=1"),
    ("mpirun", 2, ["--tensor_parallel_size", "2", "--n_head", "3", "--n_embd", "48"],
     "n_head=3 is not divisible by tensor_parallel_size=2"),
    ("torchrun", 2, ["--tensor_parallel_size", "2", "--sequence_parallel", "--block_size", "31"],
     "sequence_parallel splits block_size=31 tokens over tensor_parallel_size=2"),
    ("torchrun", 2, ["--pipeline_parallel_size", "2"],
     "gradient_accumulation_steps=1 (the micro-batches per step): 1f1b needs at least pipeline_parallel_size=2"),
    ("torchrun", 2, ["--pipeline_parallel_size", "2", "--pipeline_schedule", "interleaved_1f1b"],
     "n_layer=2 is fewer than pipeline_parallel_size=2 x virtual_pipeline_size=2 = 4 stages"),
    ("torchrun", 3, ["--pipeline_parallel_size", "2"],
     "world size 3 is not a product of tensor_parallel_size=1 x pipeline_parallel_size=2"),
    ("torchrun", 2, ["--pipeline_parallel_size", "2", "--gradient_accumulation_steps", "2",
                     "--pipeline_layers", "1,2"], "pipeline_layers=1,2: give 2 positive layer counts"),
    ("torchrun", 2, ["--pipeline_parallel_size", "2", "--virtual_pipeline_size", "2"],
     "virtual_pipeline_size=2 with pipeline_schedule=1f1b"),
    ("torchrun", 2, ["--pipeline_parallel_size", "2", "--pipeline_schedule", "zbv", "--gradient_accumulation_steps",
                     "2", "--n_layer", "4"], "zbv needs at least 2 x pipeline_parallel_size = 4 micro-batches"),
    ("mpirun", 2, ["--expert_parallel_size", "2"],
     "expert_parallel_size=2 needs a mixture-of-experts model: add --use_moe"),
    ("torchrun", 2, ["--expert_parallel_size", "2", "--use_moe", "--n_experts", "3"],
     "n_experts=3 is not divisible by expert_parallel_size=2"),
    ("torchrun", 2, ["--expert_parallel_size", "4", "--use_moe", "--n_experts", "4"],
     "expert_parallel_size=4 must divide the data-parallel size 2"),
    ("torchrun", 4, ["--expert_parallel_size", "2", "--use_moe", "--moe_router_scheme", "noisy_top_k"],
     "moe_router_scheme=noisy_top_k with expert_parallel_size=2"),
    ("torchrun", 4, ["--expert_parallel_size", "2", "--use_moe", "--tensor_parallel_size", "2",
                     "--expert_tensor_parallel_size", "3"], "expert_tensor_parallel_size=3: experts are either whole"),
    ("torchrun", 2, ["--tensor_parallel_size", "0"], "tensor_parallel_size=0 must be a positive integer"),
    ("torchrun", 2, ["--zero_stage", "2"], "zero_stage=2: the native engine runs ZeRO stage 0"),
    ("torchrun", 4, ["--zero_stage", "1", "--expert_parallel_size", "2", "--use_moe", "--pipeline_parallel_size",
                     "2"], "zero_stage=1 with expert_parallel_size=2 and pipeline_parallel_size=2"),
    ("torchrun", 2, ["--dist_backend", "nccl"], "dist_backend=nccl needs CUDA tensors but the device is cpu"),
    ("single", 1, ["--tensor_parallel_size", "2"], "torchrun --nproc_per_node 2 -m forge_dist.train"),
])
def test_bad_parallel_options_exit_2_with_one_line(monkeypatch, capsys, dataset, tmp_path, no_process_group,
                                                   launcher, world, args, message):
    fake_launch(monkeypatch, launcher, world=world)
    code, lines = refused(capsys, dataset, tmp_path, *args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("forge-train: error: ") and message in lines[0], lines


@pytest.mark.parametrize("zero, message", [
    ({"stage": 3}, "zero_optimization.stage=3 with an MoE model"),
    ({"stage": 2, "contiguous_gradients": False}, "zero_optimization.contiguous_gradients=false with "
                                                  "expert_parallel_size=2"),
])
def test_deepspeed_expert_parallel_refusals(monkeypatch, capsys, dataset, tmp_path, no_process_group, zero, message):
    """ZeRO-1/2 run with experts (tests/dist/test_expert_deepspeed.py); ZeRO-3, and ZeRO-2 without
    the contiguous gradients DeepSpeed needs to partition expert gradients, exit 2 before launch."""
    import json

    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                  "gradient_accumulation_steps": "auto", "zero_optimization": zero}))
    fake_launch(monkeypatch, "torchrun", world=2)
    code, lines = refused(capsys, dataset, tmp_path, "--use_moe", "--n_experts", "4", "--expert_parallel_size", "2",
                          "--deepspeed_config", str(config))
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_resume_with_another_global_batch_is_refused_before_any_process_group(monkeypatch, capsys, dataset, tmp_path):
    """A one-process checkpoint of global batch 2 resumed by 2 data-parallel replicas of batch 2."""
    monkeypatch.setenv("FORGE_OPS", "reference")
    fake_launch(monkeypatch, "none")
    out = tmp_path / "out"
    assert main(TINY + ["--dataset", dataset, "--out_dir", str(out)]) == 0
    capsys.readouterr()
    fake_launch(monkeypatch, "torchrun", world=2)
    import forge_dist.dist.init

    monkeypatch.setattr(forge_dist.dist.init, "init_distributed",
                        lambda *a, **k: pytest.fail("a process group was requested"))
    with pytest.raises(SystemExit) as e:
        main(TINY + ["--dataset", dataset, "--out_dir", str(out), "--init_from", "resume", "--max_iters", "2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and "global_batch_size=2, this run 4" in lines[0], lines


@pytest.mark.parametrize("launcher, code", [("torchrun", 0), ("mpirun", 2)])
def test_other_ranks_refuse_silently(monkeypatch, capsys, dataset, tmp_path, no_process_group, launcher, code):
    """Every rank of a launch refuses the same input; only rank 0 prints the line. Under torchrun
    the others exit 0, so torchrun reports rank 0 (whose line it repeats) instead of stopping it."""
    fake_launch(monkeypatch, launcher, rank=1, world=3)
    assert refused(capsys, dataset, tmp_path, "--tensor_parallel_size", "2") == (code, [])


def test_inconsistent_launch_environment_is_one_line(monkeypatch, capsys, dataset, tmp_path, no_process_group):
    fake_launch(monkeypatch, "none")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, lines = refused(capsys, dataset, tmp_path)
    assert code == 2 and len(lines) == 1 and "launch environment: env: rank 2 outside world of 2" in lines[0]


def test_missing_deepspeed_config_file(monkeypatch, capsys, dataset, tmp_path, no_process_group):
    fake_launch(monkeypatch, "none")
    code, lines = refused(capsys, dataset, tmp_path, "--deepspeed_config", str(tmp_path / "nope.json"))
    assert code == 2 and len(lines) == 1 and "nope.json: no such file" in lines[0]


def test_deepspeed_engine_module_absent(monkeypatch, capsys, dataset, tmp_path, no_process_group):
    fake_launch(monkeypatch, "none")
    monkeypatch.setattr(launch, "DEEPSPEED_MODULE", "forge_dist.train._no_such_engine")
    cfg = tmp_path / "ds.json"
    cfg.write_text("{}")
    code, lines = refused(capsys, dataset, tmp_path, "--deepspeed_config", str(cfg))
    assert code == 2 and len(lines) == 1 and "has no DeepSpeed engine yet" in lines[0] and "issue 6" in lines[0]


def test_deepspeed_config_selects_its_factory_and_preflight(monkeypatch, tmp_path):
    """--deepspeed_config imports the engine module (only then), runs its optional preflight before any
    process group, and returns its deepspeed_engine_factory."""
    calls = []
    fake = types.ModuleType("fake_ds_engine")

    def deepspeed_engine_factory(model, train_cfg, values, ctx):
        raise AssertionError("not called by plan_launch")

    deepspeed_engine_factory.__module__ = "fake_ds_engine"
    fake.deepspeed_engine_factory = deepspeed_engine_factory
    fake.preflight = lambda values, train_cfg, model_cfg, pcfg, world: calls.append(
        (values["deepspeed_config"], train_cfg.batch_size, model_cfg.n_layer, pcfg.tensor_parallel_size, world))
    monkeypatch.setitem(sys.modules, "fake_ds_engine", fake)
    monkeypatch.setattr(launch, "DEEPSPEED_MODULE", "fake_ds_engine")
    cfg = tmp_path / "ds.json"
    cfg.write_text("{}")
    from forge_dist import ModelConfig

    values = {"deepspeed_config": str(cfg), "tensor_parallel_size": 2}
    plan = launch.plan_launch(values, ModelConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=65),
                              TrainConfig(device="cpu", batch_size=3), environ={"RANK": "0", "WORLD_SIZE": "2"})
    assert plan.engine_factory is deepspeed_engine_factory
    assert calls == [(str(cfg), 3, 2, 2, 2)]
    assert (plan.backend, plan.world_size, plan.parallel_config.tensor_parallel_size) == ("gloo", 2, 2)


def test_preflight_refusal_is_a_config_error(monkeypatch, tmp_path):
    fake = types.ModuleType("fake_ds_engine2")

    def deepspeed_engine_factory(model, train_cfg, values, ctx):
        pass

    deepspeed_engine_factory.__module__ = "fake_ds_engine2"
    fake.deepspeed_engine_factory = deepspeed_engine_factory

    def preflight(values, train_cfg, model_cfg, pcfg, world):
        raise ConfigError("fp16 is not supported on this device; use bf16")

    fake.preflight = preflight
    monkeypatch.setitem(sys.modules, "fake_ds_engine2", fake)
    monkeypatch.setattr(launch, "DEEPSPEED_MODULE", "fake_ds_engine2")
    cfg = tmp_path / "ds.json"
    cfg.write_text("{}")
    from forge_dist import ModelConfig

    with pytest.raises(ConfigError, match="fp16 is not supported"):
        launch.plan_launch({"deepspeed_config": str(cfg)}, ModelConfig(n_layer=2, n_head=4, n_embd=32),
                           TrainConfig(device="cpu"), environ={})


def test_default_factory_without_deepspeed_config():
    from forge_dist.train.parallel_engine import parallel_engine_factory

    assert launch.engine_factory({"deepspeed_config": None}) is parallel_engine_factory


def test_launch_options_are_not_taken_from_a_checkpoint():
    saved = {"tensor_parallel_size": 2, "sequence_parallel": True, "deepspeed_config": "ds.json", "n_layer": 3,
             "batch_size": 8, "dist_timeout_minutes": 5.0}
    assert _known(saved, option_groups()) == {"n_layer": 3, "batch_size": 8}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_single_process_run_never_imports_deepspeed(dataset, tmp_path):
    code = ("import sys; from forge_dist.train.cli import main; "
            f"rc = main({TINY + ['--dataset', dataset, '--out_dir', str(tmp_path / 'out')]!r}); "
            "print('DEEPSPEED_IMPORTED' if 'deepspeed' in sys.modules else 'NO_DEEPSPEED'); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110,
                         env={**__import__("os").environ, "FORGE_OPS": "reference"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "NO_DEEPSPEED"


@pytest.mark.parametrize("argv,kept", [
    (["--local_rank=1", "--n_layer", "2"], ["--n_layer", "2"]),  # the deepspeed launcher's form
    (["--n_layer", "2", "--local_rank", "0"], ["--n_layer", "2"]),
    (["--local-rank=3", "--max_iters", "5"], ["--max_iters", "5"]),
    (["--out_dir", "local_rank"], ["--out_dir", "local_rank"]),
])
def test_launcher_local_rank_argument_is_dropped(argv, kept):
    from forge_dist.train.cli import strip_launcher_args

    assert strip_launcher_args(argv) == kept
