"""Where a training step of the default config goes, under FORGE_OPS=reference (the materialised
eager path: every op its PyTorch reference) against the default route (fused attention kernel and
fused norm / normaliser kernels), measured in the same process, rounds interleaved.

One step is what forge-train does per iteration on one CPU process: forward, loss, backward, global
gradient-norm clip (grad_clip 1.0), AdamW step, zero_grad, on the default ModelConfig (6 layers, 384
wide, 6 heads, block 256, vocab 50304). Rows 1: step time per variant and route (CPU time, best of
the rounds) and the ratio; and the floor: the CPU time of the work both routes do identically (every
linear's forward and gradient products, the vocab-wide LM head among them, and the cross-entropy),
timed alone at the step's shapes. The fused step cannot take less, so reference / floor bounds the
ratio whatever attention and the rest cost. Rows 2 (--profile): torch.profiler's self CPU time per op of one step in
each route, grouped (attention: the score products, the normaliser and the fused kernel; the LM head
and loss; linear layers; norms; optimizer; the rest), so the ratio's ceiling is read off the
measured shares (Amdahl: the step ratio if a group cost nothing).

    python bench/step_profile.py                                # 4 variants, batch 2, T 256 (~1 min)
    python bench/step_profile.py --variants polymax --profile polymax --top 12
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import time

import torch

import forge_dist.model  # noqa: F401  (registers the variants)
from forge_dist import ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.ops import registry
from timing import train_step  # bench/timing.py

ROUTES = ("reference", "auto")


def use_route(route: str) -> None:
    os.environ["FORGE_OPS"] = route
    registry.refresh()


def make_step(cfg: ModelConfig, idx: torch.Tensor):
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    return lambda: train_step(model, opt, idx, clip=1.0)


# op-name groups of the profile (self time); the first match wins
GROUPS = (
    ("LM head matmuls (vocab-wide)", ()),  # an mm with a vocab-sized operand: by shape, see group_of
    ("attention kernel", ("forge_ops::attention",)),
    ("score normaliser", ("forge_ops::score_", "softmax_variants")),
    ("LM head + loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("matmul (all linears, LM head, score products)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                                                       "aten::linear")),
    ("norm", ("forge_ops::norm", "layer_norm", "rms_norm")),
    ("optimizer + clip", ("Optimizer.step", "_foreach", "aten::norm", "linalg_vector_norm", "clip_grad")),
)


OTHER = "other (elementwise, copies, autograd)"


def group_of(key: str, shapes, vocab: int) -> str:
    if key in ("aten::mm", "aten::addmm") and any(vocab in s for s in shapes if isinstance(s, (list, tuple))):
        return GROUPS[0][0]
    for name, pats in GROUPS[1:]:
        if any(p in key for p in pats):
            return name
    return OTHER


def profile(step, top: int, vocab: int, rounds: int):
    """(total self ms, {group: ms}, [(op, ms, calls)] top ops) of one step: per op and input shapes the
    least self time over ``rounds`` profiled steps (time other processes took only ever adds)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    best = {}
    for _ in range(rounds):
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        for e in prof.key_averages(group_by_input_shape=True):
            k = (e.key, str(e.input_shapes))
            ms = e.self_cpu_time_total / 1e3
            if k not in best or ms < best[k][0]:
                best[k] = (ms, e.count, group_of(e.key, e.input_shapes, vocab))
    groups, per_op = collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for (key, _), (ms, n, g) in best.items():
        groups[g] += ms
        per_op[key] += ms
        calls[key] += n
    rows = sorted(((k, ms, calls[k]) for k, ms in per_op.items()), key=lambda r: -r[1])[:top]
    return sum(per_op.values()), groups, rows


def shared_floor_ms(cfg: ModelConfig, B: int, T: int, rounds: int) -> dict:
    """CPU ms of the work both routes do identically, timed alone at the step's shapes: every linear's
    three products (forward, input and weight gradient; QKV, output and MLP projections of each layer,
    and the vocab-wide LM head) and the cross-entropy forward + backward over the (B T, V) logits.
    The fused step can never take less: reference step / floor bounds the ratio."""
    C, V, N = cfg.n_embd, cfg.vocab_size, B * T
    hidden = cfg.mlp_size or cfg.mlp_expansion_factor * C
    g = torch.Generator().manual_seed(0)
    linears = [(C, C)] * 4 + [(C, hidden), (hidden, C)]  # (in, out): q, k, v, c_proj, MLP up and down

    def products(n_in, n_out):
        x, w, dy = (torch.randn(*s, generator=g) for s in ((N, n_in), (n_out, n_in), (N, n_out)))
        return lambda: (x @ w.t(), dy @ w, dy.t() @ x)

    def xent():
        logits = torch.randn(N, V, generator=g, requires_grad=True)
        target = torch.randint(0, V, (N,), generator=g)
        return lambda: torch.nn.functional.cross_entropy(logits, target).backward()

    parts = {"linears (all layers)": [products(i, o) for i, o in linears], "LM head": [products(C, V)],
             "cross-entropy": [xent()]}
    best = {k: float("inf") for k in parts}
    for _ in range(rounds):
        for key, fns in parts.items():
            t0 = time.process_time()
            for fn in fns:
                fn()
            best[key] = min(best[key], time.process_time() - t0)
    best["linears (all layers)"] *= cfg.n_layer
    return {k: v * 1e3 for k, v in best.items()}


def adamw_ms(cfg: ModelConfig, rounds: int) -> dict:
    """CPU ms of one AdamW step over the default model's parameters (gradients set), per torch
    implementation: forge-train's CPU default (the per-parameter loop), foreach, fused (torch's CPU
    fused kernel): a part of the step outside attention that both routes pay."""
    torch.manual_seed(0)
    params = [p.detach().clone().requires_grad_() for p in GPT(cfg).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for label, kw in (("loop (default on CPU)", dict(foreach=False)), ("foreach", dict(foreach=True)),
                      ("fused", dict(fused=True))):
        opt = torch.optim.AdamW(params, lr=1e-3, **kw)
        opt.step()  # state allocated
        best = float("inf")
        for _ in range(rounds):
            t0 = time.process_time()
            opt.step()
            best = min(best, time.process_time() - t0)
        out[label] = best * 1e3
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["polymax", "consmax", "strongermax", "pfla_softmax"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", nargs="*", default=[], help="variants whose step is profiled per op in each route")
    p.add_argument("--top", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    print(f"# train step (fwd, loss, bwd, clip 1.0, AdamW) of the default config, batch {a.batch}, T {a.seq}, "
          f"float32; CPU time, best of {a.rounds} interleaved rounds")
    print("# floor: CPU ms of the work both routes share (linears' products, LM head, cross-entropy), timed alone; "
          "bound = reference / floor; rest = default - floor")
    print(f"{'variant':<14}{'reference ms':>14}{'default ms':>12}{'ratio':>8}{'floor':>9}{'bound':>8}{'rest':>12}")
    floor = None
    for name in a.variants:
        cfg = ModelConfig(softmax_variant_attn=name, block_size=a.seq)
        idx = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
        steps = {}
        for route in ROUTES:
            use_route(route)
            steps[route] = make_step(cfg, idx)
            steps[route]()  # warm-up (library load, allocator)
        times = {r: [] for r in ROUTES}
        for _ in range(a.rounds):
            for route in ROUTES:
                use_route(route)
                t0 = time.process_time()
                steps[route]()
                times[route].append(time.process_time() - t0)
        tr, ta = (min(times[r]) * 1e3 for r in ROUTES)
        if floor is None:
            floor = shared_floor_ms(cfg, a.batch, a.seq, a.rounds)
        fl = sum(floor.values())
        print(f"{name:<14}{tr:>14.0f}{ta:>12.0f}{tr / ta:>7.2f}x{fl:>9.0f}{tr / fl:>7.2f}x{ta - fl:>12.0f}", flush=True)
        if name == a.variants[-1]:
            print("  floor: " + ", ".join(f"{k} {v:.0f} ms" for k, v in floor.items()))
            print("  AdamW step alone: " + ", ".join(f"{k} {v:.0f} ms" for k, v in adamw_ms(cfg, a.rounds).items()))
        if name not in a.profile:
            continue
        prof = {}
        for route in ROUTES:
            use_route(route)
            prof[route] = profile(steps[route], a.top, cfg.vocab_size, a.rounds)
        (t_ref, g_ref, top_ref), (t_def, g_def, top_def) = prof["reference"], prof["auto"]
        print(f"  profile (self ms of one step, least per op over {a.rounds} profiled steps; share of the reference step; bound = reference / "
              f"(reference - group), the ratio if the group cost nothing in the reference route)")
        print(f"  {'group':<48}{'reference':>10}{'share':>7}{'default':>10}{'saved':>9}{'bound':>8}")
        for g in [n for n, _ in GROUPS] + [OTHER]:
            r, d = g_ref.get(g, 0.0), g_def.get(g, 0.0)
            print(f"  {g:<48}{r:>10.1f}{100 * r / t_ref:>6.1f}%{d:>10.1f}{r - d:>9.1f}{t_ref / max(t_ref - r, 1e-9):>7.2f}x")
        print(f"  {'total':<48}{t_ref:>10.1f}{'':>7}{t_def:>10.1f}{t_ref - t_def:>9.1f}{t_ref / t_def:>7.2f}x")
        for label, top in (("reference", top_ref), ("default", top_def)):
            print(f"  top ops, {label}: " + "; ".join(f"{k} {ms:.1f} ms x{n}" for k, ms, n in top))


if __name__ == "__main__":
    main()
