"""What pinning glibc's mmap threshold (forge_dist.dist.malloc, applied to every launched run)
costs per training step, against glibc's dynamic threshold, measured in the same run.

Each setting runs in a fresh process (glibc reads ``MALLOC_MMAP_THRESHOLD_`` at start): a GPT
trains a few AdamW steps on CPU in float32; the figure is the median step after a warm-up step;
the two settings are interleaved over rounds so a shared machine's load hits both.

    python bench/malloc.py                             # the default model (6 x 384, T=256, batch 2)
    python bench/malloc.py --rounds 3 --steps 4
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys


def _child(steps: int, block: int, batch: int) -> None:
    """Run in a fresh process: the median step and the peak RSS, as a JSON line."""
    import resource

    import torch

    import forge_dist.model  # noqa: F401  (registers the variants)
    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from timing import timed_step  # bench/timing.py

    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=block))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (batch, block))
    times = [timed_step(model, opt, x) for _ in range(steps + 1)]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_s": statistics.median(times[1:]), "max_rss_mb": rss}))


def _run(threshold, steps: int, block: int, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
    if threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", str(steps), str(block), str(batch)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--block_size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    from forge_dist.dist.malloc import DEFAULT_THRESHOLD

    settings = {"glibc dynamic (baseline)": None, f"pinned at {DEFAULT_THRESHOLD >> 20} MiB": DEFAULT_THRESHOLD}
    results = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, threshold in settings.items():
            results[name].append(_run(threshold, args.steps, args.block_size, args.batch))
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', '1')}, load {os.getloadavg()[0]:.1f}")
    base = statistics.median(r["step_s"] for r in results["glibc dynamic (baseline)"])
    print("| malloc | step s (median of rounds) | ratio to baseline | max RSS MB |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        step = statistics.median(r["step_s"] for r in rows)
        print(f"| {name} | {step:.3f} | {step / base:.3f} | {max(r['max_rss_mb'] for r in rows):.0f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(*(int(a) for a in sys.argv[2:5]))
    else:
        main()
