"""Fused score normalisers against forge_dist.ops.reference.softmax_variants: every variant, every
mask form (none, causal, sliding window, query offset + sink columns, fully hidden rows, -inf
scores), odd shapes and rows longer than a vector or block, large magnitudes; forward, the score
gradient and the gradients of learned parameters (beta, gamma, per-head factors, temperature, obo)."""
import math

import pytest
import torch

from forge_dist import ops
from forge_dist.ops.mask import MaskSpec
from forge_dist.ops.reference import softmax_variants as ref
from ops_testing import close, devices, dtypes, upcast


def param(value, shape=(), seed=0):
    """A learned parameter: 0-d scalar or per head (H, 1, 1), float32 (float64 in gradcheck)."""
    g = torch.Generator().manual_seed(seed)
    return (value + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)) if shape else torch.tensor(float(value), dtype=torch.float64)


# name -> (function of (fused or reference module, scores, mask-or-keep, params dict), params factory(H))
STRONG = dict(log_strength=math.log(3.0), divisor=2.0, seq_len=9)
VARIANTS = {
    "softmax": (lambda m, s, k, p: m.softmax(s, k), lambda H: {}),
    "softermax": (lambda m, s, k, p: m.softermax(s, k), lambda H: {}),
    "softermax_no_max": (lambda m, s, k, p: m.softermax(s, k, False), lambda H: {}),
    "sigsoftmax": (lambda m, s, k, p: m.sigsoftmax(s, k, 0.7), lambda H: {}),
    "strongermax": (lambda m, s, k, p: m.strongermax(s, k, temperature=p["tau"], obo=p["obo"], **STRONG),
                    lambda H: {"tau": param(1.3), "obo": param(0.5, (H, 1, 1))}),
    "strongermax_guess_clamp": (lambda m, s, k, p: m.strongermax(
        s, k, temperature=p["tau"], obo=p["obo"], xmax_guess=1.0, overflow_recompute=True, overflow_value=1.5,
        clamp_value=2.0, **STRONG), lambda H: {"tau": param(0.9), "obo": param(0.2)}),
    "strongermax_no_sum": (lambda m, s, k, p: m.strongermax(s, k, div_by_sum_of_terms=False, temperature=p["tau"],
                                                            **STRONG), lambda H: {"tau": param(2.0)}),
    "consmax": (lambda m, s, k, p: m.consmax(s, k, p["beta"], p["gamma"], 0.8),
                lambda H: {"beta": param(0.5), "gamma": param(2.0)}),
    "consmax_v2": (lambda m, s, k, p: m.consmax(s, k, 0.5 * p["fb"], 2.0 * p["fg"], 1.0, 1.2),
                   lambda H: {"fb": param(1.0, (H, 1, 1), 1), "fg": param(1.0, (H, 1, 1), 2)}),
    "saturatingconsmax": (lambda m, s, k, p: m.saturating_consmax(s, k, p["beta"], p["gamma"], 1.5, 1.0, 9),
                          lambda H: {"beta": param(0.5), "gamma": param(2.0)}),
    "polymax": (lambda m, s, k, p: m.polymax(s, k, -2.0, 1.0, 2.0, 50.0, 9), lambda H: {}),
    "polymax_p2.5": (lambda m, s, k, p: m.polymax(s, k, -2.0, 1.0, 2.5, 50.0), lambda H: {}),
    "vpolymax": (lambda m, s, k, p: m.vpolymax(s, k, -2.0, 1.0, 3.0, 50.0, 9), lambda H: {}),
    "exppolymax": (lambda m, s, k, p: m.exppolymax(s, k, math.log(2.0), 2.0, 0.5, 10.0, 9), lambda H: {}),
    "exppolymax_p3": (lambda m, s, k, p: m.exppolymax(s, k, 1.0, 3.0, 0.0, 10.0), lambda H: {}),
    "relumax": (lambda m, s, k, p: m.relumax(s, k, 7.0, 9), lambda H: {}),
    "relu2max": (lambda m, s, k, p: m.relu2max(s, k, 7.0), lambda H: {}),
    "sigmoidmax": (lambda m, s, k, p: m.sigmoidmax(s, k, 7.0, 9), lambda H: {}),
    "softplus": (lambda m, s, k, p: m.softplus(s, k, 7.0), lambda H: {}),
    "squareplus": (lambda m, s, k, p: m.squareplus(s, k, 3.0, 9), lambda H: {}),
}

# (scores shape, mask): the last key dim includes sink columns where the mask has them
GEOMETRIES = {
    "nomask_2d": ((3, 37), None),
    "nomask_logits": ((2, 4, 9), None),
    "causal": ((2, 3, 5, 5), MaskSpec()),
    "window": ((1, 2, 9, 9), MaskSpec(window=3)),
    "offset_sinks": ((1, 2, 7, 11), MaskSpec(q_offset=2, n_sink=2)),
    "hidden_rows": ((1, 2, 6, 6), MaskSpec(q_offset=-2)),  # rows 0, 1 see no key
    "long_rows": ((1, 2, 3, 1100), MaskSpec(q_offset=1097, window=900)),
}


def per_head(p, scores):
    """As the softmax modules shape a per-head parameter for these scores (ScoreNormalizer.per_head)."""
    return p if p.dim() == 0 else p.reshape(p.shape[0], *([1] * (min(scores.dim(), 3) - 1)))


def scores_for(shape, dtype, device, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    if len(shape) == 4:  # a caller's own -inf mask: scattered entries and one whole row
        s[..., 0, -1] = -math.inf
        s[0, 0, -1, :] = -math.inf
    return s.to(device=device, dtype=dtype)


def evaluate(name, module, scores, mask_or_keep, params, gy=None):
    """(y, gradients of scores and params for the output gradient gy); gy defaults to a fixed random
    tensor in y's dtype, and is returned so the reference can be given the same rounded values."""
    fn, _ = VARIANTS[name]
    scores = scores.detach().requires_grad_()
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    y = fn(module, scores, mask_or_keep, leaves)
    if gy is None:
        g = torch.Generator().manual_seed(5)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(device=y.device, dtype=y.dtype)
    grads = torch.autograd.grad(y, [scores, *leaves.values()], gy.to(y.dtype))
    return y, grads, gy


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("name", VARIANTS)
def test_forward_backward(device, geometry, name):
    shape, mask = GEOMETRIES[geometry]
    heads = shape[-3] if len(shape) >= 3 else 1
    keep = None if mask is None else mask.keep(shape[-2], shape[-1], device)
    for dtype in dtypes(device):
        for scale in (1.0, 20.0):
            s = scores_for(shape, dtype, device, scale)
            params = {k: per_head(v, s).to(device=device, dtype=torch.float32)
                      for k, v in VARIANTS[name][1](heads).items()}
            y, grads, gy = evaluate(name, ops, s, mask, params)
            y_ref, grads_ref, _ = evaluate(name, ref, upcast(s), keep, {k: upcast(v) for k, v in params.items()},
                                           upcast(gy))
            what = f"{name} {geometry} {dtype} x{scale:g}"
            close(y, y_ref, dtype, what)
            hidden = ~torch.isfinite(s) if keep is None else (~keep | torch.isneginf(s))
            assert (y[hidden] == 0).all(), f"{what}: hidden keys must give exactly 0"
            # a row-normalised gradient q (gy - sum gy q) cancels where q ~ 1: terms of size |gy| |y|
            terms = upcast(gy).abs() * y_ref.detach().abs()
            for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
                assert torch.isfinite(g).all(), f"{what}: non-finite gradient {i}"
                floor = terms.sum().item() if i else terms.max().item()  # parameters sum over keys
                close(g, g_ref, dtype, f"{what} grad {i}", scale=8.0 if i else 4.0, floor=floor)


@pytest.mark.parametrize("name", VARIANTS)
def test_gradcheck_float64(name):
    """Finite differences in float64 through the CPU kernels, scores and every learned parameter."""
    fn, make = VARIANTS[name]
    mask = MaskSpec(q_offset=1, n_sink=1, window=3)
    s = scores_for((1, 2, 4, 6), torch.float64, "cpu", 1.5)
    params = make(2)
    names = list(params)

    def f(scores, *values):
        return fn(ops, scores, mask, dict(zip(names, values)))

    inputs = (s.requires_grad_(), *(v.requires_grad_() for v in params.values()))
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6)


def test_output_dtype_follows_the_reference():
    """Per-head float32 parameters promote bf16 scores to float32 in the reference; 0-d ones do not."""
    s = scores_for((1, 2, 4, 4), torch.bfloat16, "cpu", 1.0)
    per_head, scalar = torch.ones(2, 1, 1), torch.tensor(1.0)
    for beta in (per_head, scalar):
        assert ops.consmax(s, MaskSpec(), beta, 2.0).dtype == ref.consmax(s, None, beta, 2.0).dtype
    assert ops.strongermax(s, MaskSpec(), obo=per_head).dtype == torch.float32
    assert ops.softmax(s, MaskSpec()).dtype == torch.bfloat16
