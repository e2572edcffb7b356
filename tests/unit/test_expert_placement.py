"""Expert parallelism without processes: capacity counted per data-parallel group of tokens,
validation of the expert options, and placement on a world of one."""
import pytest
import torch

from forge_dist import ConfigError, ModelConfig
from forge_dist.config.parallel import ParallelConfig
from forge_dist.model.moe import expert_capacity, plan_dispatch


def test_capacity_groups_equal_one_plan_per_group():
    torch.manual_seed(0)
    experts = torch.randint(0, 4, (24, 2))
    experts[:, 1] = (experts[:, 0] + 1) % 4  # distinct choices per token
    cap = expert_capacity(8, 2, 4, 1.0)
    whole = plan_dispatch(experts, 4, cap, capacity_groups=3)
    kept, dropped = set(), 0
    for g in range(3):  # what three data-parallel ranks of 8 tokens each keep: slot j * 8 + n
        part = plan_dispatch(experts[g * 8:(g + 1) * 8], 4, cap)
        kept |= {int(s // 8) * 24 + g * 8 + int(s % 8) for s in part.slots}  # as slots j * 24 + n
        dropped += int(part.dropped)
    assert int(whole.dropped) == dropped > 0
    assert set(whole.slots.tolist()) == kept and torch.equal(whole.tokens, whole.slots % 24)
    chosen = experts.t().reshape(-1)[whole.slots]
    assert torch.equal(chosen, torch.sort(chosen).values)  # grouped by expert
    assert torch.equal(whole.counts, torch.bincount(chosen, minlength=4))


def moe(**kw):
    return ModelConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, use_moe=True,
                                 n_experts=4), **kw})


@pytest.mark.parametrize("pc, cfg, world, match", [
    (dict(expert_parallel_size=2), ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64), 2,
     "expert_parallel_size=2 needs a mixture-of-experts model: add --use_moe"),
    (dict(expert_tensor_parallel_size=1), ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64), 1,
     "expert_tensor_parallel_size=1 needs a mixture-of-experts model"),
    (dict(expert_parallel_size=2), moe(n_experts=6), 4, None),
    (dict(expert_parallel_size=4), moe(n_experts=6), 4, "n_experts=6 is not divisible by expert_parallel_size=4"),
    (dict(expert_parallel_size=4), moe(), 2, "expert_parallel_size=4 must divide the data-parallel size 2"),
    (dict(expert_parallel_size=2, tensor_parallel_size=2, expert_tensor_parallel_size=4), moe(), 4,
     "expert_tensor_parallel_size=4: experts are either whole on each rank \\(1\\) or split"),
    (dict(expert_parallel_size=2), moe(moe_router_scheme="noisy_top_k"), 2,
     "noisy_top_k with expert_parallel_size=2: the gate noise"),
    (dict(expert_parallel_size=1), moe(moe_router_scheme="noisy_top_k"), 2, None),
    (dict(expert_parallel_size=2, pipeline_parallel_size=2), moe(), 4, None),  # EP inside each stage
    (dict(tensor_parallel_size=2, expert_tensor_parallel_size=1), moe(block_size=15), 2,
     "expert_tensor_parallel_size=1 with tensor_parallel_size=2: each MoE layer's tokens split"),
    (dict(tensor_parallel_size=2, expert_tensor_parallel_size=1, sequence_parallel=True), moe(moe_capacity_factor=1.0),
     2, "moe_capacity_factor with expert_tensor_parallel_size=1 and sequence_parallel"),
    (dict(tensor_parallel_size=2, expert_tensor_parallel_size=1, sequence_parallel=True), moe(), 2, None),
    # EP inside the stages of PP x TP (tests/dist/test_pp_parity.py::test_pp2_tp2_dp2_in_a_world_of_8)
    (dict(expert_parallel_size=2, pipeline_parallel_size=2, tensor_parallel_size=2), moe(), 8, None),
    (dict(expert_parallel_size=2, pipeline_parallel_size=2, tensor_parallel_size=2, expert_tensor_parallel_size=1),
     moe(), 8, None),
])
def test_expert_options_are_validated(pc, cfg, world, match):
    config = ParallelConfig(**pc)
    if match is None:
        config.validate(cfg, world)
        return
    with pytest.raises(ConfigError, match=match):
        config.validate(cfg, world)


def test_bad_expert_tensor_parallel_size_value():
    with pytest.raises(ConfigError, match="expert_tensor_parallel_size=0 must be a positive integer"):
        ParallelConfig(expert_tensor_parallel_size=0)


def test_placement_on_one_rank_keeps_the_model():
    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.expert import apply_expert_parallel
    from forge_dist.parallel.groups import ProcessGroups

    torch.manual_seed(0)
    model = GPT(moe(moe_top_k=2))
    names = list(model.state_dict())
    apply_expert_parallel(model, ProcessGroups.single(), ParallelConfig())
    assert list(model.state_dict()) == names and not any(hasattr(p, "allreduce") for p in model.parameters())


@pytest.mark.parametrize("ep, rank", [(2, 1), (4, 2)])
def test_optimizer_state_of_one_process_reshards_to_a_placed_rank(ep, rank):
    """A one-process AdamW state dict (what every checkpoint holds) -> the entries of rank r's
    experts under their local indices, and back to one-process indices (local_optimizer_state,
    expand_names), on a layout without processes."""
    import copy

    from forge_dist.model.gpt import GPT
    from forge_dist.parallel.expert import apply_expert_parallel
    from forge_dist.parallel.expert.state import _placed, expand_names, local_optimizer_state
    from forge_dist.parallel.groups import ProcessGroups
    from forge_dist.parallel.topology import Topology
    from forge_dist.train.optim import param_groups

    torch.manual_seed(0)
    full = GPT(moe(moe_top_k=2, moe_layer_freq=1))
    opt = torch.optim.AdamW(param_groups(full, 0.1, True), lr=1e-3)
    idx = torch.randint(0, 64, (2, 16))
    full(idx, idx)[1].backward()
    opt.step()
    saved = opt.state_dict()
    order = [n for g in param_groups(full, 0.1, True) for n in
             (next(k for k, q in full.named_parameters() if q is p) for p in g["params"])]
    placed = copy.deepcopy(full)
    apply_expert_parallel(placed, ProcessGroups.layout(Topology(4, ep=ep), rank), ParallelConfig(expert_parallel_size=ep))
    first = rank * 4 // ep
    assert {n.split(".")[5] for n, _ in placed.named_parameters() if ".experts." in n} == {
        str(e) for e in range(first, first + 4 // ep)}
    local_groups = param_groups(placed, 0.1, True)
    names_of = {id(p): n for n, p in placed.named_parameters()}
    names = [names_of[id(p)] for g in local_groups for p in g["params"]]
    flat_groups, i = [], 0
    for g in local_groups:
        flat_groups.append({"params": list(range(i, i + len(g["params"])))})
        i += len(g["params"])
    assert expand_names(names, _placed(placed)) == order  # the one-process order, every expert
    local = local_optimizer_state(saved, names, flat_groups, placed)
    assert sorted(local["state"]) == list(range(len(names)))
    for j, n in enumerate(names):
        want = saved["state"][order.index(n)]
        assert torch.equal(local["state"][j]["exp_avg"], want["exp_avg"]), n
