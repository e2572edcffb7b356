"""Attention with a softmax variant: the materialised (B, H, T, T) path against the blocked one
(forge_dist/model/attention/blocked.py) and the fused C++ kernel (attention/fused.py,
csrc/cpu/attention.cpp), measured in the same run.

Rows 1: one attention call, forward + backward, per variant and sequence length T: time (best of
interleaved rounds: other processes on a shared machine only add time) and peak extra resident
memory (RSS sampled every millisecond by a thread while the call runs, minus RSS before it; with glibc's
mmap threshold pinned at 64 KiB every tensor goes back to the OS when freed, so the peak is the call's own).
Rows 2: one training step (forward, backward, SGD) of the default model config (6 layers, 384 wide,
6 heads, block 256; --train_seq for longer blocks) per variant, the default route (the fused kernel)
against the materialised path (disable_flash_attention=True, which keeps the fused normaliser
kernels), and the ratio; with attention's share of the materialised step and the bound it puts on
the ratio (Amdahl: the step ratio if attention cost nothing).
Row 3 (--long): one training step of the default config at block_size 4096, batch 1, with the fused
kernel: time and peak extra RSS, against the size of the materialised path's score tensors.

    python bench/attention.py                                   # T 512..4096, 3 variants (~1 min)
    python bench/attention.py --seq 512 1024 --variants all --rounds 3
    python bench/attention.py --seq --train_variants polymax --train_seq 1024 2048 --batch 1 --clock cpu
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import os
import platform
import threading
import time

import torch

import forge_dist.model  # noqa: F401  (registers the variants)
from forge_dist import ModelConfig
from forge_dist.model.attention import blocked, fused
from forge_dist.model.attention.core import _NO_POINTS, _materialised
from forge_dist.model.gpt import GPT
from forge_dist.model.softmax import build_softmax
from forge_dist.ops.mask import MaskSpec
from forge_dist.variants import SOFTMAX
from timing import timed_step  # bench/timing.py


def exact_rss() -> None:
    """Every allocation of 64 KiB or more gets its own mapping, returned to the OS when freed (glibc
    otherwise raises its mmap threshold to 32 MiB after the first large free and keeps freed heap
    memory, so RSS would not fall back between calls)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_rss(fn) -> int:
    """Peak RSS above the starting RSS while fn runs (bytes)."""
    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0], rss()) - start


def attention_rows(variants, seqs, rounds, clock, window=None, B=1, H=4, D=64):
    print(f"\n# attention forward+backward, B={B} H={H} head_dim={D} float32, causal, window {window}")
    rows = []
    print(f"{'variant':<14}{'T':>6}{'mat ms':>10}{'blk ms':>10}{'fus ms':>10}{'fus/mat':>10}{'mat MiB':>10}"
          f"{'blk MiB':>10}{'fus MiB':>10}")
    for T in seqs:
        q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
        for name in variants:
            cfg = ModelConfig(n_head=H, softmax_variant_attn=name)
            norm = build_softmax(name, cfg, n_head=H)
            mask = MaskSpec(causal=True, window=window)

            def mat(q=q, k=k, v=v, norm=norm, mask=mask):  # bound now: the memory pass runs them later
                y = _materialised(q, k, v, 1, norm, mask, D ** -0.5, None, None, None, 0.0, _NO_POINTS)
                y.sum().backward()

            def blk(q=q, k=k, v=v, norm=norm, mask=mask):
                y = blocked.blocked_attend(q, k, v, normalizer=norm, mask=mask, scale=D ** -0.5)
                y.sum().backward()

            def fus(q=q, k=k, v=v, norm=norm, mask=mask):
                y = fused.fused_attend(q, k, v, normalizer=norm, mask=mask, scale=D ** -0.5)
                y.sum().backward()

            if not blocked.supports(norm, T) or fused.spec_of(norm, T) is None:
                print(f"{name:<14}{T:>6}  (no blocked or fused path)")
                continue
            times = {"mat": [], "blk": [], "fus": []}
            for _ in range(rounds):
                for key, fn in (("mat", mat), ("blk", blk), ("fus", fus)):
                    t0 = clock()
                    fn()
                    times[key].append(clock() - t0)
            rows.append((name, T, *(min(times[key]) * 1e3 for key in ("mat", "blk", "fus")), mat, blk, fus))
    exact_rss()  # after the timings: one mapping per allocation slows small allocations down
    for name, T, tm, tb, tf, *fns in rows:
        mm, mb, mf = (peak_extra_rss(fn) / 2**20 for fn in fns)
        print(f"{name:<14}{T:>6}{tm:>10.1f}{tb:>10.1f}{tf:>10.1f}{tm / tf:>9.2f}x{mm:>10.0f}{mb:>10.0f}{mf:>10.0f}",
              flush=True)


def attention_call_ms(norm, B: int, H: int, T: int, D: int, rounds: int, clock) -> tuple:
    """(materialised, fused) ms of one causal attention forward+backward at the model's shape."""
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    mask = MaskSpec(causal=True)
    fns = {"mat": lambda: _materialised(q, k, v, 1, norm, mask, D ** -0.5, None, None, None, 0.0, _NO_POINTS),
           "fus": lambda: fused.fused_attend(q, k, v, normalizer=norm, mask=mask, scale=D ** -0.5)}
    best = {}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = clock()
            fn().sum().backward()
            best[key] = min(best.get(key, float("inf")), clock() - t0)
    return best["mat"] * 1e3, best["fus"] * 1e3


def training_rows(variants, rounds, batch, seqs, clock):
    """One training step per variant and block size: the materialised path against the fused kernel,
    with attention's share of the materialised step (one attention call at the step's shape, times
    the layers) and the Amdahl bound it sets: the step ratio if attention cost nothing."""
    print(f"\n# training step (fwd+bwd+SGD), default config (6x384, 6 heads), float32; attn: one layer's "
          f"attention fwd+bwd at the step's shape x n_layer; bound: mat step / (mat step - mat attn)")
    print(f"{'variant':<14}{'T':>6}{'batch':>6}{'mat ms':>10}{'fus ms':>10}{'speed-up':>10}{'mat attn':>10}"
          f"{'fus attn':>10}{'attn %':>8}{'bound':>8}")
    for T, B in zip(seqs, batch):
        for name in variants:
            cfg = ModelConfig(softmax_variant_attn=name, block_size=T)
            idx = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
            steps = {}
            for key, disable in (("mat", True), ("fus", False)):
                torch.manual_seed(0)
                model = GPT(dataclasses.replace(cfg, disable_flash_attention=disable))
                steps[key] = (model, torch.optim.SGD(model.parameters(), lr=1e-4))
            times = {"mat": [], "fus": []}
            for _ in range(rounds):
                for key in ("mat", "fus"):
                    times[key].append(timed_step(*steps[key], idx, clock))
            tm, tf = min(times["mat"]) * 1e3, min(times["fus"]) * 1e3
            norm = build_softmax(name, cfg, n_head=cfg.n_head)
            am, af = (x * cfg.n_layer for x in attention_call_ms(norm, B, cfg.n_head, T, cfg.n_embd // cfg.n_head,
                                                                 rounds + 1, clock))
            print(f"{name:<14}{T:>6}{B:>6}{tm:>10.0f}{tf:>10.0f}{tm / tf:>9.2f}x{am:>10.0f}{af:>10.0f}"
                  f"{100 * am / tm:>7.0f}%{tm / max(tm - am, 1e-9):>7.2f}x", flush=True)


def long_row(name: str, T: int = 4096):
    """One training step at block_size T, batch 1, default width, fused kernel: time and peak RSS."""
    cfg = ModelConfig(softmax_variant_attn=name, block_size=T)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    elapsed = []
    exact_rss()
    peak = peak_extra_rss(lambda: elapsed.append(timed_step(model, opt, idx))) / 2**20
    scores = cfg.n_head * T * T * 4 / 2**20
    print(f"\n# training step at block_size {T}, batch 1, {cfg.n_layer}x{cfg.n_embd}, {name}, fused kernel: "
          f"{elapsed[0]:.1f} s, peak extra RSS {peak:.0f} MiB (weights and AdamW-free SGD state excluded); the "
          f"materialised path holds (1, {cfg.n_head}, {T}, {T}) float32 = {scores:.0f} MiB per score tensor, "
          f"several per layer and {cfg.n_layer} layers", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    p.add_argument("--variants", nargs="+", default=["polymax", "consmax", "strongermax"],
                   help="variant names, or 'all'")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train_variants", nargs="*", default=["polymax", "consmax", "strongermax"])
    p.add_argument("--train_seq", type=int, nargs="*", default=[256],
                   help="block sizes of the training-step rows (256: the default config)")
    p.add_argument("--batch", type=int, nargs="*", default=[2], help="batch per --train_seq entry (one: all)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, steadier on a shared machine with OMP_NUM_THREADS=1")
    p.add_argument("--window", type=int, default=None, help="sliding window of the attention rows")
    p.add_argument("--long", default="", help="a variant: also one training step at block_size 4096")
    a = p.parse_args()
    variants = sorted(n for n in SOFTMAX.names() if n != "softmax") if a.variants == ["all"] else a.variants
    print(f"# {datetime.date.today()} {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.train_variants:
        batch = a.batch * len(a.train_seq) if len(a.batch) == 1 else a.batch
        training_rows(a.train_variants, a.rounds, batch, a.train_seq, clock)
    if a.seq:
        attention_rows(variants, a.seq, a.rounds, clock, a.window)
    if a.long:
        long_row(a.long)


if __name__ == "__main__":
    main()
