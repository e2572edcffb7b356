"""GPU: the fused score-normaliser attention (the Triton kernel, forge_dist/ops/triton_attention.py, and
FlexAttention, attention/flex.py) against the materialised path, and GPT-2 124M bf16 training
throughput per variant (the model's default route: Triton where installed). UNVERIFIED ON GPU until
a run of bench/gpu_check.sh is recorded in docs/BENCHMARKS.md.

Rows 1: one attention call at (B, H, T, D) = (16, 12, 1024, 64), bf16, forward + backward: materialised
(FORGE_OPS=reference semantics through core._materialised), Triton, FlexAttention, SDPA for reference;
max |route - materialised| of the output and of dq.
Rows 2: GPT-2 124M (12 x 768, 12 heads, block 1024, vocab 50304), bf16 autocast, AdamW, torch.compile,
batch --batch: tokens/s and MFU (6 N + 12 L T d flops per token; peak --peak_tflops, 989 for an H100/H200
SXM dense bf16).

    python bench/gpu_attention.py --variants softmax polymax consmax
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import forge_dist.model  # noqa: F401  (registers the variants)
from forge_dist import ModelConfig
from forge_dist.model.attention import flex, fused
from forge_dist.model.attention.core import _NO_POINTS, _materialised
from forge_dist.model.gpt import GPT
from forge_dist.model.softmax import build_softmax
from forge_dist.ops import triton_attention
from forge_dist.ops.mask import MaskSpec


def timed(fn, steps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def attention_rows(variants, B=16, H=12, T=1024, D=64):
    print(f"# attention fwd+bwd (B, H, T, D) = ({B}, {H}, {T}, {D}) bf16 causal; errors against the materialised path")
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = MaskSpec(causal=True)
    for name in variants:
        norm = build_softmax(name, ModelConfig(n_head=H, softmax_variant_attn=name), n_head=H).cuda()
        spec = fused.spec_of(norm, T)
        routes = {
            "materialised": lambda: _materialised(q, k, v, 1, norm, mask, D ** -0.5, None, None, None, 0.0,
                                                  _NO_POINTS),
            "triton": lambda: triton_attention.attention(q, k, v, spec, mask=mask, scale=D ** -0.5),
            "flex": lambda: flex.flex_attend(q, k, v, spec, mask=mask, scale=D ** -0.5),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        ya = routes["materialised"]()
        ga = torch.autograd.grad(ya.float().sum(), q)[0]
        cells = []
        for key, fn in routes.items():
            y = fn()
            if y is None:
                cells.append(f"{key} (none)")
                continue
            err = ""
            if key in ("triton", "flex"):
                g = torch.autograd.grad(y.float().sum(), q)[0]
                err = f" (err out {(y - ya).abs().max().item():.1e} dq {(g - ga).abs().max().item():.1e})"
            ms = timed(lambda fn=fn: fn().float().sum().backward(), 10) * 1e3
            cells.append(f"{key} {ms:.2f} ms{err}")
        print(f"{name:<14} " + "  ".join(cells), flush=True)


def gpt2_rows(variants, batch: int, steps: int, peak_tflops: float):
    print(f"# GPT-2 124M bf16 training, batch {batch} x 1024, torch.compile, AdamW")
    for name in variants:
        cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
                          softmax_variant_attn=name, dropout=0.0)
        model = GPT(cfg).cuda()
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        step_fn = torch.compile(model)
        idx = torch.randint(0, cfg.vocab_size, (batch, 1024), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = step_fn(idx, idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):  # compile and warm up
            step()
        dt = timed(step, steps)
        tokens = batch * 1024 / dt
        flops_per_token = 6 * n_params + 12 * cfg.n_layer * 1024 * cfg.n_embd
        print(f"{name:<14} {tokens / 1e3:.0f}K tokens/s  MFU {tokens * flops_per_token / (peak_tflops * 1e12):.1%}",
              flush=True)
        del model, opt, step_fn
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["softmax", "polymax", "consmax"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak_tflops", type=float, default=989.0)
    a = p.parse_args()
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    attention_rows([n for n in a.variants if n != "softmax"])
    gpt2_rows(a.variants, a.batch, a.steps, a.peak_tflops)


if __name__ == "__main__":
    main()
