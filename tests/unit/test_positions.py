"""Relative position encodings: RoPE, SOAP and FIRE against hand-derived values."""
import math

import pytest
import torch

import forge_dist.model  # noqa: F401  (registers every variant)
from forge_dist import ConfigError, ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.model.position import FIRE, RotaryEmbedding, SymmetricalOverlapAngularPositions, build_rotary


def tiny(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    base.update(kw)
    return ModelConfig(**base)


def at_position(module, x, p):
    """Rotate one vector x (D,) as if it sat at absolute position p."""
    return module(x.view(1, 1, 1, -1), offset=p).view(-1)


# --- RoPE -----------------------------------------------------------------------------------
def test_rope_rotates_a_pair_by_p_theta():
    # head dim 2: one pair, theta_0 = 10000^0 = 1, so position p rotates by p radians:
    # (1, 0) -> (cos p, sin p), (0, 1) -> (-sin p, cos p)
    rope = RotaryEmbedding(2)
    for p in (0, 1, 3):
        torch.testing.assert_close(at_position(rope, torch.tensor([1.0, 0.0]), p),
                                   torch.tensor([math.cos(p), math.sin(p)]))
        torch.testing.assert_close(at_position(rope, torch.tensor([0.0, 1.0]), p),
                                   torch.tensor([-math.sin(p), math.cos(p)]))


def test_rope_frequencies_per_pair():
    # head dim 4: theta_0 = 1, theta_1 = 10000^(-2/4) = 0.01; at p = 3 the angles are 3 and 0.03
    rope = RotaryEmbedding(4)
    out = at_position(rope, torch.tensor([1.0, 0.0, 1.0, 0.0]), 3)
    torch.testing.assert_close(out, torch.tensor([math.cos(3), math.sin(3), math.cos(0.03), math.sin(0.03)]))


def test_rope_length_rotates_only_the_first_dims():
    # head dim 8, rope_length 4: pairs (0,1) and (2,3) rotate with theta = 1 and 0.01; dims 4..7 pass
    rope = RotaryEmbedding(8, rope_length=4)
    x = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 6.0, 7.0, 8.0])
    out = at_position(rope, x, 2)
    expected = torch.tensor([math.cos(2), math.sin(2), -math.sin(0.02), math.cos(0.02), 5.0, 6.0, 7.0, 8.0])
    torch.testing.assert_close(out, expected)


def test_rope_offset_matches_position_in_full_sequence():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 10, 8)
    torch.testing.assert_close(rope(x[:, :, 6:], offset=6), rope(x)[:, :, 6:])


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(8), torch.randn(8)
    s1 = at_position(rope, q, 7) @ at_position(rope, k, 4)
    s2 = at_position(rope, q, 12) @ at_position(rope, k, 9)
    torch.testing.assert_close(s1, s2)


# --- SOAP -----------------------------------------------------------------------------------
def test_soap_one_angle_per_position_for_every_pair():
    # N = 8 angles 2 pi n / 8; position 2 -> pi/2 for both pairs: (1,0,1,0) -> (0,1,0,1)
    soap = SymmetricalOverlapAngularPositions(4, num_angles=8)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(at_position(soap, x, 2), torch.tensor([0.0, 1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    # position 9 -> angle index 9 mod 8 = 1 -> pi/4 for every pair
    h = math.sqrt(0.5)
    torch.testing.assert_close(at_position(soap, x, 9), torch.tensor([h, h, h, h]))
    # position 10 wraps to the same angle as position 2
    torch.testing.assert_close(at_position(soap, x, 10), at_position(soap, x, 2))


def test_soap_angle_table_and_rope_length():
    soap = SymmetricalOverlapAngularPositions(6, rope_length=4, num_angles=4)
    torch.testing.assert_close(soap.angle_table, torch.tensor([0.0, math.pi / 2, math.pi, 3 * math.pi / 2]))
    x = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 4.0])
    # position 2 -> angle pi: both rotated pairs negate, dims 4..5 pass through
    torch.testing.assert_close(at_position(soap, x, 2), torch.tensor([-1.0, 0.0, 0.0, -1.0, 3.0, 4.0]),
                               atol=1e-6, rtol=0)


def test_soap_is_stateless_and_relative():
    soap = SymmetricalOverlapAngularPositions(8, num_angles=16)
    x = torch.randn(1, 2, 5, 8)
    torch.testing.assert_close(soap(x), soap(x))  # upstream rolls its table every call; we do not
    q, k = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(at_position(soap, q, 5) @ at_position(soap, k, 2),
                               at_position(soap, q, 20) @ at_position(soap, k, 17))


def test_build_rotary_picks_variant():
    assert build_rotary(tiny(), 16) is None
    assert isinstance(build_rotary(tiny(use_rotary_embeddings=True), 16), RotaryEmbedding)
    soap = build_rotary(tiny(use_rotary_embeddings=True, rope_variant="soap", sym_rot_num_angles=64), 16)
    assert isinstance(soap, SymmetricalOverlapAngularPositions) and soap.num_angles == 64
    assert isinstance(build_rotary(tiny(), 16, always=True), RotaryEmbedding)


def test_rope_config_errors():
    with pytest.raises(ConfigError, match="rope_length"):
        tiny(use_rotary_embeddings=True, rope_length=3)
    with pytest.raises(ConfigError, match="rope_variant"):
        tiny(use_rotary_embeddings=True, rope_variant="yarn")


# --- FIRE -----------------------------------------------------------------------------------
def fire_identity(n_head=1, **kw):
    """FIRE whose MLP is the identity (no hidden layer, weight 1, bias 0): returns z itself."""
    fire = FIRE(tiny(use_fire_embeddings=True, fire_num_hidden_layers=0, **kw), n_head)
    with torch.no_grad():
        fire.mlp[0].weight.fill_(1.0)
        fire.mlp[0].bias.zero_()
    return fire


def test_fire_normalised_distance_golden():
    # z(i, j) = log(c |i-j| + b) / log(c max(i, L) + b), c = 0.1, b = 1 (1e-6 guards ignored)
    fire = fire_identity()
    z = fire(4, 4)[0]
    # L = 512: i = 3, j = 1: log(1.2) / log(52.2) = 0.1823216 / 3.9550824 = 0.0460985
    assert z[3, 1].item() == pytest.approx(0.0460985, abs=1e-5)
    # |i - j| = 0: log(1) / ... = 0
    assert z[2, 2].item() == pytest.approx(0.0, abs=1e-5)
    fire = fire_identity(fire_init_L=2.0)
    z = fire(4, 4)[0]
    # L = 2 < i = 3: log(1.2) / log(1.3) = 0.1823216 / 0.2623643 = 0.6949171
    assert z[3, 1].item() == pytest.approx(0.6949171, abs=1e-5)
    # i = 1 < L = 2: j = 0: log(1.1) / log(1.2) = 0.0953102 / 0.1823216 = 0.5227566
    assert z[1, 0].item() == pytest.approx(0.5227566, abs=1e-5)


def test_fire_shapes_and_head_rows():
    cfg = tiny(use_fire_embeddings=True, fire_num_hidden_layers=2, fire_mlp_width=8)
    fire = FIRE(cfg, n_head=3)
    assert fire(5, 7, q_offset=2).shape == (3, 5, 7)
    assert fire.mlp[-1].weight.shape == (3, 8)  # rows are heads: tensor parallelism shards them
    assert fire.n_head == 3
    assert [type(m).__name__ for m in fire.mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    sig = FIRE(tiny(use_fire_embeddings=True, fire_outermost_sigma=True), n_head=2)
    assert (sig(6, 6) >= 0).all() and sig.n_head == 2


def test_fire_bias_is_causal_safe():
    """b(i, j) depends on the absolute (i, j) alone, not on how many tokens exist: a row computed
    for a short prefix or while decoding equals that row in the full sequence."""
    fire = FIRE(tiny(use_fire_embeddings=True, fire_init_L=3.0), n_head=2)
    full = fire(8, 8)
    torch.testing.assert_close(fire(4, 4), full[:, :4, :4])
    torch.testing.assert_close(fire(1, 6, q_offset=5), full[:, 5:6, :6])


def test_fire_parameters_and_gradients():
    fire = FIRE(tiny(use_fire_embeddings=True, fire_init_c=0.3), n_head=2)
    names = dict(fire.named_parameters())
    assert set(names) >= {"c", "init_L", "L_multiplier", "mlp.0.weight", "mlp.2.weight"}
    assert names["c"].item() == pytest.approx(0.3) and not names["init_L"].requires_grad
    fire(6, 6, 0).sum().backward()
    assert fire.c.grad is not None and torch.isfinite(fire.c.grad)


def test_fire_shared_and_per_layer():
    m = GPT(tiny(use_fire_embeddings=True, shared_fire_embeddings=True))
    assert m.transformer.h[0].attn.fire_pos_enc is m.transformer.h[1].attn.fire_pos_enc
    m = GPT(tiny(use_fire_embeddings=True))
    assert m.transformer.h[0].attn.fire_pos_enc is not m.transformer.h[1].attn.fire_pos_enc


def test_shared_fire_needs_equal_heads():
    cfg = tiny(use_fire_embeddings=True, shared_fire_embeddings=True, attention_variant="infinite",
               n_head_layerlist=[2, 4], n_qk_head_dim=8)
    with pytest.raises(ConfigError, match="shared_fire_embeddings"):
        GPT(cfg)


@pytest.mark.parametrize("bad", [dict(fire_num_hidden_layers=-1), dict(fire_mlp_width=0), dict(fire_log_bias=0.0)])
def test_fire_config_errors(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        tiny(use_fire_embeddings=True, **bad)
