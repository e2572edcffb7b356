"""ParallelConfig validation and the rule check: bad input is refused before any process group,
with a message naming the numbers and what to change."""
import pytest
import torch.distributed as dist

from forge_dist import ModelConfig
from forge_dist.config.parallel import ParallelConfig, parallel_config_from_dict
from forge_dist.errors import ConfigError
from forge_dist.model.norm import RMSNorm
from forge_dist.parallel.parallelize import check_parallelizable
from forge_dist.parallel.tensor.plan import NoShardingRuleError
from forge_dist.parallel.tensor.rules import TP_RULES

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)


def model(**overrides):
    return ModelConfig(**{**TINY, **overrides})


def pc(**kwargs):
    return ParallelConfig(**kwargs)


def test_defaults_and_valid_combinations():
    pc().validate(model(), 1)
    pc(tensor_parallel_size=4, sequence_parallel=True).validate(model(), 8)  # dp 2
    pc(tensor_parallel_size=4).validate(model(n_kv_group=1), 4)  # MQA: KV head replicated
    pc(tensor_parallel_size=2, pipeline_parallel_size=2).validate(model(use_moe=True, n_experts=4), 8)
    pc(tensor_parallel_size=2, expert_parallel_size=2).validate(model(use_moe=True, n_experts=4), 8)
    pc(tensor_parallel_size=2, pipeline_parallel_size=2, expert_parallel_size=2).validate(
        model(use_moe=True, n_experts=4), 16)  # EP inside the stages of PP x TP
    assert pc(tensor_parallel_size=2, pipeline_parallel_size=3).model_parallel_size == 6


@pytest.mark.parametrize("parallel,overrides,world,message", [
    (dict(tensor_parallel_size=4), dict(n_head=6, n_embd=48), 4,
     r"n_head=6 is not divisible by tensor_parallel_size=4.*among \[1, 2, 3, 6\]"),
    (dict(tensor_parallel_size=2), dict(n_head=6, n_embd=48, n_kv_group=3), 2,
     r"n_kv_group=3 and tensor_parallel_size=2: one must divide the other"),
    (dict(tensor_parallel_size=4), dict(mlp_size=42), 4,
     r"MLP hidden size 42 \(mlp_size\) is not divisible by tensor_parallel_size=4"),
    (dict(tensor_parallel_size=2, expert_parallel_size=2), dict(use_moe=True, n_experts=5), 4,
     r"n_experts=5 is not divisible by expert_parallel_size=2"),
    (dict(tensor_parallel_size=4), {}, 6,
     r"world size 6 is not a product of tensor_parallel_size=4 x pipeline_parallel_size=1"),
    (dict(tensor_parallel_size=2, expert_parallel_size=3), {}, 8,
     r"expert_parallel_size=3 must divide the data-parallel size 4"),
    (dict(tensor_parallel_size=4, sequence_parallel=True), dict(block_size=18), 4,
     r"block_size=18 tokens over tensor_parallel_size=4"),
    (dict(pipeline_parallel_size=4), {}, 4, r"pipeline_parallel_size=4 exceeds n_layer=2"),
    (dict(tensor_parallel_size=4), dict(n_head_layerlist=[4, 2]), 4,
     r"layer 1: n_head=2 is not divisible by tensor_parallel_size=4"),
])
def test_bad_input_names_the_numbers(parallel, overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        pc(**parallel).validate(model(**overrides), world)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size=0 must be a positive integer"),
    (dict(pipeline_parallel_size=1.5), "pipeline_parallel_size=1.5 must be a positive integer"),
    (dict(sequence_parallel="yes"), "sequence_parallel='yes' must be true or false"),
    (dict(dist_timeout_minutes=0), "dist_timeout_minutes=0 must be a positive number"),
    (dict(dist_backend="mpi"), "dist_backend='mpi'; choose gloo, nccl"),
])
def test_field_checks(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        pc(**kwargs)


def test_from_dict_rejects_unknown_options():
    assert parallel_config_from_dict({"tensor_parallel_size": 2}).tensor_parallel_size == 2
    with pytest.raises(ConfigError, match=r"unknown parallel option\(s\) \['tp'\]"):
        parallel_config_from_dict({"tp": 2})


def test_sequence_parallel_at_tp1_is_a_no_op():
    pc(sequence_parallel=True).validate(model(block_size=15), 1)


def test_rule_check_names_the_module_without_a_rule(monkeypatch):
    check_parallelizable(model(), pc(tensor_parallel_size=2))  # every default module has a rule
    monkeypatch.delitem(TP_RULES._rules, RMSNorm)
    expected = (r"transformer\.h\.0\.pre_ln_attn \(forge_dist\.model\.norm\.RMSNorm\) "
                r"holds parameters \['gain'\] but has no tensor-parallel rule")
    with pytest.raises(NoShardingRuleError, match=expected):
        check_parallelizable(model(), pc(tensor_parallel_size=2))
    check_parallelizable(model(), pc(tensor_parallel_size=1))  # nothing to shard at TP=1


@pytest.mark.timeout(60)
def test_init_distributed_refuses_before_creating_a_process_group():
    from forge_dist.dist.init import init_distributed

    launch = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ConfigError, match="n_head=6 is not divisible by tensor_parallel_size=4"):
        init_distributed(pc(tensor_parallel_size=4), model(n_head=6, n_embd=48), environ=launch, export_env=False)
    with pytest.raises(ConfigError, match="world size 4 is not a product of tensor_parallel_size=8"):
        init_distributed(pc(tensor_parallel_size=8), environ=launch, export_env=False)
    assert not dist.is_initialized()  # a rendezvous with 3 absent ranks would have hung instead
