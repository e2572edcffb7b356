"""GPU: the fused score-normaliser attention (FlexAttention route, attention/flex.py) against the
materialised path, and GPT-2 124M bf16 training throughput per variant. UNVERIFIED ON GPU until a
run of bench/gpu_check.sh is recorded in docs/BENCHMARKS.md.

Rows 1: one attention call at (B, H, T, D) = (16, 12, 1024, 64), bf16, forward + backward: materialised
(disable the fused route: FORGE_OPS=reference semantics through core._materialised), fused, SDPA for
reference; max |fused - materialised| of the output and of dq.
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
from forge_dist.model.attention import fused
from forge_dist.model.attention.core import _NO_POINTS, _materialised
from forge_dist.model.gpt import GPT
from forge_dist.model.softmax import build_softmax
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
    print(f"# attention fwd+bwd (B, H, T, D) = ({B}, {H}, {T}, {D}) bf16 causal")
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = MaskSpec(causal=True)
    for name in variants:
        norm = build_softmax(name, ModelConfig(n_head=H, softmax_variant_attn=name), n_head=H).cuda()

        def mat():
            return _materialised(q, k, v, 1, norm, mask, D ** -0.5, None, None, None, 0.0, _NO_POINTS)

        def fus():
            return fused.fused_attend(q, k, v, normalizer=norm, mask=mask, scale=D ** -0.5)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        ya, yb = mat(), fus()
        if yb is None:
            print(f"{name:<14} (no fused route)")
            continue
        ga = torch.autograd.grad(ya.float().sum(), q)[0]
        gb = torch.autograd.grad(yb.float().sum(), q)[0]
        t = {key: timed(lambda fn=fn: fn().float().sum().backward(), 10) * 1e3
             for key, fn in (("mat", mat), ("fus", fus), ("sdpa", sdpa))}
        print(f"{name:<14} materialised {t['mat']:.2f} ms  fused {t['fus']:.2f} ms  SDPA {t['sdpa']:.2f} ms  "
              f"max err out {(ya - yb).abs().max().item():.2e} dq {(ga - gb).abs().max().item():.2e}", flush=True)


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
