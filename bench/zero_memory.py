"""Per-rank model-state memory of the DeepSpeed engine, ZeRO stages 0-3, against the ZeRO formulas.

For each data-parallel size N (default 2 and 4) one gloo world on this machine; in it, for bf16
(mixed precision) and fp32, for every stage, a GPT is trained through forge-train's DeepSpeed
engine (forge_dist.train.deepspeed_engine) for two steps of two accumulated micro-batches and
measured after the backward pass of the first micro-batch of the third step, when parameters,
accumulated gradients and optimizer states are all held (ZeRO-2/3 have reduced that micro-batch's
gradients into their partition; stage 0 and ZeRO-1 hold them whole until the boundary). Every tensor reachable from the module's parameters (``ds_tensor`` partitions under
ZeRO-3, ``.grad``), from DeepSpeed's optimizer wrapper and from the inner optimizer's state is
counted once per storage, by what it holds:

  params   the weights the forward uses (bf16 or fp32; ZeRO-3: this rank's partition, plus the
           small parameters below stage3_param_persistence_threshold, here 0)
  grads    gradients: the module's .grad, or the partitions ZeRO keeps
  master   fp32 master weights (DeepSpeed keeps a separate fp32 copy under ZeRO even in fp32)
  states   Adam's exp_avg and exp_avg_sq
  buffers  communication buckets (ZeRO's ipg bucket, sized reduce_bucket_size); not model state

ZeRO paper (Rajbhandari et al. 2020, section 3), psi parameters, mixed-precision Adam (K = 12:
fp32 master + momentum + variance): stage 0 16 psi, stage 1 4 psi + 12 psi / N, stage 2
2 psi + 14 psi / N, stage 3 16 psi / N. Those are the bf16 rows. For fp32 the analogue with
DeepSpeed's layout (4-byte params and grads, the fp32 master copy kept by ZeRO, 8 bytes of Adam
moments): stage 0 16 psi (the parameters are the master, no copy), stage 1 8 psi + 12 psi / N,
stage 2 4 psi + 16 psi / N, stage 3 20 psi / N.

    python bench/zero_memory.py                       # N = 2 and 4, a 4-layer 256-wide GPT
    python bench/zero_memory.py --dp 2 --n_embd 128
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import warnings
from typing import Dict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CATEGORIES = ("params", "grads", "master", "states", "buffers")
FORMULAS = {  # bytes per parameter as a function of N
    "bf16": {0: lambda n: 16, 1: lambda n: 4 + 12 / n, 2: lambda n: 2 + 14 / n, 3: lambda n: 16 / n},
    "fp32": {0: lambda n: 16, 1: lambda n: 8 + 12 / n, 2: lambda n: 4 + 16 / n, 3: lambda n: 20 / n},
}
FORMULA_TEXT = {
    "bf16": {0: "16 psi", 1: "4 psi + 12 psi/N", 2: "2 psi + 14 psi/N", 3: "16 psi/N"},
    "fp32": {0: "16 psi", 1: "8 psi + 12 psi/N", 2: "4 psi + 16 psi/N", 3: "20 psi/N"},
}


class Ledger:
    """Bytes by category, each storage counted once (views of one flat buffer are one buffer)."""

    def __init__(self):
        self.seen = set()
        self.bytes: Dict[str, int] = {c: 0 for c in CATEGORIES}

    def add(self, t, category: str) -> None:
        if not torch.is_tensor(t) or t.numel() == 0 or t.device.type == "meta":  # meta: shapes only
            return
        storage = t.untyped_storage()
        if storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()

    def walk(self, obj, category: str, depth: int = 0) -> None:
        if torch.is_tensor(obj):
            self.add(obj, category)
            if obj.grad is not None:
                self.add(obj.grad, "grads")
        elif isinstance(obj, (list, tuple)) and depth < 4:
            for x in obj:
                self.walk(x, category, depth + 1)
        elif isinstance(obj, dict) and depth < 4:
            for x in obj.values():
                self.walk(x, category, depth + 1)


def _category(name: str) -> str:
    name = name.lower()
    if "ipg" in name or "bucket" in name:
        return "buffers"
    if "grad" in name:
        return "grads"
    if "fp32" in name:
        return "master"
    if any(k in name for k in ("fp16", "bf16", "bit16", "lp_param", "param")):
        return "params"
    return "buffers"


def model_state_bytes(engine) -> Dict[str, int]:
    """This rank's bytes by category (see the module doc)."""
    ledger = Ledger()
    params = list({id(p): p for p in engine.model.parameters()}.values())
    for p in params:  # the weights the forward uses
        ledger.add(getattr(p, "ds_tensor", None), "params")
        ledger.add(p.data, "params")
    inner = engine.inner_optimizer
    for state in inner.state.values():
        for key, t in state.items():
            if key != "step":
                ledger.add(t, "states")
    wrapper = engine.ds.optimizer
    masters = [(k, v) for k, v in vars(wrapper).items() if "fp32" in k.lower() and "grad" not in k.lower()]
    for _, v in masters if wrapper is not inner else ():
        ledger.walk(v, "master")
    for p in params:
        ledger.add(p.grad, "grads")
    if wrapper is not inner:
        for k, v in vars(wrapper).items():
            if k != "optimizer":
                ledger.walk(v, _category(k))
    return ledger.bytes


def _world(rank, world, args):
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    os.environ["FORGE_OPS"] = "reference"
    import torch.distributed as dist

    from forge_dist import ModelConfig
    from forge_dist.model.gpt import GPT
    from forge_dist.train.context import RunContext
    from forge_dist.train.deepspeed_engine import deepspeed_engine_factory
    from forge_dist.train.options import TrainConfig

    cfg = ModelConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                      vocab_size=args.vocab_size, dropout=0.0)
    rows = []
    for precision in ("bf16", "fp32"):
        for stage in range(4):
            torch.manual_seed(0)
            model = GPT(cfg)
            psi = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
            tc = TrainConfig(batch_size=2, gradient_accumulation_steps=2, device="cpu",
                             dtype="bfloat16" if precision == "bf16" else "float32", grad_clip=1.0)
            ds = {"bf16": {"enabled": precision == "bf16"}, "steps_per_print": 10 ** 6,
                  "zero_optimization": {"stage": stage, "reduce_bucket_size": "auto",
                                        "stage3_param_persistence_threshold": 0}}
            ctx = RunContext(rank=rank, world_size=world, dp_rank=rank, dp_size=world)
            engine = deepspeed_engine_factory(model, tc, {"deepspeed_config": ds}, ctx)
            g = torch.Generator().manual_seed(rank)
            batch = [(torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=g),) * 2] * 2
            for _ in range(2):  # the optimizer states exist after the first step
                engine.forward_backward(batch)
                engine.step(1e-4)
            _, loss = engine.ds(*batch[0])  # the first micro-batch of an accumulation: gradients held
            engine.ds.backward(loss)
            measured = model_state_bytes(engine)
            gathered = [None] * world
            dist.all_gather_object(gathered, measured)
            rows.append((precision, stage, psi, gathered))
            del engine, model
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dp", type=int, nargs="+", default=[2, 4], help="data-parallel sizes (one world each)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--vocab_size", type=int, default=512)
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from forge_dist.testing.spawn import spawn

    print(f"# bench/zero_memory.py {datetime.date.today()} on {platform.machine()} {platform.processor() or ''} "
          f"({os.cpu_count()} cores), torch {torch.__version__}")
    print(f"# GPT n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} block_size={args.block_size} "
          f"vocab_size={args.vocab_size}; bytes per rank = max over ranks; ratio = measured model states / formula")
    print("| N | precision | stage | psi | params | grads | master | states | model states (MB) | formula "
          "| formula (MB) | ratio | buffers (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.dp:
        for precision, stage, psi, per_rank in spawn(_world, n, args, timeout=1200):
            worst = max(per_rank, key=lambda b: sum(b[c] for c in CATEGORIES[:4]))
            total = sum(worst[c] for c in CATEGORIES[:4])
            formula = FORMULAS[precision][stage](n) * psi
            per = {c: f"{worst[c] / psi:.2f} psi" for c in CATEGORIES[:4]}
            print(f"| {n} | {precision} | {stage} | {psi} | {per['params']} | {per['grads']} | {per['master']} | "
                  f"{per['states']} | {total / 2**20:.2f} | {FORMULA_TEXT[precision][stage]} | "
                  f"{formula / 2**20:.2f} | {total / formula:.3f} | {worst['buffers'] / 2**20:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
