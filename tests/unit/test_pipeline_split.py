"""Pipeline stages without processes: the split and placement arithmetic, the stages' parameter
names (layout-free checkpoints), and one process chaining the stages == the whole GPT (loss and
every gradient, MoE auxiliary losses of earlier stages included)."""
import copy

import pytest
import torch

from forge_dist import ModelConfig
from forge_dist.config.parallel import ParallelConfig
from forge_dist.errors import ConfigError
from forge_dist.model.gpt import GPT
from forge_dist.parallel.pipeline.split import balanced_split, min_microbatches, plan_pipeline, stage_ranks
from forge_dist.parallel.pipeline.stage import build_stages
from forge_dist.testing.pp_cases import PP_BASE, VARIANT_MIX


def test_placement_loop_and_v():
    assert stage_ranks("1f1b", 4, 1) == [0, 1, 2, 3]
    assert stage_ranks("interleaved_1f1b", 2, 3) == [0, 1, 0, 1, 0, 1]
    assert stage_ranks("zbv", 3, 2) == [0, 1, 2, 2, 1, 0]


def test_balanced_split_counts_embedding_and_head():
    assert balanced_split([1.0] * 8, 4) == [2, 2, 2, 2]
    assert balanced_split([1.0] * 8, 2, first_extra=2.0) == [3, 5]
    assert balanced_split([1.0] * 8, 2, last_extra=2.0) == [5, 3]
    untied = plan_pipeline(ModelConfig(**{**PP_BASE, "wte_weight_tying": False, "vocab_size": 512}), 2)
    assert [b - a for a, b in untied.layers] == [4, 4]  # table on the first, head on the last: balanced
    heavy_head = plan_pipeline(ModelConfig(**{**PP_BASE, "wte_weight_tying": False, "vocab_size": 512,
                                              "use_abs_pos_embeddings": False}), 4)
    assert heavy_head.layers[-1][1] - heavy_head.layers[-1][0] <= 2


def test_pipeline_layers_override_and_refusals():
    cfg = ModelConfig(**PP_BASE)
    assert plan_pipeline(cfg, 2, layers="3,5").layers == ((0, 3), (3, 8))
    assert plan_pipeline(cfg, 2, "interleaved_1f1b", 2, "1,3,3,1").layers == ((0, 1), (1, 4), (4, 7), (7, 8))
    for kwargs, message in [(dict(layers="4,5"), "summing to n_layer=8"),
                            (dict(layers="x"), "as integers"),
                            (dict(schedule="pipedream"), "choose one of gpipe, 1f1b"),
                            (dict(schedule="dualpipev", virtual=3), "runs 2 model chunk"),
                            (dict(schedule="interleaved_1f1b", virtual=5), "fewer than"),
                            (dict(n_microbatches=1), "1f1b needs at least")]:
        with pytest.raises(ConfigError, match=message):
            plan_pipeline(cfg, 2, **kwargs)
    assert min_microbatches("interleaved_1f1b", 2, 5) is not None and min_microbatches("gpipe", 4, 1) is None
    with pytest.raises(ConfigError, match="pipeline_schedule='x' is not a schedule"):
        ParallelConfig(pipeline_parallel_size=2, pipeline_schedule="x")


@pytest.mark.parametrize("schedule,pp", [("1f1b", 4), ("interleaved_1f1b", 2), ("zbv", 2)])
def test_stage_names_are_the_gpt_state_dict(schedule, pp):
    model = GPT(ModelConfig(**VARIANT_MIX))
    plan = plan_pipeline(model.config, pp, schedule)
    keys, layouts = set(), [build_stages(model, plan, r) for r in range(pp)]
    for layout in layouts:
        for chunk in layout.chunks.values():
            keys |= set(chunk.state_dict())
    assert keys == set(model.state_dict())
    shared = layouts[0].holders  # the shared attention of layers 3-5 spans a stage boundary
    assert any(".attn." in name and len(ranks) > 1 for name, ranks in shared.items())
    if schedule != "zbv":  # tied table on the first and last rank; the V puts both on rank 0
        assert shared["transformer.wte.weight"] == (0, pp - 1)


@pytest.mark.parametrize("config", [PP_BASE, VARIANT_MIX], ids=["default", "variant_mix"])
def test_chained_stages_equal_the_whole_model(config):
    torch.manual_seed(0)
    ref = GPT(ModelConfig(**config)).train()
    model = copy.deepcopy(ref)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    ref_loss = ref(x, y)[1]
    ref_loss.backward()
    plan = plan_pipeline(model.config, 4, "1f1b")
    chunks = [build_stages(model, plan, r).chunks[r] for r in range(4)]
    h = x
    for chunk in chunks:
        h = chunk(h, targets=y if chunk.is_last else None)
    # the earlier stages' aux losses reach the objective through the gradient only (AuxLossGrad)
    earlier_aux = sum(float(c.aux_sum) for c in chunks[:-1])
    assert (earlier_aux > 0) == bool(config.get("use_moe"))
    assert abs(float(h[0]) + earlier_aux - float(ref_loss)) <= 1e-6 * float(ref_loss)
    h.sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-7), name
