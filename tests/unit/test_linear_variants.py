"""Linear variants: quantized_linear (warmup, schedule, eval codes), the BitNet family against
hand-computed outputs, straight-through gradients, and every variant inside a tiny GPT."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from forge_dist import ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.model.linear import (BitLinear, BitLinear1p58, BitLinearOptimized, QuantizedLinear,
                                     build_linear)
from forge_dist.model.quantize import set_quant_iteration
from forge_dist.variants import LINEAR
from forge_dist.ops.reference import quantize as ref

W = [[1.0, -3.0], [0.5, -0.5]]


def tiny(**kw):
    return ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, **kw)


def qlinear(cfg, method="affine_quant", bits=8, bias=False, n_in=6, n_out=4):
    torch.manual_seed(0)
    return QuantizedLinear(n_in, n_out, cfg, method, bits, bias)


# --- quantized_linear -------------------------------------------------------------------------------
def test_quantized_linear_warmup_then_fake_quant():
    layer = qlinear(tiny(quantization_warmup_iters=2))
    x = torch.randn(3, 6)
    plain = F.linear(x, layer.weight)
    quant = F.linear(x, ref.fake_quantize(layer.weight.detach(), "affine_quant", 8))
    set_quant_iteration(layer, 1)
    assert torch.equal(layer(x), plain)  # iterations 0, 1: plain
    set_quant_iteration(layer, 2)
    assert torch.allclose(layer(x), quant, atol=1e-6)


def test_quantized_linear_counts_its_own_steps_without_trainer():
    layer = qlinear(tiny(quantization_warmup_iters=2))
    x = torch.randn(3, 6)
    outs = [layer(x) for _ in range(3)]
    assert torch.equal(outs[0], F.linear(x, layer.weight)) and torch.equal(outs[1], outs[0])
    assert not torch.equal(outs[2], outs[0])


def test_quantized_linear_schedule_and_straight_through_gradient():
    layer = qlinear(tiny(quantization_warmup_iters=0, quant_scheduler="static", start_quant_level=0.5))
    x = torch.randn(3, 6)
    w = layer.weight.detach()
    w_eff = w + 0.5 * (ref.fake_quantize(w, "affine_quant", 8) - w)  # W + level (Q(W) - W)
    y = layer(x)
    assert torch.allclose(y, F.linear(x, w_eff), atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert torch.allclose(layer.weight.grad, g.t() @ x, atol=1e-6)  # dW_eff/dW = identity


def test_quantized_linear_eval_uses_cached_codes_and_refreshes():
    layer = qlinear(tiny(), method="symmetric_quant", bits=4, bias=True).eval()
    x = torch.randn(3, 6)
    y = layer(x)
    assert layer.quantized_weight.dtype == torch.int8 and layer.quantized_bias.dtype == torch.int32
    assert int(layer.quantized_weight.abs().max()) == 7  # 4-bit symmetric codes reach +-7
    w = ref.dequantize(layer.weight_zero_point, layer.weight_norm, layer.quantized_weight)
    assert torch.equal(w, ref.fake_quantize(layer.weight.detach(), "symmetric_quant", 4))
    b = ref.dequantize(layer.bias_zero_point, layer.bias_norm, layer.quantized_bias, torch.float32)
    # the eval path runs the fused int8 kernel: same math, another summation order than BLAS
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-6)
    assert "quantized_weight" not in layer.state_dict()  # derived, never checkpointed
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an optimizer step: the cache must follow
    assert torch.allclose(layer(x), F.linear(x, 2 * w, b), atol=1e-5)


# --- the BitNet family --------------------------------------------------------------------------
def test_bitlinear_1p58_hand_computed():
    layer = BitLinear1p58(2, 2, bias=False)
    layer.weight.data = torch.tensor(W)
    # weights: mean|W| = 5/4 = 1.25; W/1.25 = [[0.8, -2.4], [0.4, -0.4]] -> [[1, -1], [0, 0]] * 1.25
    # input: max|x| = 2, scale 2/127; -0.5 / (2/127) = -31.75 -> -32 -> -32 * 2/127 = -0.503937
    x = torch.tensor([[2.0, -0.5]], requires_grad=True)
    y = layer(x)
    # y0 = 2 * 1.25 + (-0.503937) * (-1.25) = 3.129921; y1 = 0
    assert torch.allclose(y, torch.tensor([[2.5 + 1.25 * 64 / 127, 0.0]]), atol=1e-6)
    y[0, 0].backward()
    assert torch.allclose(x.grad, torch.tensor([[1.25, -1.25]]))  # straight through: d/dx = row 0 of W_q


def test_bitlinear_hand_computed():
    layer = BitLinear(2, 2, bias=False)
    layer.weight.data = torch.tensor(W)
    # mean(W) = -0.5; W - mean = [[1.5, -2.5], [1, 0]] -> sign [[1, -1], [1, 0]]
    # y = [2 - 1, 2 + 0] = [1, 2]; gamma = 2 per token; y * 128 / (2 + 1e-5), inside the clamp
    y = layer(torch.tensor([[2.0, 1.0]]))
    assert torch.allclose(y, torch.tensor([[128 / (2 + 1e-5), 256 / (2 + 1e-5)]]))
    assert ref.sign_binarize(layer.weight).tolist() == [[1, -1], [1, 0]]


def test_bitlinear_is_causal_per_token():
    layer = BitLinear(4, 3, bias=True)
    x = torch.randn(1, 5, 4)
    x2 = x.clone()
    x2[0, 3:] *= 100.0  # later tokens change: earlier outputs must not
    assert torch.equal(layer(x)[0, :3], layer(x2)[0, :3])


def test_bitlinear_optimized_trains_and_caches_int8_signs():
    torch.manual_seed(0)
    opt_layer = BitLinearOptimized(4, 3, bias=True)
    ref_layer = BitLinear(4, 3, bias=True)
    ref_layer.load_state_dict(opt_layer.state_dict())
    x = torch.randn(2, 5, 4)
    assert torch.equal(opt_layer(x), ref_layer(x))
    opt_layer(x).square().sum().backward()
    assert opt_layer.weight.grad is not None and opt_layer.weight.grad.abs().sum() > 0
    opt_layer.eval()
    ref_layer.eval()
    assert torch.equal(opt_layer(x), ref_layer(x))
    assert opt_layer.quantized_weights.dtype == torch.int8
    with torch.no_grad():
        opt_layer.weight.neg_()
    assert not torch.equal(opt_layer.quantized_weights, ref.sign_binarize(-ref_layer.weight))  # stale
    opt_layer(x)  # the eval forward refreshes the cache
    assert torch.equal(opt_layer.quantized_weights, ref.sign_binarize(-ref_layer.weight))


# --- building and a tiny GPT -----------------------------------------------------------------------
def test_per_projection_variant_method_and_bits():
    cfg = tiny(linear_variant_attn="quantized_linear", linear_variant_q="bitlinear_1p58",
               quantize_linear_bits=6, quantize_linear_attn_k_bits=4, quantize_linear_attn_v_method="ternary_quant")
    assert isinstance(build_linear("q", 32, 32, cfg, False), BitLinear1p58)
    k, v, o = (build_linear(p, 32, 32, cfg, False) for p in ("k", "v", "attn_proj"))
    assert (k.quant_method, k.quant_bits) == ("affine_quant", 4)
    assert (v.quant_method, v.quant_bits) == ("ternary_quant", 6)
    assert (o.quant_method, o.quant_bits) == ("affine_quant", 6)
    assert type(build_linear("mlp_up", 32, 64, cfg, False)) is nn.Linear


@pytest.mark.parametrize("variant", sorted(LINEAR.names()))
def test_variant_trains_in_tiny_gpt(variant):
    torch.manual_seed(0)
    cfg = tiny(linear_variant_attn=variant, linear_variant_mlp=variant, quantization_warmup_iters=0)
    model = GPT(cfg)
    if variant != "kan":  # kan is a KAN network; all others split like nn.Linear
        assert all(isinstance(m, nn.Linear) for m in (model.transformer.h[0].attn.c_attn_q,
                                                      model.transformer.h[0].mlp.c_proj))
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    assert torch.isfinite(loss)
    loss.backward()
    q = model.transformer.h[0].attn.c_attn_q
    p = q.weight if variant != "kan" else q.base_weights[0]
    assert p.grad is not None and p.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        logits, _ = model(idx)
    assert torch.isfinite(logits).all()
