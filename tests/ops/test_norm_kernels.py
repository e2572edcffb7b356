"""Fused norms against forge_dist.ops.reference.norms: forward, input and weight gradients, every
dtype, awkward shapes (one row, odd widths, rows longer than a vector or block), large magnitudes."""
import pytest
import torch

from forge_dist import ops
from forge_dist.ops.reference import norms as ref
from ops_testing import close, devices, dtypes, upcast

SHAPES = [(1, 1), (1, 7), (3, 5, 33), (2, 1000), (4, 4099)]


def make(shape, dtype, device, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


CASES = {  # name -> (fused(x, w, b), reference(x, w, b))
    "rmsnorm": (lambda x, w, b: ops.rms_norm(x, w, None), lambda x, w, b: ref.rms_norm(x, w, None)),
    "rmsnorm_eps": (lambda x, w, b: ops.rms_norm(x, w, 1e-5), lambda x, w, b: ref.rms_norm(x, w, 1e-5)),
    "rmsnorm_nogain": (lambda x, w, b: ops.rms_norm(x, None, 1e-6), lambda x, w, b: ref.rms_norm(x, None, 1e-6)),
    "prmsnorm": (lambda x, w, b: ops.partial_rms_norm(x, w, max(1, x.shape[-1] // 3)),
                 lambda x, w, b: ref.partial_rms_norm(x, w, max(1, x.shape[-1] // 3))),
    "layernorm": (lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), lambda x, w, b: ref.layer_norm(x, w, b, 1e-5)),
    "layernorm_nobias": (lambda x, w, b: ops.layer_norm(x, w, None), lambda x, w, b: ref.layer_norm(x, w, None)),
    "hypersphere": (lambda x, w, b: ops.hypersphere_norm(x, 2.5, w),
                    lambda x, w, b: ref.hypersphere_norm(x, 2.5, w)),
    "add_rmsnorm": (lambda x, w, b: sum(ops.add_rms_norm(x, b.expand_as(x), w, 1e-5)),
                    lambda x, w, b: sum((ref.rms_norm(x + b, w, 1e-5), x + b))),
}


def run(fn, x, w, b, gy=None):
    """(y, grads of x, w, b); gy defaults to fixed random values in y's dtype (then given, upcast,
    to the reference, so both see the same rounded output gradient)."""
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    if gy is None:
        gy = make(y.shape, torch.float64, "cpu", seed=7).to(device=y.device, dtype=y.dtype)
    grads = torch.autograd.grad(y, (x, w, b), gy.to(y.dtype), allow_unused=True)
    return y, grads, gy


def grad_floors(x, w, gy_rows, center):
    """Scale of each gradient's terms: dx ~ |dy| |w| rstd (its terms cancel when d = 1), and
    dw, db ~ the sum over rows of |dy| (times |x_hat| <= sqrt(d))."""
    x = upcast(x)
    x = x - x.mean(-1, keepdim=True) if center else x
    inv_rms = 1.0 / ref.rms(x, 1e-5).min().item()
    return [gy_rows * w.abs().max().item() * inv_rms, gy_rows * x.shape[0] * x.shape[-1] ** 0.5,
            gy_rows * x.shape[0]]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(device, name, shape):
    fused, reference = CASES[name]
    for dtype in dtypes(device):
        for scale in (1.0, 1e4):  # large magnitudes: sums of squares near 1e8 * d
            x = make(shape, dtype, device, scale)
            w = make(shape[-1:], dtype, device, seed=1) + 1
            b = make(shape[-1:], dtype, device, seed=2)
            y, grads, gy = run(fused, x, w, b)
            y_ref, grads_ref, _ = run(reference, upcast(x), upcast(w), upcast(b), upcast(gy))
            what = f"{name} {dtype} {shape} x{scale:g}"
            close(y, y_ref, dtype, what)
            x2 = x.reshape(-1, shape[-1])
            floors = grad_floors(x2, upcast(w), 1.0, name.startswith("layernorm"))
            for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
                if g_ref is None:
                    assert g is None or not g.abs().any(), f"{what}: grad {i} should be zero"
                else:  # gradients sum over rows and carry a 1/x factor: a few more roundings
                    close(g, g_ref, dtype, f"{what} grad {i}", scale=4.0, floor=floors[i])


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_float64(name):
    fused, _ = CASES[name]
    x, w, b = (make(s, torch.float64, "cpu", seed=i).requires_grad_() for i, s in enumerate([(3, 11), (11,), (11,)]))
    assert torch.autograd.gradcheck(lambda x, w, b: fused(x, w, b), (x, w, b))


def test_learned_radius_gradient():
    """hypersphere_norm's radius reaches the kernel as a gain; autograd carries its gradient back."""
    x = make((5, 16), torch.float64, "cpu").requires_grad_()
    r = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r: ops.hypersphere_norm(x, r), (x, r))


def test_mixed_precision_output_dtype():
    """bf16 activations with float32 gains: the reference promotes to float32, so does the kernel."""
    x = make((4, 64), torch.bfloat16, "cpu")
    w = make((64,), torch.float32, "cpu") + 1
    y = ops.rms_norm(x, w, None)
    assert y.dtype == ref.rms_norm(x, w, None).dtype == torch.float32
    close(y, ref.rms_norm(x.float(), w, None), torch.bfloat16)


def test_eps_free_zero_row_is_nan_like_upstream():
    x = torch.zeros(2, 8)
    assert torch.isnan(ops.rms_norm(x, None, None)).all() and torch.isnan(ref.rms_norm(x, None, None)).all()
    assert torch.isfinite(ops.rms_norm(x, None, 1e-6)).all()


def test_non_contiguous_input():
    x = make((16, 12), torch.float32, "cpu").t()  # (12, 16), strided
    w = make((16,), torch.float32, "cpu")
    close(ops.rms_norm(x, w, None), ref.rms_norm(x, w, None), torch.float32)
