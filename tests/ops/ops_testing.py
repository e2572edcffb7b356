"""Helpers of the kernel tests: devices to test and tolerances per dtype.

Every kernel result is compared with the reference evaluated in float64 on the same (rounded)
inputs. Tolerances: float64 tight (same math, other summation order); float32 to about 1e-5
relative; bf16 / fp16 kernels (float32 inside, one rounding of the output) to a few units of the
format's epsilon.
"""
import torch

TOL = {  # dtype -> (rtol, atol relative to the reference's largest magnitude)
    torch.float64: (1e-9, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-2, 8e-3),
    torch.float16: (4e-3, 1e-3),
}


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dtypes(device):
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "", scale: float = 1.0,
          floor: float = 0.0):
    """actual (any dtype) against expected (computed in float32/64), tolerance of ``dtype``: relative,
    plus an absolute part relative to the largest expected magnitude, or to ``floor`` when larger (the
    size of the terms that cancel in a result that is mathematically near 0)."""
    rtol, atol = TOL[dtype]
    expected = expected.to(torch.float64)
    finite = expected[torch.isfinite(expected)]
    mag = max(finite.abs().max().item() if finite.numel() else 0.0, float(floor), 1e-30)
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol * scale, atol=atol * scale * mag,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def upcast(t: torch.Tensor) -> torch.Tensor:
    """The reference's input: the same (rounded) values in float64, so the reference is the exact
    answer for them (torch's own float32 kernels round too: e.g. LayerNorm's backward forms
    x rstd - mean rstd, which cancels badly at large magnitudes)."""
    return t.double()
