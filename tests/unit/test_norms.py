"""Norm variants: hand-derived golden values, row independence, gradients, and every variant in
every block position of a tiny GPT."""
import itertools
import math

import pytest
import torch

from forge_dist import ConfigError, ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.model.norm import build_norm
from forge_dist.variants import NORM
from forge_dist.testing.numerics import gradcheck_module

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def cfg(**kw):
    return ModelConfig(**{**TINY, **kw})


def norm(name, dim, **kw):
    return build_norm(name, cfg(**kw), dim).double()


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)



# --- golden values --------------------------------------------------------------------------------
def test_rmsnorm_golden():
    n = norm("rmsnorm", 2)
    n.gain.data = t(1.0, 2.0)
    # rms([3, 4]) = sqrt((9 + 16) / 2) = sqrt(12.5) = 3.5355339; y = [3, 4] / 3.5355339 * [1, 2]
    torch.testing.assert_close(n(t([3.0, 4.0])), t([0.8485281, 2.2627417]), atol=1e-6, rtol=0)


def test_layernorm_golden():
    n = norm("layernorm", 4, bias=True)
    n.bias.data = t(0.0, 0.0, 0.0, 1.0)
    # mean 2.5, var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25; y = (x - 2.5) / sqrt(1.25 + 1e-5) + b
    s = math.sqrt(1.25 + 1e-5)
    expected = t([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s + 1.0])
    torch.testing.assert_close(n(t([1.0, 2.0, 3.0, 4.0])), expected)


def test_prmsnorm_golden():
    n = norm("prmsnorm", 4, prmsnorm_pct=0.5)
    # k = ceil(4 * 0.5) = 2; rms([3, 4]) = sqrt(12.5) = 3.5355339 scales the whole row
    x = t([3.0, 4.0, 10.0, -2.0])
    torch.testing.assert_close(n(x), x / 3.5355339, atol=1e-6, rtol=0)


def test_prmsnorm_default_pct_uses_ceil():
    n = norm("prmsnorm", 40)  # k = ceil(40 * 0.0625) = ceil(2.5) = 3
    x = torch.zeros(1, 40, dtype=torch.float64)
    x[0, :3] = t(1.0, 2.0, 2.0)  # rms = sqrt((1 + 4 + 4) / 3) = sqrt(3)
    x[0, 3:] = 7.0
    torch.testing.assert_close(n(x), x / math.sqrt(3))


@pytest.mark.parametrize("selection,expected_rms", [
    ("first", math.sqrt(12.5)),  # [3, 4]: sqrt((9 + 16) / 2)
    ("last", math.sqrt(52.0)),  # [10, -2]: sqrt((100 + 4) / 2)
])
def test_krmsnorm_selection_golden(selection, expected_rms):
    n = norm("krmsnorm", 4, krmsnorm_num=2, krmsnorm_selection_type=selection)
    x = t([3.0, 4.0, 10.0, -2.0])
    torch.testing.assert_close(n(x), x / expected_rms)


def test_krmsnorm_random_uses_the_drawn_entries():
    n = norm("krmsnorm", 6, krmsnorm_num=3, krmsnorm_selection_type="random")
    x = t([1.0, -2.0, 3.0, 5.0, 0.5, 4.0], [2.0, 2.0, -1.0, 0.0, 3.0, 1.0])
    torch.manual_seed(7)
    idx = torch.randperm(6)[:3]
    expected = x / x[:, idx].pow(2).mean(-1, keepdim=True).sqrt()
    torch.manual_seed(7)
    torch.testing.assert_close(n(x), expected)
    # k >= d: the set is a permutation of all entries, so the full rms: sqrt((9+16+100+4)/4)
    full = norm("krmsnorm", 4, krmsnorm_num=10, krmsnorm_selection_type="random")
    x = t([3.0, 4.0, 10.0, -2.0])
    torch.testing.assert_close(full(x), x / math.sqrt(32.25))


def test_krmsnorm_no_gain():
    n = norm("krmsnorm", 4, krmsnorm_enable_gain=False)
    assert n.gain is None and "gain" not in n.state_dict()


def test_krmsnorm_int8_golden_and_straight_through():
    n = norm("krmsnorm", 4, krmsnorm_num=3, krmsnorm_selection_type="first", krmsnorm_quantize_type="int8")
    # slice [0, 0.503, 2.55]: scale = (2.55 - 0) / (2^8 - 1) = 0.01, zero point = -round(0 / 0.01) - 128;
    # 0.503 -> round(50.3) - 128 = -78 -> (-78 + 128) * 0.01 = 0.5; 2.55 -> 127 -> 2.55; 0 -> 0.
    # rms = sqrt((0 + 0.25 + 6.5025) / 3) = sqrt(2.2508333)
    x = t([0.0, 0.503, 2.55, 7.0])
    torch.testing.assert_close(n(x), x / math.sqrt((0.25 + 2.55 ** 2) / 3))
    # the unquantized rms would be sqrt((0.503^2 + 2.55^2) / 3): the quantization is visible
    assert not torch.allclose(n(x), x / math.sqrt((0.503 ** 2 + 2.55 ** 2) / 3), atol=1e-5)
    # straight-through: on an exactly representable slice the gradient equals the float one
    exact = t([0.0, 0.5, 2.55, 7.0]).requires_grad_()
    n(exact).sum().backward()
    ref = exact.detach().clone().requires_grad_()
    norm("krmsnorm", 4, krmsnorm_num=3, krmsnorm_selection_type="first")(ref).sum().backward()
    torch.testing.assert_close(exact.grad, ref.grad)


def test_krmsnorm_int16_golden():
    n = norm("krmsnorm", 4, krmsnorm_num=3, krmsnorm_selection_type="first", krmsnorm_quantize_type="int16")
    # scale = 2.55 / (2^16 - 1) = 1 / 25700; 0.503 * 25700 = 12927.1 -> code 12927 - 32768
    # -> (12927 - 32768 + 32768) / 25700 = 12927 / 25700
    x = t([0.0, 0.503, 2.55, 7.0])
    s = math.sqrt(((12927 / 25700) ** 2 + 2.55 ** 2) / 3)
    torch.testing.assert_close(n(x), x / s)


def test_krmsnorm_recompute_is_per_row():
    n = norm("krmsnorm", 5, krmsnorm_num=1, krmsnorm_selection_type="last", krmsnorm_recompute_percentage=0.05)
    # row A: krms = |4| = 4, rms = sqrt((1+1+1+1+16)/5) = 2; 4 is outside (1.9, 2.1) -> divide by 2
    # row B: krms = 2.1, rms = sqrt((4*4 + 4.41)/5) = sqrt(4.082) = 2.0204; 2.1 is inside
    #        (1.9194, 2.1214) -> divide by the k-rms 2.1
    x = t([1.0, 1.0, 1.0, 1.0, 4.0], [2.0, 2.0, 2.0, 2.0, 2.1])
    expected = torch.stack([x[0] / 2.0, x[1] / 2.1])
    torch.testing.assert_close(n(x), expected)
    for i in range(2):  # each row alone gives the same answer as in the batch
        torch.testing.assert_close(n(x[i:i + 1]), expected[i:i + 1])


@pytest.mark.parametrize("name,kw", [
    ("prmsnorm", {}),
    ("krmsnorm", dict(krmsnorm_selection_type="first")),
    ("krmsnorm", dict(krmsnorm_selection_type="last", krmsnorm_quantize_type="int8")),
    ("krmsnorm", dict(krmsnorm_recompute_percentage=0.2)),
])
def test_partial_norms_rows_independent(name, kw):
    n = norm(name, 32, **kw)
    x = torch.randn(3, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[1, 2] *= 100.0  # one outlier row must not change any other row
    batched = n(x)
    for b, s in itertools.product(range(3), range(5)):
        torch.testing.assert_close(batched[b, s], n(x[b, s][None])[0])


def test_hyperspherenorm_default_radius_is_sqrt_d():
    n = norm("hyperspherenorm", 2)
    # x / ||x|| * sqrt(2): [3, 4] / 5 * 1.4142136
    torch.testing.assert_close(n(t([3.0, 4.0])), t([0.6, 0.8]) * math.sqrt(2))
    assert dict(n.state_dict()) == {}  # fixed radius, no gain: nothing to save (as upstream)


def test_hyperspherenorm_radius_learning_and_gain():
    n = norm("hyperspherenorm", 2, hsnorm_radius=2.0, hsnorm_radius_learning=True, hsnorm_gain=True)
    assert n.radius.shape == (1,) and set(n.state_dict()) == {"radius", "gain"}
    n.gain.data = t(1.0, -1.0)
    # [3, 4] / 5 * 2 * [1, -1] = [1.2, -1.6]
    torch.testing.assert_close(n(t([3.0, 4.0])), t([1.2, -1.6]))
    n(t([3.0, 4.0])).sum().backward()
    # d/dr sum(r x/||x|| g) = 0.6 - 0.8 = -0.2
    torch.testing.assert_close(n.radius.grad, t(-0.2))


def test_hyperspherenorm_rows_land_on_the_sphere():
    n = norm("hyperspherenorm", 32, hsnorm_radius=3.0)
    y = n(torch.randn(4, 32, dtype=torch.float64))
    torch.testing.assert_close(y.norm(dim=-1), torch.full((4,), 3.0, dtype=torch.float64))


def test_dact_golden():
    n = norm("dact", 2, dact_alpha_init=2.0)
    assert set(n.state_dict()) == {"alpha", "beta", "gamma"} and n.alpha.shape == (1,)
    n.gamma.data = t(1.0, 3.0)
    n.beta.data = t(0.1, 0.2)
    # [tanh(2 * 0.5) + 0.1, 3 tanh(2 * -1) + 0.2] = [0.7615942 + 0.1, 3 * -0.9640276 + 0.2]
    torch.testing.assert_close(n(t([0.5, -1.0])), t([0.8615942, -2.6920828]), atol=1e-6, rtol=0)


def test_dact_disabled_parts_and_other_activation():
    n = norm("dact", 3, dact_use_alpha=False, dact_use_beta=False, dact_use_gamma=False, dact_activation="relu")
    assert dict(n.state_dict()) == {}
    torch.testing.assert_close(n(t([-1.0, 0.5, 2.0])), t([0.0, 0.5, 2.0]))  # 1 * relu(1 * x) + 0


def test_identity_norm():
    x = torch.randn(2, 3, 8)
    assert torch.equal(build_norm("identity", cfg(), 8)(x), x)


# --- gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", [
    ("rmsnorm", {}),
    ("rmsnorm", dict(rmsnorm_eps=1e-6)),
    ("layernorm", dict(bias=True)),
    ("prmsnorm", dict(prmsnorm_pct=0.25)),
    ("krmsnorm", dict(krmsnorm_num=3, krmsnorm_selection_type="first")),
    ("krmsnorm", dict(krmsnorm_num=3, krmsnorm_recompute_percentage=0.3)),
    ("hyperspherenorm", dict(hsnorm_radius_learning=True, hsnorm_gain=True)),
    ("dact", {}),
    ("dact", dict(dact_activation="gelu_shifted")),
])
def test_norm_gradcheck(name, kw):
    n = norm(name, 8, **kw)
    with torch.no_grad():  # move parameters away from their symmetric init
        for p in n.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert gradcheck_module(n, x)


# --- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,option", [
    (dict(prmsnorm_pct=0.0), "prmsnorm_pct"),
    (dict(krmsnorm_num=0), "krmsnorm_num"),
    (dict(krmsnorm_quantize_type="int4"), "krmsnorm_quantize_type"),
    (dict(krmsnorm_selection_type="middle"), "krmsnorm_selection_type"),
    (dict(krmsnorm_recompute_percentage=-0.1), "krmsnorm_recompute_percentage"),
    (dict(hsnorm_radius=0.0), "hsnorm_radius"),
    (dict(dact_activation="glu"), "dact_activation"),
    (dict(dact_activation="nope"), "dact_activation"),
    (dict(norm_variant_attn="batchnorm"), "norm_variant_attn"),
])
def test_bad_norm_options_are_named(kw, option):
    with pytest.raises(ConfigError, match=option):
        cfg(**kw)


# --- in a model -------------------------------------------------------------------------------
NORM_OPTIONS = {
    "krmsnorm": dict(krmsnorm_quantize_type="int8", krmsnorm_recompute_percentage=0.05),
    "hyperspherenorm": dict(hsnorm_radius_learning=True, hsnorm_gain=True),
}
LN_FLAGS = list(itertools.product([False, True], repeat=3))  # (pre, post, peri)


@pytest.mark.parametrize("name", NORM.names())
def test_norm_in_every_block_position(name):
    """Every norm as norm_variant_attn and norm_variant_output, in every pre/post/peri
    combination, sequential and parallel blocks: forward and backward stay finite."""
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for (pre, post, peri), parallel in itertools.product(LN_FLAGS, [False, True]):
        c = cfg(norm_variant_attn=name, norm_variant_output=name, use_pre_ln=pre, use_post_ln=post,
                use_peri_ln=peri, use_parallel_mlp=parallel, **NORM_OPTIONS.get(name, {}))
        torch.manual_seed(0)
        model = GPT(c)
        _, loss = model(idx, idx)
        loss.backward()
        assert torch.isfinite(loss), (pre, post, peri, parallel)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), (pre, post, peri, parallel)
    assert type(model.transformer.ln_f) is NORM.get(name)
