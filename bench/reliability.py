"""What the failure handling costs per training step, measured against the step itself in one run.

Rows: one training step (forward, backward, AdamW) of a GPT on CPU, one process, float32; then the
per-step additions of docs/reliability.md, each timed alone over the same model's gradients:

  bad-step check     the gradient finiteness test (torch._foreach_norm over every gradient) that
                     --on_bad_step needs before the update
  flight recorder    one collective's bookkeeping (sequence number, ring entry, call site), times
                     the collectives a tensor-parallel step of this model issues (4 per layer
                     forward and backward, plus the loss's 4), without the communication itself

Each figure is the best of interleaved rounds (other processes on a shared machine only add time).

    python bench/reliability.py                       # the default model (6 layers, 384 wide)
    python bench/reliability.py --n_layer 2 --n_embd 128 --rounds 5
"""
from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

import forge_dist.model  # noqa: F401  (registers the variants)
from forge_dist import ModelConfig
from forge_dist.model.gpt import GPT
from forge_dist.parallel.flight import FlightRecorder
from forge_dist.train.bad_steps import _gradients_finite


class _Engine:
    def __init__(self, model):
        self.model = model


def _best(fn, rounds: int, inner: int = 1) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--n_head", type=int, default=6)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size,
                      vocab_size=65, dropout=0.0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 65, (args.batch_size, args.block_size))
    y = torch.randint(0, 65, (args.batch_size, args.block_size))

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients for the check below

    step()
    engine = _Engine(model)
    recorder = FlightRecorder(0)
    t = torch.zeros(args.batch_size, args.block_size, args.n_embd)
    per_step = 8 * args.n_layer + 4

    def record():
        with recorder.collective("all_reduce", "tp", (0, 1), [t]):
            pass

    step_s, check_s, record_s = float("inf"), float("inf"), float("inf")
    for _ in range(args.rounds):  # interleaved, so load hits every row alike
        step_s = min(step_s, _best(step, 1))
        check_s = min(check_s, _best(lambda: _gradients_finite(engine), 1, 10))
        record_s = min(record_s, _best(record, 1, 1000))
    print(f"# bench/reliability.py {datetime.date.today()} {platform.processor() or platform.machine()} "
          f"torch {torch.__version__} threads {args.threads}")
    print(f"model: {args.n_layer} layers, {args.n_embd} wide, block {args.block_size}, batch {args.batch_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    print(f"{'training step':<34s} {step_s * 1e3:9.2f} ms   1.000")
    print(f"{'bad-step check (gradient norms)':<34s} {check_s * 1e3:9.3f} ms   {check_s / step_s:.4f}")
    print(f"{'flight recorder, 1 collective':<34s} {record_s * 1e6:9.2f} us")
    print(f"{f'flight recorder, {per_step} collectives':<34s} {record_s * per_step * 1e3:9.3f} ms   "
          f"{record_s * per_step / step_s:.4f}")


if __name__ == "__main__":
    main()
