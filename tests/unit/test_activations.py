"""Activation variants: hand-derived golden values, gradients of the learnable ones, and every
variant in a tiny GPT."""
import math

import pytest
import torch

from forge_dist import ConfigError, ModelConfig
from forge_dist.model.activation import build_activation, natural_cubic_second_derivatives
from forge_dist.model.gpt import GPT
from forge_dist.variants import ACTIVATION
from forge_dist.testing.numerics import gradcheck_module

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def cfg(**kw):
    return ModelConfig(**{**TINY, **kw})


def act(name, **kw):
    return build_activation(name, cfg(**kw)).double()


def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def phi(x):  # standard normal CDF, for gelu(x) = x * phi(x)
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def gelu(x):
    return x * phi(x)



# --- golden values --------------------------------------------------------------------------------
def test_squared_relu_golden():
    torch.testing.assert_close(act("squared_relu")(t(-1.0, 0.5, 3.0)), t(0.0, 0.25, 9.0))


def test_glu_halves_the_width():
    a = act("glu")
    assert a.width_divisor == 2
    # halves [2, 3] and [0, ln 3]: [2 sigmoid(0), 3 sigmoid(ln 3)] = [2 * 0.5, 3 * 0.75]
    torch.testing.assert_close(a(t(2.0, 3.0, 0.0, math.log(3.0))), t(1.0, 2.25))


def test_prelu_keeps_upstream_name_and_slope():
    a = act("prelu")
    assert set(a.state_dict()) == {"activation.weight"}
    torch.testing.assert_close(a(t(-2.0, 3.0)), t(-0.5, 3.0))  # slope 0.25 on the negative side


def test_rrelu_eval_uses_mean_slope_and_training_is_random_within_bounds():
    a = act("rrelu").eval()
    # eval slope = (1/8 + 1/3) / 2 = 11/48: rrelu(-48) = -11
    torch.testing.assert_close(a(t(-48.0, 2.0)), t(-11.0, 2.0))
    a.train()
    y = a(torch.full((1000,), -24.0, dtype=torch.float64))
    assert (y <= -24.0 / 8 + 1e-12).all() and (y >= -24.0 / 3 - 1e-12).all() and y.std() > 0


def test_gelu_shifted_golden_and_buffer_or_parameter():
    a = act("gelu_shifted", shifted_gelu_initial_shift=1.0)
    assert isinstance(a.shift, torch.nn.Parameter) and a.shift.dim() == 0
    # gelu(x - 1): x=1 -> 0; x=2 -> 1 * phi(1) = 0.8413447; x=0 -> -1 * phi(-1) = -0.1586553
    torch.testing.assert_close(a(t(1.0, 2.0, 0.0)), t(0.0, 0.8413447, -0.1586553), atol=1e-7, rtol=0)
    fixed = act("gelu_shifted", shifted_gelu_learnable_shift=False)
    assert "shift" in dict(fixed.named_buffers()) and not list(fixed.parameters())


def test_piecewise_golden():
    a = act("piecewise")  # 7 knots at -1.5, -1, ..., 1.5 on gelu; bounds (-2, 2)
    torch.testing.assert_close(a.x_vals, t(-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5))
    x = t(-3.0, -1.6, -0.75, 0.25, 1.75, 3.0)
    expected = t(
        0.0,  # left of the first knot
        0.0,
        (gelu(-1.0) + gelu(-0.5)) / 2,  # midway between the knots at -1 and -0.5
        (gelu(0.0) + gelu(0.5)) / 2,
        (gelu(1.5) + 2.0) / 2,  # on the segment from (1.5, gelu(1.5)) to (2, 2)
        3.0,  # identity right of the bound
    )
    torch.testing.assert_close(a(x), expected)


def test_pfla_golden():
    a = act("pfla", pfla_num_points=3, pfla_left_bound=-4.0, pfla_right_bound=4.0)  # knots -2, 0, 2
    x = t(-3.0, -1.0, 1.0, 3.0, 5.0)
    # gelu(-2) = -2 phi(-2) = -0.0455003, gelu(2) = 1.9544997
    expected = t(0.0, gelu(-2.0) / 2, gelu(2.0) / 2, (gelu(2.0) + 4.0) / 2, 5.0)
    torch.testing.assert_close(a(x), expected)


def test_pfla_le_extends_the_edge_segments():
    a = act("pfla_le", pfla_num_points=3, pfla_left_bound=-4.0, pfla_right_bound=4.0)  # knots -2, 0, 2
    left_slope = (0.0 - gelu(-2.0)) / 2  # 0.0227501
    right_slope = (gelu(2.0) - 0.0) / 2  # 0.9772499
    x = t(-3.0, 1.0, 3.0, 10.0)
    expected = t(gelu(-2.0) - left_slope, right_slope, gelu(2.0) + right_slope, gelu(2.0) + 8 * right_slope)
    torch.testing.assert_close(a(x), expected)


def test_learned_spline_golden():
    a = act("learned_spline", lsa_num_knots=3)
    a.x_vals.data = t(-1.0, 0.0, 1.0)
    a.y_vals.data = t(0.0, 1.0, 0.0)
    # h = 1, slopes d = [1, -1]; natural: M0 = M2 = 0, 4 M1 = 6 (-1 - 1) -> M1 = -3.
    # [-1, 0]: S = 0 + 1.5 t - 0.5 t^3 (b = 1 - (0 - 3)/6 = 1.5, e = -3/6); S(-0.5) = 0.75 - 0.0625
    # [0, 1]:  S = 1 + 0 t - 1.5 t^2 + 0.5 t^3;                      S(0.5) = 1 - 0.375 + 0.0625
    # outside: linear with the end slopes S'(-1) = 1.5, S'(1) = 0 - 3 + 1.5 = -1.5
    x = t(-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
    torch.testing.assert_close(a(x), t(-1.5, 0.0, 0.6875, 1.0, 0.6875, 0.0, -1.5))
    torch.testing.assert_close(natural_cubic_second_derivatives(a.x_vals, a.y_vals), t(0.0, -3.0, 0.0))


def test_learned_spline_interpolates_its_knots_and_ignores_their_order():
    a = act("learned_spline", lsa_num_knots=7)
    with torch.no_grad():
        a.y_vals.add_(torch.randn(7, dtype=torch.float64))
    torch.testing.assert_close(a(a.x_vals.detach()), a.y_vals.detach())  # S(x_i) = y_i
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    y = a(x)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    with torch.no_grad():
        a.x_vals.copy_(a.x_vals[perm].clone())
        a.y_vals.copy_(a.y_vals[perm].clone())
    torch.testing.assert_close(a(x), y)


def test_learned_spline_knot_count_from_config():
    assert act("learned_spline").x_vals.shape == (30,)  # lsa_num_knots default
    assert act("learned_spline", lsa_num_knots=2)(t(0.0, 10.0)).isfinite().all()  # 2 knots: a line


# --- gradients --------------------------------------------------------------------------------
GRADCHECK = {  # inputs kept away from knots and kinks
    "prelu": ({}, t(-1.3, -0.4, 0.7, 2.1)),
    "gelu_shifted": (dict(shifted_gelu_initial_shift=0.3), t(-1.3, -0.4, 0.7, 2.1)),
    "piecewise": ({}, t(-3.0, -1.23, -0.77, 0.11, 0.63, 1.31, 1.77, 2.5)),
    "pfla": (dict(pfla_num_points=4, pfla_left_bound=-5.0, pfla_right_bound=5.0), t(-6.0, -2.3, 0.4, 2.7, 4.1, 6.0)),
    "pfla_le": (dict(pfla_num_points=4, pfla_left_bound=-5.0, pfla_right_bound=5.0), t(-6.0, -2.3, 0.4, 2.7, 4.1, 6.0)),
    "learned_spline": (dict(lsa_num_knots=5), t(-6.0, -3.1, -1.2, 0.7, 3.3, 6.2)),
}


def test_every_learnable_activation_has_a_gradcheck():
    learnable = {n for n in ACTIVATION.names() if list(act(n).parameters())}
    assert learnable == set(GRADCHECK)


@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_activation_gradcheck(name):
    kw, x = GRADCHECK[name]
    a = act(name, **kw)
    if hasattr(a, "y_vals"):
        with torch.no_grad():  # knots off the gelu curve
            a.y_vals.add_(0.05 * torch.randn(a.y_vals.shape, dtype=a.y_vals.dtype,
                                             generator=torch.Generator().manual_seed(0)))
    assert gradcheck_module(a, x)


@pytest.mark.parametrize("name", ACTIVATION.names())
def test_activation_in_bf16(name):
    """bf16 weights, or float32 weights on bf16 inputs (autocast): close to the float64 values."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    ref = act(name).eval()(x.double())
    for module in (build_activation(name, cfg()).bfloat16(), build_activation(name, cfg())):
        y = module.eval()(x.bfloat16())
        torch.testing.assert_close(y.double(), ref, atol=0.05, rtol=0.02)


# --- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,option", [
    (dict(pla_num_points=0), "pla_num_points"),
    (dict(pla_left_bound=2.0, pla_right_bound=-2.0), "pla_left_bound"),
    (dict(activation_variant="pfla_le", pfla_num_points=1), "pfla_num_points"),
    (dict(lsa_num_knots=1), "lsa_num_knots"),
    (dict(activation_variant="swish"), "activation_variant"),
])
def test_bad_activation_options_are_named(kw, option):
    with pytest.raises(ConfigError, match=option):
        cfg(**kw)


# --- in a model -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ACTIVATION.names())
def test_activation_in_tiny_gpt(name):
    torch.manual_seed(0)
    model = GPT(cfg(activation_variant=name))
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    mlp = model.transformer.h[0].mlp
    assert type(mlp.activation_variant) is ACTIVATION.get(name)
    assert mlp.c_fc.weight.shape == (4 * 32 * mlp.activation_variant.width_divisor, 32)
