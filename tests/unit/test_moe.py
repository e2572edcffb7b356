"""MoE: routing, capacity dropping, auxiliary losses against their formulas, grouped experts
against a per-token loop, noisy gating, placement and the collectors."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from forge_dist import ConfigError, ModelConfig
from forge_dist.model.mlp import OriginalMLP
from forge_dist.model.moe import (MoELayer, Routing, build_ffn, collect_moe_aux_loss, collect_tokens_per_expert,
                                  expert_capacity, plan_dispatch)
from forge_dist.variants import MLP


def tiny(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, use_moe=True, n_experts=4,
                moe_top_k=2)
    base.update(kw)
    return ModelConfig(**base)


def layer_for(seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(tiny(**kw))
    for p in layer.parameters():  # a larger router spread than the 0.02 init: distinct choices
        nn.init.normal_(p, std=0.5)
    return layer


def per_token_reference(layer, x):
    """y_n = sum_j w_nj expert_{e_nj}(x_n), one token at a time."""
    flat = x.reshape(-1, x.shape[-1])
    r = layer.router(flat)
    rows = []
    for n in range(flat.shape[0]):
        y = sum(r.weights[n, j] * layer.experts[int(r.experts[n, j])](flat[n].view(1, 1, -1)).view(-1)
                for j in range(layer.top_k))
        rows.append(y)
    return torch.stack(rows).view_as(x)


def test_names_follow_upstream():
    names = set(layer_for().state_dict())
    assert {"router.route_linear.weight", "router.route_linear.bias", "experts.3.c_fc.weight",
            "experts.0.c_proj.weight"} <= names


def test_routing_weights_sum_to_one_over_distinct_experts():
    layer = layer_for(moe_top_k=3)
    r = layer.router(torch.randn(10, 32))
    assert torch.allclose(r.weights.sum(-1), torch.ones(10))
    assert all(len(set(row.tolist())) == 3 for row in r.experts)
    # renormalised: the chosen experts' full-softmax probabilities divided by their sum
    chosen = r.probs.gather(-1, r.experts)
    assert torch.allclose(r.weights, chosen / chosen.sum(-1, keepdim=True), atol=1e-6)
    assert torch.equal(r.experts, r.logits.topk(3, dim=-1).indices)  # top-k over the expert axis


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_experts_equal_per_token_loop(top_k):
    layer = layer_for(moe_top_k=top_k)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    layer.double()
    assert torch.allclose(layer(x), per_token_reference(layer, x), atol=1e-12)


def test_gradients_equal_per_token_loop():
    layer = layer_for()
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    layer.double()
    layer(x).square().sum().backward()
    grouped = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    per_token_reference(layer, x).square().sum().backward()
    for a, p in zip(grouped, layer.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-10)


def test_capacity_drops_overflow_in_priority_order():
    # 8 tokens, all first choices on expert 0: capacity = ceil(1.0 * 8 * 1 / 4) = 2
    assert expert_capacity(8, 1, 4, 1.0) == 2 and expert_capacity(8, 1, 4, None) is None
    layer = layer_for(moe_top_k=1, moe_capacity_factor=1.0)
    with torch.no_grad():
        layer.router.route_linear.weight.zero_()
        layer.router.route_linear.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    x = torch.randn(1, 8, 32)
    y = layer(x)
    assert layer.last_tokens_per_expert.tolist() == [2, 0, 0, 0]
    assert int(layer.last_dropped_tokens) == 6
    assert torch.allclose(y[0, :2], layer.experts[0](x[:, :2])[0])  # the first two tokens are kept
    assert torch.equal(y[0, 2:], torch.zeros(6, 32))  # dropped tokens get no expert output


def test_first_choices_outrank_second_choices():
    # expert 0 is token 1's first choice and token 0's second choice; capacity 1 keeps token 1
    experts = torch.tensor([[1, 0], [0, 1]])
    plan = plan_dispatch(experts, n_experts=2, capacity=1)
    assert plan.tokens.tolist() == [1, 0]  # expert 0 takes token 1, expert 1 takes token 0
    assert plan.counts.tolist() == [1, 1] and int(plan.dropped) == 2


def test_load_balance_loss_formula():
    # f = [3/4, 1/4]; P = mean probs = [2.8/4, 1.2/4] = [0.7, 0.3]
    # loss = E sum f P = 2 (0.75 * 0.7 + 0.25 * 0.3) = 2 * 0.6 = 1.2
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    experts = torch.tensor([[0], [0], [0], [1]])
    routing = Routing(probs.log(), probs, experts, torch.ones(4, 1))
    layer = layer_for(n_experts=2, moe_top_k=1)
    plan = plan_dispatch(experts, 2, None)
    assert layer.load_balance_loss(routing, plan).item() == pytest.approx(1.2)


def test_z_loss_formula():
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2; mean of squares = 2.5 (ln 2)^2
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    routing = Routing(logits, logits.softmax(-1), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    assert MoELayer.z_loss(routing).item() == pytest.approx(2.5 * math.log(2) ** 2)


def test_collected_aux_loss_is_the_weighted_sum_and_trains_the_router():
    model = nn.Sequential(layer_for(0, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001),
                          layer_for(1, moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001))
    x = torch.randn(2, 6, 32)
    model(x)
    aux = collect_moe_aux_loss(model)
    counts = collect_tokens_per_expert(model)
    expected, h = 0.0, x
    for m in model:  # each layer's loss on its own input
        r = m.router(h.reshape(-1, 32))
        plan = plan_dispatch(r.experts, m.n_experts, None)
        expected = expected + 0.01 * m.load_balance_loss(r, plan) + 0.001 * m.z_loss(r)
        h = m(h)
    assert torch.allclose(aux, expected)
    aux.backward()
    assert model[0].router.route_linear.weight.grad.abs().sum() > 0
    assert list(counts) == ["0", "1"] and all(int(c.sum()) == 12 * 2 for c in counts.values())
    off = nn.Sequential(layer_for())
    off(x)
    assert collect_moe_aux_loss(off).item() == 0.0  # no coefficient: nothing added


def test_noisy_gating_changes_selection_only_in_training():
    torch.manual_seed(0)
    layer = MoELayer(tiny(moe_router_scheme="noisy_top_k", moe_noise_std=1.0))
    nn.init.normal_(layer.router.noise_linear.bias, mean=3.0, std=0.1)  # softplus ~ 3: strong noise
    x = torch.randn(64, 32)
    clean = layer.router.route_linear(x).topk(2, dim=-1).indices
    layer.eval()
    assert torch.equal(layer.router(x).experts, clean)
    layer.train()
    r = layer.router(x)
    assert not torch.equal(r.experts, clean)
    r.weights.square().sum().backward()  # the noise scale is learned through the noisy gate
    assert layer.router.noise_linear.weight.grad.abs().sum() > 0


def test_placement_every_moe_layer_freq():
    cfg = tiny(n_layer=4, moe_layer_freq=2)
    kinds = [type(build_ffn(cfg.for_layer(i), i)) for i in range(4)]
    assert kinds == [MoELayer, OriginalMLP, MoELayer, OriginalMLP]
    assert type(build_ffn(tiny(use_moe=False), 0)) is OriginalMLP


@pytest.mark.parametrize("variant", sorted(MLP.names()))
def test_every_mlp_variant_can_be_an_expert(variant):
    torch.manual_seed(0)
    layer = MoELayer(tiny(mlp_variant=variant))
    x = torch.randn(2, 4, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert x.grad is not None


def test_aux_loss_survives_activation_checkpointing():
    layer = layer_for(moe_aux_loss_coef=0.1)
    x = torch.randn(2, 4, 32, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    (y.sum() + collect_moe_aux_loss(layer)).backward()
    assert layer.router.route_linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw, match", [
    (dict(moe_top_k=5), "moe_top_k"),
    (dict(moe_aux_loss_coef=-1.0), "moe_aux_loss_coef"),
    (dict(moe_capacity_factor=0.0), "moe_capacity_factor"),
    (dict(moe_router_scheme="hash"), "valid values: noisy_top_k, softmax"),
])
def test_bad_moe_options_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


def test_shared_moe_module_adds_the_aux_loss_of_every_use():
    # layers 0 and 1 share one MoE module (shared_mlp_size=2, moe_layer_freq=1): both uses count
    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.model.moe import MoELayer, collect_moe_aux_loss

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, use_moe=True,
                      moe_layer_freq=1, n_experts=4, moe_top_k=1, moe_aux_loss_coef=0.5, shared_mlp_size=2)
    model = GPT(cfg).train()
    moe = model.transformer.h[0].mlp
    assert isinstance(moe, MoELayer) and model.transformer.h[1].mlp is moe
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    assert len(moe.aux_losses) == 2
    torch.testing.assert_close(loss - model.last_ce_loss, moe.aux_losses[0] + moe.aux_losses[1])
    assert int(moe.last_tokens_per_expert.sum()) == 2 * 2 * 16  # two uses x 32 tokens, top-1
    model(idx, idx)  # a new forward starts from empty records
    assert len(moe.aux_losses) == 2 and collect_moe_aux_loss(model).requires_grad
