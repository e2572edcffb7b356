"""DeepSpeed configs (forge_dist.config.deepspeed): "auto" resolution from forge-train's options,
every refusal with one line naming the key and the fix, the shipped configs, the model-parallel
attributes that make tensor-parallel shards count once in DeepSpeed's gradient norm, and
forge-train refusing a bad config before any process group exists."""
import glob
import json
import os

import pytest
import torch

from forge_dist import ModelConfig
from forge_dist.config.deepspeed import KNOWN_KEYS, load_deepspeed_config, resolve_deepspeed_config
from forge_dist.errors import ConfigError
from forge_dist.train.options import TrainConfig

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "deepspeed")
deepspeed = pytest.importorskip("deepspeed")


def train_cfg(**kw):
    base = dict(batch_size=4, gradient_accumulation_steps=2, grad_clip=1.0, learning_rate=3e-4, device="cpu",
                dtype="float32")
    return TrainConfig(**{**base, **kw})


def resolve(raw, dp=2, fp16=False, **kw):
    return resolve_deepspeed_config(raw, train_cfg(**kw.pop("train", {})), dp, fp16_supported=fp16, **kw)


def refused(raw, *words, **kw):
    with pytest.raises(ConfigError) as e:
        resolve(raw, **kw)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)
    return message


def test_auto_values_come_from_our_options():
    ds = resolve({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                  "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                            "weight_decay": "auto"}},
                  "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                        "stage3_param_persistence_threshold": "auto"}},
                 model_config=ModelConfig(n_embd=64, n_head=4), train={"beta2": 0.95})
    c = ds.config
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"], c["train_batch_size"]) == (4, 2, 16)
    assert c["gradient_clipping"] == 1.0 and c["bf16"]["enabled"] is False and c["fp16"]["enabled"] is False
    assert c["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01}
    z = c["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == \
        (64 * 64, int(0.9 * 64 * 64), 640)
    assert (ds.zero_stage, ds.precision, ds.ds_optimizer) == (3, "fp32", True)


def test_zero3_buffers_are_bounded_by_the_model_not_deepspeeds_1e9():
    """sub_group_size, stage3_max_live_parameters and stage3_max_reuse_distance, missing or "auto",
    are about one weight matrix (docs/BENCHMARKS.md: with DeepSpeed's 1e9 a ZeRO-3 rank's step
    peak is the whole model's); a given value is kept; other stages get none of them."""
    cfg = ModelConfig(n_embd=64, n_head=4)
    z = resolve({"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": "auto"}},
                model_config=cfg).config["zero_optimization"]
    assert (z["sub_group_size"], z["stage3_max_live_parameters"], z["stage3_max_reuse_distance"]) == \
        (2 * 64 * 64, 2 * 64 * 64, 64 * 64)
    z = resolve({"zero_optimization": {"stage": 3, "sub_group_size": 10 ** 9}}, model_config=cfg).config
    assert z["zero_optimization"]["sub_group_size"] == 10 ** 9
    z = resolve({"zero_optimization": {"stage": 2}}, model_config=cfg).config["zero_optimization"]
    assert "sub_group_size" not in z and "stage3_max_reuse_distance" not in z
    with pytest.raises(ConfigError, match="stage3_max_live_parameters.*n_embd"):
        resolve({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "auto"}})


def test_missing_keys_are_filled_and_equal_values_accepted():
    ds = resolve({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 16})
    assert ds.config["gradient_clipping"] == 1.0 and ds.zero_stage == 0 and not ds.ds_optimizer


@pytest.mark.parametrize("raw,words", [
    ({"train_micro_batch_size_per_gpu": 8}, ["train_micro_batch_size_per_gpu=8", "--batch_size 4", "auto"]),
    ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4", "--gradient_accumulation_steps 2"]),
    ({"train_batch_size": 10}, ["train_batch_size=10", "does not divide", "--batch_size 4", "multiple of 8"]),
    ({"train_batch_size": 32}, ["train_batch_size=32", "contradicts", "= 16", "--gradient_accumulation_steps 4"]),
    ({"gradient_clipping": 0.5}, ["gradient_clipping=0.5", "--grad_clip 1.0"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, ["optimizer.params.lr=0.1", "--learning_rate 0.0003"]),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}}, ["optimizer.params.betas", "--beta1/--beta2"]),
    ({"optimizer": {"type": "Lamb"}}, ["optimizer.type=\"Lamb\"", "AdamW"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["scheduler", "--lr_scheduler", "remove"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled=true", "--dtype float32", "auto"]),
    ({"amp": {"enabled": True}}, ["amp.enabled", "apex", "bf16"]),
    ({"zero_optimization": {"stage": 4}}, ["zero_optimization.stage=4", "0, 1, 2, 3"]),
    ({"zero_optimization": {"stage": 2, "no_such_option": 1}}, ["zero_optimization.no_such_option"]),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, ["offload_param", "stage 3"]),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": True},
     ["zero_force_ds_cpu_optimizer=true", "\"optimizer\""]),
    ({"steps_per_print": 10, "zero_optimisation": {"stage": 1}}, ["'zero_optimisation'", "did you mean 'zero_optimization'",
                                                                  "train_batch_size"]),
    ({"steps_per_print": 10, "gradient_accumulation_step": 1}, ["did you mean 'gradient_accumulation_steps'"]),
    ({"wall_clock_breakdown": False, "some_key": 1}, ["unknown top-level key 'some_key'", "remove it"]),
    ({"checkpoint": {}, "overflow": "auto"}, ["'overflow'"]),
])
def test_refusals_name_the_key_and_the_fix(raw, words):
    refused(raw, *words)


def test_bf16_auto_follows_dtype_and_explicit_dtype_must_agree():
    assert resolve({"bf16": {"enabled": "auto"}}, train={"dtype": "bfloat16"}).precision == "bf16"
    assert resolve({"bf16": {"enabled": "auto"}}).precision == "fp32"
    assert resolve({"bf16": {"enabled": True}}, train={"dtype": "auto"}).precision == "bf16"  # the JSON decides
    refused({"bf16": {"enabled": False}}, "bf16.enabled=false", "--dtype bfloat16", train={"dtype": "bfloat16"})
    refused({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "bf16.enabled", "fp16.enabled", "one of them",
            fp16=True, train={"dtype": "auto"})


def test_fp16_is_refused_without_device_support_naming_bf16():
    refused({"fp16": {"enabled": True}}, "fp16.enabled=true", "bf16", "\"bf16\": {\"enabled\": true}", fp16=False,
            train={"dtype": "auto"})
    assert resolve({"fp16": {"enabled": True}}, fp16=True, train={"dtype": "auto"}).precision == "fp16"


def test_zero3_with_moe_and_pipeline_with_zero2_are_refused():
    moe = ModelConfig(n_layer=2, n_head=4, n_embd=32, use_moe=True, n_experts=4)
    refused({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3", "MoE", "stage 1 or 2", model_config=moe)
    assert resolve({"zero_optimization": {"stage": 2}}, model_config=moe).zero_stage == 2
    refused({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2", "pipeline_parallel_size=2",
            "\"stage\": 1", pipeline_parallel_size=2)
    assert resolve({"zero_optimization": {"stage": 1}}, pipeline_parallel_size=2).zero_stage == 1


def test_offload_with_our_adamw_allows_a_client_optimizer():
    ds = resolve({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert ds.offload_optimizer and ds.config["zero_force_ds_cpu_optimizer"] is False and not ds.ds_optimizer


def test_bad_json_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": "auto",\n  "zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"line 2 column"):
        load_deepspeed_config(str(bad))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_deepspeed_config(str(tmp_path / "list.json"))
    with pytest.raises(ConfigError, match="no such file"):
        load_deepspeed_config(str(tmp_path / "missing.json"))


def test_shipped_configs_resolve():
    from deepspeed.accelerator import get_accelerator

    fp16_here = bool(get_accelerator().is_fp16_supported())
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.json")))
    expected = {f"zero{s}_{p}.json" for s in range(4) for p in ("fp32", "bf16", "fp16_gpu")}
    expected |= {"zero2_offload_optimizer.json", "zero3_offload_optimizer.json", "zero3_offload_param.json",
                 "zero2_offload_optimizer_cpu_adam.json", "zero3_offload_param_cpu_adam.json"}
    assert set(names) == expected
    model = ModelConfig(n_layer=2, n_head=4, n_embd=32)
    for name in names:
        raw = load_deepspeed_config(os.path.join(CONFIGS, name))
        dtype = "bfloat16" if "bf16" in name else "float16" if "fp16" in name else "float32"
        if dtype == "float16":  # fp16 in the file; --dtype auto lets the file decide
            if not fp16_here:
                refused(raw, "fp16.enabled=true", "bf16", fp16=False, train={"dtype": "auto"})
                continue
            ds = resolve(raw, fp16=True, train={"dtype": "auto"}, model_config=model)
        else:
            ds = resolve(raw, train={"dtype": dtype}, model_config=model)
        assert "auto" not in json.dumps(ds.config), name
        assert ds.zero_stage == int(name[4]), name
        assert ds.precision == {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype], name
        assert ds.ds_optimizer == ("cpu_adam" in name), name
        assert ds.offload_optimizer == ("offload" in name) and ds.offload_param == ("offload_param" in name), name


def test_known_keys_are_deepspeed_config_keys():
    """Every key we accept appears quoted in DeepSpeed's own sources (no typo of ours)."""
    root = os.path.dirname(deepspeed.__file__)
    text = "".join(open(p, encoding="utf-8", errors="ignore").read()
                   for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    missing = [k for k in KNOWN_KEYS if f'"{k}"' not in text and f"'{k}'" not in text]
    assert not missing


# --- tensor-parallel shards in DeepSpeed's gradient norm --------------------------------------------
@pytest.mark.parametrize("tp", [2, 4])
def test_each_distinct_value_counts_once_in_deepspeeds_norm(tp):
    """DeepSpeed counts a parameter on a rank when it is marked tensor_model_parallel or the rank is
    model-parallel rank 0, then sums over the model-parallel group: each distinct shard must be
    counted by exactly one rank of the TP group."""
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.tensor.metadata import ShardInfo, set_shard_info
    from forge_dist.parallel.topology import Topology
    from forge_dist.train.deepspeed_engine import set_model_parallel_attributes

    infos = {"split": ShardInfo((8, 4), dim=0, num_shards=tp), "replicated": ShardInfo((4,)),
             "kv_shared": ShardInfo((8, 4), dim=0, num_shards=1), "kv_half": ShardInfo((8, 4), dim=0, num_shards=2),
             "unannotated": None}
    counted = {name: [] for name in infos}
    for rank in range(tp):
        groups = ProcessGroups.layout(Topology(tp, tp=tp), rank)
        model = torch.nn.Module()
        for name, info in infos.items():
            p = torch.nn.Parameter(torch.zeros(2))
            if info is not None:
                set_shard_info(p, info)
            model.register_parameter(name, p)
        set_model_parallel_attributes(model, groups)
        for name, p in model.named_parameters():
            if p.tensor_model_parallel or groups.tp.rank == 0:
                shard = rank // (tp // infos[name].num_shards) if infos[name] and infos[name].dim is not None else 0
                counted[name].append(shard)
    assert counted["split"] == list(range(tp))  # every shard once
    assert counted["replicated"] == counted["kv_shared"] == counted["unannotated"] == [0]
    assert counted["kv_half"] == [0, 1]  # two distinct halves, each held by tp/2 ranks


def test_mpu_of_a_single_process():
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.mpu import DeepSpeedMPU

    mpu = DeepSpeedMPU.build(ProcessGroups.single())
    assert (mpu.get_data_parallel_world_size(), mpu.get_model_parallel_world_size(),
            mpu.get_tensor_model_parallel_world_size(), mpu.get_pipe_parallel_world_size()) == (1, 1, 1, 1)
    assert mpu.get_data_parallel_group_ranks() == [0] and mpu.get_tensor_model_parallel_src_rank() == 0
    assert not hasattr(mpu, "get_sequence_parallel_world_size")  # would mean Ulysses to DeepSpeed


# --- forge-train refuses before any process group ---------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from forge_dist.data.prepare import prepare_default_dataset

    return str(prepare_default_dataset(tmp_path_factory.mktemp("cache")))


def forge_train(*args):
    from forge_dist.train.cli import main

    try:
        return main(["--n_layer", "2", "--n_head", "4", "--n_embd", "32", "--block_size", "32", "--device", "cpu",
                     "--no-tensorboard_log", "--no-progress", *args])
    except SystemExit as e:
        return e.code


def test_forge_train_refuses_bad_configs_in_one_line(corpus, tmp_path, capsys):
    from deepspeed.accelerator import get_accelerator

    cases = [({"train_micro_batch_size_per_gpu": 3}, "contradicts --batch_size 4"),
             ({"zero_optimization": {"stage": 2}, "unknown_key": 1}, "unknown top-level key 'unknown_key'")]
    if not get_accelerator().is_fp16_supported():
        cases.append(({"fp16": {"enabled": True}}, "bf16"))
    for i, (raw, words) in enumerate(cases):
        path = tmp_path / f"ds{i}.json"
        path.write_text(json.dumps(raw))
        code = forge_train("--dataset", corpus, "--batch_size", "4", "--out_dir", str(tmp_path / "out"),
                           "--deepspeed_config", str(path))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and words in err[0], (raw, err)
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    code = forge_train("--dataset", corpus, "--out_dir", str(tmp_path / "out"), "--deepspeed_config", str(path),
                       "--compile")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compile" in err[0], err
    assert not (tmp_path / "out").exists()  # nothing ran
