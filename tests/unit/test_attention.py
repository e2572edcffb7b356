"""Attention variants: the shared scoring core against hand computations, each variant's own
formula, fused/manual parity, KV-cached decoding, and smoke runs in a tiny GPT."""
import math

import pytest
import torch

import forge_dist.model  # noqa: F401  (registers every variant)
from forge_dist import ConfigError, ModelConfig
from forge_dist.model.attention import build_attention
from forge_dist.model.attention.core import attend
from forge_dist.model.attention.ssm import selective_scan
from forge_dist.model.cache import KVCache
from forge_dist.model.gpt import GPT
from forge_dist.ops.mask import MaskSpec
from forge_dist.variants import ATTENTION, MOD_FN, SOFTMAX

VARIANTS = ATTENTION.names()
POSITIONS = {
    "abs": {},
    "rope": dict(use_rotary_embeddings=True),
    "soap": dict(use_rotary_embeddings=True, rope_variant="soap"),
    "fire": dict(use_fire_embeddings=True),
    "nope": dict(use_abs_pos_embeddings=False),
}


def tiny(**kw):
    base = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    base.update(kw)
    return ModelConfig(**base)


def attn_module(seed=0, **kw):
    torch.manual_seed(seed)
    return build_attention(tiny(**kw), 0, {}).eval()


def t(*rows):  # (T, D) -> (1, 1, T, D)
    return torch.tensor(rows, dtype=torch.float32).view(1, 1, len(rows), -1)


# --- the scoring core -----------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_sink_hand_computation(fused):
    """flash-LOBO: y_i = sum_{j<=i} e^{s_ij} v_j / (C + sum_{j<=i} e^{s_ij}); token i sees itself.
    q = (1, 1), k = (0, ln 2), v = (1, 3), scale 1, C = 2:
      y_0 = e^0 * 1 / (2 + e^0)                   = 1/3
      y_1 = (e^0 * 1 + e^{ln 2} * 3) / (2 + 1 + 2) = 7/5
    (upstream's shifted mask would give y_0 = 0: query 0 would see the sink only)."""
    q, k, v = t([1.0], [1.0]), t([0.0], [math.log(2)]), t([1.0], [3.0])
    y = attend(q, k, v, normalizer=None, mask=MaskSpec(), scale=1.0,
               sink_logit=torch.tensor(math.log(2)), fused=fused)
    torch.testing.assert_close(y.view(-1), torch.tensor([1 / 3, 7 / 5]))


@pytest.mark.parametrize("fused", [True, False])
def test_sliding_window_keeps_window_plus_one_keys(fused):
    w = 2
    keep = MaskSpec(window=w).keep(6, 6)
    assert keep.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert keep[5].tolist() == [False, False, False, True, True, True]  # i - w <= j <= i
    # q = 0 makes every visible score equal, so y_i is the mean of v over the visible keys
    v = torch.arange(6.0).view(1, 1, 6, 1)
    y = attend(torch.zeros(1, 1, 6, 1), torch.randn(1, 1, 6, 1), v, normalizer=None,
               mask=MaskSpec(window=w), scale=1.0, fused=fused)
    # means of (0), (0,1), (0,1,2), (1,2,3), (2,3,4), (3,4,5)
    torch.testing.assert_close(y.view(-1), torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 4.0]))


def test_window_with_kv_offset():
    keep = MaskSpec(window=1, q_offset=3).keep(2, 5)  # queries at positions 3, 4 over keys 0..4
    assert keep.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


def test_hides_nothing_agrees_with_keep():
    for spec in (MaskSpec(), MaskSpec(q_offset=4), MaskSpec(q_offset=3), MaskSpec(window=2, q_offset=1),
                 MaskSpec(window=5, q_offset=1), MaskSpec(causal=False), MaskSpec(n_sink=1, q_offset=4)):
        for n_q, n_k in ((1, 5), (2, 5), (1, 6)):
            assert spec.hides_nothing(n_q, n_k) == bool(spec.keep(n_q, n_k).all()), (spec, n_q, n_k)


def test_soft_capping_hand_computation():
    """scores c tanh(s / c) before the softmax: c = 1, s_10 = 0, s_11 = 2, v = (0, 1):
    y_1 = e^{tanh 2} / (e^{tanh 0} + e^{tanh 2})."""
    q, k, v = t([0.0], [1.0]), t([0.0], [2.0]), t([0.0], [1.0])
    y = attend(q, k, v, normalizer=None, mask=MaskSpec(), scale=1.0, softcap=1.0)
    e = math.exp(math.tanh(2.0))
    assert y.view(-1)[1].item() == pytest.approx(e / (1 + e), abs=1e-6)
    plain = attend(q, k, v, normalizer=None, mask=MaskSpec(), scale=1.0)
    assert plain.view(-1)[1].item() == pytest.approx(math.exp(2) / (1 + math.exp(2)), abs=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_gqa_equals_explicit_head_repetition(fused):
    q, k, v = torch.randn(2, 6, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3)
    y = attend(q, k, v, normalizer=None, mask=MaskSpec(), scale=0.5, fused=fused)
    for h in range(6):  # query head h uses key/value head h // 3
        ref = attend(q[:, h:h + 1], k[:, h // 3:h // 3 + 1], v[:, h // 3:h // 3 + 1], normalizer=None,
                     mask=MaskSpec(), scale=0.5, fused=False)
        torch.testing.assert_close(y[:, h:h + 1], ref)


def test_gqa_module_equals_tiled_kv_projection():
    """A GQA layer equals a full multi-head layer whose key/value heads are the GQA heads
    repeated (head h -> group h // (n_head / n_kv_group))."""
    gqa = attn_module(n_head=4, n_kv_group=2)
    mha = attn_module(n_head=4)
    D = 8
    with torch.no_grad():
        for name in ("c_attn_q", "c_proj"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        for name in ("c_attn_k", "c_attn_v"):
            w = getattr(gqa, name).weight.view(2, D, 32).repeat_interleave(2, dim=0).reshape(4 * D, 32)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(gqa(x), mha(x))


SCORING_OPTIONS = {
    "plain": {},
    "gqa": dict(n_head=4, n_kv_group=2),
    "window": dict(window_size=3, n_head=4, n_kv_group=1),
    "lobo": dict(use_flash_lobo=True, flash_lobo_log_const=0.5),
    "lobo_per_head_gqa": dict(use_flash_lobo=True, use_flash_lobo_per_head=True, n_head=4, n_kv_group=2),
    "lobo_const": dict(use_flash_lobo=True, use_flash_obo_const=True, flash_lobo_log_const=1.0),
    "fire": dict(use_fire_embeddings=True),
    "qk_norm_scale": dict(use_qk_norm=True, use_qk_norm_scale=True, use_rotary_embeddings=True),
    "soap_lobo_fire": dict(use_rotary_embeddings=True, rope_variant="soap", use_flash_lobo=True,
                           use_fire_embeddings=True),
}


@pytest.mark.parametrize("variant", ["causal", "infinite", "mla"])
@pytest.mark.parametrize("opts", SCORING_OPTIONS.values(), ids=SCORING_OPTIONS.keys())
def test_fused_matches_manual(variant, opts):
    """disable_flash_attention takes the materialised-score path; both give the same output and
    the same gradients (sink and FIRE parameters included)."""
    fused = attn_module(attention_variant=variant, **opts)
    manual = attn_module(attention_variant=variant, disable_flash_attention=True, **opts)
    manual.load_state_dict(fused.state_dict())
    x = torch.randn(2, 9, 32)
    y_f, y_m = fused(x), manual(x)
    torch.testing.assert_close(y_f, y_m, atol=1e-5, rtol=1e-4)
    (y_f ** 2).sum().backward()
    (y_m ** 2).sum().backward()
    for (name, p_f), (_, p_m) in zip(fused.named_parameters(), manual.named_parameters()):
        if p_f.requires_grad:
            assert p_f.grad is not None, name
            torch.testing.assert_close(p_f.grad, p_m.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_qk_norm_scale():
    """use_qk_norm_scale: scores = g * (q/|q|) . (k/|k|), g learned, init log2(L^2 - L);
    L = block_size = 16: log2(240) = 7.906891."""
    m = attn_module(use_qk_norm=True, use_qk_norm_scale=True)
    assert m.qk_norm_factor.item() == pytest.approx(7.906891, abs=1e-5)
    with torch.no_grad():
        m.qk_norm_factor.fill_(3.0)
    x = torch.randn(1, 5, 32)
    D = 16
    q = m.c_attn_q(x).view(1, 5, 2, D).transpose(1, 2)
    k = m.c_attn_k(x).view(1, 5, 2, D).transpose(1, 2)
    v = m.c_attn_v(x).view(1, 5, 2, D).transpose(1, 2)
    q, k = q / (q.norm(dim=-1, keepdim=True) + 1e-6), k / (k.norm(dim=-1, keepdim=True) + 1e-6)
    scores = 3.0 * q @ k.transpose(-1, -2)
    scores = scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 5, 32)
    torch.testing.assert_close(m(x), m.c_proj(y))


def test_flash_lobo_parameter_shapes():
    assert attn_module(use_flash_lobo=True).flash_lobo_log_const.shape == ()
    per_head = attn_module(use_flash_lobo=True, use_flash_lobo_per_head=True, n_head=4)
    assert per_head.flash_lobo_log_const.shape == (4,)
    const = attn_module(use_flash_lobo=True, use_flash_obo_const=True, flash_lobo_log_const=2.0)
    assert const.flash_lobo_log_const == 2.0 and "flash_lobo_log_const" not in dict(const.named_parameters())


# --- variant formulas -----------------------------------------------------------------------
def test_causal_state_dict_names():
    names = set(attn_module(n_head=4, n_kv_group=2).state_dict())
    assert names == {"c_attn_q.weight", "c_attn_k.weight", "c_attn_v.weight", "c_proj.weight"}
    assert attn_module(n_head=4, n_kv_group=2).c_attn_k.weight.shape == (16, 32)  # 2 groups x 8


def test_infinite_head_shapes():
    # n_head 3 does not divide n_embd 32: fine for infinite heads
    m = attn_module(attention_variant="infinite", n_head=3, n_qk_head_dim=8, n_v_head_dim=12)
    assert m.c_attn_q.weight.shape == (24, 32) and m.c_attn_k.weight.shape == (24, 32)
    assert m.c_attn_v.weight.shape == (36, 32) and m.c_proj.weight.shape == (32, 12)
    concat = attn_module(attention_variant="infinite", n_head=3, n_qk_head_dim=8, n_v_head_dim=12,
                         use_concat_heads=True)
    assert concat.c_proj.weight.shape == (32, 36)
    gqa = attn_module(attention_variant="infinite", n_head=4, n_kv_group=2, n_qk_head_dim=8, n_v_head_dim=4)
    assert gqa.c_attn_k.weight.shape == (16, 32) and gqa.c_attn_v.weight.shape == (8, 32)
    assert gqa(torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_infinite_summed_heads_equal_concat_with_tiled_projection():
    """Summing heads then W equals concatenating heads then [W W W]."""
    kw = dict(attention_variant="infinite", n_head=3, n_qk_head_dim=8, n_v_head_dim=12)
    summed = attn_module(**kw)
    concat = attn_module(use_concat_heads=True, **kw)
    with torch.no_grad():
        for name in ("c_attn_q", "c_attn_k", "c_attn_v"):
            getattr(concat, name).weight.copy_(getattr(summed, name).weight)
        concat.c_proj.weight.copy_(summed.c_proj.weight.repeat(1, 3))
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(summed(x), concat(x))


def test_infinite_n_cproj_sums_projections():
    """n_cproj projections of the summed heads add up: one projection with W1 + W2, b1 + b2."""
    kw = dict(attention_variant="infinite", n_head=2, n_qk_head_dim=8, n_v_head_dim=8, bias=True)
    many = attn_module(n_cproj=2, **kw)
    one = attn_module(**kw)
    assert len(many.c_proj_list) == 2 and not hasattr(many, "c_proj")
    with torch.no_grad():
        for name in ("c_attn_q", "c_attn_k", "c_attn_v"):
            getattr(one, name).load_state_dict(getattr(many, name).state_dict())
        for p in many.c_proj_list.parameters():
            p.normal_()
        one.c_proj.weight.copy_(many.c_proj_list[0].weight + many.c_proj_list[1].weight)
        one.c_proj.bias.copy_(many.c_proj_list[0].bias + many.c_proj_list[1].bias)
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(many(x), one(x), atol=1e-5, rtol=1e-5)


def test_infinite_per_layer_shapes_from_layerlists():
    cfg = tiny(attention_variant="infinite", n_head_layerlist=[2, 3], n_qk_head_dim_layerlist=[8, 4],
               n_v_head_dim_layerlist=[16, 6])
    m = GPT(cfg)
    a0, a1 = m.transformer.h[0].attn, m.transformer.h[1].attn
    assert a0.c_attn_q.weight.shape == (16, 32) and a0.c_attn_v.weight.shape == (32, 32)
    assert a1.c_attn_q.weight.shape == (12, 32) and a1.c_attn_v.weight.shape == (18, 32)


def test_mla_dims_honoured():
    m = attn_module(attention_variant="mla", mla_latent_dim=12, mla_rotary_dim=6)
    assert m.kv_down_proj.weight.shape == (12, 32)
    assert m.k_up_proj.weight.shape == (32, 12) and m.v_up_proj.weight.shape == (32, 12)
    assert m.q_rope_proj.weight.shape == (2 * 6, 32) and m.k_rope_proj.weight.shape == (6, 32)
    default = attn_module(attention_variant="mla")  # latent None -> 4 * head_dim = 64; rotary 32
    assert default.kv_down_proj.weight.shape == (64, 32) and default.k_rope_proj.weight.shape == (32, 32)
    with pytest.raises(ConfigError, match="mla_rotary_dim"):
        tiny(attention_variant="mla", mla_rotary_dim=5)


def test_mla_formula_with_lobo():
    """MLA against its equations written out: scores = [q_c; RoPE q_r] . [k_c; RoPE k_r] / sqrt(d_h + d_r),
    y = sum_j e^{s_ij} v_j / (C_h + sum_j e^{s_ij}), C_h = exp(lobo_log_h)."""
    from forge_dist.model.position import RotaryEmbedding

    m = attn_module(attention_variant="mla", mla_latent_dim=10, mla_rotary_dim=4, use_mla_lobo=True)
    with torch.no_grad():
        m.lobo_log.copy_(torch.tensor([0.3, -1.0]))
    B, T, H, dh, dr = 1, 5, 2, 16, 4
    x = torch.randn(B, T, 32)
    rope = RotaryEmbedding(dr)
    latent = m.kv_down_proj(x)
    q = torch.cat([m.q_proj(x).view(B, T, H, dh).transpose(1, 2),
                   rope(m.q_rope_proj(x).view(B, T, H, dr).transpose(1, 2))], -1)
    k_r = rope(m.k_rope_proj(x).view(B, 1, T, dr)).expand(B, H, T, dr)
    k = torch.cat([m.k_up_proj(latent).view(B, T, H, dh).transpose(1, 2), k_r], -1)
    v = m.v_up_proj(latent).view(B, T, H, dh).transpose(1, 2)
    e = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(dh + dr)) * torch.ones(T, T).tril()
    C = torch.exp(m.lobo_log).view(1, H, 1, 1)
    y = (e / (C + e.sum(-1, keepdim=True))) @ v
    torch.testing.assert_close(m(x), m.out_proj(y.transpose(1, 2).reshape(B, T, H * dh)))


def test_linear_attention_golden():
    """n_embd 2, one head, c_attn = [I; I; I], c_proj = I, scale 1: q = k = v = x.
    x_0 = (0, 0): phi = (1, 1), v = 0 -> y_0 = (0, 0).
    x_1 = (1, -1): phi = (2, e^-1), v = (1, -1);
      sum k*v = (2, -e^-1), sum k = (3, 1 + e^-1), denominator 2*3 + e^-1 (1 + e^-1) = 6.503214
      y_1 = (2*2, e^-1 * -e^-1) / 6.503214 = (0.615081, -0.020810)."""
    torch.manual_seed(0)
    m = build_attention(ModelConfig(n_layer=1, n_head=1, n_embd=2, block_size=4, vocab_size=8,
                                    attention_variant="linear"), 0, {})
    with torch.no_grad():
        m.c_attn.weight.copy_(torch.eye(2).repeat(3, 1))
        m.c_attn.bias.zero_()
        m.c_proj.weight.copy_(torch.eye(2))
        m.c_proj.bias.zero_()
        m.scale.fill_(1.0)
    y = m(torch.tensor([[[0.0, 0.0], [1.0, -1.0]]]))
    torch.testing.assert_close(y, torch.tensor([[[0.0, 0.0], [0.615081, -0.020810]]]), atol=1e-5, rtol=0)


def test_linear_attention_parameters():
    m = attn_module(attention_variant="linear")
    assert m.c_attn.weight.shape == (96, 32) and m.c_attn.bias is not None and m.c_proj.bias is not None
    assert m.scale.item() == pytest.approx(1 / 4)  # 1 / sqrt(head_dim 16)


def test_selective_scan_golden():
    """E = N = 1, A = -1, dt = ln 2 (decay e^{-ln 2} = 1/2), B = C = 1, x = (1, 1):
    h_1 = 0 / 2 + ln 2 = 0.693147;  h_2 = 0.693147 / 2 + ln 2 = 1.039721; y_t = h_t."""
    ln2 = math.log(2)
    y, h = selective_scan(torch.ones(1, 2, 1), torch.full((1, 2, 1), ln2), torch.tensor([[-1.0]]),
                          torch.ones(1, 2, 1), torch.ones(1, 2, 1), torch.zeros(1, 1, 1))
    torch.testing.assert_close(y.view(-1), torch.tensor([0.693147, 1.039721]))
    assert h.item() == pytest.approx(1.039721, abs=1e-6)


def test_ssm_shapes():
    m = attn_module(attention_variant="ssm", ssm_mamba_expand=2, ssm_d_state=4, ssm_dt_rank=3,
                    ssm_conv_kernel_size=4, ssm_io_bias=True)
    assert m.in_proj.weight.shape == (128, 32) and m.in_proj.bias is not None
    assert m.x_proj.weight.shape == (3 + 8, 64) and m.dt_proj.weight.shape == (64, 3)
    assert m.A_log.shape == (64, 4) and m.D.shape == (64,) and m.conv1d.weight.shape == (64, 1, 4)
    torch.testing.assert_close(-torch.exp(m.A_log[0]), torch.tensor([-1.0, -2.0, -3.0, -4.0]))
    with pytest.raises(ConfigError, match="ssm_d_state"):
        tiny(attention_variant="ssm", ssm_d_state=0)


@pytest.mark.parametrize("name,r,c,expected", [
    ("cooperation", 1.0, 1.0, 4.5),  # relu6(0.5 + 2 + 1 * 2) = 4.5
    ("cooperation", 2.0, 1.0, 6.0),  # relu6(1 + 4 + 1 * 3) = relu6(8) = 6
    ("cooperation", -1.0, 0.0, 0.0),  # relu6(-0.5 - 2 + 0) = 0
    ("tm1", 1.0, math.log(2), 1.5),  # 0.5 * 1 * (1 + e^{ln 2}) = 1.5
    ("tm2", 2.0, 3.0, 8.0),  # 2 + 2 * 3
    ("tm3", 1.0, 0.0, 1.0),  # 1 * (1 + tanh 0)
    ("tm3", 2.0, 1.0, 2.0 * (1 + math.tanh(2.0))),
    ("tm4", 2.0, 3.0, 24.0),  # 2 * 2^2 * 3
])
def test_mod_fn_golden(name, r, c, expected):
    out = MOD_FN.get(name)(torch.tensor(r), torch.tensor(c))
    assert out.item() == pytest.approx(expected, abs=1e-6)


def test_co4_options():
    m = attn_module(attention_variant="co4", n_latent=3, triadic_loops=2, mod_fn="tm2")
    assert m.latent.shape == (3, 32) and m.triadic_loops == 2 and m.mod_fn is MOD_FN.get("tm2")
    with pytest.raises(ConfigError, match="mod_fn.*cooperation"):
        tiny(attention_variant="co4", mod_fn="tm9")


def test_identity_returns_input():
    x = torch.randn(2, 5, 32)
    assert attn_module(attention_variant="identity")(x) is x


def test_unknown_variant_names_the_option():
    with pytest.raises(ConfigError, match="attention_variant.*causal"):
        tiny(attention_variant="flash")


@pytest.mark.parametrize("variant", ["causal", "infinite", "mla"])
@pytest.mark.parametrize("softmax", SOFTMAX.names())
def test_every_softmax_variant_in_every_dot_product_variant(variant, softmax):
    """Any softmax variant applies in every dot-product variant (fused flag or not), with a sink
    and per-head parameters sized by the layer's heads; cached decoding matches."""
    m = attn_module(attention_variant=variant, softmax_variant_attn=softmax, n_head=4, n_kv_group=2,
                    use_flash_lobo=True, use_flash_lobo_per_head=True)
    assert m.softmax_layer_attn is not None or softmax == "softmax"
    x = torch.randn(2, 6, 32, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    with torch.no_grad():
        cache, outs = KVCache(1), []
        for i in range(6):
            outs.append(m(x[:, i:i + 1], cache.layer(0)))
            cache.advance(1)
        torch.testing.assert_close(torch.cat(outs, 1), y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_forward(variant):
    m = attn_module(attention_variant=variant, use_rotary_embeddings=True).to(torch.bfloat16)
    y = m(torch.randn(2, 6, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


# --- decoding -------------------------------------------------------------------------------
DECODE_CASES = [(v, {}) for v in VARIANTS] + [
    ("causal", dict(n_head=4, n_kv_group=2, use_rotary_embeddings=True, window_size=3)),
    ("causal", dict(use_flash_lobo=True, use_flash_lobo_per_head=True, use_fire_embeddings=True)),
    ("causal", dict(use_rotary_embeddings=True, rope_variant="soap", sym_rot_num_angles=4,
                    use_qk_norm=True, use_qk_norm_scale=True, disable_flash_attention=True)),
    ("infinite", dict(n_head=3, n_kv_group=1, n_qk_head_dim=8, n_v_head_dim=4, use_rotary_embeddings=True)),
    ("infinite", dict(n_cproj=2, use_flash_lobo=True, attn_logit_softcapping=5.0)),
    ("mla", dict(use_mla_lobo=True, use_flash_lobo=True, mla_latent_dim=8, mla_rotary_dim=4)),
    ("mla", dict(use_fire_embeddings=True, window_size=4)),
    ("co4", dict(triadic_loops=2, mod_fn="tm3", n_latent=3)),
    ("ssm", dict(ssm_conv_kernel_size=1)),
    ("ssm", dict(ssm_conv_kernel_size=4, ssm_io_bias=True)),
]


@pytest.mark.parametrize("variant,opts", DECODE_CASES, ids=[f"{v}-{i}" for i, (v, _) in enumerate(DECODE_CASES)])
def test_cached_decode_equals_uncached(variant, opts):
    m = attn_module(attention_variant=variant, **opts)
    x = torch.randn(2, 9, 32)
    full = m(x)
    for chunks in ([1] * 9, [4, 1, 3, 1]):  # token by token, and a prefill then mixed steps
        cache, outs, pos = KVCache(1), [], 0
        for n in chunks:
            outs.append(m(x[:, pos:pos + n], cache.layer(0)))
            cache.advance(n)
            pos += n
        torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-4)


def test_gpt_cached_decode_mixed_layers():
    cfg = tiny(n_layer=7, attention_list=["causal", "infinite", "mla", "linear", "ssm", "co4", "identity"],
               use_rotary_embeddings=True, use_abs_pos_embeddings=False)
    torch.manual_seed(0)
    m = GPT(cfg).eval()
    idx = torch.randint(0, 64, (2, 10))
    cache = KVCache(cfg.n_layer)
    with torch.no_grad():
        for i in range(10):
            step, _ = m(idx[:, i:i + 1], cache=cache)
            full, _ = m(idx[:, :i + 1])
            torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


# --- whole model ----------------------------------------------------------------------------
def test_attention_list_cycles_variants():
    cfg = tiny(n_layer=5, attention_list=["causal", "mla", "linear"])
    kinds = [type(b.attn).__name__ for b in GPT(cfg).transformer.h]
    assert kinds == ["CausalSelfAttention", "MultiHeadLatentAttention", "LinearAttention",
                     "CausalSelfAttention", "MultiHeadLatentAttention"]
    cfg = tiny(n_layer=3, attention_variant_layerlist=["ssm", "co4"])
    assert [type(b.attn).__name__ for b in GPT(cfg).transformer.h] == ["SelectiveSSM", "Co4Attention", "SelectiveSSM"]


def test_mixed_model_forward_backward():
    cfg = tiny(n_layer=7, attention_list=list(VARIANTS), use_fire_embeddings=True, use_rotary_embeddings=True)
    torch.manual_seed(0)
    m = GPT(cfg)
    idx = torch.randint(0, 64, (2, 16))
    _, loss = m(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize("position", POSITIONS, ids=POSITIONS.keys())
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_smoke(variant, position):
    torch.manual_seed(0)
    m = GPT(tiny(attention_variant=variant, dropout=0.1, **POSITIONS[position])).train()
    idx = torch.randint(0, 64, (2, 16))
    logits, loss = m(idx, idx)
    assert logits.shape == (2, 16, 64) and torch.isfinite(loss)
    loss.backward()
    for name, p in m.named_parameters():
        if p.requires_grad and ".attn." in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
