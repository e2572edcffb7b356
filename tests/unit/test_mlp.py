"""MLP variants and the KAN network: hand-derived formulas, state-dict names, glu in every variant,
gradients, causality (no position mixing) and every option in a tiny GPT."""
import itertools
import math

import pytest
import torch

from forge_dist import ConfigError, ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.model.kan import KANetwork, legendre_basis, minmax_features
from forge_dist.model.mlp import build_mlp
from forge_dist.variants import MLP
from forge_dist.testing.numerics import gradcheck_module

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def cfg(**kw):
    return ModelConfig(**{**TINY, **kw})


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def mlp(variant, **kw):
    return build_mlp(cfg(mlp_variant=variant, **kw)).double()


def set_weights(module, **weights):
    with torch.no_grad():
        for name, value in weights.items():
            module.get_parameter(name).copy_(torch.as_tensor(value, dtype=torch.float64))



SMALL = dict(n_embd=2, n_head=1)


# --- formulas ---------------------------------------------------------------------------------
def test_mlp_golden_with_offsets_and_down_projs():
    m = mlp("mlp", **SMALL, mlp_size=3, activation_variant="relu", mlp_x_offset=0.5, mlp_y_offset=0.1,
            mlp_down_projs=2)
    set_weights(m, **{"c_fc.weight": [[1, 0], [0, 1], [1, 1]],
                      "c_proj.weight": [[1, 1, 1], [0, 2, 0], [1, 0, 0], [0, 0, 1]]})
    # x = [2, -1]: h = [2, -1, 1]; relu(h - 0.5) - 0.1 = [1.4, -0.1, 0.4]
    # c_proj -> [1.4 - 0.1 + 0.4, -0.2, 1.4, 0.4] = [1.7, -0.2, 1.4, 0.4]; two slices summed: [3.1, 0.2]
    torch.testing.assert_close(m(t([[2.0, -1.0]])), t([[3.1, 0.2]]))


def test_swiglu_golden_is_geglu_by_default():
    m = mlp("swiglu", **SMALL, mlp_size=2)
    set_weights(m, **{"c_fc_in1.weight": torch.eye(2), "c_fc_in2.weight": 2 * torch.eye(2),
                      "c_fc_out.weight": torch.eye(2)})
    # gelu(x) * 2x: [gelu(1) * 2, gelu(-2) * -4] = [0.8413447 * 2, -0.0455003 * -4]
    torch.testing.assert_close(m(t([1.0, -2.0])), t([1.6826895, 0.1820011]), atol=1e-6, rtol=0)


def test_dual_path_golden():
    m = mlp("dual_path", **SMALL, mlp_size=2, activation_variant="relu", mlp_x_offset=0.5, mlp_y_offset=0.1)
    set_weights(m, **{"c_fc.weight": torch.eye(2), "c_proj1.weight": torch.eye(2),
                      "c_proj2.weight": torch.eye(2)})
    # h = x = [1, -2]; path 1: relu(h - 0.5) - 0.1 = [0.4, -0.1]
    # path 2: -relu(-(h + 0.5)) - 0.1 = [-relu(-1.5) - 0.1, -relu(1.5) - 0.1] = [-0.1, -1.6]
    torch.testing.assert_close(m(t([1.0, -2.0])), t([0.3, -1.7]))


def test_identity_mlp_returns_its_input():
    m = build_mlp(cfg(mlp_variant="identity"))
    x = torch.randn(2, 5, 32)
    assert m(x) is x and not list(m.parameters())


# --- glu: the up projection doubles so every variant keeps its hidden width ------------------------
def test_glu_in_mlp_golden():
    m = mlp("mlp", **SMALL, mlp_size=2, activation_variant="glu", mlp_up_bias=True)
    set_weights(m, **{"c_fc.weight": [[1, 0], [0, 1], [0, 0], [0, 0]],
                      "c_fc.bias": [0, 0, 0, math.log(3.0)], "c_proj.weight": torch.eye(2)})
    # h = [2, 4, 0, ln 3]; glu -> [2 sigmoid(0), 4 sigmoid(ln 3)] = [1, 3]
    torch.testing.assert_close(m(t([2.0, 4.0])), t([1.0, 3.0]))


@pytest.mark.parametrize("variant,up", [("mlp", "c_fc"), ("swiglu", "c_fc_in1"), ("dual_path", "c_fc")])
def test_glu_widens_only_the_activated_projection(variant, up):
    m = build_mlp(cfg(mlp_variant=variant, activation_variant="glu", mlp_size=24))
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes[f"{up}.weight"] == (48, 32)
    assert all(s[-1] == 24 for n, s in shapes.items() if not n.startswith(up) and s[0] != 24)
    assert m(torch.randn(2, 3, 32)).shape == (2, 3, 32)


# --- names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,keys", [
    ("mlp", {"c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias", "activation_x_offset",
             "activation_y_offset"}),
    ("swiglu", {"c_fc_in1.weight", "c_fc_in1.bias", "c_fc_in2.weight", "c_fc_in2.bias", "c_fc_out.weight",
                "c_fc_out.bias", "activation_x_offset", "activation_y_offset"}),
    ("dual_path", {"c_fc.weight", "c_proj1.weight", "c_proj2.weight", "activation_x_offset",
                   "activation_y_offset"}),
    ("kan", {"kan.base_weights.0", "kan.poly_weights.0", "kan.layer_norms.0.weight", "kan.layer_norms.0.bias"}),
])
def test_state_dict_names_follow_upstream(variant, keys):
    # bias=True: mlp/swiglu take it via mlp_*_bias=None; dual_path reads mlp_*_bias only (None -> none)
    assert set(build_mlp(cfg(mlp_variant=variant, bias=True)).state_dict()) == keys


def test_dual_path_bias_options():
    m = build_mlp(cfg(mlp_variant="dual_path", mlp_up_bias=True, mlp_down_bias=True))
    assert {"c_fc.bias", "c_proj1.bias", "c_proj2.bias"} <= set(m.state_dict())


def test_learned_offsets_are_parameters():
    m = build_mlp(cfg(learn_mlp_x_offset=True, learn_mlp_y_offset=True, mlp_x_offset=0.25))
    params = dict(m.named_parameters())
    assert params["activation_x_offset"].dim() == 0 and params["activation_x_offset"].item() == 0.25
    assert "activation_y_offset" in params


# --- KAN ---------------------------------------------------------------------------------------
def test_legendre_basis_golden():
    # P0..P3 at 0.5: 1, 0.5, (3 * 0.25 - 1) / 2 = -0.125, (5 * 0.125 - 3 * 0.5) / 2 = -0.4375
    torch.testing.assert_close(legendre_basis(t(0.5), 3), t([1.0, 0.5, -0.125, -0.4375]))
    torch.testing.assert_close(legendre_basis(t(0.5), 0), t([1.0]))


def test_minmax_features_is_per_token():
    # row [1, 3, 2]: 2 (x - 1) / 2 - 1 = [-1, 1, 0]; a constant row maps to -1 (range clamped)
    torch.testing.assert_close(minmax_features(t([1.0, 3.0, 2.0], [5.0, 5.0, 5.0])),
                               t([-1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]))


def test_kan_layer_golden():
    net = KANetwork(2, 2, cfg(kan_poly_order=1, kan_base_activation="identity")).double()
    s = math.sqrt(0.25 + 1e-5)  # LayerNorm of [a, a + 1]: (+-0.5) / sqrt(0.25 + eps)
    # poly path: x = [1, 3] -> x_hat = [-1, 1] -> features [P0, P1] per input = [1, -1, 1, 1];
    # W_poly rows pick 1 and 2 * 1 -> [1, 2]; base weights 0 -> LayerNorm -> [-0.5/s, 0.5/s]
    set_weights(net, **{"base_weights.0": torch.zeros(2, 2), "poly_weights.0": [[1, 0, 0, 0], [0, 0, 0, 2]]})
    torch.testing.assert_close(net(t([1.0, 3.0])), t([-0.5 / s, 0.5 / s]))
    # base path: identity(x) = [1, 3], W_base = [[1, 0], [0, 0]] -> [1, 0] -> [0.5/s, -0.5/s]
    set_weights(net, **{"base_weights.0": [[1, 0], [0, 0]], "poly_weights.0": torch.zeros(2, 4)})
    torch.testing.assert_close(net(t([1.0, 3.0])), t([0.5 / s, -0.5 / s]))


def test_kan_widths_and_init():
    net = KANetwork(32, 16, cfg(kan_middle_layers=[8], kan_poly_order=2))
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    assert shapes["base_weights.0"] == (8, 32) and shapes["poly_weights.0"] == (8, 96)
    assert shapes["base_weights.1"] == (16, 8) and shapes["poly_weights.1"] == (16, 24)
    assert net.poly_weights[0].abs().max() <= math.sqrt(3 / 96)  # Kaiming uniform, gain 1
    assert net(torch.randn(2, 3, 32)).shape == (2, 3, 16)


def test_kan_weights_survive_gpt_init():
    model = GPT(cfg(mlp_variant="kan"))
    w = model.transformer.h[0].mlp.kan.base_weights[0]
    assert w.abs().max() <= math.sqrt(3 / 32) and w.std() > 0.1  # not redrawn as a 0.02 linear


# --- gradients, causality, models ------------------------------------------------------------------
@pytest.mark.parametrize("variant,kw", [
    ("mlp", dict(mlp_down_projs=2)),
    ("mlp", dict(activation_variant="glu")),
    ("swiglu", {}),
    ("dual_path", dict(mlp_up_bias=True, mlp_down_bias=True)),
    ("kan", dict(kan_middle_layers=[3], kan_poly_order=2)),
])
def test_mlp_gradcheck(variant, kw):
    m = mlp(variant, n_embd=4, n_head=1, mlp_size=6, bias=True, learn_mlp_x_offset=True,
            learn_mlp_y_offset=True, mlp_x_offset=0.1, **kw)
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert gradcheck_module(m, x)


@pytest.mark.parametrize("variant", MLP.names())
def test_mlp_is_causal_and_position_wise(variant):
    m = build_mlp(cfg(mlp_variant=variant, activation_variant="silu")).eval()
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    y = m(x)
    for pos in range(15):
        x2 = x.clone()
        x2[:, pos + 1:] = 100 * torch.randn(2, 15 - pos, 32)  # change everything after pos
        torch.testing.assert_close(m(x2)[:, :pos + 1], y[:, :pos + 1], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([m(x[:, i:i + 1]) for i in range(16)], 1), y)  # token by token


@pytest.mark.parametrize("variant", MLP.names())
def test_gpt_with_mlp_is_causal(variant):
    torch.manual_seed(0)
    model = GPT(cfg(mlp_variant=variant)).eval()
    idx = torch.randint(0, 64, (1, 16))
    logits, _ = model(idx, idx)
    for pos in (0, 7, 14):
        idx2 = idx.clone()
        idx2[0, pos + 1] = (idx2[0, pos + 1] + 1) % 64
        logits2, _ = model(idx2, idx2)
        torch.testing.assert_close(logits2[:, :pos + 1], logits[:, :pos + 1])
        assert not torch.allclose(logits2[:, pos + 1], logits[:, pos + 1])


BIAS = [dict(bias=False), dict(bias=True), dict(mlp_up_bias=True, mlp_down_bias=False)]
OFFSETS = [{}, dict(learn_mlp_x_offset=True, learn_mlp_y_offset=True, mlp_x_offset=0.1, mlp_y_offset=-0.1)]


@pytest.mark.parametrize("variant", MLP.names())
def test_mlp_options_in_tiny_gpt(variant):
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    for bias, size, offsets in itertools.product(BIAS, [None, 24], OFFSETS):
        torch.manual_seed(0)
        model = GPT(cfg(mlp_variant=variant, mlp_size=size, **bias, **offsets))
        _, loss = model(idx, idx)
        loss.backward()
        assert torch.isfinite(loss)
        for n, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (n, bias, size, offsets)


@pytest.mark.parametrize("kw,option", [
    (dict(mlp_variant="moe"), "mlp_variant"),
    (dict(kan_poly_order=-1), "kan_poly_order"),
    (dict(kan_middle_layers=[8, 0]), "kan_middle_layers"),
    (dict(kan_base_activation="glu"), "kan_base_activation"),
])
def test_bad_mlp_options_are_named(kw, option):
    with pytest.raises(ConfigError, match=option):
        cfg(**kw)
