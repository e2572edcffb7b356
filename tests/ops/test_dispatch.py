"""The switch itself: FORGE_OPS=reference, the fallback when no library can be built, the meta
device, torch.compile, and torch.library.opcheck of every operator."""
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from forge_dist import ops
from forge_dist.ops.mask import MaskSpec
from forge_dist.ops import registry
from forge_dist.ops.reference import norms as ref_norms
from forge_dist.ops.reference import softmax_variants as ref_scores
from ops_testing import devices

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, env: dict, timeout: float = 240.0) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_reference_mode_uses_no_kernel(monkeypatch):
    """Bit-identical to the references (the kernels round differently, e.g. x * rsqrt vs x / rms)."""
    x = torch.randn(64, 96)
    assert not torch.equal(ops.rms_norm(x, None, None), ref_norms.rms_norm(x, None, None))
    monkeypatch.setenv("FORGE_OPS", "reference")
    registry.refresh()
    try:
        assert torch.equal(ops.rms_norm(x, None, None), ref_norms.rms_norm(x, None, None))
        s, mask = torch.randn(1, 2, 4, 4), MaskSpec()
        assert torch.equal(ops.softmax(s, mask), ref_scores.softmax(s, mask.keep(4, 4)))
        assert not registry.kernel_device(x, "rms_norm")
    finally:
        monkeypatch.delenv("FORGE_OPS")
        registry.refresh()
    assert registry.kernel_device(torch.zeros(1), "rms_norm")


def test_failed_build_falls_back_once_and_is_recorded(tmp_path):
    """A compiler that cannot build (simulated with an invalid -march) leaves the references in
    charge, one warning per op, and a FAILED record the next process reads instead of rebuilding."""
    code = """
        import warnings, torch
        from forge_dist import ops
        from forge_dist.ops import registry
        from forge_dist.ops.reference import norms as ref
        x = torch.randn(4, 16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ys = [ops.rms_norm(x, None, None) for _ in range(3)]
        assert all(torch.equal(y, ref.rms_norm(x, None, None)) for y in ys)
        msgs = [str(w.message) for w in caught if "forge_dist.ops.rms_norm" in str(w.message)]
        assert len(msgs) == 1, msgs
        print("STATE", registry.state().source, "|", msgs[0])
    """
    env = {"FORGE_OPS_CACHE": str(tmp_path), "FORGE_OPS_CPU_ARCH": "no-such-cpu", "FORGE_OPS": "auto"}
    first = run_python(code, env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "STATE None | forge_dist.ops.rms_norm: using the PyTorch reference" in first.stdout
    assert "no-such-cpu" in first.stdout  # the reason names the compiler's complaint
    failed = list(tmp_path.glob("*/FAILED"))
    assert len(failed) == 1
    second = run_python(code, env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "compiling" not in second.stdout and "an earlier build failed" in second.stdout


def test_kernels_mode_refuses_to_fall_back(tmp_path):
    code = "import torch; from forge_dist import ops; ops.rms_norm(torch.ones(2, 4), None, None)"
    env = {"FORGE_OPS_CACHE": str(tmp_path), "FORGE_OPS_CPU_ARCH": "no-such-cpu", "FORGE_OPS": "kernels"}
    out = run_python(code, env)
    assert out.returncode != 0 and "FORGE_OPS=kernels" in out.stderr


def test_meta_device_shapes():
    x = torch.empty(2, 5, 8, device="meta")
    w = torch.empty(8, device="meta")
    assert ops.rms_norm(x, w, None).shape == x.shape and ops.layer_norm(x, w, w).device.type == "meta"
    s = torch.empty(2, 3, 6, 6, device="meta", dtype=torch.bfloat16)
    assert ops.consmax(s, MaskSpec(), 0.5, 2.0).shape == s.shape
    assert ops.strongermax(s, MaskSpec(), obo=torch.zeros(3, 1, 1, device="meta")).dtype == torch.float32
    q = torch.empty(16, 8, dtype=torch.int8, device="meta")
    assert ops.int8_linear(torch.empty(3, 8, device="meta"), q, torch.empty(16, device="meta"),
                           torch.empty(16, device="meta")).shape == (3, 16)


def test_torch_compile_traces_the_custom_ops():
    """aot_eager runs dynamo + AOT autograd over the fake and autograd registrations (no C++ codegen)."""
    def block(x, w, s, beta):
        h = ops.rms_norm(x, w, None)
        p = ops.consmax(s, MaskSpec(window=2), beta, 2.0) + ops.softmax(s, MaskSpec())
        return h.sum() + p.sum() + ops.fake_quantize(h, "symmetric_quant", 8, dim=-1).sum()

    args = [torch.randn(4, 8, requires_grad=True), torch.randn(8, requires_grad=True),
            torch.randn(1, 2, 5, 5, requires_grad=True), torch.tensor(0.3, requires_grad=True)]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out, out_ref = compiled(*args), block(*args)
    grads = torch.autograd.grad(out, args)
    grads_ref = torch.autograd.grad(out_ref, args)
    torch.testing.assert_close(out, out_ref)
    for g, e in zip(grads, grads_ref):
        torch.testing.assert_close(g, e)


def opcheck_cases(device):
    def t(*shape, grad=False):
        return torch.randn(*shape, device=device).requires_grad_(grad)

    x, w = t(3, 10, grad=True), t(10, grad=True)
    s = t(1, 2, 4, 6)
    mask = [1, 1, 3, 1, 1]
    params = torch.tensor([[0.5, 2.0], [0.2, 1.5]], device=device, requires_grad=True)
    c = torch.tensor([0.8], device=device, requires_grad=True)
    obo = torch.tensor([0.1, 0.3], device=device, requires_grad=True)
    q = torch.randint(-128, 127, (5, 10), dtype=torch.int8, device=device)
    op = torch.ops.forge_ops
    return {
        "rms_norm": (op.norm_fwd.default, (x, None, w, None, 10, 0.0, False, None)),
        "add_layer_norm": (op.norm_fwd.default, (t(3, 10, grad=True), t(3, 10), t(10, grad=True), t(10), 10, 1e-5,
                                                 True, None)),
        "consmax": (op.score_elementwise_fwd.default, (s.clone().requires_grad_(), params, 0, [1.0, math.inf], mask,
                                                       None)),
        "strongermax": (op.score_rownorm_fwd.default, (s.clone().requires_grad_(), c, obo, mask, 1, 3, True, 1.5, 0.5,
                                                       0.2, 0.5, None)),
        "fake_quantize": (op.fake_quantize.default, (t(4, 9, grad=True), 8, False, True)),
        "int8_linear": (op.int8_linear.default, (t(2, 10, grad=True), q, torch.rand(5, device=device),
                                                 torch.zeros(5, device=device), t(5))),
    }


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", ["rms_norm", "add_layer_norm", "consmax", "strongermax", "fake_quantize",
                                  "int8_linear"])
def test_opcheck(case, device):
    op, args = opcheck_cases(device)[case]
    torch.library.opcheck(op, args)
