"""What the fused-attention kernel tests share (test_attention_kernel.py: the C++ kernel,
test_triton_attention.py: the Triton one): the variants and mask setups of the blocked path's tests,
the materialised (B, H, T, S) reference, outputs with every gradient, and the bf16 check."""
import sys
from pathlib import Path

import torch

from forge_dist.model.attention.core import _NO_POINTS, _materialised

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_blocked_attention import CASES, MASKS, WRT, inputs, normaliser  # noqa: E402,F401

SCALE = 0.7


def case_ids(cases):
    return [f"{n}-{i}" for i, (n, _) in enumerate(cases)]


def materialised(module, x):
    n_rep = x["q"].shape[1] // x["k"].shape[1]
    return _materialised(x["q"], x["k"], x["v"], n_rep, module, x["mask"], SCALE, x["softcap"], x["bias"],
                         x["sink"], 0.0, _NO_POINTS)


def outputs_and_grads(kernel, module, x, path):
    """(output, gradients of WRT) of the materialised path or, path "kernel", of ``kernel(module, x)``,
    under a non-uniform output gradient."""
    y = materialised(module, x) if path == "materialised" else kernel(module, x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).reshape(y.shape)
    return y, torch.autograd.grad((y * w).sum(), WRT(module, x), allow_unused=True)


def assert_bf16_close_to_float64(kernel, name, device="cpu"):
    """bf16 in, bf16 out (float32 accumulation) against the float64 materialised path, loosely: 3% of
    the largest magnitude for the output and the q, k, v gradients."""
    def on(x):
        return {k: v.detach().to(device).requires_grad_() if torch.is_tensor(v) else v for k, v in x.items()}

    torch.manual_seed(0)
    m64, m16 = normaliser(name, {}, torch.float64).to(device), normaliser(name, {}, torch.bfloat16).to(device)
    m16.load_state_dict(m64.state_dict())
    y64, g64 = outputs_and_grads(kernel, m64, on(inputs(MASKS[0], torch.float64)), "materialised")
    y16, g16 = outputs_and_grads(kernel, m16, on(inputs(MASKS[0], torch.bfloat16)), "kernel")
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), y64, rtol=0, atol=0.03 * float(y64.detach().abs().max()))
    for a, b in zip(g64[:3], g16[:3]):
        torch.testing.assert_close(b.double(), a, rtol=0, atol=0.03 * float(a.abs().max()))
