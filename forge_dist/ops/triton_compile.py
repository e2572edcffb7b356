"""Ahead-of-time compilation of the Triton attention kernels for a GPU architecture, on any machine:
Triton's own compiler (Python AST -> TTIR -> TTGIR -> LLVM -> PTX -> cubin through the ptxas the
triton wheel ships) needs no GPU. It catches what the CPU interpreter cannot (a non-constexpr
global, a type that changes across a runtime branch, an unsupported dot) and reports each kernel's
shared memory against the device's limit. Must run without TRITON_INTERPRET (the interpreter
replaces the kernels the compiler reads).

    python -m forge_dist.ops.triton_compile --arch 90 --dtype bf16 --head-dim 64
"""
from __future__ import annotations

import argparse
import inspect
import time

_POINTERS_IO = ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV_")  # in the input dtype
_POINTERS_ACC = ("Bias", "Params", "C", "Obo", "Sink", "F", "Stats", "Delta", "DBias", "Parts", "DParams")  # accumulation

# the variant setups compiled by default: one of each family, the costliest options on
CONFIGS = {
    "elementwise": dict(FAMILY=0, KIND=0, SQUARE=False, TRANSFORM=0, DIVIDE=False),
    "rownorm": dict(FAMILY=1, KIND=0, SQUARE=False, TRANSFORM=2, DIVIDE=True),
    # pfla_softmax's knot table, quadratic mode, divided by its row sum (the sink's knot gradients too)
    "pfla": dict(FAMILY=0, KIND=9, SQUARE=True, TRANSFORM=0, DIVIDE=True),
}


def compile_kernels(arch: int = 90, dtype: str = "bf16", head_dim: int = 64, block: int = 64,
                    configs=tuple(CONFIGS), log=print):
    """Compiles attn_fwd, attn_bwd_dq and attn_bwd_dkdv per config; returns [(config, kernel, shared bytes)]."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from forge_dist.ops import triton_kernels as tk

    if not isinstance(tk.attn_fwd, JITFunction):
        raise RuntimeError("the kernels were decorated for the interpreter: unset TRITON_INTERPRET")
    ptr, acc = f"*{dtype}", "*fp64" if dtype == "fp64" else "*fp32"
    base = dict(D=head_dim, DV=head_dim, BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, head_dim),
                BLOCK_DV=max(16, head_dim), PREC="ieee", CAUSAL=True, HAS_BIAS=True, SOFTCAP=True)
    out = []
    for name in configs:
        for kernel, extra in ((tk.attn_fwd, dict(SHIFT=1)), (tk.attn_bwd_dq, dict(NEED_DBIAS=True)),
                              (tk.attn_bwd_dkdv, {})):
            meta = dict(base, **CONFIGS[name], **extra)
            names = list(inspect.signature(kernel.fn).parameters)
            sig = {n: "constexpr" if n in meta else ptr if n in _POINTERS_IO else acc if n in _POINTERS_ACC
                   else "i32" for n in names}
            src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in meta.items()})
            t0 = time.perf_counter()
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=4, num_stages=2))
            shared = compiled.metadata.shared
            log(f"sm_{arch} {dtype} D={head_dim} block={block} {name:<11} {kernel.fn.__name__:<14} "
                f"{time.perf_counter() - t0:5.1f} s  shared {shared} B  cubin {len(compiled.asm['cubin'])} B")
            out.append((name, kernel.fn.__name__, shared))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80: A100, 90: H100/H200)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32", "fp64"))
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    a = p.parse_args()
    compile_kernels(a.arch, a.dtype, a.head_dim, a.block, a.configs)


if __name__ == "__main__":
    main()
