"""The fused attention kernel (csrc/cpu/attention.cpp, forge_dist/ops/attention.py) against the
materialised (B, H, T, S) path: every variant the kernel covers x every mask option (causal +
soft-capping + FIRE-like bias + flash-LOBO sink + GQA; window + KV-cache offset + sink columns; full),
forward and every gradient (q, k, v, bias, sink, the variant's learned parameters) in float64,
bf16 loosely; gradcheck in float64; opcheck (schema, autograd, fake tensors, AOT dispatch); the
model routes to it by default and keeps the materialised path under FORGE_OPS=reference; and a
training step at block_size 4096 never allocates anything of T x T elements."""
import functools

import pytest
import torch

from forge_dist import ModelConfig
from forge_dist.model.attention import fused
from forge_dist.model.attention.core import _NO_POINTS, _materialised, attend
from forge_dist.ops import attention as fused_op
from forge_dist.ops.mask import MaskSpec

import attention_paths
from attention_paths import CASES, MASKS, SCALE, WRT, case_ids, inputs, materialised, normaliser

pytestmark = pytest.mark.timeout(300)
KERNEL_CASES = CASES
IDS = case_ids(KERNEL_CASES)


def fused_kernel(module, x):
    y = fused.fused_attend(x["q"], x["k"], x["v"], normalizer=module, mask=x["mask"], scale=SCALE,
                           softcap=x["softcap"], bias=x["bias"], sink_logit=x["sink"])
    assert y is not None, "the fused kernel did not take the call"
    return y


def run(module, x, path):
    return materialised(module, x) if path == "materialised" else fused_kernel(module, x)


outputs_and_grads = functools.partial(attention_paths.outputs_and_grads, fused_kernel)


@pytest.mark.parametrize("name,opts", KERNEL_CASES, ids=IDS)
def test_fused_equals_materialised_float64(name, opts):
    torch.manual_seed(0)
    module = normaliser(name, opts, torch.float64)
    for i, case in enumerate(MASKS):
        x = inputs(case, torch.float64, seed=i)
        (ya, ga), (yb, gb) = (outputs_and_grads(module, x, p) for p in ("materialised", "fused"))
        torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-12)
        for t, a, b in zip(WRT(module, x), ga, gb):
            a, b = (torch.zeros_like(t) if g is None else g for g in (a, b))  # an elementwise variant's sink: 0
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name,opts", KERNEL_CASES, ids=IDS)
def test_gradcheck_float64(name, opts):
    """The op's own backward against finite differences (the comparison above is against autograd
    through the materialised path); the first mask setup has bias, sink, soft-capping and GQA."""
    torch.manual_seed(0)
    module = normaliser(name, opts, torch.float64)
    x = inputs(MASKS[0], torch.float64)

    def f(q, k, v, bias, sink):
        return run(module, dict(x, q=q, k=k, v=v, bias=bias, sink=sink), "fused")

    # the learned parameters enter through the module: their gradients are checked against the
    # materialised path above, and by finite differences in test_gradcheck_op_all_inputs_float64
    assert torch.autograd.gradcheck(f, tuple(x[n] for n in ("q", "k", "v", "bias", "sink")), atol=1e-6,
                                    fast_mode=True)


@pytest.mark.parametrize("name,opts,n_sink", [
    ("polymax", {}, 2), ("consmax", {}, 0),
    ("strongermax", dict(strongermax_use_learned_obo=True, strongermax_obo=0.5), 2)])
def test_fused_skips_masked_key_tiles_float64(name, opts, n_sink):
    """Several query tiles (64 rows each) under a sliding window, with and without sink columns: each
    tile computes only the sinks and the keys from its first row's window start to its last row's key
    (Tile in attention_tiles.h), so tile edges and the skipped key ranges are checked; with
    soft-capping, GQA and a bias per batch entry and head (dbias written by the task that owns it)."""
    torch.manual_seed(0)
    module = normaliser(name, opts, torch.float64)
    T, g = 150, torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    x = dict(q=rnd(2, 4, T, 3), k=rnd(2, 2, T + n_sink, 3), v=rnd(2, 2, T + n_sink, 3), softcap=2.0,
             mask=MaskSpec(causal=True, window=40, n_sink=n_sink), bias=rnd(2, 4, T, T + n_sink), sink=None)
    (ya, ga), (yb, gb) = (outputs_and_grads(module, x, p) for p in ("materialised", "fused"))
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_fused_learned_divisor_float64():
    """A row-normalised variant with a learned per-head divisor runs fused (the kernel's output / divisor)."""
    torch.manual_seed(0)
    module = normaliser("strongermax", {}, torch.float64)
    module.divisor = torch.nn.Parameter(torch.tensor([1.5, 2.0, 0.5, 1.0], dtype=torch.float64).reshape(4, 1, 1))
    x = inputs(MASKS[0], torch.float64)
    (ya, ga), (yb, gb) = (outputs_and_grads(module, x, p) for p in ("materialised", "fused"))
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode,divide", [("linear", True), ("quadratic", False), ("quadratic", True)])
def test_pfla_knot_table_float64(mode, divide):
    """pfla_softmax's knot table inside the tile loop: scores past both ends of the knots (the first
    segment extended, the last value held), learned knots out of order (sorted by the module), parity
    with the materialised path for every gradient, and finite differences for the knot positions and
    values, the learned divisor or the addend, through the op itself."""
    from forge_dist.ops import scores as ops_scores

    torch.manual_seed(0)
    opts = dict(pfla_softmax_mode=mode, pfla_softmax_learn_x=True, pfla_softmax_num_points=6,
                pfla_softmax_left_bound=-3.0, pfla_softmax_right_bound=3.0)
    opts.update(dict(pfla_softmax_use_obo=True, pfla_softmax_use_learned_obo=True) if divide
                else dict(pfla_softmax_use_learned_divisor=True))
    module = normaliser("pfla_softmax", opts, torch.float64)
    with torch.no_grad():
        module.x_vals[[1, 3]] = module.x_vals[[3, 1]].clone()  # crossed knots
        module.y_vals.add_(0.3 * torch.rand_like(module.y_vals))
    x = inputs(MASKS[2], torch.float64)  # no soft-capping: scores well beyond [-3, 3]
    x["q"] = (x["q"] * 3.0).detach().requires_grad_()
    s = x["q"] @ x["k"].transpose(-1, -2) * 0.7
    assert s.min() < -4 and s.max() > 4
    (ya, ga), (yb, gb) = (outputs_and_grads(module, x, p) for p in ("materialised", "fused"))
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-12)
    for t, a, b in zip(WRT(module, x), ga, gb):
        a, b = (torch.zeros_like(t) if g is None else g for g in (a, b))  # a learned divisor's sink: 0
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)

    xk, yk = (t.detach().clone().requires_grad_() for t in module.knots())
    extra = torch.tensor(0.7 if divide else 1.3, dtype=torch.float64, requires_grad=True)

    def f(q, xk, yk, extra):
        spec = (ops_scores.pfla_spec(xk, yk, mode, divide=True, addend=extra) if divide
                else ops_scores.pfla_spec(xk, yk, mode, gamma=extra))
        return fused_op.attention(q, x["k"], x["v"], spec, mask=x["mask"], scale=0.7, softcap=None,
                                  bias=x["bias"], sink_logit=x["sink"])

    assert torch.autograd.gradcheck(f, (x["q"], xk, yk, extra), atol=1e-6, fast_mode=True)


PFLA_ROWSUM = 2  # not a family code: the elementwise family with pfla's table and the row-sum division


def _op_args(family: int, dtype):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, S, D = 2, 4, 2, 5, 7, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = rnd(B, Hq, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    # a bias per batch and head for one family, shared by all for the other (both dbias reductions)
    bias = rnd(*((B, Hq) if family == fused_op.ELEMENTWISE else (1, 1)), T, S).detach().to(acc).requires_grad_()
    empty = torch.zeros(0, dtype=acc)
    mask = [1, 1, -1, 2, 0]
    if family == fused_op.ELEMENTWISE:  # consmax, per-head beta and gamma
        params = torch.tensor([[0.1, 1.5], [0.2, 2.0], [-0.1, 1.0], [0.0, 3.0]], dtype=acc, requires_grad=True)
        return (q, k, v, bias, params, torch.ones(1, dtype=acc), empty, empty, 0, 0, [1.0, float("inf")], [0.0] * 7,
                mask, 0.6, 0.0)
    if family == PFLA_ROWSUM:  # a knot table row [beta, gamma, x_0..x_3, v_0..v_3], / (row sum + addend)
        params = torch.tensor([[0.0, 1.0, -1.0, -0.2, 0.4, 1.5, 0.3, 0.8, 1.1, 0.9]], dtype=acc, requires_grad=True)
        addend = torch.tensor([0.5], dtype=acc, requires_grad=True)
        sink = torch.tensor([0.3, -0.5, 0.2, 2.0], dtype=acc, requires_grad=True)
        return (q, k, v, bias, params, torch.ones(1, dtype=acc), addend, sink, 0, 9, [1.0],
                [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0], mask, 0.6, 0.0)
    c = torch.tensor([0.9], dtype=acc, requires_grad=True)
    obo = torch.tensor([0.5, 0.1, 0.2, 0.3], dtype=acc, requires_grad=True)
    sink = torch.tensor([0.3], dtype=acc, requires_grad=True)
    return (q, k, v, bias, empty, c, obo, sink, 1, 0, [0.0] * 8, [2.0, 1.0, 1.0, 1.5, 0.0, 0.0, 0.5], mask, 0.6, 2.0)


@pytest.mark.parametrize("family", [0, 1, PFLA_ROWSUM], ids=["elementwise", "rownorm", "pfla_rowsum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(family, dtype):
    torch.library.opcheck(torch.ops.forge_ops.attention_fwd, _op_args(family, dtype))


@pytest.mark.parametrize("family", [0, 1, PFLA_ROWSUM], ids=["elementwise", "rownorm", "pfla_rowsum"])
def test_gradcheck_op_all_inputs_float64(family):
    """gradcheck of the raw op over every differentiable input (the learned parameters included)."""
    args = _op_args(family, torch.float64)
    diff = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.requires_grad]

    def f(*ts):
        full = list(args)
        for i, t in zip(diff, ts):
            full[i] = t
        return torch.ops.forge_ops.attention_fwd(*full)[0]

    assert torch.autograd.gradcheck(f, tuple(args[i] for i in diff), atol=1e-6)


@pytest.mark.parametrize("name", ["softmax", "consmax", "polymax", "strongermax", "sigsoftmax", "relu2max",
                                  "pfla_softmax"])
def test_fused_bfloat16_close_to_float64(name):
    attention_paths.assert_bf16_close_to_float64(fused_kernel, name)


@pytest.mark.parametrize("mode,expect", [("auto", True), ("reference", False)])
def test_attend_takes_the_fused_kernel_by_default(monkeypatch, mode, expect):
    from forge_dist.ops import registry

    monkeypatch.setenv("FORGE_OPS", mode)
    registry.refresh()
    calls = []
    real = fused_op.attention
    monkeypatch.setattr(fused_op, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    module = normaliser("polymax", {}, torch.float64)
    x = inputs(MASKS[0], torch.float64)
    y = attend(x["q"], x["k"], x["v"], normalizer=module, mask=x["mask"], scale=0.7, bias=x["bias"])
    assert bool(calls) == expect
    ref = _materialised(x["q"], x["k"], x["v"], 2, module, x["mask"], 0.7, None, x["bias"], None, 0.0, _NO_POINTS)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)


def test_train_step_at_block_size_4096_never_allocates_t_by_t():
    """One training step (forward, backward, AdamW) at T = 4096 with polymax: no tensor of T x T or
    more elements is ever allocated (a dispatch mode sees every op's outputs). The materialised path
    holds (B, H, T, T) = 2 x 4096^2 float32 = 128 MiB per score tensor, several per layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from forge_dist.model.gpt import GPT

    T = 4096
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=T, vocab_size=32, softmax_variant_attn="polymax",
                      dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 32, (1, T))
    largest = [0]

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t):
                    largest[0] = max(largest[0], t.numel())
            return out

    with Largest():
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert largest[0] < T * T // 8, f"a tensor of {largest[0]} elements (T x T = {T * T})"


def test_flex_route_forward_on_cpu_equals_materialised():
    """The CUDA route's algebra (attention/flex.py: score_mod = ln f or c t(s), output rescaled by
    e^{lse} / D) checked through FlexAttention's CPU forward, float32, without gradients (its
    backward does not run on CPU; the GPU run itself is unverified). One case per kind of rescale
    (eager FlexAttention on CPU is slow), on the two causal mask setups (bias + soft-cap + sink + GQA;
    window + KV offset + sink columns); obo with the row max is left to the blocked path (None)."""
    from forge_dist.model.attention import flex

    cases = [("softmax", {}), ("consmax_v2", dict(consmax_v2_clamping=True, consmax_v2_clamp_value=0.3)),
             ("polymax", dict(div_by_seq_len=True)), ("squareplus", {}), ("softermax", dict(softermax_use_xmax=False)),
             ("sigsoftmax", dict(sigsoftmax_use_euler_base=False, sigsoftmax_base=2.0)),
             ("strongermax", dict(strongermax_xmax_guess=1.0)),
             ("strongermax", dict(strongermax_div_by_sum_of_terms=False, strongermax_use_xmax=False)),
             ("strongermax", dict(strongermax_use_learned_obo=True, strongermax_obo=1.0))]
    for name, opts in cases:
        module = normaliser(name, opts, torch.float32).requires_grad_(False)
        for i, case in enumerate(MASKS[:2]):
            x = {k: v.detach() if torch.is_tensor(v) else v for k, v in inputs(case, torch.float32, seed=i).items()}
            spec = fused.spec_of(module, x["k"].shape[-2] - x["mask"].n_sink)
            y = flex.flex_attend(x["q"], x["k"], x["v"], spec, mask=x["mask"], scale=0.7, softcap=x["softcap"],
                                 bias=x["bias"], sink_logit=x["sink"])
            if "strongermax_use_learned_obo" in opts:
                assert y is None
                continue
            ref = run(module, x, "materialised")
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
