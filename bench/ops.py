"""Fused kernels against their references, measured in the same run.

For every op and shape: time and bandwidth of the fused kernel (forge_dist.ops), of the eager
reference (forge_dist.ops.reference, as the model ran before the kernels, mask matrix included)
and of torch.compile of that reference, and the kernel's speed-up over each. On a GPU also the
device-to-device copy bandwidth (the memory ceiling), F.rms_norm, torch.softmax and, where it
happens to be importable, apex's fused RMSNorm, on the same shapes.

Bandwidth counts the bytes an op must move (read inputs, write outputs; forward+backward adds the
gradient's reads and writes), the same count for all three columns, so GB/s ratios are speed ratios.
Timings are the best of interleaved rounds (kernel, eager, compiled, kernel, ...): other processes
on a shared machine only ever add time, so the minimum is the estimate of the undisturbed time,
and interleaving exposes all three columns to the same load.

    python bench/ops.py                          # CPU, float32 and bf16, forward and fwd+bwd
    python bench/ops.py --device cuda --quick    # what bench/gpu_check.sh runs
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from forge_dist import ops  # noqa: E402
from forge_dist.ops.mask import MaskSpec  # noqa: E402
from forge_dist.ops import registry  # noqa: E402
from forge_dist.ops.reference import norms as rn  # noqa: E402
from forge_dist.ops.reference import quantize as rq  # noqa: E402
from forge_dist.ops.reference import softmax_variants as rs  # noqa: E402


@dataclass
class Case:
    op: str
    shape: str
    kernel: Callable
    reference: Callable  # a pure function of the inputs (compiled as is)
    inputs: Sequence[torch.Tensor]
    bytes_fwd: int
    bytes_bwd: int = 0  # 0: forward only (no gradient, e.g. inference ops)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- cases -----------------------------------------------------------------------------------------
def norm_cases(shapes, dtype, device) -> List[Case]:
    cases = []
    for rows, d in shapes:
        x = torch.randn(rows, d, device=device, dtype=dtype)
        w = torch.rand(d, device=device, dtype=dtype) + 0.5
        b = torch.randn(d, device=device, dtype=dtype)
        r = torch.randn_like(x)
        io = 2 * nbytes(x)  # read x, write y
        bwd = 3 * nbytes(x)  # read x (or h) and dy, write dx
        shape = f"{rows}x{d}"
        k = max(1, d // 4)
        cases += [
            Case("rms_norm", shape, lambda x, w: ops.rms_norm(x, w, None), lambda x, w: rn.rms_norm(x, w, None),
                 (x, w), io, bwd),
            Case("rms_norm eps", shape, lambda x, w: ops.rms_norm(x, w, 1e-6), lambda x, w: rn.rms_norm(x, w, 1e-6),
                 (x, w), io, bwd),
            Case("partial_rms_norm", shape, lambda x, w, _k=k: ops.partial_rms_norm(x, w, _k),
                 lambda x, w, _k=k: rn.partial_rms_norm(x, w, _k), (x, w), io, bwd),
            Case("hypersphere_norm", shape, lambda x, w: ops.hypersphere_norm(x, 1.5, w),
                 lambda x, w: rn.hypersphere_norm(x, 1.5, w), (x, w), io, bwd),
            Case("layer_norm", shape, lambda x, w, b: ops.layer_norm(x, w, b), lambda x, w, b: rn.layer_norm(x, w, b),
                 (x, w, b), io, bwd),
            Case("add_rms_norm", shape, lambda x, r, w: ops.add_rms_norm(x, r, w, None)[0],
                 lambda x, r, w: rn.rms_norm(x + r, w, None), (x, r, w), 4 * nbytes(x), 4 * nbytes(x)),
        ]
    return cases


def score_variants(heads: int, device):
    """name -> (fused(s, mask, p), reference(s, keep, p), params); params as a model holds them."""
    def p(v, shape=()):
        return torch.full(shape, v, device=device, requires_grad=True)

    strong = dict(log_strength=math.log(2.5), divisor=1.0)
    return {
        "softmax": (ops.softmax, rs.softmax, ()),
        "softermax": (ops.softermax, rs.softermax, ()),
        "strongermax": (lambda s, m, t, o: ops.strongermax(s, m, temperature=t, obo=o, **strong),
                        lambda s, k, t, o: rs.strongermax(s, k, temperature=t, obo=o, **strong),
                        (p(1.0), p(0.1, (heads, 1, 1)))),
        "sigsoftmax": (ops.sigsoftmax, rs.sigsoftmax, ()),
        "consmax": (lambda s, m, b, g: ops.consmax(s, m, b, g), lambda s, k, b, g: rs.consmax(s, k, b, g),
                    (p(2.5), p(100.0))),
        "consmax_v2": (lambda s, m, b, g: ops.consmax(s, m, 2.5 * b, 100.0 * g),
                       lambda s, k, b, g: rs.consmax(s, k, 2.5 * b, 100.0 * g),
                       (p(1.0, (heads, 1, 1)), p(1.0, (heads, 1, 1)))),
        "saturatingconsmax": (lambda s, m, b, g: ops.saturating_consmax(s, m, b, g, 10.0),
                              lambda s, k, b, g: rs.saturating_consmax(s, k, b, g, 10.0), (p(2.5), p(100.0))),
        "polymax": (lambda s, m: ops.polymax(s, m, -10.0, 1.0, 2.0, 1000.0),
                    lambda s, k: rs.polymax(s, k, -10.0, 1.0, 2.0, 1000.0), ()),
        "vpolymax": (lambda s, m: ops.vpolymax(s, m, -10.0, 1.0, 2.0, 1000.0),
                     lambda s, k: rs.vpolymax(s, k, -10.0, 1.0, 2.0, 1000.0), ()),
        "exppolymax": (lambda s, m: ops.exppolymax(s, m, 1.0, 2.0, 0.0, 1000.0),
                       lambda s, k: rs.exppolymax(s, k, 1.0, 2.0, 0.0, 1000.0), ()),
        **{name: (lambda s, m, _f=getattr(ops, name): _f(s, m, 100.0),
                  lambda s, k, _f=getattr(rs, name): _f(s, k, 100.0), ())
           for name in ("relumax", "relu2max", "sigmoidmax", "softplus", "squareplus")},
    }


def score_cases(shape, dtype, device, names: Optional[Sequence[str]]) -> List[Case]:
    B, H, T, _ = shape
    s = torch.randn(shape, device=device, dtype=dtype) * 2
    mask = MaskSpec()  # causal, applied inside the kernel; the reference builds the keep matrix as the model did
    cases = []
    for name, (fused, reference, params) in score_variants(H, device).items():
        if names and name not in names:
            continue
        cases.append(Case(
            name, "x".join(map(str, shape)),
            lambda s, *p, _f=fused: _f(s, mask, *p),
            lambda s, *p, _r=reference: _r(s, mask.keep(T, T, s.device), *p),
            (s, *params), 2 * nbytes(s), 3 * nbytes(s)))
    return cases


def quant_cases(dtype, device, quick: bool) -> List[Case]:
    n = 4096 if device == "cuda" else 2048
    x = torch.randn(n, n, device=device, dtype=dtype)
    cases = []
    for method in ("affine_quant", "symmetric_quant"):
        for dim, label in ((None, "per tensor"), (-1, "per channel")):
            cases.append(Case(f"fake_quantize {method.split('_')[0]} {label}", f"{n}x{n}",
                              lambda x, _m=method, _d=dim: ops.fake_quantize(x, _m, 8, dim=_d),
                              lambda x, _m=method, _d=dim: rq.fake_quantize(x, _m, 8, dim=_d),
                              (x,), 2 * nbytes(x), 2 * nbytes(x)))
    zp, scale, q = rq.symmetric_quantize(torch.randn(n, n, device=device), 8, dim=-1)
    for rows in (1, 256):
        a = torch.randn(rows, n, device=device, dtype=dtype)
        cases.append(Case(f"int8_linear {rows} row{'s' if rows > 1 else ''}", f"{rows}x{n} @ {n}x{n}",
                          lambda a, _q=q: ops.int8_linear(a, _q, scale, zp),
                          lambda a, _q=q: F.linear(a, rq.dequantize(zp, scale, _q, a.dtype)),
                          (a,), nbytes(q, a) + rows * n * a.element_size()))
    return cases


# --- timing ----------------------------------------------------------------------------------------
def timer(device: str):
    if device == "cuda":
        def run(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / n
    else:
        def run(fn, n):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t) * 1e3 / n
    return run


def step(fn, inputs, backward: bool):
    """A zero-argument callable: forward, or forward + backward with a fixed output gradient."""
    if not backward:
        def forward():
            with torch.no_grad():
                fn(*inputs)
        return forward
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    wrt = [t for t in leaves if t.requires_grad]
    gy = torch.randn_like(fn(*leaves))

    def run():
        torch.autograd.grad(fn(*leaves), wrt, gy)
    return run


def measure(fns, device, rounds: int, target_ms: float) -> List[Optional[float]]:
    run = timer(device)
    for f in fns:
        if f is not None:
            f(), f()  # warm-up (and compilation)
    if device == "cuda":
        torch.cuda.synchronize()
    per = [max(1, int(target_ms / max(run(f, 1), 1e-3))) if f is not None else 0 for f in fns]
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, f in enumerate(fns):
            if f is not None:
                samples[i].append(run(f, per[i]))
    return [min(s) if s else None for s in samples]


def fmt(ms, nbytes_):
    return ("-", "-") if ms is None else (f"{ms:.3f}", f"{nbytes_ / ms / 1e6:.1f}")


def ratio(a, b):
    return "-" if a is None or b is None else f"{b / a:.2f}x"


def bench_case(case: Case, device, backward, compile_ref, rounds, target_ms, copy_gbs) -> str:
    nb = case.bytes_fwd + (case.bytes_bwd if backward else 0)
    compiled = None
    if compile_ref:
        torch._dynamo.reset()
        compiled = torch.compile(case.reference, dynamic=False)
    fns = [step(case.kernel, case.inputs, backward), step(case.reference, case.inputs, backward),
           step(compiled, case.inputs, backward) if compiled is not None else None]
    try:
        k, e, c = measure(fns, device, rounds, target_ms)
    except Exception as err:  # noqa: BLE001 - report a compile failure in the table, keep going
        k, e, _ = measure(fns[:2] + [None], device, rounds, target_ms)
        c = None
        print(f"<!-- {case.op}: torch.compile failed: {type(err).__name__}: {str(err).splitlines()[0][:200]} -->")
    cols = [case.op, case.shape, str(case.inputs[0].dtype).replace("torch.", ""), "fwd+bwd" if backward else "fwd",
            *fmt(k, nb), *fmt(e, nb), *fmt(c, nb), ratio(k, e), ratio(k, c)]
    if copy_gbs:
        cols.append("-" if k is None else f"{100 * nb / k / 1e6 / copy_gbs:.0f}%")
    return "| " + " | ".join(cols) + " |"


def gpu_baselines(norm_shapes, score_shape, dtype, rounds, target_ms) -> float:
    """Copy bandwidth, F.rms_norm, torch.softmax (and apex if importable); returns the copy GB/s."""
    x = torch.empty(64 * 2 ** 20, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    (copy_ms,) = measure([lambda: y.copy_(x)], "cuda", rounds, target_ms)
    copy_gbs = 2 * nbytes(x) / copy_ms / 1e6
    print(f"\ndevice-to-device copy (read + write 64 MiB): {copy_gbs:.1f} GB/s\n")
    rows = []
    try:
        from apex.normalization import FusedRMSNorm
    except ImportError:
        FusedRMSNorm = None
    for r, d in norm_shapes:
        t = torch.randn(r, d, device="cuda", dtype=dtype)
        w = torch.ones(d, device="cuda", dtype=dtype)
        (ms,) = measure([lambda: F.rms_norm(t, (d,), w)], "cuda", rounds, target_ms)
        rows.append(f"| F.rms_norm | {r}x{d} | {ms:.3f} | {2 * nbytes(t) / ms / 1e6:.1f} |")
        if FusedRMSNorm is not None:
            apex_norm = FusedRMSNorm(d).to("cuda", dtype)
            (ms,) = measure([lambda: apex_norm(t)], "cuda", rounds, target_ms)
            rows.append(f"| apex FusedRMSNorm | {r}x{d} | {ms:.3f} | {2 * nbytes(t) / ms / 1e6:.1f} |")
    s = torch.randn(score_shape, device="cuda", dtype=dtype)
    (ms,) = measure([lambda: torch.softmax(s, -1)], "cuda", rounds, target_ms)
    rows.append(f"| torch.softmax | {'x'.join(map(str, score_shape))} | {ms:.3f} | {2 * nbytes(s) / ms / 1e6:.1f} |")
    print("| baseline | shape | ms | GB/s |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return copy_gbs


def steady_state_malloc() -> str:
    """Keep freed CPU tensors in glibc's heap (mmap threshold at its 32 MiB maximum, no trimming), as
    a long-running process does; otherwise every call of every column re-faults the pages of its
    fresh output and the timings measure the kernel's page faults, not its work."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default allocator"
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 2 ** 20) and libc.mallopt(m_trim_threshold, 2 ** 30)
    return "glibc malloc: mmap threshold 32 MiB, trim 1 GiB" if ok else "default allocator"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma list: float32, bfloat16, float16")
    ap.add_argument("--groups", default="norms,scores,quant", help="comma list of norms, scores, quant")
    ap.add_argument("--variants", default="", help="comma list of softmax variants (default: all)")
    ap.add_argument("--norms", default="", help="comma list of norm ops, e.g. rms_norm,layer_norm (default: all)")
    ap.add_argument("--pass", dest="passes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer rounds")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    args = ap.parse_args(argv)

    os.environ["FORGE_OPS"] = "kernels"  # a missing kernel is an error here, never a silent reference
    registry.refresh()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    state = registry.ensure_loaded()
    if device not in state.devices:
        print(f"no {device} kernels: {state.reason}")
        return 1
    gpu = device == "cuda"
    allocator = "CUDA caching allocator" if gpu else steady_state_malloc()
    # CPU shapes: no tensor above 32 MiB (see steady_state_malloc)
    norm_shapes = [(65536, 768), (32768, 4096)] if gpu else ([(2048, 768)] if args.quick else [(8192, 768), (1024, 4096)])
    score_shape = (16, 12, 1024, 1024) if gpu else ((2, 12, 256, 256) if args.quick else (2, 12, 512, 512))
    if gpu and args.quick:
        norm_shapes, score_shape = [(65536, 768)], (8, 12, 1024, 1024)
    # CPU: many short samples, so that the best of them finds a window without preemption
    rounds = args.rounds or (5 if gpu else (11 if args.quick else 25))
    target_ms = 20.0 if gpu else 5.0
    names = [v for v in args.variants.split(",") if v]
    dev_name = torch.cuda.get_device_name(0) if gpu else f"{platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads"
    print(f"# bench/ops.py  {datetime.date.today()}  {dev_name}  torch {torch.__version__}")
    print(f"# command: python bench/ops.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# library: {state.source} ({os.path.basename(state.path or '')}); "
          f"GPU status: {registry.GPU_VERIFIED or 'unverified on GPU'}; {allocator}")
    for dtype_name in args.dtype.split(","):
        dtype = getattr(torch, dtype_name)
        copy_gbs = gpu_baselines(norm_shapes, score_shape, dtype, rounds, target_ms) if gpu else 0.0
        cases = []
        groups = args.groups.split(",")
        if "norms" in groups:
            wanted = [n for n in args.norms.split(",") if n]
            cases += [c for c in norm_cases(norm_shapes, dtype, device) if not wanted or c.op in wanted]
        if "scores" in groups:
            cases += score_cases(score_shape, dtype, device, names)
        if "quant" in groups:
            cases += quant_cases(dtype, device, args.quick)
        header = ["op", "shape", "dtype", "pass", "kernel ms", "kernel GB/s", "eager ms", "eager GB/s",
                  "compiled ms", "compiled GB/s", "kernel vs eager", "kernel vs compiled"] + (["% of copy"] if gpu else [])
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for case in cases:
            for p in args.passes.split(","):
                if p == "fwd+bwd" and not case.bytes_bwd:
                    continue
                print(bench_case(case, device, p == "fwd+bwd", not args.no_compile, rounds, target_ms, copy_gbs),
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
