"""Quantization kernels against forge_dist.ops.reference.quantize: fake quantization reproduces the
reference's values exactly in float32 (same operations in the same order), with the straight-through
gradient; the int8 weight-only linear matches the dequantised float linear."""
import pytest
import torch
import torch.nn.functional as F

from forge_dist import ops
from forge_dist.ops.reference import quantize as ref
from ops_testing import close, devices, dtypes


def randn(shape, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


SHAPES = [(1,), (7,), (3, 5), (4, 1000), (2, 3, 67)]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("method", ["affine_quant", "symmetric_quant"])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fake_quantize_matches_reference(device, method, bits, shape):
    for dtype in dtypes(device):
        for dim in [None] + list(range(-len(shape), 0)):
            for scale in (1.0, 1e4):
                x = randn(shape, dtype, device, scale)
                y = ops.fake_quantize(x, method, bits, dim=dim)
                expected = ref.fake_quantize(x, method, bits, dim=dim)
                what = f"{method} {bits} bits {dtype} dim={dim} x{scale:g}"
                assert y.dtype == x.dtype and y.shape == x.shape, what
                if dtype == torch.float32:  # bit for bit
                    assert torch.equal(y, expected), f"{what}: max diff {(y - expected).abs().max()}"
                else:  # the reference rounds per op in bf16/fp16; compare with its float32 value
                    close(y, ref.fake_quantize(x.float(), method, bits, dim=dim), dtype, what)


def test_fake_quantize_constant_and_zero_tensors():
    for x in (torch.zeros(3, 4), torch.full((3, 4), 2.5)):
        for method in ("affine_quant", "symmetric_quant"):
            for dim in (None, -1):
                assert torch.equal(ops.fake_quantize(x, method, 8, dim=dim), ref.fake_quantize(x, method, 8, dim=dim))


def test_straight_through_gradient():
    x = randn((5, 9), torch.float64).requires_grad_()
    for dim in (None, 0, -1):
        y = ops.fake_quantize(x, "affine_quant", 4, dim=dim)
        (g,) = torch.autograd.grad(y, x, torch.arange(45.0, dtype=torch.float64).reshape(5, 9))
        assert torch.equal(g, torch.arange(45.0, dtype=torch.float64).reshape(5, 9))


def test_other_methods_use_the_reference_with_straight_through():
    x = randn((4, 6)).requires_grad_()
    y = ops.fake_quantize(x, "ternary_quant", 2)
    assert torch.equal(y, ref.fake_quantize(x, "ternary_quant", 2))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones_like(x))


def quantized_weight(n, k, per_channel, seed=0):
    w = randn((n, k), seed=seed)
    zp, scale, q = ref.affine_quantize(w, 8, dim=-1 if per_channel else None)
    return q, scale, zp


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 64])  # the GEMV path up to 8 rows, the tiled path above
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear(device, rows, per_channel, bias):
    n, k = 37, 1000
    q, scale, zp = (t.to(device) for t in quantized_weight(n, k, per_channel))
    b = randn((n,), device=device, seed=3) if bias else None
    for dtype in dtypes(device):
        x = randn((rows, k), dtype, device, seed=1)
        y = ops.int8_linear(x, q, scale, zp, None if b is None else b.to(dtype))
        w = ref.dequantize(zp, scale, q)  # float32
        expected = F.linear(x.float(), w, None if b is None else b.to(dtype).float())
        assert y.dtype == dtype and y.shape == (rows, n)
        close(y, expected, dtype, f"int8_linear {dtype} rows={rows}", scale=4.0)


def test_int8_linear_batched_input_and_gradient():
    q, scale, zp = quantized_weight(16, 24, True)
    x = randn((2, 3, 24), torch.float64).requires_grad_()
    b = randn((16,), torch.float64, seed=2).requires_grad_()
    w = ref.dequantize(zp.double(), scale.double(), q)
    assert torch.allclose(ops.int8_linear(x, q, scale, zp, b), F.linear(x, w, b), rtol=1e-6, atol=1e-6)
    gy = randn((2, 3, 16), torch.float64, seed=4)
    gx, gb = torch.autograd.grad(ops.int8_linear(x, q, scale, zp, b), (x, b), gy)
    ex, eb = torch.autograd.grad(F.linear(x, w, b), (x, b), gy)
    torch.testing.assert_close(gx, ex, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, eb)
