"""The shared gradient-norm mechanism (forge_dist/parallel/grad_norm.py) on one process: torch's
clip_grad_norm_ value, shares and expert sums, non-finite propagation, and no full-size copy of a
gradient (the multi-rank reductions are proven by the TP, PP, EP and DeepSpeed parity tests)."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from forge_dist.parallel import grad_norm as gn
from forge_dist.parallel.groups import RankGroup

ONE = RankGroup("tp", (0,), 0)  # a group of one rank: all_reduce returns its input


def _grads(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((64, 32), (32,), (7, 5, 3))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_clip_grad_norm(dtype):
    grads = _grads(dtype)
    ref = torch.float64 if dtype == torch.float64 else torch.float32  # bfloat16: its float32 values
    params = [torch.nn.Parameter(torch.zeros_like(x, dtype=ref)) for x in grads]
    for p, x in zip(params, grads):
        p.grad = x.to(ref)
    want = torch.nn.utils.clip_grad_norm_(params, 1e9).double()
    got = gn.global_grad_norm([(x, 1, False) for x in grads], [ONE, None], experts=ONE)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert abs(got.double() - want) <= tol * want


def test_copies_and_experts():
    """Each gradient's square divided by its copies; the expert sum added after its own reduce."""
    grads = _grads(torch.float64)
    terms = [(grads[0], 2, False), (grads[1], 1, True), (grads[2], 4, True)]
    want = math.sqrt(sum(x.pow(2).sum().item() / c for x, c, _ in terms))
    got = gn.global_grad_norm(terms, [ONE], experts=ONE)
    assert got.item() == pytest.approx(want, rel=1e-14)
    assert gn.global_grad_norm([], [ONE]).item() == 0.0


@pytest.mark.parametrize("bad, check", [(math.inf, math.isinf), (math.nan, math.isnan)])
def test_non_finite_propagates(bad, check):
    x = torch.ones(10)
    x[3] = bad
    assert check(gn.global_grad_norm([(torch.ones(4), 1, False), (x, 1, False)], [ONE]).item())


class _Allocations(TorchDispatchMode):
    """The largest tensor an op creates that is not a view of ``base``."""

    def __init__(self, base):
        super().__init__()
        self.base, self.largest = base.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.base:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_never_copies_a_whole_gradient(dtype, monkeypatch):
    monkeypatch.setattr(gn, "ROW", 64)
    monkeypatch.setattr(gn, "SLAB", 1024)
    grad = torch.randn(50, 101).to(dtype)  # 5050: 4 slabs, the last with a partial row
    with _Allocations(grad) as seen:
        got = gn.squared_norm(grad)
    assert seen.largest <= (5050 // 64 + 1 if dtype in (torch.float32, torch.float64) else 1024)
    assert got.item() == pytest.approx(grad.double().pow(2).sum().item(), rel=1e-6)


def test_precision_of_a_large_float32_gradient():
    """Better than torch's float32 norm on CPU (7e-5 relative on 4M values)."""
    x = torch.randn(1 << 22, generator=torch.Generator().manual_seed(1)) * 1e-3
    exact = x.double().pow(2).sum()
    assert abs(gn.squared_norm(x) - exact) <= 1e-6 * exact
