"""The Triton fused attention (forge_dist/ops/triton_kernels.py, triton_attention.py) against the
materialised (B, H, T, S) path: forward and every gradient (q, k, v, bias, sink logit, the variant's
learned parameters). Without a GPU the kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1: the kernels' own code, numpy underneath); with CUDA they run compiled on the GPU.

Every elementwise kind and every row-normalised option (transforms, shifts, off-by-one, no division,
learned temperature, per-head parameters) in float64 on one of the three mask setups each (the
setups rotate: causal + soft-cap + bias + flash-LOBO sink + GQA; window + KV offset + sink columns;
full), a few variants on all three, float32 and bfloat16 loosely; a GPT training step through
the route against FORGE_OPS=reference; opcheck of the custom ops (fake tensors,
autograd registration); torch.compile traces the route as one op without a graph break; Triton's
compiler takes the kernels to an sm_90 cubin without a GPU; the CUDA route order (Triton, then
FlexAttention) and FORGE_OPS=reference keeping the materialised path.
"""
import functools
import sys

import pytest
import torch

from forge_dist.model.attention import fused
from forge_dist.ops import attention as fused_op
from forge_dist.ops import triton_attention

import attention_paths
from attention_paths import CASES, MASKS, SCALE, WRT, case_ids, inputs, materialised, normaliser

pytestmark = pytest.mark.timeout(300)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# pfla_softmax with 6 knots instead of 30: the interpreter runs the kernel's knot search knot by knot
KERNEL_CASES = [(n, dict(o, pfla_softmax_num_points=6) if n == "pfla_softmax" else o) for n, o in CASES]
IDS = case_ids(KERNEL_CASES)


@pytest.fixture(scope="module", autouse=True)
def triton_kernels():
    """Triton is a test requirement (requirements-cpu.txt): its absence fails here, it is not skipped.
    On CPU the kernels must be the interpreter's (tests/conftest.py sets TRITON_INTERPRET=1 before
    anything imports triton)."""
    import triton  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction

    from forge_dist.ops import triton_kernels as tk

    if DEVICE == "cpu":
        assert isinstance(tk.attn_fwd, InterpretedFunction), "TRITON_INTERPRET=1 was not set before triton loaded"
    return tk


def to_device(x):
    return {k: v.detach().to(DEVICE).requires_grad_() if torch.is_tensor(v) else v for k, v in x.items()}


def triton_kernel(module, x):
    spec = fused.spec_of(module, x["k"].shape[-2] - x["mask"].n_sink)
    y = triton_attention.attention(x["q"], x["k"], x["v"], spec, mask=x["mask"], scale=SCALE, softcap=x["softcap"],
                                   bias=x["bias"], sink_logit=x["sink"])
    assert y is not None, "the Triton kernel did not take the call"
    return y


def run(module, x, path):
    return materialised(module, x) if path == "materialised" else triton_kernel(module, x)


outputs_and_grads = functools.partial(attention_paths.outputs_and_grads, triton_kernel)


def check(name, opts, mask_ids, dtype, rtol, atol):
    torch.manual_seed(0)
    module = normaliser(name, opts, dtype).to(DEVICE)
    for i in mask_ids:
        x = to_device(inputs(MASKS[i], dtype, seed=i))
        (ya, ga), (yb, gb) = (outputs_and_grads(module, x, p) for p in ("materialised", "triton"))
        scale = float(ya.detach().abs().max()) if dtype != torch.float64 else 1.0
        torch.testing.assert_close(yb, ya, rtol=rtol, atol=atol * scale)
        for t, a, b in zip(WRT(module, x), ga, gb):
            a, b = (torch.zeros_like(t) if g is None else g for g in (a, b))  # an elementwise variant's sink: 0
            g_scale = float(a.abs().max()) if dtype != torch.float64 else 1.0
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol * max(g_scale, 1e-3))


@pytest.mark.parametrize("case", range(len(KERNEL_CASES)), ids=IDS)
def test_triton_equals_materialised_float64(case):
    name, opts = KERNEL_CASES[case]
    check(name, opts, [case % len(MASKS)], torch.float64, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["consmax", "strongermax", "sigsoftmax"])
def test_triton_every_mask_setup_float64(name):
    check(name, {}, range(len(MASKS)), torch.float64, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["consmax", "strongermax"])
def test_triton_learned_divisor_and_batch_bias_float64(name):
    """A bias per batch entry and head (B, H, T, S) (its gradient per entry), and for the row-normalised
    variant a learned per-head divisor (the kernel's output / divisor, as the CPU op)."""
    torch.manual_seed(0)
    module = normaliser(name, {}, torch.float64).to(DEVICE)
    if name == "strongermax":
        module.divisor = torch.nn.Parameter(torch.tensor([1.5, 2.0, 0.5, 1.0], dtype=torch.float64,
                                                         device=DEVICE).reshape(4, 1, 1))
    x = inputs(MASKS[0], torch.float64)
    x["bias"] = torch.randn((2,) + tuple(x["bias"].shape), dtype=torch.float64)
    x = to_device(x)
    (ya, ga), (yb, gb) = (outputs_and_grads(module, x, p) for p in ("materialised", "triton"))
    torch.testing.assert_close(yb, ya, rtol=1e-10, atol=1e-12)
    for t, a, b in zip(WRT(module, x), ga, gb):
        a, b = (torch.zeros_like(t) if g is None else g for g in (a, b))
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["polymax", "softmax"])
def test_triton_float32(name):
    check(name, {}, [0], torch.float32, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["polymax", "strongermax"])
def test_triton_bfloat16_close_to_float64(name):
    attention_paths.assert_bf16_close_to_float64(triton_kernel, name, DEVICE)


@pytest.mark.parametrize("name", ["polymax", "strongermax"])
def test_model_training_step_through_the_triton_route(monkeypatch, name):
    """A GPT forward + backward whose attention takes the CUDA route (the device test monkeypatched
    on CPU): the Triton kernel is called and loss and every parameter gradient equal the
    FORGE_OPS=reference (materialised) run's, float64."""
    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.ops import registry

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=32, softmax_variant_attn=name,
                      dropout=0.0)
    torch.manual_seed(0)
    model = GPT(cfg).double().to(DEVICE)
    idx = torch.randint(0, 32, (2, 16), device=DEVICE)
    monkeypatch.setattr(fused, "_on_cuda", lambda t: True)
    calls = []
    real = triton_attention.attention
    monkeypatch.setattr(triton_attention, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    results = []
    for mode in ("reference", "auto"):
        monkeypatch.setenv("FORGE_OPS", mode)
        registry.refresh()
        model.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert calls, "the model did not call the Triton route"
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(lb, la, rtol=1e-10, atol=1e-12)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_op_matches_cpu_library_op_outputs_and_stats():
    """The two implementations of the one op schema agree on everything they return (stats too)."""
    args = _op_args(fused_op.ROWNORM, torch.float64, "cpu")
    ya, sa = torch.ops.forge_ops.attention_fwd(*args)
    yb, sb = torch.ops.forge_triton.attention_fwd(*(a.to(DEVICE) if torch.is_tensor(a) else a for a in args))
    torch.testing.assert_close(yb.cpu(), ya, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sb.cpu(), sa, rtol=1e-10, atol=1e-12)


def _op_args(family: int, dtype, device=DEVICE):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, S, D = 2, 4, 2, 5, 7, 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = rnd(B, Hq, T, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    bias = rnd(Hq, T, S).detach().to(acc).requires_grad_()
    empty = torch.zeros(0, dtype=acc, device=device)
    one = torch.ones(1, dtype=acc, device=device)
    mask = [1, 1, -1, 2, 0]
    if family == fused_op.ELEMENTWISE:  # consmax, per-head beta and gamma
        params = torch.tensor([[0.1, 1.5], [0.2, 2.0], [-0.1, 1.0], [0.0, 3.0]], dtype=acc, device=device,
                              requires_grad=True)
        return (q, k, v, bias, params, one, empty, empty, 0, 0, [1.0, float("inf")], [0.0] * 7, mask, 0.6, 0.0)
    c = torch.tensor([0.9], dtype=acc, device=device, requires_grad=True)
    obo = torch.tensor([0.5, 0.1, 0.2, 0.3], dtype=acc, device=device, requires_grad=True)
    sink = torch.tensor([0.3], dtype=acc, device=device, requires_grad=True)
    return (q, k, v, bias, empty, c, obo, sink, 1, 0, [0.0] * 8, [2.0, 1.0, 1.0, 1.5, 0.0, 0.0, 0.5], mask, 0.6, 2.0)


@pytest.mark.parametrize("family", [0, 1], ids=["elementwise", "rownorm"])
def test_opcheck(family):
    """Schema, fake tensors, autograd registration and dispatch of the Triton custom ops."""
    torch.library.opcheck(torch.ops.forge_triton.attention_fwd, _op_args(family, torch.float32),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_gradcheck_op_learned_inputs_float64():
    """Finite differences of the raw op for the row-normalised small inputs (c, per-head obo, sink)
    and the bias, with q, k, v fixed (their gradients are compared against autograd above)."""
    args = list(_op_args(fused_op.ROWNORM, torch.float64))
    idx = [3, 5, 6, 7]

    def f(*ts):
        full = list(args)
        for i, t in zip(idx, ts):
            full[i] = t
        return torch.ops.forge_triton.attention_fwd(*full)[0]

    assert torch.autograd.gradcheck(f, tuple(args[i] for i in idx), atol=1e-6, fast_mode=True)


def test_torch_compile_traces_the_route_without_graph_breaks():
    """dynamo + AOT autograd over the fake and autograd registrations (aot_eager: the op runs as is)."""
    module = normaliser("strongermax", {}, torch.float64).to(DEVICE)
    x = to_device(inputs(MASKS[0], torch.float64))
    spec = fused.spec_of(module, x["k"].shape[-2])

    def f(q, k, v, bias):
        return triton_attention.attention(q, k, v, spec, mask=x["mask"], scale=0.7, softcap=2.0, bias=bias)

    explain = torch._dynamo.explain(f)(x["q"], x["k"], x["v"], x["bias"])
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    ya, yb = f(x["q"], x["k"], x["v"], x["bias"]), compiled(x["q"], x["k"], x["v"], x["bias"])
    ga = torch.autograd.grad(ya.sum(), x["q"])[0]
    gb = torch.autograd.grad(yb.sum(), x["q"])[0]
    torch.testing.assert_close(yb, ya)
    torch.testing.assert_close(gb, ga)


def test_kernels_compile_for_sm90_without_a_gpu():
    """Triton's compiler (not the interpreter) takes every kernel to an sm_90 cubin, bf16, head dim 64,
    64 x 64 tiles, every option of the row-normalised family on (the interpreter runs the kernels'
    Python and misses what only compilation checks); shared memory within an H100's 227 KiB. In a
    subprocess: this process's kernels are the interpreter's."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from forge_dist.ops.triton_compile import compile_kernels; "
            "print('SHARED', max(s for *_, s in compile_kernels(90, 'bf16', 64, 64, ('rownorm',))))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    shared = int(r.stdout.split("SHARED")[-1])
    assert 0 < shared <= 227 * 1024, r.stdout


def test_cuda_route_order(monkeypatch):
    """fused_attend on a CUDA tensor: Triton first, FlexAttention where Triton answers None; the
    CPU tensors of this check stand in for CUDA ones (the device test is monkeypatched)."""
    from forge_dist.model.attention import flex

    calls = []
    monkeypatch.setattr(triton_attention, "attention", lambda *a, **kw: calls.append("triton") or None)
    monkeypatch.setattr(flex, "flex_attend", lambda *a, **kw: calls.append("flex") or "flex")
    monkeypatch.setattr(fused, "_on_cuda", lambda t: True)
    module = normaliser("polymax", {}, torch.float64)
    x = inputs(MASKS[0], torch.float64)
    assert fused.fused_attend(x["q"], x["k"], x["v"], normalizer=module, mask=x["mask"], scale=0.7) == "flex"
    assert calls == ["triton", "flex"]


def test_reference_mode_keeps_the_materialised_path(monkeypatch):
    x = to_device(inputs(MASKS[0], torch.float64))
    spec = fused.spec_of(normaliser("polymax", {}, torch.float64), x["k"].shape[-2])
    monkeypatch.setenv("FORGE_OPS", "reference")
    assert triton_attention.attention(x["q"], x["k"], x["v"], spec, mask=x["mask"], scale=0.7) is None
